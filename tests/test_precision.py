"""One precision path on every device: the same DKEL step under bf16 autocast and in fp32 agree
within bf16's rounding, everything outside the convolutions stays fp32, and --precision resolves
to what config.json records."""
import copy

import pytest
import torch
import torch.nn.functional as F

import cli
import data
import train
from conftest import tiny_data
from methods import DKEL
from models import multi_peer_net


def dkel_step_grads(method, views, labels, precision):
    """The loss of one DKEL step and the student's gradient, flattened."""
    method.set_mode(True)
    method.student.zero_grad(set_to_none=True)
    with train.autocast(views.device, precision):
        loss, _ = method.loss(views, labels, {"rampup": 1.0, "teacher_ensemble_weight": 0.5})
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in method.student.parameters()])


def test_bf16_and_fp32_steps_agree_within_bf16_rounding():
    torch.manual_seed(0)
    method = DKEL(multi_peer_net("resnet8", 10, 3), temperature=3.0, kd_weight=1.0, ema_decay=0.999,
                  init_iters=1, init_lr=0.01)
    twin = copy.deepcopy(method)  # the same weights and BatchNorm buffers for the second precision
    dataset = tiny_data("synthetic", "", "cpu")
    views, labels = next(data.train_batches(dataset, 64, 3, torch.Generator().manual_seed(0)))
    loss32, grad32 = dkel_step_grads(method, views, labels, "fp32")
    loss16, grad16 = dkel_step_grads(twin, views, labels, "bf16")
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%) in the convolutions only; the
    # loss is a sum over many such products, so it agrees to 1e-3, and the gradient (direction and
    # size) to a few percent; element-wise gradients are not compared.
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), rel=1e-3)
    assert grad16.norm().item() == pytest.approx(grad32.norm().item(), rel=2e-2)
    assert F.cosine_similarity(grad16, grad32, dim=0).item() > 0.99
    # Outside the autocast region everything is fp32: parameters, gradients, BatchNorm buffers.
    for net in (twin.student, twin.teacher.network):
        assert all(t.dtype == torch.float32 for t in net.state_dict().values() if t.is_floating_point())
    assert all(p.grad.dtype == torch.float32 for p in twin.student.parameters())


def test_a_bf16_step_runs_the_convolutions_in_bf16():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with train.autocast(torch.device("cpu"), "bf16"):
        assert conv(images).dtype == torch.bfloat16
    with train.autocast(torch.device("cpu"), "fp32"):
        assert conv(images).dtype == torch.float32


def test_precision_resolves_and_is_recorded(tmp_path, small_data):
    auto = train.resolve_args(["--device", "cpu"]).precision
    assert auto == ("bf16" if cli.native_bf16(torch.device("cpu")) else "fp32")
    assert train.resolve_args(["--device", "cpu", "--precision", "fp32"]).precision == "fp32"
    assert train.main(["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1", "--batch-size", "64",
                       "--device", "cpu", "--precision", "bf16", "--out-dir", str(tmp_path)]) == 0
    assert '"precision": "bf16"' in (tmp_path / "config.json").read_text()
