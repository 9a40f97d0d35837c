"""The authors' code by one flag (docs/spec.md Sec. 8), model selection on a held-out validation split,
and the warning for runs too short for the EMA teacher (issue: faithfulness)."""
import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import data
import train
from conftest import tiny_data
from infra.report import ema_lag_warning
from methods import DK
from models import multi_peer_net

AUTHORS_FLAGS = ("authors_rampup", "authors_ema_warmup", "authors_weight_cutoff", "authors_init")


def weights(epoch, *flags, epochs=300):
    args = train.resolve_args(["--epochs", str(epochs), "--device", "cpu", *flags])
    return train.epoch_weights(args, epoch)


def test_authors_rampup_by_hand():
    # r(ep) = 0.1 exp(-5 (1 - ep/0.1)^2) for ep <= 80, 0.1 after, whatever --epochs says.
    assert weights(0, "--authors-rampup")["rampup"] == pytest.approx(0.1 * math.exp(-5.0))
    assert weights(1, "--authors-rampup")["rampup"] == pytest.approx(0.1 * math.exp(-5.0 * 81))
    assert weights(80, "--authors-rampup")["rampup"] == 0.0          # exp(-5 * 799^2) underflows
    assert weights(81, "--authors-rampup")["rampup"] == 0.1
    assert weights(81, "--authors-rampup", epochs=100)["rampup"] == 0.1  # TinyImageNet: epochs 81-99
    assert weights(50, "--authors-rampup", epochs=100)["rampup"] == 0.0


def test_authors_weight_cutoff_only_for_the_exponential_decay():
    # beta = 0.5: exp(-0.5 ep) = 0.0111 at ep 9, 0.0067 at ep 10.
    assert weights(9, "--authors-weight-cutoff")["teacher_ensemble_weight"] == pytest.approx(math.exp(-4.5))
    assert weights(10, "--authors-weight-cutoff")["teacher_ensemble_weight"] == 0.0
    assert weights(10)["teacher_ensemble_weight"] == pytest.approx(math.exp(-5.0))
    # cos decay at ep = 299 of 300: 0.5 (1 + cos(pi 299/300)) = 2.7e-5 < 0.01, and it is kept.
    late = weights(299, "--authors-weight-cutoff", "--decay", "cos")["teacher_ensemble_weight"]
    assert late == pytest.approx(0.5 * (1 + math.cos(math.pi * 299 / 300))) and late > 0


def test_authors_code_switches_every_behaviour_on(tmp_path, small_data):
    args = train.resolve_args(["--authors-code", "--device", "cpu"])
    assert all(getattr(args, flag) for flag in AUTHORS_FLAGS)
    assert not any(getattr(train.resolve_args(["--device", "cpu"]), flag) for flag in AUTHORS_FLAGS)
    assert train.main(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1", "--batch-size", "64",
                       "--device", "cpu", "--out-dir", str(tmp_path), "--authors-code"]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["authors_code"] and all(config[flag] for flag in AUTHORS_FLAGS)


@pytest.mark.parametrize("k", [0, 2])
def test_authors_init_runs_k_plus_1_steps_with_weight_decay(k):
    torch.manual_seed(0)
    method = DK(multi_peer_net("resnet8", 10, 3), temperature=3.0, kd_weight=1.0, ema_decay=0.999,
                init_iters=k, init_lr=0.01, authors_init=True)
    views, labels = torch.randn(3, 4, 3, 32, 32), torch.randint(0, 10, (4,))
    teacher = method.teacher.network
    # The first step by hand: theta' = theta - 0.001 (grad + 5e-4 theta), plain SGD.
    reference = copy.deepcopy(teacher).requires_grad_(True).train()
    loss = sum(F.cross_entropy(reference(views).logits[i], labels) for i in range(3)) / 3
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    expected = [p.detach() - 0.001 * (g + 5e-4 * p.detach()) for p, g in zip(reference.parameters(), grads)]
    drawn = []

    def batches():
        while True:
            drawn.append(1)
            yield views, labels

    if k == 0:
        method.initialise(batches())
        for p, e in zip(teacher.parameters(), expected):
            assert torch.allclose(p, e, atol=1e-6)
    else:
        method.initialise(batches())
    assert len(drawn) == k + 1


def test_paper_init_runs_k_steps():
    method = DK(multi_peer_net("resnet8", 10, 3), temperature=3.0, kd_weight=1.0, ema_decay=0.999,
                init_iters=2, init_lr=0.01)
    drawn = []
    views, labels = torch.randn(3, 4, 3, 32, 32), torch.randint(0, 10, (4,))
    method.initialise(drawn.append(1) or (views, labels) for _ in iter(int, 1))
    assert len(drawn) == 2


