"""train.py end to end on a tiny synthetic set: files, resume equality, bad input, Eq. (5) only,
offline KD from a finished run."""
import csv
import json
import os

import pytest
import torch

import data
import train
from conftest import fake_finished_run, tiny_data
from infra import report
from methods import DKEL
from models import build_deployable, multi_peer_net

pytestmark = pytest.mark.usefixtures("small_data")
RUN_FILES = {"config.json", "metrics.csv", "curves.png", "checkpoint.pt", "deployable.pt", "summary.json"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def args_for(out_dir, *extra):
    return ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2", "--batch-size", "32",
            "--device", "cpu", "--out-dir", str(out_dir), *extra]


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["pcl", "dk", "pcl_de", "dkel"])
def test_two_epoch_run_writes_every_file(tmp_path, method, capsys):
    assert train.main(args_for(tmp_path, "--method", method)) == 0
    assert RUN_FILES <= set(os.listdir(tmp_path))
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for key in ("lr", "w", "rampup", "loss", "ce", "pe", "train_acc", "acc_student_peer0",
                "acc_student_ensemble",
                "acc_teacher_peer2", "acc_teacher_ensemble", "epoch_seconds", "images_per_s"):
        assert key in rows[0], key
    assert ("de" in rows[0]) == (method in ("dkel", "pcl_de"))
    config = json.load(open(tmp_path / "config.json"))
    assert config["method"] == method and config["milestones"] == [1, 2]
    assert config["torch"] == torch.__version__
    summary = json.load(open(tmp_path / "summary.json"))
    final = summary["final"]
    teacher_accs = [final[f"acc_teacher_peer{i}"] for i in range(3)]
    assert summary["headline_final_deployed_mean"] == pytest.approx(sum(teacher_accs) / 3)
    # The exported model reproduces the accuracy of the teacher peer it was cut from, evaluated
    # in the run's precision (bf16 on a CPU with native bf16). The same arithmetic on the same
    # images, in another kernel's summation order (one network, not the multi-peer one), may
    # round one borderline image of the 128 the other way: at most 1 image, 0.78 points.
    deployed = build_deployable("resnet8", 10)
    deployed.load_state_dict(torch.load(tmp_path / "deployable.pt", weights_only=True))
    test = tiny_data("synthetic", "", "cpu")
    with torch.no_grad(), train.autocast(torch.device("cpu"), config["precision"]):
        images, labels = next(data.test_batches(test, 128))
        correct = (deployed.eval()(images).argmax(1) == labels).sum().item()
    run_correct = final[f"acc_{summary['deployable']['output']}"] * 128 / 100
    assert abs(correct - run_correct) <= 1
    assert summary["test_images"] == len(test.test_labels) == 128  # conftest's tiny test split
    assert "headline" in capsys.readouterr().out


R0 = 0.006737946999085467      # r(0) = exp(-5) of a 2-epoch run (R = round(80/300 * 2) = 1)
W1 = 0.6065306597126334       # w(1) = exp(-0.5), Eq. (11) at beta 0.5


