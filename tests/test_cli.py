"""The command lines keep their promises: a bad flag is one line that names it and points to
--help (exit code 2), and every --help shows each default once."""
import os
import re
import subprocess
import sys

import pytest

import torch

import cli
import compare
import simulate
import train
from conftest import cifar_shaped
from ema import PeerMeanNetwork, PeerMeanTeacher

PROGRAMS = {"train.py": train.main, "compare.py": compare.main, "simulate.py": simulate.main}


@pytest.mark.parametrize("program, argv, named", [
    ("train.py", ["--epochs", "0"], "--epochs"),
    ("train.py", ["--eval-batch-size", "0"], "--eval-batch-size"),
    ("train.py", ["--no-such-flag"], "--no-such-flag"),
    ("train.py", ["--method", "nope"], "--method"),
    ("train.py", ["--method", "dkel", "--authors-pcl-teacher"], "--authors-pcl-teacher"),
    ("train.py", ["--method", "baseline", "--ensemble-lr-per-peer"], "--ensemble-lr-per-peer"),
    ("train.py", ["--method", "dk", "--rampup-scales-de"], "--rampup-scales-de"),
    ("compare.py", ["--epochs", "0"], "--epochs"),
    ("compare.py", ["--experiment", "table9"], "--experiment"),
    ("simulate.py", ["montecarlo", "--trials", "0"], "--trials"),
])
def test_a_bad_flag_is_one_line_naming_it_and_the_help(program, argv, named, capsys):
    with pytest.raises(SystemExit) as stop:
        PROGRAMS[program](argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err   # no 20-line usage before it
    assert named in err and "--help" in err and "usage:" not in err


def help_text(parser) -> str:
    return parser.format_help()


def subcommand_helps(parser) -> list[str]:
    actions = [a for a in parser._actions if a.choices and hasattr(a.choices, "items")]
    return [sub.format_help() for action in actions for sub in action.choices.values()]


@pytest.mark.parametrize("texts", [
    lambda: [help_text(cli.build_parser())],
    lambda: [help_text(compare.build_parser())],
    lambda: subcommand_helps(simulate.build_parser()),
], ids=["train.py", "compare.py", "simulate.py"])
def test_every_help_shows_each_default_once(texts):
    for text in texts():
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: False)" not in flat
        # An option whose text states its default ("default ..." or "Default ...") gets no second
        # "(default: X)" from argparse.
        for entry in re.split(r"\s(?=--?[a-z])", flat):
            assert len(re.findall(r"\bdefault\b", entry, flags=re.I)) <= 1, entry


def test_defaults_that_argparse_alone_knows_are_shown():
    flat = " ".join(help_text(compare.build_parser()).split())
    assert "(default: [0, 1, 2])" in flat and "(default: runs)" in flat
    montecarlo = " ".join(subcommand_helps(simulate.build_parser())[-1].split())
    assert "(default: 10000)" in montecarlo and "(default: 0.1)" in montecarlo


def built(*argv: str):
    args = train.resolve_args(["--arch", "resnet8", "--device", "cpu", *argv])
    return train.build_method(args, cifar_shaped(), torch.device("cpu"))


def test_each_flag_reaches_its_method():
    assert type(built("--method", "pcl").teacher) is PeerMeanTeacher
    assert type(built("--method", "pcl", "--authors-pcl-teacher").teacher) is PeerMeanNetwork
    dkel = built("--method", "dkel", "--init-iters", "3", "--init-lr", "0.02", "--temperature", "2",
                 "--kd-weight", "0.5", "--ema-decay", "0.9", "--num-peers", "4")
    assert (dkel.init_iters, dkel.init_lr, dkel.init_weight_decay) == (3, 0.02, 0.0)
    assert (dkel.temperature, dkel.kd_weight, dkel.teacher.ema_decay) == (2.0, 0.5, 0.9)
    assert dkel.student.num_peers == 4 and not dkel.teacher.authors_warmup
    authors = built("--method", "dk", "--init-iters", "3", "--authors-code",
                    "--ensemble-lr-per-peer")
    # The authors' k + 1 steps at lr 0.001 with weight decay 5e-4 (docs/spec.md Sec. 8).
    assert (authors.init_iters, authors.init_lr, authors.init_weight_decay) == (4, 0.001, 5e-4)
    assert authors.teacher.authors_warmup and len(authors.trainable_parameters()) == 2
    # L_de's weight: lambda w(ep) by default, lambda r(ep) w(ep) with the flag and in the authors'
    # code; DK and PCL have no L_de, and the authors' code leaves them as they are.
    assert not dkel.rampup_scales_de and built("--method", "dkel", "--rampup-scales-de").rampup_scales_de
    assert type(built("--method", "pcl_de").teacher) is PeerMeanTeacher
    assert built("--method", "pcl_de", "--authors-code").rampup_scales_de
    assert not authors.rampup_scales_de and not authors.with_de
    okddip = built("--method", "okddip", "--num-peers", "4", "--temperature", "5")
    assert okddip.net.num_peers == 4 and okddip.temperature == 5.0


# Runs an entry point as `python <program> --help` would, with sys.version_info saying 3.9.
OLD_PYTHON = """
import runpy, sys
sys.version_info = (3, 9, 18, "final", 0)
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_an_older_python_is_one_line_before_any_import(program):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", OLD_PYTHON, program], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {program} needs Python 3.10 or newer, this is Python 3.9; run it with a newer "
        f"python (README, Quick start)"]
