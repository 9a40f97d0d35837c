"""The methods DKEL is compared with in Tables 1 and 2 (paper Sec. 4.3; docs/spec.md Sec. 6), whole:
their networks and small pieces (ONE's gate, CL's gradient scaling, OKDDip's peer attention),
their objectives, and how a training step and an evaluation use them.

- `Baseline`: one plain network, cross-entropy only.
- `DML` (Zhang et al. 2018): M independent networks on the same batch, mutual KD.
- `KDCL` (Guo et al. 2020): M independent networks, each on its own view, MinLogit target.
- `ONE` (Lan et al. 2018): shared trunk, M branches, a gated ensemble as the target.
- `CL` (Song & Chai 2018, CL-ILR): shared trunk, M heads, the trunk's gradient scaled by 1/M.
- `OKDDip` (Chen et al. 2020): shared trunk, M-1 auxiliary peers and a group leader, attention
  over the auxiliary peers.
- `KD` (Hinton et al. 2015, Table 2's "KD" row): offline KD, one network and a frozen teacher,
  the deployed model of a finished run.

They reuse the paper's building blocks (models.MultiPeerNet, the KD loss of Eq. (1) and its
leave-one-out forms from losses.py) and none of its EMA teachers. Each is a methods.Method, the one
interface the training loop calls: no initialisation and nothing after a step; `num_views` = M
for KDCL alone, which gives every network its own augmented view.

Logits (M, B, C): the M networks or branches; labels (B,). Every distillation target is detached
except OKDDip's attention target t_a, through which alone W_Q and W_K learn (docs/spec.md). Every
distillation term is scaled by lambda * r(ep) (PCL's weight and ramp-up, docs/spec.md Sec. 6),
except DML's, which has no ramp-up.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import ARCHS, global_pool
from losses import (cross_entropy_per_peer, kd_loss, leave_one_out_kd, peer_ensemble_kd,
                    teacher_ensemble_without_self)
from methods import Method
from models import MultiPeerNet, multi_peer_net
def _named(total: torch.Tensor,
           **parts: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the objective, its parts detached for logging)."""
    return total, {name: value.detach() for name, value in parts.items()}


# ----------------------------------------------------------------------------- objectives
def baseline_loss(logits: torch.Tensor, labels: torch.Tensor):
    """Baseline: one plain network (M = 1) trained with cross-entropy alone."""
    ce = cross_entropy_per_peer(logits, labels).sum()
    return _named(ce, ce=ce)


def dml_loss(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, kd_weight: float):
    """DML: the mutual KD of M networks, summed over them.

    NOTE(paper): DML updates the networks one after the other, each against the others' fresh
    predictions; here all M are updated in one step against the same step's (detached)
    predictions, the usual joint reading. docs/spec.md: T = `temperature` with the T^2 of Eq. (1)
    (DML itself uses T = 1), and no ramp-up. NOTE(paper): lambda (`kd_weight`) scales DML's KD
    term as it scales every other method's (docs/spec.md Sec. 6; DML itself has no lambda).
    """
    ce = cross_entropy_per_peer(logits, labels).sum()
    # L_kd(z_l, z_k) for every ordered pair l != k, the target z_l detached.
    kd = leave_one_out_kd(logits, logits, temperature).sum()
    # DML: L = sum_k [ L_ce(z_k, y) + lambda 1/(M-1) sum_{l != k} L_kd(z_l, z_k) ]
    return _named(ce + kd_weight * kd, ce=ce, kd=kd)


def offline_kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                    temperature: float, kd_weight: float, rampup: float):
    """Offline KD: the one network's logits (1, B, C) learn from the labels and from the frozen
    teacher's logits t (B, C), detached: the teacher is never trained.
    NOTE(paper): lambda r(ep) scales the KD term as it scales every compared method's
    (docs/spec.md)."""
    ce = cross_entropy_per_peer(logits, labels).sum()
    kd = kd_loss(teacher_logits.detach()[None], logits, temperature).sum()
    # KD: L = L_ce(s, y) + lambda r(ep) L_kd(t, s), L_kd of Eq. (1) at temperature T
    return _named(ce + kd_weight * rampup * kd, ce=ce, kd=kd)