@pytest.mark.parametrize("method,flags,epoch1,epoch2", [
    ("pcl", (), {"pe": R0, "pm": R0}, {"pe": 1.0, "pm": 1.0}),
    ("dk", (), {"pe": R0, "dk": R0}, {"pe": 1.0, "dk": 1.0}),
    ("pcl_de", (), {"pe": R0, "pm": 0.0, "de": 1.0}, {"pe": 1.0, "pm": 1 - W1, "de": W1}),
    ("dkel", (), {"pe": R0, "dk": 0.0, "de": 1.0}, {"pe": 1.0, "dk": 1 - W1, "de": W1}),
    ("dkel", ("--rampup-scales-de",), {"pe": R0, "dk": 0.0, "de": R0},
     {"pe": 1.0, "dk": 1 - W1, "de": W1}),
    # Their r(ep) = 0.1 exp(-5 (1 - ep / 0.1)^2): 0.1 e^-5 at epoch 0, 0.1 e^-405 at epoch 1.
    ("dkel", ("--authors-code",), {"pe": 0.1 * R0, "dk": 0.0, "de": 0.1 * R0},
     {"pe": 0.0, "dk": 0.0, "de": 0.0}),
])
def test_each_terms_weight_is_logged(tmp_path, method, flags, epoch1, epoch2):
    """metrics.csv's weight_<term>: lambda times all that multiplies the term in the epoch's
    objective; summary.json sums them over the run."""
    assert train.main(args_for(tmp_path, "--method", method, *flags)) == 0
    rows = read_metrics(tmp_path)
    for row, expected in zip(rows, (epoch1, epoch2)):
        logged = {k[len("weight_"):]: float(v) for k, v in row.items() if k.startswith("weight_")}
        assert logged == pytest.approx(expected, abs=1e-12)
    summed = json.load(open(tmp_path / "summary.json"))["summed_term_weights"]
    assert summed == pytest.approx({k: epoch1[k] + epoch2[k] for k in epoch1}, abs=1e-12)


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
    real_weights = train.epoch_weights

    def killed_in_second_epoch(args, epoch):  # called at the start of every epoch
        if epoch == 1:
            raise KeyboardInterrupt
        return real_weights(args, epoch)

    monkeypatch.setattr(train, "epoch_weights", killed_in_second_epoch)
    assert train.main(args_for(resumed, "--precision", precision)) == 130
    assert len(read_metrics(resumed)) == 1
    monkeypatch.setattr(train, "epoch_weights", real_weights)
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


def test_two_optimizer_groups_survive_a_resume(tmp_path, monkeypatch):
    """--ensemble-lr-per-peer: the head's group at lr/M, the others at lr, through two milestones
    (stopped after the first)."""
    flags = ("--method", "dkel", "--ensemble-lr-per-peer", "--milestones", "1", "2",
             "--batch-size", "64")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    real_save, real_weights, rates = train.rundir.save_checkpoint, train.epoch_weights, {}

    def recording_rates(out_dir, modules, optimizer, *rest):  # after each epoch's schedule step
        rates.setdefault(out_dir, []).append([group["lr"] for group in optimizer.param_groups])
        return real_save(out_dir, modules, optimizer, *rest)

    def stopped_after_the_first_milestone(args, epoch):  # called at the start of every epoch
        if epoch == 1 and not os.path.exists(os.path.join(args.out_dir, "summary.json")):
            raise KeyboardInterrupt
        return real_weights(args, epoch)

    monkeypatch.setattr(train.rundir, "save_checkpoint", recording_rates)
    assert train.main(args_for(straight, *flags)) == 0
    monkeypatch.setattr(train, "epoch_weights", stopped_after_the_first_milestone)
    assert train.main(args_for(resumed, *flags)) == 130
    monkeypatch.setattr(train, "epoch_weights", real_weights)
    assert train.main(args_for(resumed, *flags, "--resume")) == 0
    expected = [0.01, 0.01 / 3, 0.001, 0.001 / 3]  # each epoch's lr and lr / M (M = 3)
    for out_dir in (straight, resumed):
        assert sum(rates[str(out_dir)], []) == pytest.approx(expected, rel=1e-12)
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for name in ("student", "teacher"):
        assert all(torch.equal(value, b[name][key]) for key, value in a[name].items()), name
    timing = {"epoch_seconds", "images_per_s"}
    assert ([{k: v for k, v in row.items() if k not in timing} for row in read_metrics(straight)]
            == [{k: v for k, v in row.items() if k not in timing} for row in read_metrics(resumed)])


def test_collapse_stops_the_run(tmp_path, capsys):
    assert train.main(args_for(tmp_path, "--collapse-threshold", "1e9")) == 3
    assert "collapse in epoch 1" in capsys.readouterr().err


