"""The README keeps its promises: its size, its own-network example (run exactly as shown), its
smoke run's printed lines and docs/training.md's whole printout of it (against what train.py
prints), a repository that stands alone, and its layout: the root is the paper, the machinery
one folder down."""
import ast
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import train
from conftest import tracked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
TRAINING_MD = open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8").read()
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")  # not the 0 of teacher_peer0
TIED_PEER = re.compile(r"(\(\w+_peer)\d+(, epoch)")  # the paper's convention line's output


def section(title: str, text: str = README) -> str:
    """The text of the section `## title` of `text` (the README), up to the next `## `."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_is_at_most_9000_characters():
    assert len(README) <= 9_000


def test_no_file_of_the_repository_points_outside_it():
    files = tracked()
    outside = "../" + "shared"  # spelled in two pieces so that this file does not name it
    for name in files:
        path = os.path.join(ROOT, name)
        if name.endswith((".png", ".npz")) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            assert outside not in f.read(), name


def test_the_own_network_example_runs_one_dkel_step(capsys):
    example, = code_blocks(section("DKEL on your own network"), "python")
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert capsys.readouterr().out.startswith(f"Eq. (12) = {scope['loss'].item():.3f}: {{")
    method, loss = scope["method"], scope["loss"]
    assert math.isfinite(loss.item())
    # One student step happened, and Eq. (5) moved the teacher by (1 - alpha) towards it.
    student = dict(method.student.named_parameters())
    teacher = dict(method.teacher.network.named_parameters())
    assert teacher.keys() <= student.keys() and len(teacher) > 10
    assert all(not p.requires_grad for p in teacher.values())
    assert scope["student"].num_peers == 3 and loss.requires_grad


def summary_lines(text: str) -> dict[str, tuple[float, ...]]:
    """The summary table's rows: output name -> its numbers."""
    rows = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)\s+([\d.]+)\s+([\d.]+)", line.strip())
        if match:
            rows[match[1]] = (float(match[2]), float(match[3]))
    return rows


def smoke_command(text: str) -> str:
    command, = [line for block in code_blocks(text, "bash") for line in block.splitlines()
                if "--dataset synthetic" in line]
    return command


def shape_of(line: str) -> str:
    """A line with its numbers as # and its runs of spaces as one: another CPU's numbers may have
    another width (99.90 where 100.00 was), and the summary table pads them to one column."""
    line = TIED_PEER.sub(r"\1#\2", line)  # a tie at the best accuracy: the CPU's rounding picks
    return " ".join(NUMBER.sub("#", line).split())


def shown_as_printed(shown: str, printed: str) -> None:
    """Each line shown is a line printed, its numbers within 1 (another CPU's kernels may round
    differently)."""
    by_shape = {shape_of(line): line for line in printed.splitlines()}
    for line in shown.strip().splitlines():
        shape = shape_of(line)
        assert shape in by_shape, line
        numbers = [float(n) for n in NUMBER.findall(by_shape[shape])]
        assert numbers == pytest.approx([float(n) for n in NUMBER.findall(line)], abs=1.0), line


def test_the_smoke_run_prints_what_the_readme_shows_and_its_program_runs_alone(tmp_path, capsys):
    """The smoke command, run in an empty folder as shown (its --out-dir runs/smoke there): the
    README's lines and docs/training.md's whole printout are what it prints; then the README's
    lines that load deployable.pt2, run there by a Python that cannot import this repository (-I:
    neither the script's folder nor PYTHONPATH on sys.path)."""
    smoke = section("Quick start")
    command = smoke_command(smoke)
    assert smoke_command(TRAINING_MD) == command
    argv = command.split("train.py", 1)[1].split()
    out_dir = argv[argv.index("--out-dir") + 1]
    argv[argv.index("--out-dir") + 1] = str(tmp_path / out_dir)
    torch.set_num_threads(2)
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    shown, = code_blocks(smoke, "text")
    whole, = code_blocks(section("The smoke run", TRAINING_MD), "text")
    shown_as_printed(shown, printed)
    rows = summary_lines(whole)
    assert summary_lines(printed).keys() == rows.keys() and len(rows) >= 8
    # The epoch lines' speed (img/s, ETA) is this machine's: only their shape is compared.
    epochs = [line for line in whole.splitlines() if line.startswith("epoch ")]
    shown_as_printed("\n".join(line for line in whole.splitlines() if line not in epochs), printed)
    assert [shape_of(line) for line in epochs] == \
        [shape_of(line) for line in printed.splitlines() if line.startswith("epoch ")]
    loading, = [block for block in code_blocks(smoke, "python") if "torch.export.load" in block]
    assert loading in code_blocks(TRAINING_MD, "python")  # the same lines in both places
    alone = "import importlib.util\nassert importlib.util.find_spec('models') is None\n" + loading
    result = subprocess.run([sys.executable, "-I", "-c", alone], cwd=tmp_path, text=True,
                            capture_output=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    predicted = ast.literal_eval(result.stdout.strip())
    assert len(predicted) == 4 and set(predicted) <= set(data.SYNTHETIC_CLASSES)


PAPER_MODULES = ["backbones", "baselines", "cli", "data", "ema", "losses", "methods", "models",
                 "simulate"]


def test_the_root_holds_the_paper_and_the_machinery_sits_one_folder_down():
    """The README's reading order is the root's Python files; the paper's modules (all of them but
    train.py and compare.py, which wire the paper to the machinery) import nothing of infra/ or
    tools/."""
    root = sorted(name[:-3] for name in tracked("*.py") if "/" not in name)
    assert root == sorted(PAPER_MODULES + ["compare", "train"])
    reading_order = re.findall(r"^\d+\. `(\w+)\.py`", section("Reading order"), flags=re.M)
    assert sorted(reading_order) == root
    for name in PAPER_MODULES:
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom)}
        assert not {m for m in imported if m.split(".")[0] in ("infra", "tools")}, name
