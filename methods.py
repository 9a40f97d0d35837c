"""How each method of the paper's comparison uses its networks in one training step and in an
evaluation (paper Sec. 3.2-3.4 for pcl, dk, dkel; Sec. 4.3 and SPEC.md Sec. 6 for the others).

train.py owns the loop, the optimizer, the run directory and the command line; a method object
here owns the networks of one method and answers five questions: which views a step needs
(`num_views`), the loss of a step and its named parts (`loss`), what happens after every
optimizer step (`after_step`: the EMA of Eq. (5)), the test logits of every output
(`eval_logits`, SPEC.md Sec. 4) and which of them is the deployed model (`deployed_keys`,
`deployable`).

The six compared methods of Table 1 (SPEC.md Sec. 6) share one wiring, `PeerMethod`: one
MultiPeerNet (M independent networks for DML and KDCL, a shared trunk and M branches for ONE,
CL and OKDDip, one plain network for the baseline) plus at most one small piece from models.py,
no teacher. Every network or branch is evaluated as `student_peer{i}` (OKDDip's group leader as
`leader`), their ensemble as `student_ensemble`; the deployed model is network / branch 0, or
OKDDip's leader.
"""
import argparse
from typing import NamedTuple

import torch

from ema import independent_teacher, initialise_teacher, peer_mean_teacher
from losses import baseline_loss, cl_loss, dml_loss, kdcl_loss, okddip_loss, one_loss, online_kd_loss
from models import ARCHS, Gate, MultiPeerNet, PeerAttention, scale_gradient, trunk_channels


class OnlineDistillation:
    """The student, its teacher, and how a step and an evaluation use them (pcl, dk, dkel)."""

    def __init__(self, args: argparse.Namespace, num_classes: int, device: torch.device):
        self.args = args
        self.student = MultiPeerNet(args.arch, num_classes, args.num_peers).to(device)
        make_teacher = peer_mean_teacher if args.method == "pcl" else independent_teacher
        self.ema = make_teacher(self.student, args.ema_decay, args.authors_ema_warmup)
        # NHWC convolutions: the tensor cores' layout on CUDA, and about 1.3x faster than NCHW for
        # resnet32 on this project's 2-core CPU as well (oneDNN).
        self.student.to(memory_format=torch.channels_last)
        self.ema.teacher.to(memory_format=torch.channels_last)
        self.student_forward = torch.compile(self.student) if args.compile else self.student
        self.teacher_forward = torch.compile(self.ema.teacher) if args.compile else self.ema.teacher
        self.num_views = args.num_peers  # every peer its own augmented view (Sec. 3.2)

    def teacher_logits(self, views: torch.Tensor, student_trunk: torch.Tensor) -> torch.Tensor:
        """Teacher peer logits t_j (M, B, C), under no_grad: the teacher learns only by Eq. (5)."""
        with torch.no_grad():
            if self.args.method == "pcl":  # PCL: EMA branches on the student's own trunk features
                return self.student.run_peers(student_trunk, peers=self.ema.teacher)[0]
            return self.teacher_forward(views).logits

    def loss(self, views: torch.Tensor, labels: torch.Tensor, weights: dict[str, float]):
        out = self.student_forward(views)
        teacher_logits = self.teacher_logits(views, out.trunk)
        loss, parts = online_kd_loss(self.args.method, out.logits, out.ensemble, teacher_logits, labels,
                                     temperature=self.args.temperature, kd_weight=self.args.kd_weight,
                                     rampup_weight=weights["rampup"], ensemble_weight=weights["w"])
        parts["correct"] = (out.logits.argmax(-1) == labels).float().mean(-1).mean()
        parts["logit_norm"] = teacher_logits.float().norm(dim=-1).mean()  # collapse watch
        return loss, parts

    def after_step(self, step: int) -> None:
        self.ema.update(step)

    def initialise(self, batches) -> None:
        """Sec. 3.3: train the copied independent teacher alone for k CE iterations."""
        if self.args.method != "pcl" and self.args.init_iters > 0:
            initialise_teacher(self.ema.teacher, batches, self.args.init_iters, self.args.init_lr)

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """SPEC.md Sec. 4: every student peer, e, every teacher peer, the teacher ensemble."""
        out = self.student(images)  # the same image to every peer
        teacher = self.teacher_logits(images, out.trunk)
        logits = {f"student_peer{i}": out.logits[i] for i in range(self.args.num_peers)}
        logits["student_ensemble"] = out.ensemble
        logits.update({f"teacher_peer{i}": teacher[i] for i in range(self.args.num_peers)})
        logits["teacher_ensemble"] = teacher.float().mean(0)
        return logits

    def deployed_keys(self) -> list[str]:
        return [f"teacher_peer{i}" for i in range(self.args.num_peers)]

    def deployable(self, peer: int) -> torch.nn.Module:
        """The teacher's trunk (PCL: the student's, which its peer mean teacher runs on) + one
        teacher branch (SPEC.md Sec. 4)."""
        if self.args.method != "pcl":
            return self.ema.teacher.deployable(peer)
        deployed = self.student.deployable(peer)
        deployed.peer.load_state_dict(self.ema.teacher[peer].state_dict())
        return deployed

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, "teacher": self.ema.teacher}

    def set_mode(self, train: bool) -> None:
        # Teacher in train mode while training: batch-statistics BatchNorm (ema.py, Mean Teacher).
        for module in self.modules().values():
            module.train(train)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.student.parameters())


