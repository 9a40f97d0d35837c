"""The losses of PCL and DKEL: Eq. (1)-(4), (6) and (9)-(14) of the paper (Sec. 3.1-3.4), and
the objectives of the methods it is compared with in Table 1 (SPEC.md Sec. 6, end of file).

Every function works on stacks of peers: student logits s (M, B, C), teacher logits t (M, B, C),
ensemble logits e (B, C). Pairwise terms are computed by broadcasting an (M, M) grid of peer
pairs rather than by Python loops; tests/test_losses.py checks each against the per-pair formula.

Gradient flow: a distillation target is never trained through the term that uses it. The
teacher's logits come from an EMA network that receives no gradient at all, and the ensemble
logits e learn only from their own cross-entropy (SPEC.md Eq. (3)), so every target is detached
here, at the point where it becomes a target.

Symbols: T -> `temperature`, lambda -> `kd_weight`, r(ep) -> `rampup`, w(ep) -> `ensemble_weight`,
beta -> `beta`, m -> M (number of peers).
"""
import math

import torch
import torch.nn.functional as F

METHODS = ("pcl", "dk", "dkel")
DECAYS = ("exp", "cos", "linear")


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. (1) on any leading dims: (..., B, C) x (..., B, C) -> (...), batch-mean over B.

    The caller passes a detached teacher; the loss is zero iff the softened distributions match.
    """
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)   # (..., B, C)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)   # (..., B, C)
    # Eq. (1): L_kd(t, s) = T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)          # (..., B)
    return temperature ** 2 * kl.mean(-1)                                         # (...)


def leave_one_out_kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """1/(M-1) * sum_{j != i} L_kd(t_j, s_i) for every student peer i: (M, B, C) x2 -> (M,).

    This is L_dk of Eq. (6) when t is the independent teacher and L_pm of Eq. (4) when t is
    PCL's peer mean teacher (the same formula on different teachers).
    """
    num_peers = student_logits.shape[0]
    # pairs[i, j] = L_kd(t_j, s_i): teachers broadcast along dim 0, students along dim 1.
    pairs = kd_loss(teacher_logits.detach()[None], student_logits[:, None], temperature)  # (M, M)
    off_diagonal = 1.0 - torch.eye(num_peers, device=pairs.device)                    # (M, M)
    # Eq. (6): L_dk(s_i) = 1/(M-1) * sum_{j != i} L_kd(t_j(x_j), s_i(x_i))  (Eq. (4) L_pm alike).
    return (pairs * off_diagonal).sum(1) / (num_peers - 1)                              # (M,)


def teacher_ensemble_without_self(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Eq. (10): E_bar_i = 1/(M-1) * sum_{j != i} t_j, for every i: (M, B, C) -> (M, B, C).

    Leaving t_i out of the target of s_i keeps the homogenisation of peer i low (Sec. 3.4).
    """
    num_peers = teacher_logits.shape[0]
    # Eq. (10): E_bar_i = (sum_j t_j - t_i) / (M - 1).
    return (teacher_logits.sum(0, keepdim=True) - teacher_logits) / (num_peers - 1)


