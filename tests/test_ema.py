"""Eq. (5) and the teacher initialisation of Sec. 3.3."""
import copy

import pytest
import torch

from ema import EMATeacher, IndependentTeacher, PeerMeanTeacher, initialise_teacher
from methods import PCL
from models import multi_peer_net


def _pair(dtype=torch.float64):
    torch.manual_seed(0)
    student = multi_peer_net("resnet8", 10, 3).to(dtype)
    teacher = multi_peer_net("resnet8", 10, 3).to(dtype)  # different random weights
    return student, teacher


def test_one_update_is_the_convex_combination():
    student, teacher = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    EMATeacher(teacher, student, 0.9).update()
    for name, p_s in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p_s.detach()
        assert torch.allclose(dict(teacher.named_parameters())[name], expected, rtol=0, atol=1e-14)
    # Buffers (BatchNorm running statistics) are the teacher's own: untouched by Eq. (5).
    for name, buf in teacher.named_buffers():
        assert torch.equal(buf, before[name])


def test_n_updates_with_fixed_student_match_closed_form():
    # theta_T(n) = alpha^n theta_T(0) + (1 - alpha^n) theta_S
    student, teacher = _pair()
    start = [p.detach().clone() for p in teacher.parameters()]
    ema = EMATeacher(teacher, student, 0.99)
    for step in range(50):
        ema.update(step)
    a = 0.99 ** 50
    for p_t, p0, p_s in zip(teacher.parameters(), start, student.parameters()):
        assert torch.allclose(p_t, a * p0 + (1 - a) * p_s.detach(), rtol=0, atol=1e-12)


def test_authors_warmup_copies_student_at_first_step():
    student, teacher = _pair()
    ema = EMATeacher(teacher, student, 0.999, authors_warmup=True)
    assert ema.ema_decay_at(0) == 0.0 and ema.ema_decay_at(1) == 0.5 and ema.ema_decay_at(10 ** 6) == 0.999
    ema.update(0)
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(p_t, p_s)


def test_independent_teacher_is_a_copy_without_shared_parameters():
    student, _ = _pair(torch.float32)
    ema = IndependentTeacher(student, 0.999)
    teacher = ema.network
    assert teacher.ensemble_head is None
    student_ptrs = {p.data_ptr() for p in student.parameters()}
    assert not any(p.data_ptr() in student_ptrs for p in teacher.parameters())
    for name, p in teacher.named_parameters():
        assert torch.equal(p, dict(student.named_parameters())[name])
    assert not any(p.requires_grad for p in teacher.parameters())


def test_peer_mean_teacher_covers_the_branches_only():
    student, _ = _pair(torch.float32)
    ema = PeerMeanTeacher(student, 0.999)
    n_branch = sum(p.numel() for p in student.peers.parameters())
    assert sum(p.numel() for p in ema.network.parameters()) == n_branch
    out = student(torch.randn(3, 2, 3, 32, 32))
    logits = ema.logits(None, out)  # the EMA branches on the student's own trunk output
    assert torch.allclose(logits, out.logits, atol=1e-5)  # a copy at step 0: same logits


def test_initialisation_changes_teacher_and_leaves_student():
    torch.manual_seed(1)
    student = multi_peer_net("resnet8", 10, 3)
    student_before = copy.deepcopy(student.state_dict())
    ema = IndependentTeacher(student, 0.999)
    teacher_before = [p.clone() for p in ema.network.parameters()]
    views, labels = torch.randn(3, 8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = initialise_teacher(ema.network, [(views, labels)] * 2, iters=2, lr=0.01)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, ema.network.parameters()))
    for k, v in student.state_dict().items():
        assert torch.equal(v, student_before[k])
    assert not any(p.requires_grad for p in ema.network.parameters())


def test_plain_sgd_step_by_hand():
    # One iteration at lr 0.01 of plain SGD: theta' = theta - 0.01 * grad (no momentum, no decay).
    torch.manual_seed(2)
    teacher = multi_peer_net("resnet8", 10, 3, ensemble_head=False).eval()
    views, labels = torch.randn(3, 4, 3, 32, 32), torch.randint(0, 10, (4,))
    reference = copy.deepcopy(teacher).train()
    loss = sum(torch.nn.functional.cross_entropy(reference(views).logits[i], labels) for i in range(3)) / 3
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    expected = [p.detach() - 0.01 * g for p, g in zip(reference.parameters(), grads)]
    initialise_teacher(teacher, [(views, labels)], iters=1, lr=0.01)
    for p, e in zip(teacher.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-6)


def test_mismatched_teacher_rejected():
    student = multi_peer_net("resnet8", 10, 2)
    with pytest.raises(ValueError, match="without a student counterpart"):
        EMATeacher(multi_peer_net("resnet8", 10, 3), student, 0.9)


def _pcl(authors_pcl_teacher: bool):
    torch.manual_seed(0)
    student = multi_peer_net("resnet8", 10, 3)
    return PCL(student, temperature=3.0, kd_weight=1.0, ema_decay=0.9,
               authors_pcl_teacher=authors_pcl_teacher)


def _teacher_logits(method, views):
    method.set_mode(False)  # running statistics: the logits depend on the weights alone
    with torch.no_grad():
        return method.teacher_logits(views, method.student(views))


@pytest.mark.parametrize("authors_pcl_teacher", [False, True])
def test_pcls_teacher_runs_on_the_students_trunk_unless_built_the_authors_way(authors_pcl_teacher):
    method = _pcl(authors_pcl_teacher)
    student, teacher = method.student, method.teacher.network
    student_tensors = {t.data_ptr() for t in [*student.parameters(), *student.buffers()]}
    teacher_tensors = {t.data_ptr() for t in [*teacher.parameters(), *teacher.buffers()]}
    # The paper's reading: EMA branches, no trunk. The authors' way: a whole network of its own.
    assert hasattr(teacher, "trunk") == authors_pcl_teacher
    assert teacher_tensors.isdisjoint(student_tensors)
    views = torch.randn(3, 2, 3, 32, 32)
    before = _teacher_logits(method, views)
    with torch.no_grad():  # move the student's trunk alone, the teacher not updated
        for p in student.trunk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = _teacher_logits(method, views)
    # Only a teacher that runs on the student's own trunk sees the student's trunk move.
    assert torch.equal(before, after) == authors_pcl_teacher
    assert method.teacher.term == "pm"


def test_the_authors_pcl_teacher_is_the_ema_of_the_whole_student():
    method = _pcl(True)
    start = {k: v.clone() for k, v in method.teacher.network.named_parameters()}
    student = dict(method.student.named_parameters())
    with torch.no_grad():
        for p in student.values():
            p.add_(1.0)
    method.after_step(0)
    for name, p in method.teacher.network.named_parameters():
        # Eq. (5) on the trunk too: 0.9 * theta_T + 0.1 * theta_S.
        assert torch.allclose(p, 0.9 * start[name] + 0.1 * student[name], atol=1e-6), name
    assert any(name.startswith("trunk.") for name in start)
