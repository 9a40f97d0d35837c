"""Make the flat top-level modules importable from tests/, keep the tests on 2 CPU threads, and
share the tiny synthetic data set of the end-to-end tests, a finished run made by hand, and the
repository's tracked files."""
import functools
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

import cli  # noqa: E402  (after the path is set)
import data  # noqa: E402
import train  # noqa: E402
from models import build_deployable  # noqa: E402

REAL_LOAD = data.load_data


def tracked(*patterns: str) -> list[str]:
    """The files git tracks (those matching `patterns`, if any), relative to the root."""
    return subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def tiny_data(name, data_dir, device, seed=0):
    """256 training and 128 test images of the synthetic set (keeps each epoch about a second),
    each run's own copy."""
    tiny = tiny_synthetic(str(device), seed)
    return replace(tiny, **{field: getattr(tiny, field).clone() for field in
                            ("train_images", "train_labels", "test_images", "test_labels")})


@functools.cache
def tiny_synthetic(device: str, seed: int):
    """The tiny set, drawn once per device and seed (drawing the whole synthetic set takes most of
    a second, and the end-to-end tests start about a hundred runs)."""
    full = REAL_LOAD("synthetic", ".", device, seed)
    return replace(full, train_images=full.train_images[:256], train_labels=full.train_labels[:256],
                   test_images=full.test_images[:128], test_labels=full.test_labels[:128])


@pytest.fixture
def small_data(monkeypatch):
    """train.py (and compare.py through it) loads the tiny set whatever --dataset says."""
    monkeypatch.setattr(train.data, "load_data", tiny_data)
    return tiny_data


def fake_finished_run(path, arch="resnet8", num_classes=10, image_size=32, data_set=None):
    """A finished run directory as offline KD reads it (summary.json's "deployable" entry and
    deployable.pt), written by hand with a freshly initialised network; returns that network.
    `data_set`: (name, mean, std) of the data set it records, or None, as runs written before
    summary.json recorded it."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    net = build_deployable(arch, num_classes)
    torch.save(net.state_dict(), path / "deployable.pt")
    deployable = {"file": "deployable.pt", "arch": arch, "num_classes": num_classes, "image_size": image_size}
    if data_set is not None:
        deployable.update(zip(("dataset", "mean", "std"), data_set))
    (path / "summary.json").write_text(json.dumps({"deployable": deployable}))
    return net


def cifar_shaped(num_classes=10):
    """A data set of one 32x32 image, as build_method and load_teacher see a data set."""
    image, label = torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)
    return data.ImageData("synthetic", image, label, image, label, (0.5,) * 3, (0.25,) * 3,
                          num_classes)


# compare.py's run directories (tests/test_compare.py, tests/test_sweep.py)
TINY_TRAINING = ["--", "--batch-size", "64", "--device", "cpu"]


def config_by_hand(path, train_argv):
    """config.json as train.py writes it for these flags (its resolved arguments)."""
    os.makedirs(path, exist_ok=True)
    (path / "config.json").write_text(json.dumps(vars(cli.resolve_args(train_argv))))


def finished_by_hand(runs_dir, name, final, best, train_argv):
    """A run directory made with train.py's `train_argv` whose summary.json says it finished with
    these accuracies."""
    config_by_hand(runs_dir / name, train_argv)
    summary = {"headline_final_deployed_mean": final,
               "paper_convention_best_peer_best_epoch": {"acc": best}}
    (runs_dir / name / "summary.json").write_text(json.dumps(summary))
