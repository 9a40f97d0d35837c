"""The compared methods of Tables 1 and 2 (docs/spec.md Sec. 6): each objective against an explicit
loop over networks or pairs and a case worked by hand, gradient flow (detached targets, CL's 1/M
scaling, OKDDip's attention), and one training step through every method object."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import cli
import train
from baselines import (Gate, PeerAttention, attention_targets, baseline_loss, cl_loss, dml_loss,
                       kdcl_loss, min_logit_target, offline_kd_loss, okddip_loss,
                       one_loss, scale_gradient)
from conftest import cifar_shaped, fake_finished_run
from infra import rundir
from models import build_deployable, multi_peer_net

T = 3.0


def kl_reference(target, student, temperature=T):
    """T^2 KL(softmax(t/T) || softmax(s/T)), batch mean, from torch's own kl_div (Eq. (1))."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(target / temperature, -1),
                    reduction="batchmean") * temperature ** 2


def stack(m=3, b=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, b, c, generator=g) * 2, torch.randint(0, c, (b,), generator=g)


def value_and_grad(fn, logits, *others):
    """fn's value and its gradient with respect to the logits (a fresh leaf)."""
    leaf = logits.clone().requires_grad_(True)
    out = fn(leaf, *others)
    value = out[0] if isinstance(out, tuple) else out
    return value, torch.autograd.grad(value, leaf)[0]


def assert_same(fn, reference, logits, *others):
    """Same value and same gradient as the explicit loop, whose targets are detached by hand:
    equal gradients show that no gradient flows into the objective's detached targets."""
    got, got_grad = value_and_grad(fn, logits, *others)
    want, want_grad = value_and_grad(reference, logits, *others)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(got_grad, want_grad, atol=1e-6)


# ----------------------------------------------------------------------------- objectives
def test_baseline_is_cross_entropy():
    z, y = stack(m=1)
    assert baseline_loss(z, y)[0].item() == pytest.approx(F.cross_entropy(z[0], y).item(), rel=1e-6)


def test_dml_equals_pair_loop_with_detached_targets():
    z, y = stack()

    def loop(z):
        total = 0.0
        for k in range(3):
            kd = sum(kl_reference(z[l].detach(), z[k]) for l in range(3) if l != k) / 2
            total = total + F.cross_entropy(z[k], y) + 0.7 * kd
        return total

    assert_same(lambda z: dml_loss(z, y, temperature=T, kd_weight=0.7), loop, z)
    # The check has power: the same loop without the detach has a different gradient.
    def attached(z):
        return sum(F.cross_entropy(z[k], y)
                   + 0.7 * sum(kl_reference(z[l], z[k]) for l in range(3) if l != k) / 2
                   for k in range(3))

    assert not torch.allclose(value_and_grad(loop, z)[1], value_and_grad(attached, z)[1], atol=1e-4)


def test_min_logit_by_hand():
    # Two networks, three classes, true class 0: shift so that z_y = 0, then the element-wise min.
    z = torch.tensor([[[2.0, 0.0, 1.0]], [[1.0, 0.0, -1.0]]])    # (M=2, B=1, C=3)
    # network 0: [0, -2, -1]; network 1: [0, -1, -2]; min: [0, -2, -2]
    assert torch.equal(min_logit_target(z, torch.tensor([0])), torch.tensor([[0.0, -2.0, -2.0]]))
    # true class 2 instead: network 0: [1, -1, 0]; network 1: [2, 1, 0]; min: [1, -1, 0]
    assert torch.equal(min_logit_target(z, torch.tensor([2])), torch.tensor([[1.0, -1.0, 0.0]]))


def test_kdcl_equals_network_loop():
    z, y = stack(seed=1)

    def loop(z):
        target = torch.stack([torch.stack([min(z[k, n, c] - z[k, n, y[n]] for k in range(3))
                                           for c in range(4)])
                              for n in range(5)]).detach()             # (B, C), by scalar loops
        return sum(F.cross_entropy(z[k], y) + 0.6 * 0.5 * kl_reference(target, z[k])
                   for k in range(3))

    assert_same(lambda z: kdcl_loss(z, y, temperature=T, kd_weight=0.6, rampup=0.5), loop, z)


