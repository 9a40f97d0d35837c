"""The deployed model on its own: `deployable.pt2`, which every finished run of train.py writes
beside deployable.pt (report.write_summary), the same network and weights as a torch.export
program that needs torch alone, neither this repository nor the architecture's name.

The program takes uint8 images (N, 3, H, W) as they come from disk, any N (one image too),
normalises them inside with the data set's mean and std, and returns the logits (N, C) in fp32.
It computes as train.py's evaluation does: the same normalisation (data.normalise), NHWC, and the
network in the run's precision (config.json's `precision`: under bf16 autocast, or in fp32), on
the CPU; so on the CPU its test accuracy is summary.json's figure for the deployed model. The
autocast is the CPU's: on a GPU the program computes in fp32.
The class names, the data set and the precision travel inside the file (`DESCRIPTION`).

    import json, torch
    extra = {"deployed.json": ""}
    model = torch.export.load("runs/smoke/deployable.pt2", extra_files=extra).module()
    classes = json.loads(extra["deployed.json"])["classes"]
    logits = model(images)        # images: uint8 (N, 3, H, W)
"""
import contextlib
import io
import json
import os
import sys

import torch
from torch import nn

from data import normalise, normaliser
from infra.rundir import atomic_write, writes_files
from models import build_deployable

PROGRAM = "deployable.pt2"
DESCRIPTION = "deployed.json"  # the program's extra file: class names, data set, precision


class UInt8Classifier(nn.Module):
    """A deployed network behind the normalisation of data.py: uint8 images (N, 3, H, W) ->
    logits (N, C), the network under bf16 autocast (`bf16`) or in fp32."""

    def __init__(self, network: nn.Module, mean, std, bf16: bool):
        super().__init__()
        shift, scale = normaliser(mean, std, "cpu")
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self.network, self.bf16 = network, bf16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # NHWC, as data.test_batches hands the evaluation its images: the same convolution kernels.
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.network(normalise(images, self.shift, self.scale)).float()


def export(weights: dict, deployed: dict, precision: str) -> torch.export.ExportedProgram:
    """The program of the deployed model `weights` (a state dict of
    models.build_deployable(arch, num_classes)), `deployed` being summary.json's "deployable"
    entry (architecture, classes, image size, mean, std); the batch dimension is dynamic."""
    network = build_deployable(deployed["arch"], deployed["num_classes"])
    network.load_state_dict(weights)
    model = UInt8Classifier(network, deployed["mean"], deployed["std"], precision == "bf16").eval()
    size = deployed["image_size"]
    # Two images: torch.export specialises a dimension of size 0 or 1 to a constant.
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})


def description(deployed: dict, precision: str, classes: list[str]) -> dict:
    """What travels inside the program (`DESCRIPTION`): the class names by label, the data set,
    the deployed output and epoch, the precision and what goes in and out."""
    return {"classes": classes, "dataset": deployed["dataset"], "arch": deployed["arch"],
            "output": deployed["output"], "epoch": deployed["epoch"],
            "image_size": deployed["image_size"], "precision": precision,
            "input": "uint8 images (N, 3, H, W), RGB 0-255, normalised inside",
            "returns": "logits (N, C), fp32"}


def write_program(out_dir: str, weights: dict, deployed: dict, precision: str,
                  classes: list[str]) -> str | None:
    """deployable.pt2 in `out_dir` from `weights` (the state dict deployable.pt holds); returns
    its file name, or None where the architecture cannot be exported: then one line on stderr
    says so, deployable.pt stays the deployed model, and no program of an earlier choice is left.
    Rank 0 alone writes it (`writes_files`)."""
    if not writes_files():
        return None
    path = os.path.join(out_dir, PROGRAM)
    archive, described = io.BytesIO(), description(deployed, precision, classes)
    try:
        program = export(weights, deployed, precision)
        torch.export.save(program, archive, extra_files={DESCRIPTION: json.dumps(described)})
    except Exception as error:  # torch.export's limits are the architecture's, never the run's
        reason = " ".join(str(error).split())[:200]
        print(f"warning: {PROGRAM} not written: torch.export cannot export {deployed['arch']} "
              f"({type(error).__name__}: {reason}); deployable.pt holds the deployed model",
              file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return None
    with atomic_write(path, binary=True) as f:  # a failing disk stops the run as for every file
        f.write(archive.getvalue())
    return PROGRAM
