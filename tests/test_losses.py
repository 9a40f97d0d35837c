"""Eq. (1), (2), (4), (6) and (9)-(14): each loss against a hand computation or an explicit loop over
pairs, and the logged weight of each term against the factor the objective gives it."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (decaying_ensemble_kd, distillation_objective, kd_loss, leave_one_out_kd,
                    peer_ensemble_kd, rampup, teacher_ensemble_decay, teacher_ensemble_without_self,
                    term_weights)


def test_kd_loss_by_hand():
    # Two classes, T = 1: p_t = softmax([0, ln 3]) = (1/4, 3/4), p_s = (1/2, 1/2).
    t = torch.tensor([[0.0, math.log(3.0)]])
    s = torch.zeros(1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kd_loss(t, s, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 2 softens both (p_t = softmax([0, ln3 / 2]) = (1/(1+sqrt3), sqrt3/(1+sqrt3))) and scales by 4.
    a = 1.0 / (1.0 + math.sqrt(3.0))
    expected_t2 = 4.0 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert kd_loss(t, s, 2.0).item() == pytest.approx(expected_t2, rel=1e-6)


def test_kd_loss_matches_torch_kl_div_batchmean():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    reference = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean") * 9
    assert kd_loss(t, s, 3.0).item() == pytest.approx(reference.item(), rel=1e-5)


def test_kd_loss_zero_iff_softened_distributions_match():
    s = torch.randn(4, 5)
    assert kd_loss(s + 7.0, s, 3.0).abs().item() < 1e-6  # a shift of the logits: same softmax
    assert kd_loss(s * 2.0, s, 3.0).item() > 1e-3


def test_kd_gradient_scales_with_temperature():
    # For large T, d/ds [T^2 KL] -> (s - t)/(C) centred, i.e. T-independent; T^2 restores the
    # gradient scale that dividing the logits by T removed: grad = T * (p_s - p_t) at temperature T.
    t, s = torch.randn(2, 4), torch.randn(2, 4, requires_grad=True)
    for temperature in (1.0, 3.0, 10.0):
        (g,) = torch.autograd.grad(kd_loss(t, s, temperature), s)
        expected = temperature * (F.softmax(s / temperature, 1) - F.softmax(t / temperature, 1)) / 2
        assert torch.allclose(g, expected.detach(), atol=1e-6)


def _stacks(m=3, b=5, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher, student = torch.randn(m, b, c, generator=g), torch.randn(m, b, c, generator=g)
    return teacher, student, torch.randn(b, c, generator=g)


def test_leave_one_out_kd_equals_pair_loop():
    t, s, _ = _stacks()
    got = leave_one_out_kd(t, s, 3.0)
    for i in range(3):
        loop = sum(kd_loss(t[j], s[i], 3.0) for j in range(3) if j != i) / 2
        assert got[i].item() == pytest.approx(loop.item(), rel=1e-5)


def test_teacher_ensemble_excludes_own_peer():
    t = torch.tensor([1.0, 2.0, 6.0]).view(3, 1, 1).expand(3, 2, 4)
    ensemble = teacher_ensemble_without_self(t)
    assert torch.allclose(ensemble[:, 0, 0], torch.tensor([4.0, 3.5, 1.5]))  # (2+6)/2, (1+6)/2, (1+2)/2


def test_decaying_ensemble_kd_equals_loop():
    t, s, _ = _stacks(m=4, seed=1)
    got = decaying_ensemble_kd(t, s, 3.0)
    for i in range(4):
        target = torch.stack([t[j] for j in range(4) if j != i]).mean(0)
        assert got[i].item() == pytest.approx(kd_loss(target, s[i], 3.0).item(), rel=1e-5)


def test_peer_ensemble_kd_equals_loop():
    _, s, e = _stacks()
    got = peer_ensemble_kd(e, s, 3.0)
    assert torch.allclose(got, torch.stack([kd_loss(e, s[i], 3.0) for i in range(3)]), rtol=1e-5)


@pytest.mark.parametrize("kind,values", [
    ("exp", (1.0, math.exp(-0.5 * 50), math.exp(-0.5 * 100))),
    ("cos", (1.0, 0.5, 0.0)),
    ("linear", (1.0, 0.5, 0.0)),
])
def test_decay_schedules(kind, values):
    got = [teacher_ensemble_decay(ep, 100, kind, beta=0.5) for ep in (0, 50, 100)]
    assert got == pytest.approx(values, abs=1e-12)


def test_rampup():
    assert rampup(0, 80) == pytest.approx(math.exp(-5))
    assert rampup(40, 80) == pytest.approx(math.exp(-5 * 0.25))
    assert rampup(80, 80) == 1.0 and rampup(200, 80) == 1.0
    assert rampup(0, 0) == 1.0


def _objective_by_hand(with_de, s, e, t, y, *, w, kd_weight, r, de_rampup, T=3.0):
    """Eq. (12) peer by peer as printed (Eq. (2): no L_de, w = 0), L_de times de_rampup."""
    total = F.cross_entropy(e, y)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        ce = F.cross_entropy(s[i], y)
        pe = kd_loss(e, s[i], T)
        dk = sum(kd_loss(t[j], s[i], T) for j in others) / 2
        de = kd_loss((t[others[0]] + t[others[1]]) / 2, s[i], T)
        if with_de:
            total = total + ce + kd_weight * r * (pe + (1 - w) * dk) + kd_weight * de_rampup * w * de
        else:
            total = total + ce + kd_weight * r * pe + kd_weight * r * dk
    return total


# (method, teacher term, with L_de, de_rampup): the four rows of Table 3; dkel and pcl_de under
# Eq. (12) as printed (de_rampup 1) and under the earlier reading (de_rampup = r = 0.5).
OBJECTIVES = [("pcl", "pm", False, 1.0), ("dk", "dk", False, 1.0), ("pcl_de", "pm", True, 1.0),
              ("dkel", "dk", True, 1.0), ("dkel", "dk", True, 0.5), ("pcl_de", "pm", True, 0.5)]


@pytest.mark.parametrize("method,term,with_de,de_rampup", OBJECTIVES)
def test_objectives_equal_per_peer_formula(method, term, with_de, de_rampup):
    """Eq. (12) at w = 0.3 and Eq. (2) (w = 0) against the per-peer sums written out by hand."""
    t, s, e = _stacks(b=6, c=5, seed=3)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    w = 0.3 if with_de else 0.0
    total, parts = distillation_objective(s, e, t, y, temperature=3.0, kd_weight=0.7, rampup=0.5,
                                          teacher_ensemble_weight=w, de_rampup=de_rampup,
                                          teacher_term=term, with_de=with_de)
    expected = _objective_by_hand(with_de, s, e, t, y, w=w, kd_weight=0.7, r=0.5,
                                  de_rampup=de_rampup)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ("de" in parts) == with_de  # Eq. (2) never computes L_de
    assert set(parts) >= {"ce", "ce_ensemble", "pe", term}


@pytest.mark.parametrize("method,term,with_de,de_rampup", OBJECTIVES)
def test_logged_weights_are_the_objectives_factors(method, term, with_de, de_rampup):
    """The weight_<term> columns: the objective equals its cross-entropies plus each logged
    part times its logged weight, and by hand at the first epoch of a run (r = e^-5, w = 1)."""
    t, s, e = _stacks(b=6, c=5, seed=5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    factors = {"kd_weight": 0.7, "rampup": 0.4, "teacher_ensemble_weight": 0.3 if with_de else 0.0,
               "de_rampup": 0.4 if de_rampup != 1.0 else 1.0}
    total, parts = distillation_objective(s, e, t, y, temperature=3.0, teacher_term=term,
                                          with_de=with_de, **factors)
    weights = term_weights(teacher_term=term, with_de=with_de, **factors)
    assert set(weights) == {"pe", term} | ({"de"} if with_de else set())
    rebuilt = parts["ce"] + parts["ce_ensemble"] + sum(weights[k] * parts[k] for k in weights)
    assert total.item() == pytest.approx(rebuilt.item(), rel=1e-6)
    r = math.exp(-5.0)
    first = term_weights(kd_weight=1.0, rampup=r, teacher_ensemble_weight=1.0 if with_de else 0.0,
                         de_rampup=r if de_rampup != 1.0 else 1.0, teacher_term=term,
                         with_de=with_de)
    assert first["pe"] == pytest.approx(0.006738, abs=1e-6)
    assert first[term] == pytest.approx(0.0 if with_de else 0.006738, abs=1e-6)
    if with_de:  # the printed Eq. (12): L_de at full weight; the earlier reading: at r(0)
        assert first["de"] == pytest.approx(1.0 if de_rampup == 1.0 else 0.006738, abs=1e-6)


def test_no_gradient_reaches_teacher_or_ensemble_through_distillation():
    t, s, e = _stacks(seed=4)
    t.requires_grad_(True), s.requires_grad_(True), e.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 4])
    # Only the distillation terms: CE weights are not involved in these three functions.
    distill = (peer_ensemble_kd(e, s, 3.0) + leave_one_out_kd(t, s, 3.0)
               + decaying_ensemble_kd(t, s, 3.0)).sum()
    distill.backward()
    assert t.grad is None and e.grad is None and s.grad is not None
    # In the full objective, e's gradient is exactly that of its own cross-entropy.
    e.grad = None
    total, _ = distillation_objective(s, e, t, y, temperature=3.0, kd_weight=1.0, rampup=1.0,
                                      teacher_ensemble_weight=0.5, de_rampup=1.0,
                                      teacher_term="dk", with_de=True)
    total.backward()
    e_ce = e.detach().clone().requires_grad_(True)
    F.cross_entropy(e_ce, y).backward()
    assert torch.allclose(e.grad, e_ce.grad) and t.grad is None


def test_unknown_decay_rejected():
    with pytest.raises(ValueError, match="unknown decay"):
        teacher_ensemble_decay(0, 10, "step")