def min_logit_target(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KDCL-MinLogit's soft target: every network's logits shifted so that its true-class logit
    is 0, then the element-wise minimum over networks: (M, B, C) x (B,) -> (B, C)."""
    index = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)       # (M, B, 1)
    shifted = logits - logits.gather(-1, index)                        # (M, B, C): z_k,c - z_k,y
    # z_t,c = min_k (z_k,c - z_k,y)
    return shifted.amin(0)                                             # (B, C)


def kdcl_loss(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, kd_weight: float,
              rampup: float):
    """KDCL-MinLogit: network k on its own augmented view x_k learns from the detached MinLogit
    target z_t of the M views' logits."""
    ce = cross_entropy_per_peer(logits, labels).sum()
    target = min_logit_target(logits.detach(), labels)                 # (B, C)
    kd = kd_loss(target[None], logits, temperature).sum()
    # KDCL: L = sum_k [ L_ce(z_k, y) + lambda r(ep) L_kd(z_t, z_k) ]
    return _named(ce + kd_weight * rampup * kd, ce=ce, kd=kd)


def one_loss(logits: torch.Tensor, ensemble_logits: torch.Tensor, labels: torch.Tensor, *,
             temperature: float, kd_weight: float, rampup: float):
    """ONE: the branches learn from the labels and from the gated ensemble z_e (B, C). z_e is
    detached as a target (docs/spec.md), so the gate learns from L_ce(z_e, y) alone. L_kd(z_e, z_i)
    is PCL's L_pe, hence the part names."""
    ce = cross_entropy_per_peer(logits, labels).sum()
    ce_ensemble = F.cross_entropy(ensemble_logits.float(), labels)
    pe = peer_ensemble_kd(ensemble_logits, logits, temperature).sum()
    # ONE: L = sum_i L_ce(z_i, y) + L_ce(z_e, y) + lambda r(ep) sum_i L_kd(z_e, z_i)
    return _named(ce + ce_ensemble + kd_weight * rampup * pe, ce=ce, ce_ensemble=ce_ensemble, pe=pe)


def cl_loss(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, kd_weight: float,
            rampup: float):
    """CL-ILR: every head h learns from the labels and from the mean of the other heads' logits.

    NOTE(paper): CL weights its two terms beta and 1 - beta (beta = 0.5); docs/spec.md gives every
    compared method the same lambda r(ep) on the distillation term instead.
    """
    ce = cross_entropy_per_peer(logits, labels).sum()
    # mean_{j != h} z_j for every head h: Eq. (10)'s leave-one-out mean, on the heads' own logits.
    targets = teacher_ensemble_without_self(logits.detach())           # (M, B, C)
    kd = kd_loss(targets, logits, temperature).sum()
    # CL: L = sum_h [ L_ce(z_h, y) + lambda r(ep) L_kd(mean_{j != h} z_j, z_h) ]
    return _named(ce + kd_weight * rampup * kd, ce=ce, kd=kd)


def attention_targets(peer_logits: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """OKDDip's peer ensemble teacher of every auxiliary peer a:
    (A, B, C) x (B, A, A) -> (A, B, C)."""
    # t_a = sum_b alpha_ab z_b: (B, A, A) @ (B, A, C) -> (B, A, C), back to (A, B, C).
    return (attention.float() @ peer_logits.float().transpose(0, 1)).transpose(0, 1)


def okddip_loss(peer_logits: torch.Tensor, leader_logits: torch.Tensor, attention: torch.Tensor,
                labels: torch.Tensor, *, temperature: float, kd_weight: float, rampup: float):
    """OKDDip: A = M-1 auxiliary peers z_a (A, B, C) learn from their attention targets t_a, the
    group leader z_L (B, C) from the auxiliary peers' mean; alpha (B, A, A).

    t_a is NOT detached (docs/spec.md, as in the authors' code): W_Q and W_K learn only through it.
    """
    ce = cross_entropy_per_peer(peer_logits, labels).sum()
    ce_leader = F.cross_entropy(leader_logits.float(), labels)
    kd = kd_loss(attention_targets(peer_logits, attention), peer_logits, temperature).sum()
    # NOTE(paper): the leader's target mean_a z_a is detached, as every other target is (our
    # reading, docs/spec.md Sec. 6). OKDDip's authors' code (train_GL.py) does not detach it: its
    # KL_Loss takes torch.mean(output_batch, dim=2) as it is, so there the leader's KD term also
    # trains the auxiliary peers.
    kd_leader = kd_loss(peer_logits.detach().float().mean(0), leader_logits, temperature)
    # OKDDip: L = sum_a L_ce(z_a, y) + L_ce(z_L, y) + lambda r(ep) [ sum_a L_kd(t_a, z_a)
    #             + L_kd(mean_a z_a, z_L) ]
    total = ce + ce_leader + kd_weight * rampup * (kd + kd_leader)
    return _named(total, ce=ce, ce_leader=ce_leader, kd=kd, kd_leader=kd_leader)


# ----------------------------------------------------------------------------- pieces
class GradientScale(torch.autograd.Function):
    """CL's "backpropagation rescaling" of the shared intermediate-level representation:
    identity forward, the incoming gradient times `factor` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """CL: with factor 1/M the trunk receives the mean, not the sum, of the M heads' gradients."""
    return GradientScale.apply(x, factor)


class Gate(nn.Module):
    """ONE's gate (the on-the-fly native ensemble): from the shared trunk feature,
    g = softmax(ReLU(BN(W pool(trunk)))), one weight per branch, g_i >= 0, sum_i g_i = 1."""

    def __init__(self, trunk_channels: int, num_peers: int):
        super().__init__()
        self.scores = nn.Sequential(global_pool(), nn.Linear(trunk_channels, num_peers),
                                    nn.BatchNorm1d(num_peers), nn.ReLU())

    def forward(self, trunk_out: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.scores(trunk_out).float(), dim=-1)       # (B, ...) -> (B, M)


def trunk_channels(arch: str) -> int:
    """Channels of an architecture's trunk output (the input of ONE's gate): one forward of a
    spare trunk in eval mode."""
    spec = ARCHS[arch]()
    with torch.no_grad():
        return spec.trunk().eval()(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape[1]


class PeerAttention(nn.Module):
    """OKDDip's peer ensemble teacher: attention among the A = M-1 auxiliary peers,
    alpha_ab = softmax_b((W_Q h_a) . (W_K h_b)), self included, where h_a is peer a's pooled
    feature f_a. Letters: A auxiliary peers, P projection width.

    NOTE(paper): the paper leaves the width of W_Q and W_K open; we take the authors' code,
    P = D / 8 (64 -> 8 for resnet32), without bias and without a 1/sqrt(P) scaling.
    """

    def __init__(self, feature_dim: int, reduction: int = 8):
        super().__init__()
        self.query = nn.Linear(feature_dim, feature_dim // reduction, bias=False)  # W_Q
        self.key = nn.Linear(feature_dim, feature_dim // reduction, bias=False)    # W_K

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        queries = self.query(feats).transpose(0, 1)                    # (B, A, P)
        keys = self.key(feats).transpose(0, 1)                         # (B, A, P)
        # alpha_ab = exp(q_a . k_b) / sum_f exp(q_a . k_f): every row sums to 1.
        return F.softmax((queries @ keys.transpose(1, 2)).float(), dim=-1)  # (B, A, A)


# ----------------------------------------------------------------------------- the methods
class Outputs(NamedTuple):
    logits: torch.Tensor                    # (M, B, C): every network or branch
    ensemble: torch.Tensor | None           # (B, C): the method's ensemble; None for the baseline
    attention: torch.Tensor | None = None   # (B, M-1, M-1): OKDDip's alpha
    teacher: torch.Tensor | None = None     # (B, C): KD's frozen teacher


class PeerMethod(Method):
    """What the compared methods share: one network (and a piece), no teacher; the deployed model
    is the network or branch `deployed_peer`. A subclass gives `outputs(images)` and
    `objective(outputs, labels, weights)`, `weights` holding the epoch's r(ep) as "rampup"."""
    deployed_peer = 0

    def __init__(self, net: MultiPeerNet, device: torch.device, **pieces: nn.Module):
        self.net, self.pieces = net, pieces
        for module in self.modules().values():
            module.to(device)
        super().__init__(self.outputs)

    def loss(self, views: torch.Tensor, labels: torch.Tensor, weights: dict[str, float]):
        out = self.training_forward(views if self.num_views > 1 else views[0])
        loss, parts = self.objective(out, labels, weights)
        # Over networks and images.
        parts["correct"] = (out.logits.argmax(-1) == labels).float().mean()
        # The collapse watch.
        parts["logit_norm"] = out.logits[self.deployed_peer].float().norm(dim=-1).mean()
        return loss, parts

    def output_names(self) -> list[str]:
        return [f"student_peer{i}" for i in range(self.net.num_peers)]

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.outputs(images)  # the same image to every network or branch
        logits = dict(zip(self.output_names(), out.logits))
        if out.ensemble is not None:
            logits["student_ensemble"] = out.ensemble
        return logits

    def deployed_keys(self) -> list[str]:
        return [self.output_names()[self.deployed_peer]]

    def deployable(self, name: str) -> nn.Module:
        """The network or branch of the output `name` as a plain network."""
        return self.net.deployable(self.output_names().index(name))

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.net, **self.pieces}


class Baseline(PeerMethod):
    """One plain network, cross-entropy only."""

    def __init__(self, arch: str, num_classes: int, device: torch.device):
        super().__init__(multi_peer_net(arch, num_classes, 1, ensemble_head=False), device)

    def outputs(self, images: torch.Tensor) -> Outputs:
        return Outputs(self.net(images).logits, None)

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return baseline_loss(out.logits, labels)


class DML(PeerMethod):
    """DML: M independent networks on the same augmented batch."""

    def __init__(self, arch: str, num_classes: int, num_peers: int, device: torch.device, *,
                 temperature: float, kd_weight: float):
        net = multi_peer_net(arch, num_classes, num_peers, ensemble_head=False, shared_trunk=False)
        super().__init__(net, device)
        self.temperature, self.kd_weight = temperature, kd_weight

    def outputs(self, images: torch.Tensor) -> Outputs:
        logits = self.net(images).logits                              # (M, B, C)
        return Outputs(logits, logits.float().mean(0))

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return dml_loss(out.logits, labels, temperature=self.temperature, kd_weight=self.kd_weight)


class KDCL(DML):
    """KDCL-MinLogit: M independent networks, each on its own augmented view."""

    def __init__(self, arch: str, num_classes: int, num_peers: int, device: torch.device, *,
                 temperature: float, kd_weight: float):
        super().__init__(arch, num_classes, num_peers, device, temperature=temperature,
                         kd_weight=kd_weight)
        self.num_views = num_peers

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return kdcl_loss(out.logits, labels, temperature=self.temperature, kd_weight=self.kd_weight,
                         rampup=weights["rampup"])


class SharedTrunkMethod(PeerMethod):
    """A shared trunk and M branches without the ensemble head of Eq. (3) (ONE, CL, OKDDip), one
    view, with the temperature and lambda of their distillation terms."""

    def __init__(self, arch: str, num_classes: int, num_peers: int, device: torch.device, *,
                 temperature: float, kd_weight: float):
        net = multi_peer_net(arch, num_classes, num_peers, ensemble_head=False)
        super().__init__(net, device, **self.make_pieces(arch, num_peers))
        self.temperature, self.kd_weight = temperature, kd_weight

    def make_pieces(self, arch: str, num_peers: int) -> dict[str, nn.Module]:
        """The method's own small modules, trained with the network (built after it)."""
        return {}

    def distill_scale(self, weights: dict[str, float]) -> dict[str, float]:
        """Keyword arguments of a distillation term: T, lambda and r(ep) (docs/spec.md Sec. 6)."""
        return {"temperature": self.temperature, "kd_weight": self.kd_weight,
                "rampup": weights["rampup"]}


class ONE(SharedTrunkMethod):
    """ONE: one view, since the gate reads the one trunk feature that every branch starts from."""

    def make_pieces(self, arch: str, num_peers: int) -> dict[str, nn.Module]:
        return {"gate": Gate(trunk_channels(arch), num_peers)}

    def outputs(self, images: torch.Tensor) -> Outputs:
        trunk_out = self.net.run_trunk(images)                        # (1, B, ...)
        logits, _ = self.net.run_peers(trunk_out)                     # (M, B, C)
        gates = self.pieces["gate"](trunk_out[0])                     # (B, M)
        # ONE: z_e = sum_i g_i z_i
        return Outputs(logits, torch.einsum("bm,mbc->bc", gates, logits.float()))

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return one_loss(out.logits, out.ensemble, labels, **self.distill_scale(weights))


class CL(SharedTrunkMethod):
    """CL-ILR: the trunk's gradient scaled by 1/M.
    NOTE(paper): as in CL, the heads share one input image (one view), docs/spec.md Sec. 6."""

    def outputs(self, images: torch.Tensor) -> Outputs:
        trunk_out = self.net.run_trunk(images)                        # (1, B, ...)
        # CL backpropagation rescaling: identity forward, 1/M of the heads' summed gradient back.
        logits, _ = self.net.run_peers(scale_gradient(trunk_out, 1.0 / self.net.num_peers))
        return Outputs(logits, logits.float().mean(0))

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return cl_loss(out.logits, labels, **self.distill_scale(weights))


class OKDDip(SharedTrunkMethod):
    """OKDDip: the last branch is the group leader, which is deployed.
    NOTE(paper): as in the authors' code, every branch sees the same input image (one view)."""
    deployed_peer = -1

    def make_pieces(self, arch: str, num_peers: int) -> dict[str, nn.Module]:
        return {"attention": PeerAttention(ARCHS[arch]().feature_dim)}

    def outputs(self, images: torch.Tensor) -> Outputs:
        logits, feats = self.net.run_peers(self.net.run_trunk(images))  # (M, B, C), (M, B, D)
        attention = self.pieces["attention"](feats[:-1])                # (B, M-1, M-1)
        return Outputs(logits, logits[:-1].float().mean(0), attention)  # ensemble: auxiliary peers

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return okddip_loss(out.logits[:-1], out.logits[-1], out.attention, labels,
                           **self.distill_scale(weights))

    def output_names(self) -> list[str]:
        return [f"student_peer{i}" for i in range(self.net.num_peers - 1)] + ["leader"]


class KD(PeerMethod):
    """Offline KD: one plain network learns from a frozen teacher network, the deployed model of
    a finished run (train.py loads it with rundir.load_teacher, which checks that its classes,
    image size and data set are this run's; any architecture). The teacher is not one of
    `modules()`: it is neither trained nor checkpointed (a resumed run reloads it from
    `teacher_run`), and it stays in eval mode throughout."""

    def __init__(self, arch: str, num_classes: int, teacher: nn.Module, device: torch.device, *,
                 temperature: float, kd_weight: float):
        super().__init__(multi_peer_net(arch, num_classes, 1, ensemble_head=False), device)
        self.teacher = teacher.to(device)
        self.temperature, self.kd_weight = temperature, kd_weight

    def outputs(self, images: torch.Tensor) -> Outputs:
        with torch.no_grad():  # the teacher gives a constant target; nothing of it is learned
            teacher = self.teacher(images)                             # (B, C)
        return Outputs(self.net(images).logits, None, teacher=teacher)

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return offline_kd_loss(out.logits, out.teacher, labels, temperature=self.temperature,
                               kd_weight=self.kd_weight, rampup=weights["rampup"])

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.outputs(images)
        return {"student_peer0": out.logits[0], "teacher": out.teacher}

    def set_mode(self, train: bool) -> None:
        super().set_mode(train)
        self.teacher.eval()   # frozen: eval-mode BatchNorm, its running statistics never move
