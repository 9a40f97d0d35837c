"""tools/bench_train.py's op count (what its dispatch mode counts and leaves out, one DKEL step's
convolutions against the networks' layers) and its --base comparison."""
import argparse
import os
import subprocess
import sys

import torch

import data
from tools import bench_train


def test_the_counter_counts_kernels_not_views_detaches_or_allocations():
    x = torch.randn(4, 4)
    with bench_train.OpCounter() as counter:
        x.view(16).t().detach()
        torch.empty(3)
        y = (x + 1).transpose(0, 1)
        y.add_(1)
        y.float().to(torch.bfloat16)  # float() of a float tensor is no op, to() is a cast
    assert counter.counts == {"add": 1, "add_": 1, "_to_copy": 1}


def test_one_dkel_step_runs_each_convolution_once_forward_and_the_students_once_backward():
    options = argparse.Namespace(arch="resnet8", batch_size=2, compile=False)
    dataset = data.synthetic_data(8, 1, 0)
    counts = bench_train.count_ops(options, dataset, torch.device("cpu"))
    method, _ = bench_train.dkel_method(options, dataset, torch.device("cpu"))
    student = sum(isinstance(m, torch.nn.Conv2d) for m in method.student.modules())
    teacher = sum(isinstance(m, torch.nn.Conv2d) for m in method.teacher.network.modules())
    assert student == teacher > 0
    assert counts["convolution"] == student + teacher  # the teacher's forward has no backward
    assert counts["convolution_backward"] == student
    assert "detach" not in counts and "view" not in counts


def test_base_times_ours_against_a_commit_in_its_own_worktree(monkeypatch, capsys):
    # HEAD against itself: both lines, the base at 1.00x itself, and no worktree left behind.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = worktrees(root)
    monkeypatch.setattr(sys, "argv", ["bench_train", "--base", "HEAD", "--arch", "resnet8",
                                      "--batch-size", "2", "--steps", "1", "--rounds", "1",
                                      "--device", "cpu"])
    bench_train.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dkel step, resnet8, batch 2, bf16, cpu")
    assert lines[1].startswith("ours ") and lines[2].startswith("HEAD ")
    assert lines[2].endswith(" 1.00x HEAD")
    assert worktrees(root) == before


def worktrees(root):
    return subprocess.run(["git", "-C", root, "worktree", "list"], capture_output=True,
                          text=True, check=True).stdout
