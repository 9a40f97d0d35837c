"""The temporal mean teacher: Eq. (5) and the teacher initialisation of Sec. 3.3.

Two teachers follow the student by an exponential moving average (EMA) of its parameters:
- PCL's peer mean teacher (Sec. 3.2): an EMA copy of the student's peer branches only. It runs
  on the *student's own* trunk features, so teacher and student share the backbone, which is
  the homogenisation the paper blames for collapse (Sec. 3.3).
- DKEL's independent teacher (Sec. 3.3): a whole network of the same architecture (its own
  trunk and peers, no parameter shared with the student), initialised by copying the student
  and then training it alone for a few cross-entropy iterations, so that its "decoupled
  knowledge" is useful from the first step.

BatchNorm policy (as in Mean Teacher): the EMA covers parameters only. The teacher runs in train
mode during training, so its BatchNorm normalises with the statistics of the current batch and
keeps its own running statistics, which evaluation uses.
"""
import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from losses import cross_entropy_per_peer
from models import MultiPeerNet


class EMATeacher:
    """Eq. (5) over every parameter that teacher and student share by name.

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
        self.teacher = teacher.requires_grad_(False)
        self.teacher_params = [p for _, p in teacher.named_parameters()]
        self.student_params = [student_params[name] for name in names]
        self.ema_decay = ema_decay
        self.authors_warmup = authors_warmup

    def decay_at(self, step: int) -> float:
        """alpha, constant. With `authors_warmup` (the authors' code, SPEC.md Sec. 8):
        min(1 - 1/(step + 1), alpha), which makes the teacher a copy of the student at step 0 and
        so erases the initialisation of Sec. 3.3."""
        if self.authors_warmup:
            return min(1.0 - 1.0 / (step + 1), self.ema_decay)
        return self.ema_decay

    @torch.no_grad()
    def update(self, step: int = 0) -> None:
        """Call after every optimizer step of the student; `step` counts those steps from 0."""
        ema_decay = self.decay_at(step)
        # Eq. (5): theta_T <- alpha * theta_T + (1 - alpha) * theta_S
        #          (lerp: theta_T + (1 - alpha) * (theta_S - theta_T), one fused kernel).
        torch._foreach_lerp_(self.teacher_params, self.student_params, 1.0 - ema_decay)


def peer_mean_teacher(student: MultiPeerNet, ema_decay: float, authors_warmup: bool = False) -> EMATeacher:
    """PCL (Eq. (4)): the EMA of the student's peer branches, to be run on the student's trunk
    output through `student.run_peers(trunk_out, peers=teacher.teacher)`."""
    return EMATeacher(copy.deepcopy(student.peers), student.peers, ema_decay, authors_warmup)


def independent_teacher(student: MultiPeerNet, ema_decay: float, authors_warmup: bool = False) -> EMATeacher:
    """DK / DKEL (Eq. (6)): an independent network of the student's architecture, without an
    ensemble head (the teacher's ensemble is the mean of its peers' logits, Eq. (10)).

    Sec. 3.3, step 1: copy the student's weights into the teacher.
    """
    teacher = copy.deepcopy(student)
    teacher.ensemble_head = None
    return EMATeacher(teacher, student, ema_decay, authors_warmup)


def initialise_teacher(teacher: MultiPeerNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       iters: int, lr: float) -> list[float]:
    """Sec. 3.3, step 2: train the teacher alone with cross-entropy for `iters` iterations of plain
    SGD (no momentum, no weight decay) at learning rate `lr` (paper: 1 iteration at 0.01).

    The loss is the mean over the teacher's peers of L_ce(t_j(x_j), y), each peer on its own view.
    Batches are (views (M, B, 3, H, W), labels (B,)). Returns the loss of each iteration.
    """
    params = list(teacher.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    teacher.train()
    losses = []
    batch_iter: Iterator = iter(batches)
    for _ in range(iters):
        views, labels = next(batch_iter)
        loss = cross_entropy_per_peer(teacher(views).logits, labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return losses