def test_one_equals_branch_loop():
    z, y = stack(seed=2)
    ensemble = torch.randn(5, 4)

    def loop(z):
        return (F.cross_entropy(ensemble, y)
                + sum(F.cross_entropy(z[i], y) + 0.4 * kl_reference(ensemble, z[i])
                      for i in range(3)))

    assert_same(lambda z: one_loss(z, ensemble, y, temperature=T, kd_weight=0.8, rampup=0.5),
                loop, z)
    # The gated ensemble learns from its own cross-entropy only: L_kd(z_e, z_i) is detached in z_e.
    _, ensemble_grad = value_and_grad(
        lambda e: one_loss(z, e, y, temperature=T, kd_weight=1.0, rampup=1.0), ensemble)
    _, ce_grad = value_and_grad(lambda e: F.cross_entropy(e, y), ensemble)
    assert torch.allclose(ensemble_grad, ce_grad, atol=1e-7)


def test_one_gate_weights_sum_to_one():
    gate = Gate(trunk_channels=6, num_peers=3)
    weights = gate(torch.randn(4, 6, 5, 5))                             # (B, M)
    assert weights.shape == (4, 3) and (weights >= 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(4))


def test_cl_equals_head_loop():
    z, y = stack(m=4, seed=3)

    def loop(z):
        total = 0.0
        for h in range(4):
            target = sum(z[j] for j in range(4) if j != h).detach() / 3
            total = total + F.cross_entropy(z[h], y) + 0.5 * kl_reference(target, z[h])
        return total

    assert_same(lambda z: cl_loss(z, y, temperature=T, kd_weight=1.0, rampup=0.5), loop, z)


def test_okddip_attention_by_hand():
    attention = PeerAttention(feature_dim=8)                            # P = 8 / 8 = 1
    with torch.no_grad():
        attention.query.weight.copy_(torch.eye(8)[:1])                  # q_a = h_a[0]
        attention.key.weight.copy_(torch.eye(8)[:1])                    # k_b = h_b[0]
    feats = torch.zeros(2, 1, 8)                                        # (A=2, B=1, D=8)
    feats[0, 0, 0], feats[1, 0, 0] = 1.0, 2.0
    alpha = attention(feats)[0]                                         # q.k: [[1, 2], [2, 4]]
    e = math.e
    assert torch.allclose(alpha, torch.tensor([[1 / (1 + e), e / (1 + e)],
                                               [1 / (1 + e ** 2), e ** 2 / (1 + e ** 2)]]))
    # Every row sums to 1.
    assert torch.allclose(attention(torch.randn(3, 5, 8)).sum(-1), torch.ones(5, 3))


def test_okddip_target_by_hand():
    alpha = torch.tensor([[[0.25, 0.75], [0.5, 0.5]]])                  # (B=1, A=2, A=2)
    peers = torch.tensor([[[4.0, 0.0]], [[0.0, 4.0]]])                  # (A=2, B=1, C=2)
    # t_0 = 0.25 z_0 + 0.75 z_1 = [1, 3]; t_1 = 0.5 z_0 + 0.5 z_1 = [2, 2]
    assert torch.allclose(attention_targets(peers, alpha),
                          torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]]))


def test_okddip_equals_peer_loop_target_not_detached():
    z, y = stack(m=4, seed=4)                         # 3 auxiliary peers + the leader
    alpha = F.softmax(torch.randn(5, 3, 3), -1)       # (B, A, A)

    def loop(z, alpha):
        peers, leader = z[:3], z[3]
        total = F.cross_entropy(leader, y) + 0.5 * kl_reference(peers.detach().mean(0), leader)
        for a in range(3):
            target = sum(alpha[:, a, b, None] * peers[b] for b in range(3))   # NOT detached
            total = total + F.cross_entropy(peers[a], y) + 0.5 * kl_reference(target, peers[a])
        return total

    def objective(z, alpha):
        return okddip_loss(z[:3], z[3], alpha, y, temperature=T, kd_weight=1.0, rampup=0.5)

    assert_same(objective, loop, z, alpha)
    # Gradient reaches the attention through t_a, exactly as in the loop.
    _, got = value_and_grad(lambda a: objective(z, a), alpha)
    _, want = value_and_grad(lambda a: loop(z, a), alpha)
    assert got.abs().sum() > 0 and torch.allclose(got, want, atol=1e-6)