# ----------------------------------------------------------------------------- Table 1 (SPEC.md Sec. 6)
class Outputs(NamedTuple):
    logits: torch.Tensor                    # (M, B, C): every network or branch
    ensemble: torch.Tensor | None           # (B, C): the method's ensemble; None for the baseline
    attention: torch.Tensor | None = None   # (B, M-1, M-1): OKDDip's alpha


class PeerMethod:
    """What the compared methods share: one network (and a piece), nothing after a step, no
    initialisation; the deployed model is the network or branch `deployed_peer`. A subclass
    gives `outputs(images)` and `objective(outputs, labels, weights)`."""
    num_views = 1      # the same augmented batch for every network or branch
    deployed_peer = 0

    def __init__(self, args: argparse.Namespace, device: torch.device, net: MultiPeerNet,
                 **pieces: torch.nn.Module):
        self.args, self.net, self.pieces = args, net, pieces
        for module in self.modules().values():  # NHWC, as in OnlineDistillation
            module.to(device, memory_format=torch.channels_last)
        self.train_outputs = torch.compile(self.outputs) if args.compile else self.outputs

    def distill_scale(self, weights: dict[str, float]) -> dict[str, float]:
        """Keyword arguments of a distillation term: T, lambda and r(ep) (SPEC.md Sec. 6)."""
        return {"temperature": self.args.temperature, "kd_weight": self.args.kd_weight,
                "rampup_weight": weights["rampup"]}

    def loss(self, views: torch.Tensor, labels: torch.Tensor, weights: dict[str, float]):
        out = self.train_outputs(views if self.num_views > 1 else views[0])
        loss, parts = self.objective(out, labels, weights)
        parts["correct"] = (out.logits.argmax(-1) == labels).float().mean()  # over networks and images
        parts["logit_norm"] = out.logits[self.deployed_peer].float().norm(dim=-1).mean()  # collapse watch
        return loss, parts

    def after_step(self, step: int) -> None:
        """No teacher to update."""

    def initialise(self, batches) -> None:
        """No teacher to initialise."""

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

    def deployable(self, index: int) -> torch.nn.Module:
        return self.net.deployable(self.deployed_peer)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.net, **self.pieces}

    def set_mode(self, train: bool) -> None:
        for module in self.modules().values():
            module.train(train)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.modules().values() for p in module.parameters()]


class Baseline(PeerMethod):
    """One plain network, cross-entropy only."""

    def __init__(self, args: argparse.Namespace, num_classes: int, device: torch.device):
        super().__init__(args, device, MultiPeerNet(args.arch, num_classes, 1, ensemble_head=False))

    def outputs(self, images: torch.Tensor) -> Outputs:
        return Outputs(self.net(images).logits, None)

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return baseline_loss(out.logits, labels)


class DML(PeerMethod):
    """DML: M independent networks on the same augmented batch (Zhang et al. 2018)."""

    def __init__(self, args: argparse.Namespace, num_classes: int, device: torch.device):
        super().__init__(args, device, MultiPeerNet(args.arch, num_classes, args.num_peers,
                                                    ensemble_head=False, shared_trunk=False))

    def outputs(self, images: torch.Tensor) -> Outputs:
        logits = self.net(images).logits                              # (M, B, C)
        return Outputs(logits, logits.float().mean(0))

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return dml_loss(out.logits, labels, temperature=self.args.temperature, kd_weight=self.args.kd_weight)


