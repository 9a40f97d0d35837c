"""The README keeps its promises: its size, its own-network example (run exactly as shown), its
smoke run's summary lines (against what train.py prints), and a repository that stands alone."""
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def section(title: str) -> str:
    """The text of the README section `## title`, up to the next `## `."""
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_is_at_most_15000_characters():
    assert len(README) <= 15_000


def test_no_file_of_the_repository_points_outside_it():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
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


def test_the_smoke_run_prints_what_the_readme_shows_and_its_program_runs_alone(tmp_path, capsys):
    """The smoke command, run in an empty folder as shown (its --out-dir runs/smoke there); then
    the README's lines that load deployable.pt2, run there by a Python that cannot import this
    repository (-I: neither the script's folder nor PYTHONPATH on sys.path)."""
    smoke = section("Quick start")
    command, = [line for block in code_blocks(smoke, "bash") for line in block.splitlines()
                if "--dataset synthetic" in line]
    argv = command.split("train.py", 1)[1].split()
    out_dir = argv[argv.index("--out-dir") + 1]
    argv[argv.index("--out-dir") + 1] = str(tmp_path / out_dir)
    torch.set_num_threads(2)
    assert train.main(argv) == 0
    printed = summary_lines(capsys.readouterr().out)
    shown = summary_lines("\n".join(code_blocks(smoke, "text")))
    assert printed.keys() == shown.keys() and len(shown) >= 8
    for name, numbers in shown.items():  # another CPU's kernels may round differently
        assert printed[name] == pytest.approx(numbers, abs=1.0), name
    loading, = [block for block in code_blocks(smoke, "python") if "torch.export.load" in block]
    training_md = open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8").read()
    assert loading in code_blocks(training_md, "python")  # the same lines in both places
    alone = "import importlib.util\nassert importlib.util.find_spec('models') is None\n" + loading
    result = subprocess.run([sys.executable, "-I", "-c", alone], cwd=tmp_path, text=True,
                            capture_output=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    predicted = ast.literal_eval(result.stdout.strip())
    assert len(predicted) == 4 and set(predicted) <= set(data.SYNTHETIC_CLASSES)