def test_okddip_attention_weights_receive_gradient():
    attention = PeerAttention(feature_dim=16)
    z, y = stack(m=3, seed=5)
    feats = torch.randn(2, 5, 16)
    loss, _ = okddip_loss(z[:2], z[2], attention(feats), y, temperature=T, kd_weight=1.0,
                          rampup=1.0)
    loss.backward()
    assert attention.query.weight.grad.abs().sum() > 0 and attention.key.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- CL's gradient scaling
def test_scale_gradient_identity_forward_one_mth_backward():
    x = torch.randn(2, 3, requires_grad=True)
    y = scale_gradient(x, 1.0 / 3)
    assert torch.equal(y, x)
    weight = torch.randn(2, 3)
    (grad,) = torch.autograd.grad((y * weight).sum(), x)
    assert torch.equal(grad, weight * (1.0 / 3))


def test_shared_feature_gradient_is_one_mth_of_unscaled():
    torch.manual_seed(0)
    net = multi_peer_net("resnet8", 5, 3, ensemble_head=False).eval()
    feature = net.run_trunk(torch.randn(2, 3, 32, 32)).detach().requires_grad_(True)  # (1, B, ...)
    weight = torch.randn(3, 2, 5)
    scaled_logits = net.run_peers(scale_gradient(feature, 1.0 / 3))[0]
    (scaled,) = torch.autograd.grad((scaled_logits * weight).sum(), feature)
    (unscaled,) = torch.autograd.grad((net.run_peers(feature)[0] * weight).sum(), feature)
    assert unscaled.abs().sum() > 0 and torch.equal(scaled, unscaled * (1.0 / 3))


