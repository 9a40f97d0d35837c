"""train.py end to end on a tiny synthetic set: files, resume equality, bad input, Eq. (5) only."""
import csv
import json
import os

import pytest
import torch

import data as datasets
import train
from conftest import tiny_data
from models import build_deployable

pytestmark = pytest.mark.usefixtures("small_data")
RUN_FILES = {"config.json", "metrics.csv", "checkpoint.pt", "deployable.pt", "summary.json"}


def args_for(out_dir, *extra):
    return ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2", "--batch-size", "32",
            "--device", "cpu", "--out-dir", str(out_dir), *extra]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["pcl", "dk", "dkel"])
def test_two_epoch_run_writes_every_file(tmp_path, method, capsys):
    assert train.main(args_for(tmp_path, "--method", method)) == 0
    assert RUN_FILES <= set(os.listdir(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in ("lr", "w", "rampup", "loss", "ce", "pe", "train_acc", "acc_student_peer0",
                "acc_student_ensemble",
                "acc_teacher_peer2", "acc_teacher_ensemble", "epoch_seconds", "images_per_s"):
        assert key in rows[0], key
    assert ("de" in rows[0]) == (method == "dkel")
    config = json.load(open(tmp_path / "config.json"))
    assert config["method"] == method and config["milestones"] == [1, 2]
    assert config["torch"] == torch.__version__
    summary = json.load(open(tmp_path / "summary.json"))
    final = summary["final"]
    teacher_accs = [final[f"acc_teacher_peer{i}"] for i in range(3)]
    assert summary["headline_final_deployed_mean"] == pytest.approx(sum(teacher_accs) / 3)
    # The exported model reproduces the accuracy of the teacher peer it was cut from.
    deployed = build_deployable("resnet8", 10)
    deployed.load_state_dict(torch.load(tmp_path / "deployable.pt", weights_only=True))
    test = tiny_data("synthetic", "", "cpu")
    with torch.no_grad():
        images, labels = next(datasets.test_batches(test, 128))
        accuracy = 100.0 * (deployed.eval()(images).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(final[f"acc_{summary['deployable']['output']}"])
    assert "headline" in capsys.readouterr().out


@pytest.mark.parametrize("method,deployed", [("baseline", "student_peer0"), ("dml", "student_peer0"),
                                             ("kdcl", "student_peer0"), ("one", "student_peer0"),
                                             ("cl", "student_peer0"), ("okddip", "leader")])
def test_table1_method_one_epoch_run(tmp_path, method, deployed):
    assert train.main(args_for(tmp_path, "--method", method, "--epochs", "1")) == 0
    assert RUN_FILES <= set(os.listdir(tmp_path))
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["deployable"]["output"] == deployed
    assert summary["headline_final_deployed_mean"] == summary["final"][f"acc_{deployed}"]
    row = read_metrics(tmp_path)[0]
    assert ("acc_student_ensemble" in row) == (method != "baseline")
    deployed_net = build_deployable("resnet8", 10)
    deployed_net.load_state_dict(torch.load(tmp_path / "deployable.pt", weights_only=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_gives_the_same_weights_and_metrics(tmp_path, monkeypatch, precision):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(args_for(straight, "--precision", precision)) == 0
    real_epoch = train.train_epoch

    def killed_in_second_epoch(args, method, optimizer, data, epoch, state):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(args, method, optimizer, data, epoch, state)

    monkeypatch.setattr(train, "train_epoch", killed_in_second_epoch)
    assert train.main(args_for(resumed, "--precision", precision)) == 130
    assert len(read_metrics(resumed)) == 1
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    assert train.main(args_for(resumed, "--precision", precision, "--resume")) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    for name in ("student", "teacher"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), f"{name}.{key}"
    timing = {"epoch_seconds", "images_per_s"}
    for row_a, row_b in zip(read_metrics(straight), read_metrics(resumed)):
        assert ({k: v for k, v in row_a.items() if k not in timing}
                == {k: v for k, v in row_b.items() if k not in timing})


def test_collapse_stops_the_run(tmp_path, capsys):
    assert train.main(args_for(tmp_path, "--collapse-threshold", "1e9")) == 3
    assert "collapse in epoch 1" in capsys.readouterr().err


def test_teacher_changes_only_by_eq5_after_initialisation():
    data = tiny_data("synthetic", "", "cpu")
    method = train.DKEL("resnet8", 10, 3, torch.device("cpu"), temperature=3.0, kd_weight=1.0,
                        ema_decay=0.999, init_iters=1, init_lr=0.01)
    optimizer = torch.optim.SGD(method.student.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    views, labels = next(datasets.train_batches(data, 32, 3, torch.Generator().manual_seed(0)))
    method.set_mode(True)
    teacher = method.teacher.teacher
    before = [p.clone() for p in teacher.parameters()]
    loss, _ = method.loss(views, labels, {"rampup": 1.0, "w": 0.5})
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    optimizer.step()
    method.after_step(0)
    student = dict(method.student.named_parameters())
    for (name, p), p0 in zip(teacher.named_parameters(), before):
        assert torch.allclose(p, 0.999 * p0 + 0.001 * student[name], rtol=0, atol=1e-6), name


def test_non_finite_loss_stops_the_run_and_keeps_no_bad_checkpoint(tmp_path, capsys):
    assert train.main(args_for(tmp_path, "--lr", "1e30", "--rampup-epochs", "0")) == 3
    assert "the loss became" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()  # the diverged epoch 1 is never saved
