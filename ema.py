"""The temporal mean teacher: Eq. (5), and the two teachers of PCL (Sec. 3.2) and DKEL (Sec. 3.3).

Two teachers follow the student by an exponential moving average (EMA) of its parameters:
- PCL's peer mean teacher (Sec. 3.2): an EMA copy of the student's peer branches only. It runs
  on the *student's own* trunk features, so teacher and student share the backbone, which is
  the homogenisation the paper blames for collapse (Sec. 3.3). (The authors' code builds it as
  a whole EMA network instead: `PeerMeanNetwork`, opt-in.)
- DKEL's independent teacher (Sec. 3.3): a whole network of the same architecture (its own
  trunk and peers, no parameter shared with the student), initialised by copying the student
  and then training it alone for a few cross-entropy iterations (`initialise_teacher`), so that
  its "decoupled knowledge" is useful from the first step.

BatchNorm policy (as in Mean Teacher): the EMA covers parameters only. The teacher runs in train
mode during training, so its BatchNorm normalises with the statistics of the current batch and
keeps its own running statistics, which evaluation uses.
"""
import copy

import torch
import torch.nn as nn

from losses import cross_entropy_per_peer
from models import DeployableNet, MultiPeerNet, PeerOutputs


class EMATeacher:
    """The EMA over every parameter that teacher and student share by name.

    The teacher's parameters are paired with the student's once; an update is then one fused
    multi-tensor operation (`torch._foreach_lerp_`) over all of them.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, ema_decay: float,
                 authors_warmup: bool = False):
        student_params = dict(student.named_parameters())
        names = [name for name, _ in teacher.named_parameters()]
        missing = [name for name in names if name not in student_params]
        if missing:
            raise ValueError(f"teacher parameters without a student counterpart: {missing[:3]}")
        self.network = teacher.requires_grad_(False)  # the EMA copy: a whole network or the peer branches
        self.teacher_params = [p for _, p in teacher.named_parameters()]
        self.student_params = [student_params[name] for name in names]
        self.ema_decay = ema_decay
        self.authors_warmup = authors_warmup

    def ema_decay_at(self, step: int) -> float:
        """alpha of Eq. (5), constant (the paper)."""
        if self.authors_warmup:
            # DEVIATION (opt-in, docs/spec.md Sec. 8): the authors' code warms the decay up,
            # alpha = min(1 - 1/(step + 1), alpha), which makes the teacher a copy of the student
            # at step 0 and so erases the initialisation of Sec. 3.3.
            return min(1.0 - 1.0 / (step + 1), self.ema_decay)
        return self.ema_decay

    @torch.no_grad()
    def update(self, step: int = 0) -> None:
        """Call after every optimizer step of the student; `step` counts those steps from 0."""
        self.follow(self.ema_decay_at(step))

    def follow(self, ema_decay: float | torch.Tensor) -> None:
        """Eq. (5) at a given alpha, a float or (in the compiled step, infra/compiled.py) a
        0-dim tensor; called without gradient tracking."""
        # Eq. (5): theta_T <- alpha * theta_T + (1 - alpha) * theta_S
        #          (lerp: theta_T + (1 - alpha) * (theta_S - theta_T), one fused kernel).
        torch._foreach_lerp_(self.teacher_params, self.student_params, 1.0 - ema_decay)


class PeerMeanTeacher(EMATeacher):
    """PCL's peer mean teacher t~ (Eq. (4)): the EMA of the student's peer branches, run on the
    student's own trunk features. Its distillation term is L_pm."""
    term = "pm"

    def __init__(self, student: MultiPeerNet, ema_decay: float, authors_warmup: bool = False):
        super().__init__(copy.deepcopy(student.peers), student.peers, ema_decay, authors_warmup)
        self.student = student

    def logits(self, views: torch.Tensor, student_out: PeerOutputs) -> torch.Tensor:
        """t~_j: the EMA branch j on the student's trunk features of view j, (M, B, C)."""
        return self.student.run_peers(student_out.trunk, peers=self.network)[0]

    def deployable(self, peer: int) -> DeployableNet:
        """The student's trunk (which the peer mean teacher runs on) + EMA branch `peer`."""
        deployed = self.student.deployable(peer)
        deployed.peer.load_state_dict(self.network[peer].state_dict())
        return deployed


class IndependentTeacher(EMATeacher):
    """DK / DKEL (Eq. (6)): an independent network of the student's architecture, without an
    ensemble head (the teacher's ensemble is the mean of its peers' logits, Eq. (10)). Its
    distillation term is L_dk.

    Sec. 3.3, step 1: copy the student's weights into the teacher (step 2, the k cross-entropy
    iterations, is `initialise_teacher`).
    """
    term = "dk"

    def __init__(self, student: MultiPeerNet, ema_decay: float, authors_warmup: bool = False):
        teacher = copy.deepcopy(student)
        teacher.ensemble_head = None
        super().__init__(teacher, student, ema_decay, authors_warmup)
        self.forward = teacher  # the loop may replace it by a compiled one (train.py --compile)

    def logits(self, views: torch.Tensor, student_out: PeerOutputs) -> torch.Tensor:
        """t_j: teacher peer j on its own view x_j, (M, B, C)."""
        return self.forward(views).logits

    def deployable(self, peer: int) -> DeployableNet:
        """The teacher's trunk + its branch `peer` (docs/spec.md Sec. 4)."""
        return self.network.deployable(peer)


class PeerMeanNetwork(IndependentTeacher):
    """PCL's temporal mean teacher as the authors' code builds it (--authors-pcl-teacher): a
    whole EMA copy of the student network, its own trunk included, each peer on its own view, and
    no initialisation (PCL has none). Its distillation term is L_pm, as PeerMeanTeacher's; only
    the trunk differs: the EMA trunk instead of the student's own (docs/spec.md Sec. 2, 8)."""
    term = "pm"


def initialise_teacher(teacher: MultiPeerNet, batches, iters: int, lr: float,
                       weight_decay: float = 0.0) -> list[float]:
    """Sec. 3.3, step 2: train the copied teacher alone with cross-entropy for `iters` iterations
    of plain SGD (the paper: 1 iteration at lr 0.01, Sec. 4.2).
    NOTE(paper): the paper names neither momentum nor weight decay for these steps; our reading is
    plain SGD without either (`weight_decay` 0; the authors' code uses 5e-4, docs/spec.md Sec. 8).

    The loss is the mean over the teacher's peers of L_ce(t_j(x_j), y), each peer on its own view.
    Batches are (views (M, B, 3, H, W), labels (B,)). Returns the loss of each iteration.
    """
    params = list(teacher.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=weight_decay)
    teacher.train()
    losses = []
    batch_iter = iter(batches)
    for _ in range(iters):
        views, labels = next(batch_iter)
        logits = teacher(views).logits                                      # (M, B, C)
        loss = cross_entropy_per_peer(logits, labels).mean()               # mean over peers of L_ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for p in params:  # from here on the teacher follows Eq. (5) alone
        p.requires_grad_(False)
        p.grad = None
    return losses
