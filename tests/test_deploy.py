"""deployable.pt2 (infra/deploy.py), the deployed model on its own: loaded in a process that cannot
import this repository, it classifies uint8 images of any batch size with the test accuracy that
summary.json reports for the deployed model (within one image: another kernel's rounding), with
and without --val-size, in bf16 and in fp32."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import tiny_data
from infra import deploy

pytestmark = pytest.mark.usefixtures("small_data")

# Run with `python -I` in an empty folder: neither the repository nor PYTHONPATH is on sys.path.
ISOLATED_EVALUATION = """
import importlib.util, json, sys, torch
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("infra") is None
extra = {"deployed.json": ""}
model = torch.export.load(sys.argv[1], extra_files=extra).module()
images, labels = torch.load(sys.argv[2])
correct = {}
for batch in (1, 37, len(labels)):
    with torch.no_grad():
        predicted = torch.cat([model(images[i:i + batch]).argmax(1)
                               for i in range(0, len(labels), batch)])
    correct[batch] = int((predicted == labels).sum())
print(json.dumps({"correct": correct, "description": json.loads(extra["deployed.json"])}))
"""


def isolated(tmp_path, program, images_and_labels):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    torch.save(images_and_labels, folder / "test.pt")
    result = subprocess.run([sys.executable, "-I", "-c", ISOLATED_EVALUATION, str(program),
                             "test.pt"], cwd=folder, capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("flags", [("--precision", "bf16", "--epochs", "1"),
                                   ("--precision", "fp32", "--val-size", "64", "--epochs", "2")])
def test_the_program_alone_scores_the_summary_figure_at_any_batch_size(tmp_path, flags):
    out_dir = tmp_path / "run"
    assert train.main(["--dataset", "synthetic", "--arch", "resnet8", "--batch-size", "64",
                       "--ema-decay", "0.9", "--device", "cpu", "--out-dir", str(out_dir),
                       *flags]) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    test = tiny_data("synthetic", "", "cpu")
    result = isolated(tmp_path, out_dir / deploy.PROGRAM, (test.test_images, test.test_labels))
    total = len(test.test_labels)
    # summary.json's figure: the evaluation's count of correct images, as a percentage. The same
    # arithmetic in another batch size (1, 37, all) and another kernel (the exported program) may
    # round one borderline image the other way on another CPU (bf16 most of all): within 1 image.
    expected = round(summary["selection"]["test_acc"] * total / 100)
    assert all(abs(correct - expected) <= 1 for correct in result["correct"].values()), \
        (result["correct"], expected)
    description = result["description"]
    assert description["classes"] == list(test.classes) and len(test.classes) == 10
    assert description["precision"] == flags[1]
    assert (description["output"], description["epoch"]) == (summary["selection"]["output"],
                                                             summary["selection"]["epoch"])
    assert summary["deployable"]["program"] == deploy.PROGRAM
    # One autocast region, the CPU's, on in bf16 only: on a GPU the program computes in fp32.
    program = torch.export.load(out_dir / deploy.PROGRAM)
    regions = [(node.args[0], node.args[2]) for node in program.graph.nodes
               if node.target is torch.ops.higher_order.wrap_with_autocast]
    assert regions == [("cpu", flags[1] == "bf16")]


def test_an_architecture_that_cannot_be_exported_keeps_deployable_pt(tmp_path, monkeypatch,
                                                                     capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(torch.export, "export", refuse)
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / deploy.PROGRAM).write_text("a program of another choice")
    assert train.main(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1",
                       "--batch-size", "32", "--device", "cpu", "--out-dir", str(out_dir)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if deploy.PROGRAM in line]
    assert len(warnings) == 1 and "resnet8" in warnings[0] and "deployable.pt" in warnings[0]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["deployable"]["program"] is None
    assert (out_dir / "deployable.pt").exists() and not (out_dir / deploy.PROGRAM).exists()
