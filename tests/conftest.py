"""Make the flat top-level modules importable from tests/, keep the tests on 2 CPU threads, and
share the tiny synthetic data set of the end-to-end tests."""
import os
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

import data as datasets  # noqa: E402  (after the path is set)
import train  # noqa: E402

REAL_LOAD = datasets.load_data


def tiny_data(name, data_dir, device, seed=0):
    """256 training and 128 test images of the synthetic set (keeps each epoch about a second)."""
    full = REAL_LOAD("synthetic", data_dir, device, seed)
    return replace(full, train_images=full.train_images[:256], train_labels=full.train_labels[:256],
                   test_images=full.test_images[:128], test_labels=full.test_labels[:128])


@pytest.fixture
def small_data(monkeypatch):
    """train.py (and compare.py through it) loads the tiny set whatever --dataset says."""
    monkeypatch.setattr(train.datasets, "load_data", tiny_data)
    return tiny_data