def test_teacher_changes_only_by_eq5_after_initialisation():
    dataset = tiny_data("synthetic", "", "cpu")
    method = DKEL(multi_peer_net("resnet8", 10, 3), temperature=3.0, kd_weight=1.0, ema_decay=0.999,
                  init_iters=1, init_lr=0.01)
    optimizer = torch.optim.SGD(method.student.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    views, labels = next(data.train_batches(dataset, 32, 3, torch.Generator().manual_seed(0)))
    method.set_mode(True)
    teacher = method.teacher.network
    before = [p.clone() for p in teacher.parameters()]
    loss, _ = method.loss(views, labels, {"rampup": 1.0, "teacher_ensemble_weight": 0.5})
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


def test_a_failure_to_draw_the_curves_never_stops_a_run(tmp_path, monkeypatch, capsys):
    def broken(path, history):
        raise RuntimeError("no backend")

    monkeypatch.setattr(report, "draw_curves", broken)
    assert train.main(args_for(tmp_path, "--method", "baseline", "--epochs", "1")) == 0
    assert "curves.png not drawn (RuntimeError: no backend)" in capsys.readouterr().err
    assert (tmp_path / "summary.json").exists() and not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluating_in_larger_batches_gives_the_same_accuracies(precision):
    # Eval-mode BatchNorm: an image's logits do not depend on the others in its batch. After two
    # steps the running statistics are no longer their initial values.
    torch.manual_seed(0)
    dataset = tiny_data("synthetic", "", "cpu")
    method = DKEL(multi_peer_net("resnet8", 10, 3), temperature=3.0, kd_weight=1.0,
                  ema_decay=0.9, init_iters=0, init_lr=0.1)
    optimizer = train.sgd(method.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=0)
    method.set_mode(True)
    for step, (views, labels) in zip(range(2), data.train_batches(
            dataset, 32, 3, data.epoch_generator(0, 0, dataset.device))):
        train.student_step(method, optimizer, views, labels, {"rampup": 1.0,
                           "teacher_ensemble_weight": 0.5}, precision)
        method.after_step(step)
    at_training_size = train.evaluate(method, dataset, 32, precision)
    assert train.evaluate(method, dataset, 1024, precision) == at_training_size
    assert train.evaluate(method, dataset, 48, precision) == at_training_size  # a ragged last batch
    # The count by hand, one image at a time, for one output.
    method.set_mode(False)
    correct = 0
    with torch.no_grad(), train.autocast(dataset.device, precision):
        for images, labels in data.test_batches(dataset, 1):
            correct += int(method.eval_logits(images)["teacher_ensemble"].argmax(-1) == labels)
    assert at_training_size["acc_teacher_ensemble"] == 100.0 * correct / 128


def epoch_row(epoch):
    """A row of metrics.csv as train.epoch_row writes it, with made-up figures."""
    return {"epoch": epoch, "lr": 0.1, "w": 0.5, "rampup": 1.0, "loss": 1.0 / epoch,
            "train_acc": 50.0, "epoch_seconds": 1.0, "images_per_s": 256.0,
            "acc_deployed_mean": 10.0 + epoch}


def test_curves_are_redrawn_every_ten_epochs_and_after_the_last(tmp_path, monkeypatch, capsys):
    drawn = []
    monkeypatch.setattr(report, "plot_curves", lambda out_dir, history: drawn.append(len(history)))
    history = []
    for epoch in range(23):
        history.append(epoch_row(epoch + 1))
        report.end_of_epoch(str(tmp_path), history[-1], history, 23, ())
    assert drawn == [10, 20, 23]
    assert len(capsys.readouterr().out.splitlines()) == 23  # the epoch line every epoch


def test_the_last_curves_are_those_of_a_redraw_every_epoch(tmp_path, capsys):
    every, sparse = tmp_path / "every", tmp_path / "sparse"
    every.mkdir(), sparse.mkdir()
    history = []
    for epoch in range(12):
        history.append(epoch_row(epoch + 1))
        report.plot_curves(str(every), history)
        report.end_of_epoch(str(sparse), history[-1], history, 12, ())
    assert (sparse / "curves.png").read_bytes() == (every / "curves.png").read_bytes()


def test_kd_learns_from_a_finished_run_of_another_network(tmp_path, capsys):
    teacher, student = tmp_path / "teacher", tmp_path / "kd"
    assert train.main(args_for(teacher, "--method", "baseline", "--arch", "resnet20", "--epochs", "1")) == 0
    capsys.readouterr()
    assert train.main(args_for(student, "--method", "kd", "--teacher-run", str(teacher))) == 0
    # 16 steps against the 1,000-step time constant of --ema-decay 0.999, which KD's frozen teacher
    # does not have: no warning about an EMA teacher's lag.
    assert "lag" not in capsys.readouterr().err
    taught = json.load(open(teacher / "summary.json"))
    # The teacher run records the data set its model was trained on, and its normalisation.
    dataset = tiny_data("synthetic", "", "cpu")
    assert taught["deployable"]["dataset"] == "synthetic"
    recorded = taught["deployable"]
    assert (recorded["mean"], recorded["std"]) == (list(dataset.mean), list(dataset.std))
    teacher_accuracy = taught["final"][f"acc_{taught['deployable']['output']}"]
    rows = read_metrics(student)
    # The teacher is the network the teacher run deployed, and it never changes: its test accuracy is
    # the teacher run's, at every epoch.
    assert [float(r["acc_teacher"]) for r in rows] == pytest.approx([teacher_accuracy] * 2)
    assert "kd" in rows[0] and float(rows[0]["kd"]) > 0
    summary = json.load(open(student / "summary.json"))
    assert summary["deployable"]["output"] == "student_peer0"
    assert summary["headline_final_deployed_mean"] == summary["final"]["acc_student_peer0"]
    assert json.load(open(student / "config.json"))["teacher_run"] == str(teacher)


@pytest.mark.parametrize("case,message", [
    ("no flag", "--method kd needs --teacher-run DIR"),
    ("no such run", "not a finished run (no summary.json)"),
    ("unfinished", "not a finished run (no summary.json)"),
    ("other classes", "its model has 100 classes and 32x32 images, this run 10 and 32x32"),
    ("other size", "its model has 10 classes and 64x64 images, this run 10 and 32x32"),
    ("other data set", "its model was trained on cifar10 (mean 0.4914 0.4822 0.4465, std 0.247 0.2435 "
                       "0.2616), this run is on synthetic (mean "),
    ("other normalisation", "its model was trained on synthetic (mean 0.5 0.5 0.5, std 0.25 0.25 0.25), "
                            "this run is on synthetic (mean "),
    ("corrupt", "cannot load its deployed model"),
])
def test_kd_refuses_a_bad_teacher_run_with_one_line(tmp_path, capsys, case, message):
    teacher = tmp_path / "teacher"
    data_sets = {"other data set": ("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                 "other normalisation": ("synthetic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}
    if case in ("other classes", "other size", "corrupt", *data_sets):
        fake_finished_run(teacher, num_classes=100 if case == "other classes" else 10,
                          image_size=64 if case == "other size" else 32, data_set=data_sets.get(case))
    if case == "unfinished":
        teacher.mkdir()
        (teacher / "config.json").write_text("{}")               # started, no summary.json yet
    if case == "corrupt":
        (teacher / "deployable.pt").write_bytes(b"not a state dict")
    flags = [] if case == "no flag" else ["--teacher-run", str(teacher)]
    assert train.main(args_for(tmp_path / "kd", "--method", "kd", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert case == "no flag" or f"--teacher-run {teacher}:" in err
    assert not (tmp_path / "kd").exists()                         # refused before anything was written
