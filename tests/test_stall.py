"""The start-of-training stall of the multi-peer student
(docs/training.md#the-start-of-training), and --ensemble-lr-per-peer, which trains the Eq. (3)
ensemble head at lr/M.

The head h classifies the M stacked pooled features, all >= 0, so the curvature of L_ce(e, y) in
h's weights is ~M times a peer classifier's. At the paper's lr 0.1 with Nesterov momentum 0.9 a
resnet20 student's head is past the stability limit and e's logits blow up within three steps;
at lr/M it has a peer classifier's step size. The tests build their own synthetic data."""
import pytest
import torch

import cli
import data
import train
from conftest import cifar_shaped
from methods import DKEL
from models import multi_peer_net

LR, MOMENTUM = 0.1, 0.9     # the paper's optimizer (Sec. 4.2)
FIRST_EPOCH = {"rampup": 0.0067, "teacher_ensemble_weight": 1.0}  # r(ep) and w(ep) of the first epoch (R = 8 epochs)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for these small resnet20 steps: on a loaded 2-core machine two threads made
    them ~25x slower (58 s against 2 s for a seed's pair of runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_set(count: int = 256, size: int = 16) -> data.ImageData:
    """Small synthetic images (16 x 16 keeps a resnet20 step cheap; the pooled features' mean,
    which sets the curvature, is the same as at 32 x 32)."""
    images, labels = data.make_synthetic(count, 0, size=size)
    mean = tuple(images.double().mean((0, 2, 3)).div(255).tolist())
    std = tuple(images.double().div(255).std((0, 2, 3), unbiased=False).tolist())
    return data.ImageData("synthetic", images, labels, images[:8], labels[:8], mean, std, 10)


def student(seed: int, remedy: bool) -> tuple[DKEL, torch.optim.Optimizer]:
    """The DKEL student of train.py at the paper's settings, and its optimizer."""
    torch.manual_seed(seed)
    method = DKEL(multi_peer_net("resnet20", 10, 3), temperature=3.0, kd_weight=1.0, ema_decay=0.99,
                  init_iters=0, init_lr=0.01, ensemble_lr_per_peer=remedy)
    optimizer = train.sgd(method.trainable_parameters(), lr=LR, momentum=MOMENTUM, weight_decay=5e-4)
    return method, optimizer


def lr_of(optimizer: torch.optim.Optimizer, parameter: torch.nn.Parameter) -> float:
    return next(g["lr"] for g in optimizer.param_groups if any(p is parameter for p in g["params"]))


def nesterov_stable(step: float, momentum: float) -> bool:
    """Whether torch's Nesterov SGD converges on a quadratic of curvature h with lr * h = step.
    With u = lr * v: u' = mu u + step p, p' = p - step p - mu u', i.e. (p, u) times the matrix
    below; stable when its spectral radius is below 1 (at momentum 0.9: step < 2(1+mu)/(1+2mu))."""
    matrix = torch.tensor([[1 - step * (1 + momentum), -momentum ** 2], [step, momentum]],
                          dtype=torch.float64)
    return torch.linalg.eigvals(matrix).abs().max().item() < 1


def top_eigenvalue(features: torch.Tensor) -> float:
    """lambda_max of E[f f^T] over the batch, features (B, D)."""
    return torch.linalg.eigvalsh(features.double().T @ features.double() / len(features))[-1].item()


def test_nesterov_limit_of_the_docs():
    limit = 2 * (1 + MOMENTUM) / (1 + 2 * MOMENTUM)  # 1.357, as docs/training.md states
    assert nesterov_stable(0.99 * limit, MOMENTUM) and not nesterov_stable(1.01 * limit, MOMENTUM)


@pytest.mark.parametrize("seed", [0, 1])
def test_head_curvature_past_the_limit_at_lr_and_within_it_at_lr_over_m(seed):
    """At a uniform softmax the Hessian of L_ce in a linear classifier's weights is
    (I/C - 11^T/C^2) (x) E[f f^T], top eigenvalue lambda_max(E[f f^T]) / C."""
    batch = next(data.train_batches(synthetic_set(64), 64, 3, torch.Generator().manual_seed(0)))
    for remedy in (False, True):
        method, optimizer = student(seed, remedy)
        with torch.no_grad():
            out = method.student(batch[0])
        feats = out.feats.float()                                   # (M, B, D)
        stacked = feats.transpose(0, 1).flatten(1)                  # (B, M*D): h's input
        head_lr = lr_of(optimizer, method.student.ensemble_head.weight)
        head_step = head_lr * top_eigenvalue(stacked) / 10
        for i, peer in enumerate(method.student.peers):
            peer_step = lr_of(optimizer, peer.classifier.weight) * top_eigenvalue(feats[i]) / 10
            assert nesterov_stable(peer_step, MOMENTUM), (seed, i, peer_step)
        assert nesterov_stable(head_step, MOMENTUM) == remedy, (seed, remedy, head_step)


def ensemble_logit_std(seed: int, remedy: bool, steps: int = 3) -> float:
    """The std of e's logits (B, C) after `steps` of train.py's student step at the paper's
    settings, on a fixed batch stream of the synthetic set."""
    method, optimizer = student(seed, remedy)
    method.set_mode(True)
    batches = data.train_batches(synthetic_set(), 32, 3, torch.Generator().manual_seed(seed))
    for step in range(steps):
        views, labels = next(batches)
        train.student_step(method, optimizer, views, labels, FIRST_EPOCH, "fp32")
        method.after_step(step)
    views, _ = next(batches)
    with torch.no_grad():
        return method.student(views).ensemble.std().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ensemble_logits_blow_up_at_lr_and_stay_bounded_at_lr_over_m(seed):
    """Measured (seeds 0-9): after 3 steps the std of e is 3.5-9.2 at lr (from ~0.7 at
    initialisation) and 0.6-1.3 at lr/M."""
    assert ensemble_logit_std(seed, remedy=False) > 3.0
    assert ensemble_logit_std(seed, remedy=True) < 2.5


def test_flag_is_off_by_default_and_keeps_one_parameter_group():
    """The paper's recipe: one group at lr over every student parameter, as without the flag."""
    args = cli.resolve_args(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2"])
    assert args.ensemble_lr_per_peer is False
    method = train.build_method(args, cifar_shaped(), torch.device("cpu"))
    optimizer = train.sgd(method.trainable_parameters(), lr=LR, momentum=MOMENTUM, weight_decay=5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [LR]
    assert optimizer.param_groups[0]["params"] == list(method.student.parameters())


def test_flag_reaches_the_method_and_the_schedule_decays_both_groups():
    args = cli.resolve_args(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2",
                             "--milestones", "1", "--ensemble-lr-per-peer"])
    method = train.build_method(args, cifar_shaped(), torch.device("cpu"))
    optimizer = train.sgd(method.trainable_parameters(), lr=LR, momentum=MOMENTUM, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)
    head = method.student.ensemble_head
    assert lr_of(optimizer, head.weight) == lr_of(optimizer, head.bias) == pytest.approx(LR / 3)
    rest = [p for name, p in method.student.named_parameters() if not name.startswith("ensemble_head.")]
    assert all(lr_of(optimizer, p) == LR for p in rest)
    optimizer.step()
    scheduler.step()
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([LR / 30, LR / 10])


@pytest.mark.parametrize("method", ["baseline", "dml"])
def test_flag_is_refused_for_methods_without_the_ensemble_head(method, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.resolve_args(["--method", method, "--ensemble-lr-per-peer"])
    assert exit_info.value.code == 2
    refusal = "--ensemble-lr-per-peer is for --method pcl, dk, pcl_de or dkel"
    assert refusal in capsys.readouterr().err
