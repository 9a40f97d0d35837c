"""The losses of PCL and DKEL: Eq. (1), (2), (4), (6) and (9)-(14) of the paper (Sec. 3.1-3.4)
and the ramp-up r(ep); nothing else (the ensemble e of Eq. (3) is computed in models.py, the
compared methods of Table 1 are in baselines.py).

Every function works on stacks of peers: student logits s (M, B, C), teacher logits t (M, B, C),
ensemble logits e (B, C). Pairwise terms are computed by broadcasting an (M, M) grid of peer
pairs rather than by Python loops; tests/test_losses.py checks each against the per-pair formula.

Gradient flow: a distillation target is never trained through the term that uses it. The
teacher's logits come from an EMA network that receives no gradient at all, and the ensemble
logits e learn only from their own cross-entropy (Eq. (2)/(12): L_ce(e, y)), so every target is
detached here, at the point where it becomes a target.

Symbols: T -> `temperature`, lambda -> `kd_weight`, r(ep) -> `rampup`, w(ep) ->
`teacher_ensemble_weight` (the weight of the teacher ensemble Ebar_i, not of the student's ensemble
e), its schedule -> `teacher_ensemble_decay` (`--decay`: the paper's "decay" of Eq. (11), (13),
(14); the EMA's alpha is always `ema_decay`), beta -> `beta`, m -> M (number of peers).
"""
import math

import torch
import torch.nn.functional as F

DECAYS = ("exp", "cos", "linear")


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KD loss on any leading dims: (..., B, C) x (..., B, C) -> (...), batch-mean over B.

    The caller passes a detached teacher; the loss is zero iff the softened distributions match.
    """
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)   # (..., B, C)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)   # (..., B, C)
    # Eq. (1): L_kd(t, s) = T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)          # (..., B)
    return temperature ** 2 * kl.mean(-1)                                         # (...)


def leave_one_out_kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """The leave-one-out teacher term of every student peer i: (M, B, C) x2 -> (M,).

    It is L_dk of Eq. (6) when t is the independent teacher and L_pm of Eq. (4) when t is
    PCL's peer mean teacher (the same formula on different teachers).
    """
    num_peers = student_logits.shape[0]
    # pairs[i, j] = L_kd(t_j, s_i): teachers broadcast along dim 0, students along dim 1.
    pairs = kd_loss(teacher_logits.detach()[None], student_logits[:, None], temperature)  # (M, M)
    off_diagonal = 1.0 - torch.eye(num_peers, device=pairs.device)                    # (M, M)
    # Eq. (6): L_dk(s_i) = 1/(M-1) * sum_{j != i} L_kd(t_j(x_j), s_i(x_i))  (Eq. (4) L_pm alike).
    return (pairs * off_diagonal).sum(1) / (num_peers - 1)                              # (M,)


def teacher_ensemble_without_self(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher ensemble without peer i, for every i: (M, B, C) -> (M, B, C).

    Leaving t_i out of the target of s_i keeps the homogenisation of peer i low (Sec. 3.4).
    """
    num_peers = teacher_logits.shape[0]
    # Eq. (10): E_bar_i = 1/(M-1) * sum_{j != i} t_j = (sum_j t_j - t_i) / (M - 1).
    return (teacher_logits.sum(0, keepdim=True) - teacher_logits) / (num_peers - 1)


def decaying_ensemble_kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """The decaying-ensemble term of every peer i: (M, B, C) x2 -> (M,)."""
    ensemble_targets = teacher_ensemble_without_self(teacher_logits.detach())   # (M, B, C)
    # Eq. (9): L_de(s_i) = L_kd(E_bar_i, s_i).
    return kd_loss(ensemble_targets, student_logits, temperature)               # (M,)


