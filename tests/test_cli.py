"""The command lines keep their promises: a bad flag is one line that names it and points to
--help (exit code 2), and every --help shows each default once."""
import os
import re
import subprocess
import sys

import pytest

import cli
import compare
import simulate
import train

PROGRAMS = {"train.py": train.main, "compare.py": compare.main, "simulate.py": simulate.main}


@pytest.mark.parametrize("program, argv, named", [
    ("train.py", ["--epochs", "0"], "--epochs"),
    ("train.py", ["--no-such-flag"], "--no-such-flag"),
    ("train.py", ["--method", "nope"], "--method"),
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