def decaying_ensemble_kd(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """Eq. (9): L_de(s_i) = L_kd(E_bar_i, s_i) for every peer i: (M, B, C) x2 -> (M,)."""
    ensemble_targets = teacher_ensemble_without_self(teacher_logits.detach())   # (M, B, C)
    # Eq. (9): L_de(s_i) = L_kd(E_bar_i, s_i).
    return kd_loss(ensemble_targets, student_logits, temperature)               # (M,)


def peer_ensemble_kd(ensemble_logits: torch.Tensor, student_logits: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Eq. (4), first term: L_pe(s_i) = L_kd(e, s_i): (B, C) x (M, B, C) -> (M,).

    e is detached: the ensemble head learns only from its own cross-entropy (SPEC.md Eq. (3)).
    """
    # Eq. (4): L_pe(s_i) = L_kd(e, s_i).
    return kd_loss(ensemble_logits.detach()[None], student_logits, temperature)  # (M,)


def decay_weight(epoch: int, epochs: int, kind: str = "exp", beta: float = 0.5) -> float:
    """The weight w(ep) of the decaying ensemble term, `epoch` 0-based, `epochs` = E."""
    if kind == "exp":
        # Eq. (11): w(ep) = exp(-beta * ep).
        return math.exp(-beta * epoch)
    if kind == "cos":
        # Eq. (13): w(ep) = 1/2 * (1 + cos(pi * ep / E)).
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if kind == "linear":
        # Eq. (14): w(ep) = 1 - ep / E.
        return 1.0 - epoch / epochs
    raise ValueError(f"unknown decay {kind!r}; choose one of {', '.join(DECAYS)}")


def rampup(epoch: int, rampup_epochs: int) -> float:
    """PCL's sigmoid-shaped ramp-up of the distillation terms, r(ep) in Eq. (2)/(12).

    NOTE(paper): the paper is silent on it; SPEC.md takes PCL's r(ep) = exp(-5 (1 - ep/R)^2)
    for ep < R, else 1, with R = 80 of 300 epochs; R = 0 disables it (r = 1).
    """
    if epoch >= rampup_epochs:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / rampup_epochs) ** 2)


def cross_entropy_per_peer(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_ce(s_i, y) for every peer: (M, B, C) x (B,) -> (M,), batch-mean per peer."""
    num_peers, batch = logits.shape[:2]
    per_sample = F.cross_entropy(logits.float().flatten(0, 1), labels.repeat(num_peers),
                                 reduction="none")                              # (M*B,)
    return per_sample.view(num_peers, batch).mean(1)                            # (M,)


def _named(total: torch.Tensor, **parts: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return total, {name: value.detach() for name, value in parts.items()}


def online_kd_loss(method: str, student_logits: torch.Tensor, ensemble_logits: torch.Tensor,
                   teacher_logits: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                   kd_weight: float, rampup_weight: float, ensemble_weight: float = 0.0
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full objective of `method`, summed over the M peers, and its named parts.

    pcl:  Eq. (2)  with teacher_logits = PCL's peer mean teacher t~ (shared backbone);
    dk:   Eq. (2)  with L_pm replaced by L_dk of Eq. (6) (teacher_logits = independent teacher);
    dkel: Eq. (12) (independent teacher, decaying ensemble weighted by w(ep)).
    student_logits, teacher_logits: (M, B, C); ensemble_logits: (B, C); labels: (B,).
    The parts are detached per-peer sums, for logging without a host sync.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    ce_peers = cross_entropy_per_peer(student_logits, labels).sum()
    ce_ensemble = F.cross_entropy(ensemble_logits.float(), labels)
    pe = peer_ensemble_kd(ensemble_logits, student_logits, temperature).sum()
    # Eq. (4) L_pm for pcl, Eq. (6) L_dk for dk/dkel: the same leave-one-out sum over teacher peers.
    teacher_kd = leave_one_out_kd(teacher_logits, student_logits, temperature).sum()
    parts = {"ce": ce_peers, "ce_ensemble": ce_ensemble, "pe": pe,
             ("pm" if method == "pcl" else "dk"): teacher_kd}
    distill_scale = kd_weight * rampup_weight
    if method == "dkel":
        de = decaying_ensemble_kd(teacher_logits, student_logits, temperature).sum()
        parts["de"] = de
        # Eq. (12): L_DKEL = L_ce(e, y) + sum_i [ L_ce(s_i, y) + lambda r(ep) ( L_pe(s_i)
        #                    + w(ep) L_de(s_i) + (1 - w(ep)) L_dk(s_i) ) ].
        distill = pe + ensemble_weight * de + (1.0 - ensemble_weight) * teacher_kd
    else:
        # Eq. (2): L_PCL = L_ce(e, y) + sum_i [ L_ce(s_i, y) + lambda r(ep) L_pe(s_i)
        #                  + lambda r(ep) L_pm(s_i) ]   (dk: L_dk in place of L_pm).
        distill = pe + teacher_kd
    return _named(ce_ensemble + ce_peers + distill_scale * distill, **parts)


# ----------------------------------------------------------------------------- compared methods (Table 1)
# SPEC.md Sec. 6. logits (M, B, C): the M networks or branches; labels (B,). Every target is
# detached except OKDDip's attention target t_a. Each distillation term is scaled by
# kd_weight * r(ep) (PCL's lambda and ramp-up), except DML's, which has no ramp-up. Every
# function returns (the objective summed over the networks, its detached named parts).
def baseline_loss(logits: torch.Tensor, labels: torch.Tensor):
    """Baseline: one plain network (M = 1) trained with cross-entropy alone."""
    ce = cross_entropy_per_peer(logits, labels).sum()
    return _named(ce, ce=ce)


def dml_loss(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, kd_weight: float):
    """DML (Zhang et al. 2018): L_k = L_ce(z_k, y) + 1/(M-1) sum_{l != k} L_kd(z_l, z_k), summed over k.

    NOTE(paper): DML updates the networks one after the other, each against the others' fresh
    predictions; here all M are updated in one step against the same step's (detached)
    predictions, the usual joint reading. SPEC.md: T = `temperature` with the T^2 of Eq. (1)
    (DML itself uses T = 1), and no ramp-up.
    """
    ce = cross_entropy_per_peer(logits, labels).sum()
    # L_kd(z_l, z_k) for every ordered pair l != k, the target z_l detached.
    kd = leave_one_out_kd(logits, logits, temperature).sum()
    # DML: L = sum_k [ L_ce(z_k, y) + lambda 1/(M-1) sum_{l != k} L_kd(z_l, z_k) ]
    return _named(ce + kd_weight * kd, ce=ce, kd=kd)


def min_logit_target(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KDCL-MinLogit (Guo et al. 2020): shift every network's logits so that its true-class logit
    is 0, then take the element-wise minimum over networks: (M, B, C) x (B,) -> (B, C)."""
    index = labels.view(1, -1, 1).expand(logits.shape[0], -1, 1)       # (M, B, 1)
    shifted = logits - logits.gather(-1, index)                        # (M, B, C): z_k,c - z_k,y
    # z_t,c = min_k (z_k,c - z_k,y)
    return shifted.amin(0)                                             # (B, C)


def kdcl_loss(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, kd_weight: float,
              rampup_weight: float):
    """KDCL-MinLogit (Guo et al. 2020): L_k = L_ce(z_k, y) + lambda r(ep) L_kd(z_t, z_k), network k
    on its own augmented view x_k, z_t the detached MinLogit target of the M views' logits."""
    ce = cross_entropy_per_peer(logits, labels).sum()
    target = min_logit_target(logits.detach(), labels)                 # (B, C)
    kd = kd_loss(target[None], logits, temperature).sum()
    # KDCL: L = sum_k [ L_ce(z_k, y) + lambda r(ep) L_kd(z_t, z_k) ]
    return _named(ce + kd_weight * rampup_weight * kd, ce=ce, kd=kd)


def one_loss(logits: torch.Tensor, ensemble_logits: torch.Tensor, labels: torch.Tensor, *,
             temperature: float, kd_weight: float, rampup_weight: float):
    """ONE (Lan et al. 2018): L = sum_i L_ce(z_i, y) + L_ce(z_e, y) + lambda r(ep) sum_i L_kd(z_e, z_i),
    z_e = sum_i g_i z_i the gated ensemble (B, C). z_e is detached as a target (SPEC.md), so the
    gate learns from L_ce(z_e, y) alone. L_kd(z_e, z_i) is PCL's L_pe, hence the part names."""
    ce = cross_entropy_per_peer(logits, labels).sum()
    ce_ensemble = F.cross_entropy(ensemble_logits.float(), labels)
    pe = peer_ensemble_kd(ensemble_logits, logits, temperature).sum()
    # ONE: L = sum_i L_ce(z_i, y) + L_ce(z_e, y) + lambda r(ep) sum_i L_kd(z_e, z_i)
    return _named(ce + ce_ensemble + kd_weight * rampup_weight * pe, ce=ce, ce_ensemble=ce_ensemble, pe=pe)


def cl_loss(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float, kd_weight: float,
            rampup_weight: float):
    """CL-ILR (Song & Chai 2018): L_h = L_ce(z_h, y) + lambda r(ep) L_kd(mean_{j != h} z_j, z_h), summed
    over the heads h.

    NOTE(paper): CL weights its two terms beta and 1 - beta (beta = 0.5); SPEC.md gives every
    compared method the same lambda r(ep) on the distillation term instead. The target is the
    mean of the other heads' logits (softened by T), as in CL.
    """
    ce = cross_entropy_per_peer(logits, labels).sum()
    # mean_{j != h} z_j for every head h: Eq. (10)'s leave-one-out mean, on the heads' own logits.
    targets = teacher_ensemble_without_self(logits.detach())           # (M, B, C)
    kd = kd_loss(targets, logits, temperature).sum()
    # CL: L = sum_h [ L_ce(z_h, y) + lambda r(ep) L_kd(mean_{j != h} z_j, z_h) ]
    return _named(ce + kd_weight * rampup_weight * kd, ce=ce, kd=kd)


def attention_targets(peer_logits: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """OKDDip's peer ensemble teacher of every auxiliary peer a: (A, B, C) x (B, A, A) -> (A, B, C)."""
    # t_a = sum_b alpha_ab z_b: (B, A, A) @ (B, A, C) -> (B, A, C), back to (A, B, C).
    return (attention.float() @ peer_logits.float().transpose(0, 1)).transpose(0, 1)


def okddip_loss(peer_logits: torch.Tensor, leader_logits: torch.Tensor, attention: torch.Tensor,
                labels: torch.Tensor, *, temperature: float, kd_weight: float, rampup_weight: float):
    """OKDDip (Chen et al. 2020): A = M-1 auxiliary peers z_a (A, B, C), the group leader z_L (B, C),
    the attention alpha (B, A, A):
    L = sum_a L_ce(z_a, y) + L_ce(z_L, y) + lambda r(ep) [ sum_a L_kd(t_a, z_a) + L_kd(mean_a z_a, z_L) ].

    t_a is NOT detached (SPEC.md, as in the authors' code): W_Q and W_K learn only through it.
    NOTE(paper): the leader's target mean_a z_a is detached (SPEC.md: every other target is).
    """
    ce = cross_entropy_per_peer(peer_logits, labels).sum()
    ce_leader = F.cross_entropy(leader_logits.float(), labels)
    kd = kd_loss(attention_targets(peer_logits, attention), peer_logits, temperature).sum()
    kd_leader = kd_loss(peer_logits.detach().float().mean(0), leader_logits, temperature)
    # OKDDip: L = sum_a L_ce(z_a, y) + L_ce(z_L, y) + lambda r(ep) [ sum_a L_kd(t_a, z_a) + L_kd(mean_a z_a, z_L) ]
    total = ce + ce_leader + kd_weight * rampup_weight * (kd + kd_leader)
    return _named(total, ce=ce, ce_leader=ce_leader, kd=kd, kd_leader=kd_leader)