def test_validation_split_is_disjoint_stratified_and_seeded():
    full = tiny_data("synthetic", "", "cpu")                 # 256 training images, 10 classes
    split = data.hold_out_validation(full, 50, seed=3)
    assert len(split.val_labels) == 50 and len(split.train_labels) == 206
    # Disjoint, and together the whole training set: images are distinct (random pixels).
    flat = lambda t: {bytes(x.flatten().tolist()) for x in t}  # noqa: E731
    assert flat(split.val_images).isdisjoint(flat(split.train_images))
    assert flat(split.val_images) | flat(split.train_images) == flat(full.train_images)
    # Stratified: each class's share is within one image of 50 * N_c / 256.
    counts = torch.bincount(full.train_labels, minlength=10).double()
    assert (torch.bincount(split.val_labels, minlength=10) - 50 * counts / 256).abs().max() < 1
    again, other = (data.hold_out_validation(full, 50, seed=s) for s in (3, 4))
    assert torch.equal(again.val_images, split.val_images)
    assert not torch.equal(other.val_images, split.val_images)


def test_deployed_model_is_chosen_on_validation(tmp_path, small_data):
    assert train.main(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "3", "--batch-size", "32",
                       "--device", "cpu", "--out-dir", str(tmp_path), "--val-size", "64",
                       "--ema-decay", "0.9"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(json.dumps(r)) for r in train.rundir.torch.load(tmp_path / "checkpoint.pt",
                                                                      weights_only=True)["history"]]
    # The choice by hand: the best validation accuracy over epochs and teacher peers, earliest epoch.
    keys = [f"teacher_peer{i}" for i in range(3)]
    best = max(r[f"val_acc_{k}"] for r in rows for k in keys)
    epoch = min(r["epoch"] for r in rows for k in keys if r[f"val_acc_{k}"] == best)
    chosen = summary["selection"]
    assert chosen["on"] == "validation split" and chosen["val_acc"] == best and chosen["epoch"] == epoch
    row = rows[epoch - 1]
    assert chosen["test_acc"] == row[f"acc_{chosen['output']}"] and row[f"val_acc_{chosen['output']}"] == best
    assert summary["deployable"]["epoch"] == epoch
    assert summary["paper_convention_best_peer_best_epoch"]["selected_on"] == "test split"


def test_without_validation_no_selection_is_made(tmp_path, small_data):
    assert train.main(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1", "--batch-size", "64",
                       "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    chosen = json.loads((tmp_path / "summary.json").read_text())["selection"]
    assert chosen["on"].startswith("none") and chosen["output"] == "teacher_peer0" and chosen["epoch"] == 1


def test_the_lag_warning_fires_when_the_teacher_lags_longer_than_the_run(tmp_path, small_data, capsys):
    # 3 epochs of 39 steps (the synthetic set at batch 128) = 117 steps; time constant 1/(1 - 0.99) = 100.
    assert ema_lag_warning(0.99, 39, 3) is None
    # The paper's alpha over the same 117 steps: 1,000 steps, and 0.999^117 = 0.8894 of the teacher's
    # starting weights left in the final teacher.
    message = ema_lag_warning(0.999, 39, 3)
    assert "1,000 optimizer steps" in message and "this run's 117" in message and "89%" in message
    # The largest alpha of four decimals with 1/(1 - alpha) <= 117: 1 - 1/117 = 0.99145 -> 0.9914.
    suggested = float(re.search(r"--ema-decay (\S+) ", message)[1])
    assert suggested == 0.9914 and 1 / (1 - 0.9914) <= 117 < 1 / (1 - 0.9915)
    assert ema_lag_warning(suggested, 39, 3) is None
    assert ema_lag_warning(0.9915, 39, 3) is not None
    for steps in range(1, 2000):  # the suggested value never warns, whatever the run's length
        lag = ema_lag_warning(0.9999, steps, 1)
        fitting = float(re.search(r"--ema-decay (\S+) ", lag)[1])
        assert ema_lag_warning(fitting, steps, 1) is None, steps
    assert ema_lag_warning(0.999, 390, 300) is None                # the paper's 117,000 steps
    train.main(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1", "--batch-size", "64",
                "--device", "cpu", "--out-dir", str(tmp_path)])  # 4 steps at alpha 0.999
    assert "warning: the teacher will lag" in capsys.readouterr().err