def peer_ensemble_kd(ensemble_logits: torch.Tensor, student_logits: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """The peer-ensemble term of every peer i: (B, C) x (M, B, C) -> (M,).

    e is detached: the ensemble head learns only from its own cross-entropy (docs/spec.md Eq. (3)).
    """
    # Eq. (4): L_pe(s_i) = L_kd(e, s_i).
    return kd_loss(ensemble_logits.detach()[None], student_logits, temperature)  # (M,)


def teacher_ensemble_decay(epoch: int, epochs: int, kind: str = "exp", beta: float = 0.5) -> float:
    """The weight w(ep) of the decaying ensemble term, `epoch` 0-based, `epochs` = E."""
    if kind == "exp":
        # Eq. (11): w(ep) = exp(-beta * ep).
        return math.exp(-beta * epoch)
    if kind == "cos":
        # Eq. (13): w(ep) = 1/2 * (1 + cos(pi * ep / E)).
        # NOTE(paper): the paper's words also fit cos(pi * ep / (2E)); the authors' code has only
        # Eq. (11) (docs/spec.md Sec. 2).
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if kind == "linear":
        # Eq. (14): w(ep) = 1 - ep / E.
        return 1.0 - epoch / epochs
    raise ValueError(f"unknown decay {kind!r}; choose one of {', '.join(DECAYS)}")


def authors_weight_cutoff(teacher_ensemble_weight: float) -> float:
    """w(ep) as the authors' code uses it with the exponential decay: 0 once below 0.01."""
    # DEVIATION (opt-in --authors-weight-cutoff, docs/spec.md Sec. 8): the authors' code cuts
    # w(ep) = exp(-beta * ep) to 0 below 0.01; the paper's Eq. (11) has no cut-off.
    return teacher_ensemble_weight if teacher_ensemble_weight >= 0.01 else 0.0


def rampup(epoch: int, rampup_epochs: int) -> float:
    """PCL's sigmoid-shaped ramp-up of the distillation terms, r(ep) in Eq. (2)/(12).

    NOTE(paper): the paper is silent on it; docs/spec.md takes PCL's form with R = 80 of 300
    epochs; R = 0 disables it (r = 1).
    """
    if epoch >= rampup_epochs:
        return 1.0
    # r(ep) = exp(-5 * (1 - ep / R)^2) for ep < R, else 1.
    return math.exp(-5.0 * (1.0 - epoch / rampup_epochs) ** 2)


def authors_rampup(epoch: int) -> float:
    """r(ep) as the authors' DKEL code computes it, whatever the data set and the epochs."""
    # DEVIATION (opt-in --authors-rampup, docs/spec.md Sec. 8): the authors' code calls its ramp-up
    # with lambda = 0.1, which scales it by 0.1 and stands where R was meant (ep / 0.1), and
    # switches to 0.1 after its hard-coded epoch 80.
    if epoch > 80:
        return 0.1
    return 0.1 * math.exp(-5.0 * (1.0 - epoch / 0.1) ** 2)


def cross_entropy_per_peer(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_ce(s_i, y) for every peer: (M, B, C) x (B,) -> (M,), batch-mean per peer."""
    num_peers, batch = logits.shape[:2]
    per_sample = F.cross_entropy(logits.float().flatten(0, 1), labels.repeat(num_peers),
                                 reduction="none")                              # (M*B,)
    return per_sample.view(num_peers, batch).mean(1)                            # (M,)


def term_weights(*, kd_weight: float, rampup: float, teacher_ensemble_weight: float,
                 de_rampup: float, teacher_term: str, with_de: bool) -> dict[str, float]:
    """The weight that each distillation term gets in Eq. (12) (Eq. (2): w(ep) = 0, no L_de), by
    the name of its part: "pe", `teacher_term` ("dk" or "pm") and, `with_de`, "de". They are the
    factors of the equation line in `distillation_objective` (tests/test_losses.py holds them to
    it); metrics.csv logs them as weight_pe, weight_dk or weight_pm, and weight_de."""
    weights = {"pe": kd_weight * rampup,
               teacher_term: kd_weight * rampup * (1.0 - teacher_ensemble_weight)}
    if with_de:
        weights["de"] = kd_weight * de_rampup * teacher_ensemble_weight
    return weights


def distillation_objective(student_logits: torch.Tensor, ensemble_logits: torch.Tensor,
                           teacher_logits: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                           kd_weight: float, rampup: float, teacher_ensemble_weight: float,
                           de_rampup: float, teacher_term: str, with_de: bool
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DKEL objective, summed over the M peers, and its named, detached parts (for logging
    without a host sync): s, t (M, B, C), e (B, C), y (B,).

    The teacher logits t are PCL's peer mean teacher t~ (then the teacher term is L_pm of
    Eq. (4)) or the independent teacher (L_dk of Eq. (6)); `teacher_term` names it among the parts,
    "pm" or "dk" (the teacher's `term`, ema.py). Eq. (2) (PCL, DK) is Eq. (12) without L_de:
    `with_de` False and `teacher_ensemble_weight` 0. DKEL and PCL+L_de (Table 3) pass w(ep) of
    Eq. (11)/(13)/(14) and `with_de`. `de_rampup` is 1 (Eq. (12) as printed) or r(ep) (the earlier
    reading, below).
    """
    w = teacher_ensemble_weight
    ce_ensemble = F.cross_entropy(ensemble_logits.float(), labels)                  # L_ce(e, y)
    ce_peers = cross_entropy_per_peer(student_logits, labels).sum()                # sum_i L_ce(s_i, y)
    pe = peer_ensemble_kd(ensemble_logits, student_logits, temperature).sum()      # sum_i L_pe(s_i)
    dk = leave_one_out_kd(teacher_logits, student_logits, temperature).sum()       # sum_i L_dk(s_i)
    de = (decaying_ensemble_kd(teacher_logits, student_logits, temperature).sum()  # sum_i L_de(s_i)
          if with_de else torch.zeros((), device=student_logits.device))
    # NOTE(paper): r(ep) is PCL's ramp-up of the terms DKEL inherits from PCL (L_pe, and L_dk in
    # L_pm's place); L_de has its own schedule w(ep) (Sec. 3.4: "a strong teacher during the early
    # training"). `de_rampup` = r(ep) is the earlier reading, lambda r(ep) w(ep) on L_de, which the
    # authors' code computes (--rampup-scales-de). The (1 - w(ep)) on L_dk is the authors' code's
    # mixing, a reading too (docs/spec.md Sec. 2).
    # Eq. (12): L_DKEL = L_ce(e, y) + sum_i [ L_ce(s_i, y)
    #                    + lambda r(ep) ( L_pe(s_i) + (1 - w(ep)) L_dk(s_i) ) + lambda w(ep) L_de(s_i) ]
    total = (ce_ensemble + ce_peers
             + kd_weight * rampup * (pe + (1 - w) * dk) + kd_weight * de_rampup * w * de)
    # Eq. (2): L_PCL = L_ce(e, y) + sum_i [ L_ce(s_i, y) + lambda r(ep) L_pe(s_i) + lambda r(ep) L_pm(s_i) ]
    #          is the line above at w(ep) = 0 without L_de, with PCL's teacher (DK: L_dk for L_pm).
    parts = {"ce": ce_peers, "ce_ensemble": ce_ensemble, "pe": pe, teacher_term: dk}
    if with_de:
        parts["de"] = de
    return total, {name: value.detach() for name, value in parts.items()}
