"""Faults and impossible input (docs/training.md#exit-codes): every refusal exits with its code
and one line naming the flag or path, without a traceback; SIGTERM and a failing write stop a
run with the finished epochs saved, and --resume ends where an uninterrupted run ends."""
import csv
import errno
import fcntl
import json
import os
import signal
import sys
import urllib.error
import urllib.request

import pytest
import torch

import cli
import train
from infra import report, rundir

pytestmark = pytest.mark.usefixtures("small_data")
TIMING = {"epoch_seconds", "images_per_s"}


def args_for(out_dir, *extra):
    return ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2", "--batch-size", "64",
            "--device", "cpu", "--out-dir", str(out_dir), *extra]


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def finished_run(out_dir):
    assert train.main(args_for(out_dir, "--epochs", "1")) == 0


def foreign_checkpoint(out_dir):
    finished_run(out_dir)
    return ["--resume", "--beta", "0.25"]


def corrupt_checkpoint(out_dir):
    finished_run(out_dir)
    (out_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    return ["--resume"]


# (case, extra flags or a set-up that makes the run directory and returns them, exit code, the flag
# or path the message names). The tiny training set has 256 images.
BAD_INPUT = [
    ("unknown arch", ["--arch", "resnet1000"], 2, "--arch"),
    ("unknown data set", ["--dataset", "mnist"], 2, "--dataset"),
    ("unknown method", ["--method", "xyz"], 2, "--method"),
    ("negative beta", ["--beta", "-1"], 2, "--beta"),
    ("one peer", ["--num-peers", "1"], 2, "--num-peers"),
    ("okddip with two peers", ["--method", "okddip", "--num-peers", "2"], 2, "--num-peers"),
    ("milestone past the end", ["--milestones", "5"], 2, "--milestones"),
    ("no epochs", ["--epochs", "0"], 2, "--epochs"),
    ("EMA decay above 1", ["--ema-decay", "1.5"], 2, "--ema-decay"),
    ("batch larger than the training set", ["--batch-size", "100000"], 2, "--batch-size"),
    ("out-dir that cannot be created", ["--out-dir", "/proc/forbidden/run"], 2, "/proc/forbidden/run"),
    ("resume without a checkpoint", ["--resume"], 2, "--resume"),
    ("a teacher run without --method kd", ["--teacher-run", "runs/x"], 2, "--teacher-run"),
    ("kd without a finished teacher run", ["--method", "kd", "--teacher-run", "/nonexistent"], 2,
     "--teacher-run"),
    ("a finished run started again", lambda d: finished_run(d) or [], 2, "--out-dir"),
    ("a checkpoint of other settings", foreign_checkpoint, 2, "--beta"),
    ("a corrupt checkpoint", corrupt_checkpoint, 2, "checkpoint.pt"),
]


@pytest.mark.parametrize("flags,code,named", [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_refused_with_one_line(tmp_path, capsys, flags, code, named):
    out_dir = tmp_path / "run"
    if callable(flags):
        out_dir.mkdir()
        flags = flags(out_dir)
    capsys.readouterr()
    try:
        returned = train.main(args_for(out_dir, *flags))
    except SystemExit as exit_info:  # argparse's refusals
        returned = exit_info.code
    err = capsys.readouterr().err
    assert returned == code
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]  # argparse prints its usage line first
    assert message.startswith(("error:", "train.py: error:")) and named in message, err


def test_cifar_data_dir_that_cannot_be_created_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.undo()  # the real loader
    assert train.main(["--dataset", "cifar10", "--data-dir", "/proc/forbidden/data", "--device", "cpu",
                       "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--data-dir /proc/forbidden/data: cannot create it" in err


def test_a_refused_data_dir_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    """Offline, a CIFAR --data-dir and an --out-dir whose folders do not exist yet: the refusal
    (exit 2) removes the folders the run made for them, parents included."""
    monkeypatch.undo()  # the real loader

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data_dir, out_dir = tmp_path / "new" / "data", tmp_path / "runs" / "cifar" / "run"
    assert train.main(["--dataset", "cifar10", "--data-dir", str(data_dir), "--device", "cpu",
                       "--out-dir", str(out_dir)]) == 2
    assert "downloading it failed" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_sigterm_stops_at_a_step_and_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main(args_for(straight)) == 0
    real_step, steps = train.student_step, []

    def terminated_in_second_epoch(*step_args):
        out = real_step(*step_args)
        steps.append(len(steps))
        if len(steps) == 7:  # 4 steps per epoch: the third step of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train, "student_step", terminated_in_second_epoch)
    assert train.main(args_for(stopped)) == rundir.EXIT_TERMINATED == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert len(metrics(stopped)) == 1  # epoch 1 saved, the partial epoch 2 not
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    monkeypatch.setattr(train, "student_step", real_step)
    assert train.main(args_for(stopped, "--resume")) == 0
    assert metrics(stopped) == metrics(straight)


def test_a_closed_stdout_stops_the_run_quietly_and_resume_finishes_it(tmp_path, monkeypatch,
                                                                     capsys):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `train.py ... | head`: the reader has gone
    stdout = sys.stdout
    with open(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert train.main(args_for(tmp_path)) == rundir.EXIT_CLOSED_PIPE == 141
        closed_pipe.write("at exit, Python flushes stdout once more\n")
        closed_pipe.flush()
    monkeypatch.setattr(sys, "stdout", stdout)
    err = capsys.readouterr().err
    assert "stdout was closed" in err and "--resume" in err and "Traceback" not in err
    assert len(metrics(tmp_path)) == 1  # epoch 1 was saved before its line failed to print
    assert train.main(args_for(tmp_path, "--resume")) == 0
    assert [row["epoch"] for row in metrics(tmp_path)] == ["1", "2"]


def test_a_second_sigterm_stops_at_once_with_its_own_code(tmp_path, monkeypatch, capsys):
    real_step, steps = train.student_step, []

    def terminated_twice(*step_args):
        steps.append(len(steps))
        if len(steps) == 2:  # the first asks for a stop after the step, the second stops at once
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*step_args)

    monkeypatch.setattr(train, "student_step", terminated_twice)
    assert train.main(args_for(tmp_path)) == rundir.EXIT_TERMINATED == 143  # not 130, Ctrl-C's
    assert len(steps) == 2 and not (tmp_path / "checkpoint.pt").exists()  # at once, in step 2
    err = capsys.readouterr().err
    assert "stopped at once by a second SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_failing_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    assert train.main(args_for(straight, "--epochs", "3")) == 0
    real_save = torch.save
    saves = []

    def disk_full_at_second_checkpoint(obj, f, *a, **k):
        saves.append(f.name)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(rundir.torch, "save", disk_full_at_second_checkpoint)
    assert train.main(args_for(failed, "--epochs", "3")) == rundir.EXIT_WRITE_FAILED
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars: one line
    assert message.startswith("error: cannot write") and "checkpoint.pt (No space left on device)" in message
    assert not (failed / "checkpoint.pt.tmp").exists()
    monkeypatch.setattr(rundir.torch, "save", real_save)
    assert torch.load(failed / "checkpoint.pt", weights_only=True)["epoch"] == 1  # intact and loadable
    assert train.main(args_for(failed, "--epochs", "3", "--resume")) == 0
    assert metrics(failed) == metrics(straight)


def test_a_stop_in_the_first_epoch_is_started_again_by_a_requeue_with_resume(tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = ("--epochs", "1", "--batch-size", "64")                # 4 steps
    assert train.main(args_for(straight, *flags)) == 0
    real_step, steps = train.student_step, []

    def terminated_in_first_epoch(*step_args):
        steps.append(len(steps))
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*step_args)

    monkeypatch.setattr(train, "student_step", terminated_in_first_epoch)
    assert train.main(args_for(stopped, *flags)) == rundir.EXIT_TERMINATED
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nothing is saved" in message and "with or without --resume" in message, message
    assert not (stopped / "checkpoint.pt").exists()
    monkeypatch.setattr(train, "student_step", real_step)
    # A requeue that always adds --resume: the run starts from the beginning and says so.
    assert train.main(args_for(stopped, *flags, "--resume")) == 0
    assert "starting the run from the beginning" in capsys.readouterr().err
    assert metrics(stopped) == metrics(straight)


def test_resume_of_a_run_stopped_in_its_first_epoch_refuses_other_settings(tmp_path, monkeypatch, capsys):
    def interrupted(args, epoch):  # called at the start of every epoch
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "epoch_weights", interrupted)
    assert train.main(args_for(tmp_path, "--epochs", "1")) == rundir.EXIT_INTERRUPTED
    assert (tmp_path / "config.json").exists() and not (tmp_path / "checkpoint.pt").exists()
    capsys.readouterr()
    assert train.main(args_for(tmp_path, "--epochs", "1", "--resume", "--beta", "0.25")) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "--beta: 0.5 -> 0.25" in message, message


def without_setting(out_dir, key):
    """The run in `out_dir` as a version of train.py without the flag of `key` wrote it."""
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    del checkpoint["config"][key]
    torch.save(checkpoint, out_dir / "checkpoint.pt")
    config = json.loads((out_dir / "config.json").read_text())
    del config[key]
    (out_dir / "config.json").write_text(json.dumps(config))


def test_a_run_made_before_a_flag_existed_resumes_at_the_flags_default(tmp_path, capsys):
    finished_run(tmp_path)
    without_setting(tmp_path, "ensemble_lr_per_peer")
    assert train.main(args_for(tmp_path, "--epochs", "1", "--resume")) == 0
    # Its missing setting is the flag's default, False: with the flag on it is another run.
    capsys.readouterr()
    flagged = args_for(tmp_path, "--epochs", "1", "--resume", "--method", "dkel",
                       "--ensemble-lr-per-peer")
    assert train.main(flagged) == 2
    assert "--ensemble-lr-per-peer: False -> True" in capsys.readouterr().err


def test_a_dkel_run_made_before_rampup_scales_de_existed_is_of_that_reading(tmp_path, capsys):
    """A DKEL config.json without rampup_scales_de was made with the reading it now names (L_de at
    lambda r(ep) w(ep)): it resumes with the flag and is another run without it."""
    finished_run(tmp_path)  # the default method, dkel
    without_setting(tmp_path, "rampup_scales_de")
    capsys.readouterr()
    assert train.main(args_for(tmp_path, "--epochs", "1", "--resume")) == 2
    assert "--rampup-scales-de: True -> False" in capsys.readouterr().err
    assert train.main(args_for(tmp_path, "--epochs", "1", "--resume", "--rampup-scales-de")) == 0


def test_a_teacher_run_spelt_otherwise_is_the_same_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main(args_for("teacher", "--method", "baseline", "--epochs", "1")) == 0
    kd = args_for("kd", "--method", "kd", "--epochs", "1")
    assert train.main([*kd, "--teacher-run", "teacher"]) == 0
    for spelling in ("./teacher", str(tmp_path / "teacher"), "teacher/"):
        assert train.main([*kd, "--teacher-run", spelling, "--resume"]) == 0, spelling
    assert train.main([*kd, "--teacher-run", "kd", "--resume"]) == 2   # another directory
    assert "--teacher-run: 'teacher' -> 'kd'" in capsys.readouterr().err


class RecordingGenerator:
    """Stands in for a GPU's CUDA generator: records the states set on it."""

    def __init__(self):
        self.states = []

    def set_state(self, state):
        self.states.append(state)


def test_a_run_started_with_more_gpus_resumes_with_the_generators_it_sees(tmp_path, monkeypatch):
    """Started with 2 GPUs visible (two CUDA generator states saved), resumed seeing one (compare.py
    --gpus): torch.cuda's own set_rng_state runs, on a machine that stands in for one GPU."""
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1])
    config = cli.defaults()
    rundir.save_checkpoint(str(tmp_path), {"net": net}, optimizer, scheduler,
                           {"epoch": 1, "step": 8, "history": []}, config)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    checkpoint["rng_cuda"] = saved
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    visible = RecordingGenerator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.random, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "default_generators", (visible,))
    state = rundir.restore_checkpoint(str(tmp_path), config, {"net": net}, optimizer, scheduler)
    assert state["epoch"] == 1
    assert len(visible.states) == 1 and torch.equal(visible.states[0], saved[0])


