"""The paper's three online-distillation methods, PCL, DK and DKEL (Sec. 3.2-3.4, Table 3), and
`Method`, the one interface between a method and the training loop of train.py.

All three train the same multi-peer student (models.py: a shared trunk, M peers each on its own
augmented view, the Eq. (3) ensemble head) with one objective (losses.distillation_objective):
- PCL, Eq. (2): the peers learn from the labels, from the ensemble e (L_pe) and from PCL's peer
  mean teacher (L_pm), an EMA of the student's own branches (ema.PeerMeanTeacher).
- DK, Eq. (2) with L_dk of Eq. (6) for L_pm: the teacher is an independent network
  (ema.IndependentTeacher), copied from the student and trained alone for k iterations before
  training starts (Sec. 3.3, ema.initialise_teacher).
- DKEL, Eq. (12): DK plus the decaying ensemble term L_de of Eq. (9), weighted by w(ep).
After every optimizer step the teacher follows the student by Eq. (5) (`after_step`).

The compared methods of Tables 1 and 2 (baselines.py) implement the same `Method` interface.
"""
import abc

import torch
import torch.nn as nn

from ema import IndependentTeacher, PeerMeanNetwork, PeerMeanTeacher, initialise_teacher
from losses import distillation_objective
from models import MultiPeerNet


