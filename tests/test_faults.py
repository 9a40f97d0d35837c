"""Faults and impossible input (README, "Nothing lost, nothing silent"): every refusal exits with
its code and one line naming the flag or path, without a traceback; SIGTERM and a failing write
stop a run with the finished epochs saved, and --resume ends where an uninterrupted run ends."""
import csv
import errno
import os
import signal

import pytest
import torch

import rundir
import train

pytestmark = pytest.mark.usefixtures("small_data")
TIMING = {"epoch_seconds", "images_per_s"}


def args_for(out_dir, *extra):
    return ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "2", "--batch-size", "32",
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


def test_sigterm_stops_at_a_step_and_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main(args_for(straight)) == 0
    real_step, steps = train.student_step, []

    def terminated_in_second_epoch(*step_args):
        out = real_step(*step_args)
        steps.append(len(steps))
        if len(steps) == 11:  # 8 steps per epoch: the third step of epoch 2
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