def test_cl_method_scales_its_trunk_gradient():
    method = build("cl")
    captured = []
    method.net.trunk.register_forward_hook(lambda module, inputs, output: captured.append(output))
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    weights = {"rampup": 1.0, "teacher_ensemble_weight": 0.0}
    loss, _ = method.objective(method.outputs(images), labels, weights)
    (scaled,) = torch.autograd.grad(loss, captured[0])
    logits, _ = method.net.run_peers(captured[0].unsqueeze(0))          # the same feature, unscaled
    unscaled_loss = cl_loss(logits, labels, **method.distill_scale(weights))[0]
    (unscaled,) = torch.autograd.grad(unscaled_loss, captured[0])
    assert torch.allclose(scaled, unscaled / 3, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- method objects
def build(method, **values):
    """A compared method on resnet8, 10 classes, with the values its constructor asks for."""
    torch.manual_seed(0)
    values = {"arch": "resnet8", "num_classes": 10, "num_peers": 3, "device": torch.device("cpu"),
              "temperature": T, "kd_weight": 1.0, **values}
    method_class = train.METHODS[method].build
    return method_class(**{name: values[name] for name in inspect.signature(method_class).parameters
                           if name in values})


PEERS = ["student_peer0", "student_peer1", "student_peer2"]
EXPECTED = {  # method: (views, eval keys, deployed key)
    "baseline": (1, ["student_peer0"], "student_peer0"),
    "dml": (1, PEERS + ["student_ensemble"], "student_peer0"),
    "kdcl": (3, PEERS + ["student_ensemble"], "student_peer0"),
    "one": (1, PEERS + ["student_ensemble"], "student_peer0"),
    "cl": (1, PEERS + ["student_ensemble"], "student_peer0"),
    "okddip": (1, PEERS[:2] + ["leader", "student_ensemble"], "leader"),
}


def test_methods_are_listed_once_in_the_papers_order():
    assert list(train.METHODS) == ["dml", "cl", "one", "okddip", "kdcl", "pcl", "baseline", "dk",
                                   "pcl_de", "dkel", "kd"]
    assert cli.build_parser().parse_args(["--method", "okddip"]).method == "okddip"
    labels = [train.METHODS[m].label for m in ("dk", "dkel", "okddip")]
    assert labels == ["PCL+L_dk", "DKEL", "OKDDip"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_one_training_step_and_evaluation(name):
    method = build(name)
    num_views, keys, deployed = EXPECTED[name]
    assert method.num_views == num_views
    views, labels = torch.randn(num_views, 4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.set_mode(True)
    loss, parts = method.loss(views, labels, {"rampup": 0.5, "teacher_ensemble_weight": 0.3})
    assert torch.isfinite(loss) and {"ce", "correct", "logit_norm"} <= set(parts)
    assert 0.0 <= parts["correct"].item() <= 1.0 and parts["logit_norm"].item() > 0
    loss.backward()
    # Every trainable parameter (gate and attention included) is reached by the objective.
    params = method.trainable_parameters()
    assert all(p.grad is not None for p in params)
    assert len(params) == sum(len(list(m.parameters())) for m in method.modules().values())
    method.set_mode(False)
    with torch.no_grad():
        logits = method.eval_logits(views[0])
        assert list(logits) == keys and method.deployed_keys() == [deployed]
        assert all(v.shape == (4, 10) for v in logits.values())
        # The exported model reproduces its output and loads into a freshly built deployable.
        exported = method.deployable(deployed).eval()
        assert torch.allclose(exported(views[0]), logits[deployed], atol=1e-5)
        rebuilt = build_deployable("resnet8", 10)
        rebuilt.load_state_dict(exported.state_dict())
        assert torch.allclose(rebuilt.eval()(views[0]), logits[deployed], atol=1e-5)


def test_independent_networks_export_for_either_build_deployable():
    method = build("dml")
    state = method.deployable("student_peer0").state_dict()
    build_deployable("resnet8", 10, shared_trunk=False).load_state_dict(state)
    build_deployable("resnet8", 10).load_state_dict(state)


def test_kdcl_gives_network_k_view_k_and_one_the_gated_ensemble():
    kdcl, one = build("kdcl"), build("one")
    views = torch.randn(3, 2, 3, 32, 32)
    for method in (kdcl, one):
        method.set_mode(False)
    with torch.no_grad():
        logits = kdcl.outputs(views).logits
        for k in range(3):
            assert torch.allclose(logits[k], kdcl.net.peers[k](views[k])[0], atol=1e-5)
        out = one.outputs(views[0])
        gates = one.pieces["gate"](one.net.trunk(views[0]))             # (B, M)
        by_hand = sum(gates[:, i, None] * out.logits[i] for i in range(3))
        assert torch.allclose(out.ensemble, by_hand, atol=1e-5)


def test_baseline_ignores_num_peers():
    args = train.resolve_args(["--method", "baseline", "--num-peers", "5", "--device", "cpu"])
    assert train.build_method(args, cifar_shaped(), torch.device("cpu")).net.num_peers == 1


def test_offline_kd_loss_by_hand():
    # Two classes, label 0: the student s = (0, 0), the teacher t = (ln 3, 0), T = 2, lambda 2,
    # r 0.5.
    student = torch.zeros(1, 1, 2, requires_grad=True)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    loss, parts = offline_kd_loss(student, teacher, torch.tensor([0]), temperature=2.0,
                                  kd_weight=2.0, rampup=0.5)
    p_teacher = [3 ** 0.5 / (3 ** 0.5 + 1), 1 / (3 ** 0.5 + 1)]      # softmax(t / 2)
    kd = 4 * sum(p * math.log(p / 0.5) for p in p_teacher)           # T^2 KL(p_t || (1/2, 1/2))
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(2) + 2 * 0.5 * kd, rel=1e-5)


def test_kd_teacher_is_loaded_frozen_and_never_checkpointed(tmp_path):
    # Another architecture than the student.
    teacher_net = fake_finished_run(tmp_path, arch="resnet20")
    method = build("kd", teacher=rundir.load_teacher(str(tmp_path), cifar_shaped()))
    assert method.num_views == 1 and method.deployed_keys() == ["student_peer0"]
    # Reloaded from the teacher run on resume.
    assert list(method.modules()) == ["student"]
    views, labels = torch.randn(1, 4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.set_mode(True)
    assert method.net.training and not method.teacher.training
    loss, parts = method.loss(views, labels, {"rampup": 1.0, "teacher_ensemble_weight": 0.0})
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.trainable_parameters())
    with torch.no_grad():
        logits = method.eval_logits(views[0])
        expected = teacher_net.eval()(views[0])  # the network saved in the run
        student = method.net(views[0]).logits    # (1, B, C), train mode as in the step
    assert torch.allclose(logits["teacher"], expected, atol=1e-5)
    assert parts["kd"].item() == pytest.approx(kl_reference(expected, student[0]).item(), rel=1e-4)
