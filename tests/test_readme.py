"""The README keeps its promises: its size, its own-network example (run exactly as shown), its
smoke run's summary lines (against what train.py prints), and a repository that stands alone."""
import math
import os
import re
import subprocess

import pytest
import torch

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


def test_the_own_network_example_runs_one_dkel_step():
    example, = code_blocks(section("DKEL on your own network"), "python")
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
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


def test_the_smoke_run_prints_what_the_readme_shows(tmp_path, capsys):
    smoke = section("Quick start")
    command, = [line for block in code_blocks(smoke, "bash") for line in block.splitlines()
                if "--dataset synthetic" in line]
    argv = command.split("train.py", 1)[1].split()
    if "--out-dir" in argv:
        del argv[argv.index("--out-dir"):argv.index("--out-dir") + 2]
    argv += ["--out-dir", str(tmp_path / "smoke")]
    torch.set_num_threads(2)
    assert train.main(argv) == 0
    printed = summary_lines(capsys.readouterr().out)
    shown = summary_lines("\n".join(code_blocks(smoke, "text")))
    assert printed.keys() == shown.keys() and len(shown) >= 8
    for name, numbers in shown.items():  # another CPU's kernels may round differently
        assert printed[name] == pytest.approx(numbers, abs=1.0), name