def test_a_process_refused_by_the_lock_removes_nothing(tmp_path, monkeypatch, capsys):
    out_dir, held = tmp_path / "run", []
    real_prepare = rundir.prepare

    def the_other_process_wins(path, resume):
        # Between this process's look at the (new) directory and its lock, another process makes
        # the directory and takes the lock, and has not written anything yet.
        os.makedirs(path)
        held.append(open(os.path.join(path, ".lock"), "a"))
        fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        real_prepare(path, resume)

    monkeypatch.setattr(rundir, "prepare", the_other_process_wins)
    assert train.main(args_for(out_dir)) == rundir.EXIT_BAD_INPUT
    assert "another process is training" in capsys.readouterr().err
    assert (out_dir / ".lock").exists()                    # the winner's directory and lock are left alone
    held[0].close()


def test_deployable_summary_and_checkpoint_agree_after_a_failed_write(tmp_path, monkeypatch):
    """With --val-size the deployed model is chosen at the epoch that trains it. An epoch trained
    again after a failed checkpoint write need not repeat its first attempt (a GPU's kernels are not
    deterministic): here the validation split rates epoch 1 best, except in the first attempt at
    epoch 2, whose checkpoint then cannot be written."""
    flags = ("--batch-size", "64", "--val-size", "64")
    rating, current = {1: 90.0, 2: 80.0}, {}
    real_weights, real_evaluate, real_save = train.epoch_weights, train.evaluate, torch.save

    def weights(args, epoch):  # called at the start of every epoch
        current["epoch"] = epoch + 1
        return real_weights(args, epoch)

    def rated(method, data, batch_size, precision, split="test"):
        accuracies = real_evaluate(method, data, batch_size, precision, split)
        if split == "val":
            accuracies = {k: rating[current["epoch"]] for k in accuracies}
        return accuracies

    def disk_full_at_second_checkpoint(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(train, "epoch_weights", weights)
    monkeypatch.setattr(train, "evaluate", rated)
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    assert train.main(args_for(straight, *flags)) == 0
    rating[2] = 95.0                                       # the first attempt at epoch 2 ...
    monkeypatch.setattr(rundir.torch, "save", disk_full_at_second_checkpoint)
    assert train.main(args_for(failed, *flags)) == rundir.EXIT_WRITE_FAILED
    rating[2] = 80.0                                       # ... and the epoch trained again
    monkeypatch.setattr(rundir.torch, "save", real_save)
    assert train.main(args_for(failed, *flags, "--resume")) == 0
    summary = json.loads((failed / "summary.json").read_text())
    assert summary["selection"]["epoch"] == summary["deployable"]["epoch"] == 1
    assert summary["selection"] == json.loads((straight / "summary.json").read_text())["selection"]
    expected = torch.load(straight / "deployable.pt", weights_only=True)
    deployed = torch.load(failed / "deployable.pt", weights_only=True)
    assert expected.keys() == deployed.keys()
    assert all(torch.equal(deployed[k], expected[k]) for k in expected)


def test_ranks_other_than_0_build_and_write_nothing(tmp_path, monkeypatch):
    class Untouchable(torch.nn.Linear):
        def state_dict(self, *a, **k):
            raise AssertionError("a rank other than 0 built a checkpoint")

    def no_serialising(*a, **k):
        raise AssertionError("a rank other than 0 serialised something")

    monkeypatch.setattr(rundir.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(rundir.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(rundir.torch, "save", no_serialising)
    monkeypatch.setattr(rundir.json, "dump", no_serialising)
    monkeypatch.setattr(report, "draw_curves", no_serialising)
    net = Untouchable(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1])
    history = [{"epoch": 1, "loss": 1.0}]
    rundir.save_checkpoint(str(tmp_path), {"student": net}, optimizer, scheduler,
                           {"epoch": 1, "step": 8, "history": history}, {})
    rundir.atomic_save({"weights": torch.zeros(2)}, str(tmp_path / "deployable.pt"))
    rundir.write_json({"a": 1}, str(tmp_path / "summary.json"))
    rundir.write_metrics(str(tmp_path / "metrics.csv"), history)
    report.plot_curves(str(tmp_path), history)
    assert os.listdir(tmp_path) == []


def test_a_file_is_on_disk_before_it_replaces_the_previous_version(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.path.getsize(source)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rundir.write_json({"accuracy": [1.5] * 1000}, str(tmp_path / "summary.json"))
    size = os.path.getsize(tmp_path / "summary.json")
    # The whole file (flushed from Python's buffer) is synced, then renamed over the old one.
    assert events[:2] == [("fsync", size), ("replace", size)], events