class Method(abc.ABC):
    """What the training loop may call of a method: the paper's interface, and nothing else.

    - The objective: `loss(views, labels, weights)` gives the loss of one step and its named,
      detached parts. `views` is (num_views, B, 3, H, W): every peer its own augmented view when
      `num_views` = M, one augmented batch for every network or branch when it is 1; `weights`
      holds the epoch's r(ep) ("rampup") and w(ep) ("ensemble_weight").
    - The step after the optimizer's: `after_step(step)` (Eq. (5) for an EMA teacher).
    - The initialisation, before the first epoch: `initialise(batches)` (Sec. 3.3).
    - The evaluation outputs: `eval_logits(images)` gives every output's logits (docs/spec.md
      Sec. 4); `deployed_keys()` are the deployed model's, and `deployable(key)` cuts that output
      out as a plain network.
    - The trainable parameters: `trainable_parameters()`, parameters or parameter groups whose
      "lr_scale" scales the learning rate (train.sgd); `modules()` are the networks a checkpoint
      holds.
    `training_forward` is the forward pass `loss` runs the student through: the loop may replace
    it by a wrapped one (torch.compile, DistributedDataParallel) computing the same function.
    """
    num_views = 1               # augmented views of each image that a step needs

    def __init__(self, training_forward):
        self.training_forward = training_forward

    @abc.abstractmethod
    def loss(self, views: torch.Tensor, labels: torch.Tensor, weights: dict[str, float]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective of one step and its parts, detached (with "correct" and "logit_norm")."""

    @abc.abstractmethod
    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The test logits (B, C) of every output, by name."""

    @abc.abstractmethod
    def deployed_keys(self) -> list[str]:
        """The outputs of `eval_logits` that are the deployed model."""

    @abc.abstractmethod
    def deployable(self, name: str) -> nn.Module:
        """The output `name` as a plain network mapping images (B, 3, H, W) to logits (B, C)."""

    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every module a checkpoint holds, by name."""

    def initialise(self, batches) -> None:
        """Before the first epoch, given an endless iterator of training batches: nothing."""

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (counted from 0): nothing."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that takes a gradient (an EMA teacher's take none)."""
        return [p for module in self.modules().values() for p in module.parameters()
                if p.requires_grad]

    def set_mode(self, train: bool) -> None:
        for module in self.modules().values():
            module.train(train)


class OnlineDistillation(Method):
    """The multi-peer student with the ensemble head of Eq. (3), its EMA teacher, and how a step
    and an evaluation use them. PCL, DK and DKEL differ only in the teacher (`make_teacher`), in
    its initialisation (`initialise`) and in w(ep) (`ensemble_weight`)."""

    def __init__(self, student: MultiPeerNet, *, temperature: float, kd_weight: float,
                 ema_decay: float, device: torch.device | str = "cpu",
                 authors_ema_warmup: bool = False, ensemble_lr_per_peer: bool = False):
        self.temperature, self.kd_weight = temperature, kd_weight
        self.ensemble_lr_per_peer = ensemble_lr_per_peer
        self.student = student.to(device)
        self.teacher = self.make_teacher(ema_decay, authors_ema_warmup)
        super().__init__(self.student)
        self.num_views = student.num_peers  # every peer its own augmented view (Sec. 3.2)

    @abc.abstractmethod
    def make_teacher(self, ema_decay: float, authors_warmup: bool):
        """The EMA teacher of the student (ema.py)."""

    def ensemble_weight(self, weights: dict[str, float]) -> float:
        """w(ep) of Eq. (12); Eq. (2) (PCL, DK) has no decaying-ensemble term: 0."""
        return 0.0

    def teacher_logits(self, views: torch.Tensor, student_out) -> torch.Tensor:
        """Teacher peer logits (M, B, C), under no_grad: the teacher learns only by Eq. (5), so
        every distillation target it gives is detached by construction."""
        with torch.no_grad():
            return self.teacher.logits(views, student_out)

    def loss(self, views: torch.Tensor, labels: torch.Tensor, weights: dict[str, float]):
        out = self.training_forward(views)
        teacher_logits = self.teacher_logits(views, out)                     # (M, B, C)
        loss, parts = distillation_objective(out.logits, out.ensemble, teacher_logits, labels,
                                             temperature=self.temperature,
                                             kd_weight=self.kd_weight, rampup=weights["rampup"],
                                             ensemble_weight=self.ensemble_weight(weights),
                                             teacher_term=self.teacher.term)  # "pm" or "dk"
        parts["correct"] = (out.logits.argmax(-1) == labels).float().mean(-1).mean()
        parts["logit_norm"] = teacher_logits.float().norm(dim=-1).mean()  # collapse watch
        return loss, parts

    def after_step(self, step: int) -> None:
        self.teacher.update(step)  # Eq. (5)

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """docs/spec.md Sec. 4: every student peer, e, every teacher peer, the teacher ensemble."""
        out = self.student(images)  # the same image to every peer
        teacher = self.teacher_logits(images, out)
        logits = {f"student_peer{i}": peer for i, peer in enumerate(out.logits)}
        logits["student_ensemble"] = out.ensemble
        logits.update({f"teacher_peer{i}": peer for i, peer in enumerate(teacher)})
        logits["teacher_ensemble"] = teacher.float().mean(0)
        return logits

    def deployed_keys(self) -> list[str]:
        return [f"teacher_peer{i}" for i in range(self.student.num_peers)]

    def deployable(self, name: str) -> nn.Module:
        """The teacher peer of the output `name` as a plain network (docs/spec.md Sec. 4)."""
        return self.teacher.deployable(self.deployed_keys().index(name))

    def modules(self) -> dict[str, nn.Module]:
        # The teacher stays in train mode while training: batch-statistics BatchNorm (ema.py).
        return {"student": self.student, "teacher": self.teacher.network}

    def trainable_parameters(self) -> list:
        """The student's parameters; with `ensemble_lr_per_peer`, two groups: the Eq. (3) head's
        at 1/M of the learning rate ("lr_scale", train.sgd), every other at the full rate."""
        parameters = super().trainable_parameters()
        if not self.ensemble_lr_per_peer:
            return parameters
        # NOTE(paper): a remedy the paper does not have (docs/training.md, "The start of
        # training"). h classifies the M stacked pooled features, all >= 0 (mean ~1 at
        # initialisation), so the curvature of L_ce(e, y) in h's weights is ~M times a peer
        # classifier's: lr * lambda_max(E[f f^T]) / C ~ 2.0 for resnet20 (M = 3, lr 0.1), past the
        # stability limit ~1.36 of Nesterov momentum 0.9. e's logits blow up in the first steps,
        # its gradient drives the pooled features to zero and the peers can stay at chance for an
        # epoch on some seeds. lr / M gives h a peer classifier's step size.
        head = list(self.student.ensemble_head.parameters())
        rest = [p for p in parameters if all(p is not q for q in head)]
        return [{"params": rest}, {"params": head, "lr_scale": 1.0 / self.student.num_peers}]


class PCL(OnlineDistillation):
    """Eq. (2): PCL's peer mean teacher (Eq. (4), L_pm), no initialisation (Table 3, row 1)."""

    def __init__(self, student: MultiPeerNet, *, temperature: float, kd_weight: float,
                 ema_decay: float, device: torch.device | str = "cpu",
                 authors_ema_warmup: bool = False, ensemble_lr_per_peer: bool = False,
                 authors_pcl_teacher: bool = False):
        self.authors_pcl_teacher = authors_pcl_teacher
        super().__init__(student, temperature=temperature, kd_weight=kd_weight,
                         ema_decay=ema_decay, device=device,
                         authors_ema_warmup=authors_ema_warmup,
                         ensemble_lr_per_peer=ensemble_lr_per_peer)

    def make_teacher(self, ema_decay: float, authors_warmup: bool):
        if self.authors_pcl_teacher:
            # DEVIATION (opt-in, docs/spec.md Sec. 8): the authors' code builds its temporal mean
            # teacher as a whole EMA copy of the student network, trunk included.
            return PeerMeanNetwork(self.student, ema_decay, authors_warmup)
        return PeerMeanTeacher(self.student, ema_decay, authors_warmup)


class DK(OnlineDistillation):
    """Eq. (2) with L_dk of Eq. (6): the independent teacher, initialised by Sec. 3.3."""

    def __init__(self, student: MultiPeerNet, *, temperature: float, kd_weight: float,
                 ema_decay: float, init_iters: int, init_lr: float,
                 device: torch.device | str = "cpu", authors_init: bool = False,
                 authors_ema_warmup: bool = False, ensemble_lr_per_peer: bool = False):
        super().__init__(student, temperature=temperature, kd_weight=kd_weight,
                         ema_decay=ema_decay, device=device,
                         authors_ema_warmup=authors_ema_warmup,
                         ensemble_lr_per_peer=ensemble_lr_per_peer)
        # Sec. 3.3's step 2: the paper's k iterations at --init-lr, no weight decay (our reading).
        self.init_iters, self.init_lr, self.init_weight_decay = init_iters, init_lr, 0.0
        if authors_init:
            # DEVIATION (opt-in, docs/spec.md Sec. 8): the authors' code runs k + 1 SGD steps (its
            # loop stops after the step at which its counter reaches k) at lr 0.001 with weight
            # decay 5e-4.
            self.init_iters, self.init_lr, self.init_weight_decay = init_iters + 1, 0.001, 5e-4

    def make_teacher(self, ema_decay: float, authors_warmup: bool):
        # Sec. 3.3, step 1: the teacher is a copy of the student.
        return IndependentTeacher(self.student, ema_decay, authors_warmup)

    def initialise(self, batches) -> None:
        """Sec. 3.3, step 2: the copied teacher trains alone with cross-entropy for k iterations."""
        if self.init_iters > 0:
            initialise_teacher(self.teacher.network, batches, self.init_iters, self.init_lr,
                               self.init_weight_decay)


class DKEL(DK):
    """Eq. (12): DK plus the decaying ensemble term L_de of Eq. (9), weighted by w(ep)."""

    def ensemble_weight(self, weights: dict[str, float]) -> float:
        return weights["ensemble_weight"]  # w(ep) of Eq. (11), (13) or (14)
