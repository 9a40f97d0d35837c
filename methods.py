"""The paper's online-distillation methods, the four rows of its Table 3 (PCL, DK, PCL+L_de and
DKEL, Sec. 3.2-3.4), and `Method`, the one interface between a method and the training loop of
train.py.

All three train the same multi-peer student (models.py: a shared trunk, M peers each on its own
augmented view, the Eq. (3) ensemble head) with one objective (losses.distillation_objective):
- PCL, Eq. (2): the peers learn from the labels, from the ensemble e (L_pe) and from PCL's peer
  mean teacher (L_pm), an EMA of the student's own branches (ema.PeerMeanTeacher).
- DK, Eq. (2) with L_dk of Eq. (6) for L_pm: the teacher is an independent network
  (ema.IndependentTeacher), copied from the student and trained alone for k iterations before
  training starts (Sec. 3.3, ema.initialise_teacher).
- DKEL, Eq. (12): DK plus the decaying ensemble term L_de of Eq. (9), weighted by w(ep).
- PCL+L_de (Table 3's "+L_de" row): PCL plus L_de on PCL's own teacher, Ebar_i the mean of the
  peer mean teacher's t~_j, j != i, weighted as in Eq. (12).
After every optimizer step the teacher follows the student by Eq. (5) (`after_step`).

The compared methods of Tables 1 and 2 (baselines.py) implement the same `Method` interface.
"""
import abc

import torch
import torch.nn as nn

from ema import IndependentTeacher, PeerMeanNetwork, PeerMeanTeacher, initialise_teacher
from losses import distillation_objective, term_weights
from models import MultiPeerNet


class Method(abc.ABC):
    """What the training loop may call of a method: the paper's interface, and nothing else.

    - The objective: `loss(views, labels, weights)` gives the loss of one step and its named,
      detached parts. `views` is (num_views, B, 3, H, W): every peer its own augmented view when
      `num_views` = M, one augmented batch for every network or branch when it is 1; `weights`
      holds the epoch's r(ep) ("rampup") and w(ep) ("teacher_ensemble_weight").
    - The weights of its distillation terms in an epoch's objective: `term_weights(weights)`, by
      the name of the term's part (metrics.csv: weight_<name>); none by default.
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

    def term_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """The weight of each distillation term in the epoch's objective: none logged."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that takes a gradient (an EMA teacher's take none)."""
        return [p for module in self.modules().values() for p in module.parameters()
                if p.requires_grad]

    def set_mode(self, train: bool) -> None:
        for module in self.modules().values():
            module.train(train)


class OnlineDistillation(Method):
    """The multi-peer student with the ensemble head of Eq. (3), its EMA teacher, and how a step
    and an evaluation use them. PCL, DK, PCL+L_de and DKEL differ only in the teacher
    (`make_teacher`), in its initialisation (`initialise`) and in whether their objective has L_de
    (`with_de`).

    `rampup_scales_de` weights L_de by lambda r(ep) w(ep), the earlier reading of Eq. (12) and the
    authors' code's, instead of lambda w(ep) (losses.distillation_objective)."""
    with_de = False             # Eq. (2): no decaying-ensemble term

    def __init__(self, student: MultiPeerNet, *, temperature: float, kd_weight: float,
                 ema_decay: float, device: torch.device | str = "cpu",
                 authors_ema_warmup: bool = False, ensemble_lr_per_peer: bool = False,
                 rampup_scales_de: bool = False):
        self.temperature, self.kd_weight = temperature, kd_weight
        self.rampup_scales_de = rampup_scales_de
        self.ensemble_lr_per_peer = ensemble_lr_per_peer
        self.student = student.to(device)
        self.teacher = self.make_teacher(ema_decay, authors_ema_warmup)
        super().__init__(self.student)
        self.num_views = student.num_peers  # every peer its own augmented view (Sec. 3.2)

    @abc.abstractmethod
    def make_teacher(self, ema_decay: float, authors_warmup: bool):
        """The EMA teacher of the student (ema.py)."""

    def epoch_factors(self, weights: dict[str, float]) -> dict[str, float]:
        """r(ep), w(ep) (0 without L_de: Eq. (2)) and the factor of L_de's weight that is r(ep) under
        the earlier reading and 1 under Eq. (12) as printed."""
        w = weights["teacher_ensemble_weight"] if self.with_de else 0.0
        de_rampup = weights["rampup"] if self.rampup_scales_de else 1.0
        return {"rampup": weights["rampup"], "teacher_ensemble_weight": w, "de_rampup": de_rampup}

    def term_weights(self, weights: dict[str, float]) -> dict[str, float]:
        """lambda times what multiplies each term in the epoch's Eq. (12) or Eq. (2)."""
        return term_weights(kd_weight=self.kd_weight, teacher_term=self.teacher.term,
                            with_de=self.with_de, **self.epoch_factors(weights))

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
                                             kd_weight=self.kd_weight,
                                             teacher_term=self.teacher.term,  # "pm" or "dk"
                                             with_de=self.with_de, **self.epoch_factors(weights))
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

    def __init__(self, student: MultiPeerNet, *, authors_pcl_teacher: bool = False, **online):
        self.authors_pcl_teacher = authors_pcl_teacher
        super().__init__(student, **online)

    def make_teacher(self, ema_decay: float, authors_warmup: bool):
        if self.authors_pcl_teacher:
            # DEVIATION (opt-in, docs/spec.md Sec. 8): the authors' code builds its temporal mean
            # teacher as a whole EMA copy of the student network, trunk included.
            return PeerMeanNetwork(self.student, ema_decay, authors_warmup)
        return PeerMeanTeacher(self.student, ema_decay, authors_warmup)


class DK(OnlineDistillation):
    """Eq. (2) with L_dk of Eq. (6): the independent teacher, initialised by Sec. 3.3."""

    def __init__(self, student: MultiPeerNet, *, init_iters: int, init_lr: float,
                 authors_init: bool = False, **online):
        super().__init__(student, **online)
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


class PCLDE(PCL):
    """Table 3's "+L_de" row: Eq. (2) plus the decaying ensemble term on PCL's own teacher, weighted
    as in Eq. (12): lambda r(ep) (L_pe + (1 - w(ep)) L_pm) + lambda w(ep) L_de, where Ebar_i of
    Eq. (10) is the mean of the peer mean teacher's logits t~_j, j != i (docs/spec.md Sec. 2)."""
    with_de = True


class DKEL(DK):
    """Eq. (12): DK plus the decaying ensemble term L_de of Eq. (9), weighted by w(ep)."""
    with_de = True