class KDCL(DML):
    """KDCL-MinLogit: M independent networks, each on its own augmented view (Guo et al. 2020)."""

    def __init__(self, args: argparse.Namespace, num_classes: int, device: torch.device):
        super().__init__(args, num_classes, device)
        self.num_views = args.num_peers

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return kdcl_loss(out.logits, labels, **self.distill_scale(weights))


class ONE(PeerMethod):
    """ONE: shared trunk, M branches and a gate on the trunk feature (Lan et al. 2018); one view,
    since the gate reads the one trunk feature that every branch starts from."""

    def __init__(self, args: argparse.Namespace, num_classes: int, device: torch.device):
        net = MultiPeerNet(args.arch, num_classes, args.num_peers, ensemble_head=False)
        super().__init__(args, device, net, gate=Gate(trunk_channels(args.arch), args.num_peers))

    def outputs(self, images: torch.Tensor) -> Outputs:
        trunk_out = self.net.run_trunk(images)                        # (1, B, ...)
        logits, _ = self.net.run_peers(trunk_out)                     # (M, B, C)
        gates = self.pieces["gate"](trunk_out[0])                     # (B, M)
        # ONE: z_e = sum_i g_i z_i
        return Outputs(logits, torch.einsum("bm,mbc->bc", gates, logits.float()))

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return one_loss(out.logits, out.ensemble, labels, **self.distill_scale(weights))


class CL(PeerMethod):
    """CL-ILR: shared trunk, M heads, the trunk's gradient scaled by 1/M (Song & Chai 2018).
    NOTE(paper): as in CL, the heads share one input image (one view), SPEC.md Sec. 6."""

    def __init__(self, args: argparse.Namespace, num_classes: int, device: torch.device):
        super().__init__(args, device, MultiPeerNet(args.arch, num_classes, args.num_peers, ensemble_head=False))

    def outputs(self, images: torch.Tensor) -> Outputs:
        trunk_out = self.net.run_trunk(images)                        # (1, B, ...)
        # CL backpropagation rescaling: identity forward, 1/M of the heads' summed gradient back.
        logits, _ = self.net.run_peers(scale_gradient(trunk_out, 1.0 / self.net.num_peers))
        return Outputs(logits, logits.float().mean(0))

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return cl_loss(out.logits, labels, **self.distill_scale(weights))


class OKDDip(PeerMethod):
    """OKDDip: shared trunk, M-1 auxiliary peers and a group leader, the last branch, which is
    deployed; attention over the auxiliary peers' features (Chen et al. 2020).
    NOTE(paper): as in the authors' code, every branch sees the same input image (one view)."""
    deployed_peer = -1

    def __init__(self, args: argparse.Namespace, num_classes: int, device: torch.device):
        net = MultiPeerNet(args.arch, num_classes, args.num_peers, ensemble_head=False)
        super().__init__(args, device, net, attention=PeerAttention(ARCHS[args.arch]().feature_dim))

    def outputs(self, images: torch.Tensor) -> Outputs:
        logits, feats = self.net.run_peers(self.net.run_trunk(images))  # (M, B, C), (M, B, D)
        attention = self.pieces["attention"](feats[:-1])                # (B, M-1, M-1)
        return Outputs(logits, logits[:-1].float().mean(0), attention)  # ensemble: auxiliary peers

    def objective(self, out: Outputs, labels: torch.Tensor, weights: dict[str, float]):
        return okddip_loss(out.logits[:-1], out.logits[-1], out.attention, labels, **self.distill_scale(weights))

    def output_names(self) -> list[str]:
        return [f"student_peer{i}" for i in range(self.net.num_peers - 1)] + ["leader"]


TABLE1 = {"baseline": Baseline, "dml": DML, "kdcl": KDCL, "one": ONE, "cl": CL, "okddip": OKDDip}
METHODS = ("dkel", "dk", "pcl", *TABLE1)


def build_method(args: argparse.Namespace, num_classes: int, device: torch.device):
    """The method object of `args.method`: pcl/dk/dkel share OnlineDistillation, the others above."""
    if args.method in TABLE1:
        return TABLE1[args.method](args, num_classes, device)
    return OnlineDistillation(args, num_classes, device)
