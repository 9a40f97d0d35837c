"""infra/sweep.py, the training of compare.py's grid: the --gpus process pool (K runs at a time on
each GPU), runs made otherwise (named, never tabulated, retrained on request, never moved while a
process trains in them), and stops (SIGTERM / SIGINT end a sweep with their exit code)."""
import fcntl
import json
import os
import signal
import time

import pytest

import cli
import compare
from conftest import TINY_TRAINING, config_by_hand, finished_by_hand
from infra import sweep

pytestmark = pytest.mark.usefixtures("small_data")


class StandInChild:
    """Stands in for a `python train.py ...` child on one GPU (subprocess.Popen's interface): it
    ends after `seconds`, or with code 128 + N as soon as it is sent signal N."""
    seconds = 0.1
    started: list = []  # of every StandInChild, in launch order

    def __init__(self, cmd, stdout, stderr, env, start_new_session):
        self.cmd, self.gpu, self.signals = cmd, env["CUDA_VISIBLE_DEVICES"], []
        self.start, self.returncode = time.monotonic(), None
        self.started.append(self)

    def poll(self):
        if self.returncode is None and self.signals:
            self.returncode = 128 + self.signals[0]
        elif self.returncode is None and time.monotonic() - self.start >= self.seconds:
            self.returncode, self.end = 0, time.monotonic()
        return self.returncode

    def send_signal(self, number):
        self.signals.append(number)


@pytest.fixture
def stand_in_children(monkeypatch):
    monkeypatch.setattr(sweep.subprocess, "Popen", StandInChild)
    monkeypatch.setattr(sweep, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(StandInChild, "started", [])
    return StandInChild


def test_gpus_run_one_child_per_listed_device_at_a_time(tmp_path, stand_in_children):
    argv = ["--experiment", "table2", "--dataset", "synthetic", "--archs", "resnet8",
            "--methods", "baseline", "kd", "dml", "--seeds", "0", "1", "--runs-dir", str(tmp_path),
            "--gpus", "3", "5", "--", "--batch-size", "64"]
    # The stand-ins write no summary: every run is listed missing.
    assert compare.main(argv) == 1
    children = stand_in_children.started
    assert len(children) == 6 and {child.gpu for child in children} == {"3", "5"}
    for child in children:                                      # never two runs on one device
        others = [c for c in children if c is not child and c.gpu == child.gpu]
        assert all(c.end <= child.start or c.start >= child.end for c in others)
        assert child.cmd[1].endswith("train.py")
        assert child.cmd[-4:] == ["--device", "cuda", "--batch-size", "64"]
        out_dir = child.cmd[child.cmd.index("--out-dir") + 1]
        assert os.path.exists(os.path.join(out_dir, "train.log"))
    # Both devices worked at once, and each kd run started after its teacher run had ended.
    assert children[1].start < children[0].end
    ends = {child.cmd[child.cmd.index("--out-dir") + 1]: child.end for child in children}
    for child in children:
        if "--teacher-run" in child.cmd:
            assert child.start >= ends[child.cmd[child.cmd.index("--teacher-run") + 1]]


def concurrent(children, gpu=None) -> int:
    """The most children that ran at once (on `gpu`, or on any)."""
    on = [c for c in children if gpu in (None, c.gpu)]
    return max(sum(c.start <= child.start < c.end for c in on) for child in on)


def test_gpus_run_k_children_at_a_time_on_each_device(tmp_path, stand_in_children, monkeypatch):
    monkeypatch.setattr(StandInChild, "seconds", 0.3)
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "dml", "pcl",
            "dkel", "--seeds", "0", "1", "--runs-dir", str(tmp_path), "--gpus", "3", "5",
            "--runs-per-gpu", "2"]
    assert compare.main(argv) == 1  # the stand-ins write no summary
    children = stand_in_children.started
    assert len(children) == 8 and {child.gpu for child in children} == {"3", "5"}
    assert concurrent(children, "3") == concurrent(children, "5") == 2
    assert concurrent(children) == 4
    assert [child.gpu for child in children[:4]] == ["3", "5", "3", "5"]  # spread first


@pytest.mark.parametrize("flags,message", [
    (["--gpus", "0", "1", "0"], "--gpus lists GPU 0 more than once; list each GPU once and give "
                                "the runs at a time on each with --runs-per-gpu K"),
    (["--runs-per-gpu", "2"], "--runs-per-gpu is for --gpus"),
    (["--gpus", "0", "--runs-per-gpu", "0"], "--runs-per-gpu must be at least 1, got 0"),
])
def test_a_gpu_listed_twice_or_runs_per_gpu_alone_is_refused(tmp_path, stand_in_children, capsys,
                                                             flags, message):
    with pytest.raises(SystemExit) as stop:
        compare.main(["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline",
                      "--seeds", "0", "--runs-dir", str(tmp_path), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert stand_in_children.started == []


def test_gpus_show_the_reason_of_a_child_that_failed(tmp_path, stand_in_children, monkeypatch,
                                                      capsys):
    class OutOfMemory(StandInChild):
        def __init__(self, cmd, stdout, **kwargs):
            super().__init__(cmd, stdout, **kwargs)
            stdout.write("Traceback (most recent call last):\n  ...\n"
                         "torch.OutOfMemoryError: CUDA out of memory\n")

        def poll(self):
            self.returncode = 1
            return 1

    monkeypatch.setattr(sweep.subprocess, "Popen", OutOfMemory)
    run = tmp_path / "synthetic_resnet8_baseline_seed0"
    run.mkdir()
    (run / "train.log").write_text("error: an earlier attempt's reason\n")
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "--seeds", "0",
            "--runs-dir", str(tmp_path), "--gpus", "3"]
    assert compare.main(argv) == 1
    reason = "failed (exit code 1): torch.OutOfMemoryError: CUDA out of memory"
    assert f"== GPU 3: {run} {reason}" in capsys.readouterr().out
    assert f"{run}: {reason}" in (tmp_path / "table1_synthetic.md").read_text()


# ----------------------------------------------------------------------------- runs made otherwise
def test_a_run_made_with_other_settings_is_named_not_tabulated_and_retrained_on_request(
        tmp_path, capsys):
    run = tmp_path / "synthetic_resnet8_baseline_seed0"
    finished_by_hand(tmp_path, run.name, 61.5, 62.25,
                     ["--dataset", "synthetic", "--arch", "resnet8", "--method", "baseline",
                      "--epochs", "2"])
    grid = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "--seeds", "0",
            "--runs-dir", str(tmp_path)]
    assert compare.main([*grid, "--epochs", "2", "--read-only"]) == 0  # as it was made
    assert "61.50 (n=1)" in (tmp_path / "table1_synthetic.md").read_text()
    capsys.readouterr()
    # Read back as a 1-epoch experiment: listed with the setting that differs, not in the table.
    assert compare.main([*grid, "--epochs", "1", "--read-only"]) == 1
    table = (tmp_path / "table1_synthetic.md").read_text()
    assert "(n=1)" not in table and f"{run}: made with other settings (--epochs: 2 -> 1" in table
    assert "--retrain-mismatched" in capsys.readouterr().out
    # Nor as one with another flag after --.
    assert compare.main([*grid, "--epochs", "2", "--read-only", "--", "--lr", "0.05"]) == 1
    table = (tmp_path / "table1_synthetic.md").read_text()
    assert "(n=1)" not in table and f"{run}: made with other settings (--lr: 0.1 -> 0.05)" in table
    # A sweep refuses before it trains anything, and says how to go on.
    capsys.readouterr()
    assert compare.main([*grid, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{run}: --epochs: 2 -> 1" in err
    assert "--runs-dir" in err and "--retrain-mismatched" in err
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    # --retrain-mismatched moves it aside and trains it again (one epoch of two steps).
    retrain = [*grid, "--epochs", "1", "--retrain-mismatched", "--", "--device", "cpu"]
    assert compare.main(retrain) == 0
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    assert (run / "summary.json").exists()
    aside = tmp_path / f"{run.name}.mismatched-1"
    assert json.loads((aside / "config.json").read_text())["epochs"] == 2
    table = (tmp_path / "table1_synthetic.md").read_text()
    assert "(n=1)" in table and "61.50" not in table


def test_an_unfinished_run_made_otherwise_is_not_resumed(tmp_path, capsys):
    run = tmp_path / "synthetic_resnet8_dkel_seed0"
    config_by_hand(run, ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1"])
    (run / "checkpoint.pt").write_bytes(b"")
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "dkel", "--seeds", "0",
            "--epochs", "2", "--runs-dir", str(tmp_path)]
    assert compare.main(argv) == 2
    assert f"{run}: --epochs: 1 -> 2" in capsys.readouterr().err
    assert compare.main([*argv, "--cell", "0"]) == 2
    assert f"{run}: --epochs: 1 -> 2" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.json"]  # nothing trained into it


def test_a_run_made_before_a_flag_existed_is_tabulated(tmp_path):
    train_argv = ["--dataset", "synthetic", "--arch", "resnet8", "--method", "dkel",
                  "--epochs", "1"]
    finished_by_hand(tmp_path, "synthetic_resnet8_dkel_seed0", 61.5, 62.25, train_argv)
    config = json.loads((tmp_path / "synthetic_resnet8_dkel_seed0" / "config.json").read_text())
    del config["ensemble_lr_per_peer"]  # written before the flag existed: its default, off
    (tmp_path / "synthetic_resnet8_dkel_seed0" / "config.json").write_text(json.dumps(config))
    grid = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "dkel", "--seeds", "0",
            "--epochs", "1", "--runs-dir", str(tmp_path), "--read-only"]
    assert compare.main(grid) == 0
    assert "61.50 (n=1)" in (tmp_path / "table1_synthetic.md").read_text()
    assert compare.main([*grid, "--", "--ensemble-lr-per-peer"]) == 1
    table = (tmp_path / "table1_synthetic.md").read_text()
    assert "(--ensemble-lr-per-peer: False -> True)" in table


def test_the_same_runs_dir_spelt_otherwise_holds_the_same_kd_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    teacher = "synthetic_resnet8_baseline_seed0"
    student = "synthetic_resnet8_kd_teacher-resnet8_seed0"
    made = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1"]
    finished_by_hand(tmp_path / "runs", teacher, 61.5, 62.25, [*made, "--method", "baseline"])
    finished_by_hand(tmp_path / "runs", student, 63.5, 64.25,
                     [*made, "--method", "kd", "--teacher-run", f"runs/{teacher}"])
    for runs_dir in ("runs", "./runs", str(tmp_path / "runs"), "runs/"):
        argv = ["--experiment", "table2", "--dataset", "synthetic", "--archs", "resnet8",
                "--methods", "baseline", "kd", "--seeds", "0", "--epochs", "1", "--runs-dir",
                runs_dir, "--read-only"]
        assert compare.main(argv) == 0, runs_dir
        table = (tmp_path / "runs" / "table2_synthetic.md").read_text()
        assert "| synthetic resnet8 | 61.50 (n=1) | 63.50 (n=1) |" in table, runs_dir


def test_retrain_mismatched_leaves_a_run_that_a_process_trains_in_where_it_is(tmp_path, capsys):
    run = tmp_path / "synthetic_resnet8_baseline_seed0"
    finished_by_hand(tmp_path, run.name, 61.5, 62.25,
                     ["--dataset", "synthetic", "--arch", "resnet8", "--method", "baseline",
                      "--epochs", "2"])
    grid = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "--seeds", "0",
            "--epochs", "1", "--runs-dir", str(tmp_path), "--retrain-mismatched"]
    with open(run / ".lock", "a") as lock:  # a train.py holds it (rundir.hold_run_dir)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert compare.main(grid) == 1
        assert compare.main([*grid, "--cell", "0"]) == 2
    assert sorted(os.listdir(tmp_path)) == [run.name, "table1_synthetic.md", "table1_synthetic.png"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    out = capsys.readouterr().out
    line = (f"{run}: made with other settings (--epochs: 2 -> 1, --milestones: [1, 2] -> [1], "
            f"--rampup-epochs: 1 -> 0); a process is training in it (it holds {run}/.lock): "
            f"left alone, neither moved nor trained")
    assert out.count(line) == 3 and f"moved {run}" not in out  # as it happens (twice), the table
    assert line in (tmp_path / "table1_synthetic.md").read_text()


def test_a_run_directory_that_cannot_be_read_is_named_and_counted_as_not_finished(tmp_path, capsys):
    made = ["--dataset", "synthetic", "--arch", "resnet8", "--epochs", "1"]
    truncated = tmp_path / "synthetic_resnet8_dkel_seed0"
    finished_by_hand(tmp_path, truncated.name, 61.5, 62.25, [*made, "--method", "dkel"])
    config = (truncated / "config.json").read_text()
    (truncated / "config.json").write_text(config[:len(config) // 2])
    corrupt = tmp_path / "synthetic_resnet8_pcl_seed0"
    finished_by_hand(tmp_path, corrupt.name, 60.0, 61.0, [*made, "--method", "pcl"])
    (corrupt / "summary.json").write_text("{}")
    grid = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "pcl", "dkel",
            "--seeds", "0", "--epochs", "1", "--runs-dir", str(tmp_path)]
    for mode in (["--read-only"], []):  # the sweep neither refuses (exit 2) nor trains them
        assert compare.main([*grid, *mode]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"{truncated}: its config.json cannot be read (JSONDecodeError)" in err
        table = (tmp_path / "table1_synthetic.md").read_text()
        assert f"{truncated}: its config.json cannot be read (JSONDecodeError)" in table
        assert f"{corrupt}: its summary.json cannot be read (KeyError)" in table
        assert "(n=1)" not in table and "made with other settings" not in table
    assert sorted(os.listdir(truncated)) == ["config.json", "summary.json"]
    assert compare.main([*grid, "--cell", "1"]) == 2
    assert "cannot be read (JSONDecodeError)" in capsys.readouterr().err


def test_a_run_started_in_bf16_goes_on_in_bf16_under_precision_auto(tmp_path, monkeypatch,
                                                                     capsys):
    """One rule for --precision auto in train.py and compare.py: a run goes on in the precision it
    was started in, on a machine whose auto would choose the other."""
    run = tmp_path / "synthetic_resnet8_baseline_seed0"
    real_weights, real_autocast = sweep.train.epoch_weights, sweep.train.autocast

    def stopped_in_second_epoch(args, epoch):  # called at the start of every epoch
        if epoch == 1:
            raise KeyboardInterrupt
        return real_weights(args, epoch)

    monkeypatch.setattr(sweep.train, "epoch_weights", stopped_in_second_epoch)
    started = ["--dataset", "synthetic", "--arch", "resnet8", "--method", "baseline", "--epochs",
               "2", "--batch-size", "64", "--device", "cpu", "--out-dir", str(run)]
    assert sweep.train.main([*started, "--precision", "bf16"]) == 130  # a machine with bf16
    monkeypatch.setattr(sweep.train, "epoch_weights", real_weights)
    monkeypatch.setattr(cli, "native_bf16", lambda device: False)      # resumed on one without
    precisions = []

    def recorded(device, precision):
        precisions.append(precision)
        return real_autocast(device, precision)

    monkeypatch.setattr(sweep.train, "autocast", recorded)
    grid = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "--seeds", "0",
            "--epochs", "2", "--runs-dir", str(tmp_path)]
    assert compare.main([*grid, *TINY_TRAINING]) == 0
    assert precisions and set(precisions) == {"bf16"}
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    # Another precision asked for by name is another run.
    assert compare.main([*grid, "--read-only", *TINY_TRAINING, "--precision", "fp32"]) == 1
    table = (tmp_path / "table1_synthetic.md").read_text()
    assert f"{run}: made with other settings (--precision: 'bf16' -> 'fp32')" in table


# ----------------------------------------------------------------------------- a stop is a stop
def test_a_sequential_sweep_ends_at_a_terminated_run(tmp_path, monkeypatch, capsys):
    calls = []

    def terminated(argv):  # train.main stopped by SIGTERM: exit code 143
        calls.append(argv)
        return 143

    monkeypatch.setattr(sweep.train, "main", terminated)
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "dkel",
            "--seeds", "0", "--runs-dir", str(tmp_path)]
    assert compare.main(argv) == 143
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert "2 of the 2 runs have not finished" in err
    assert "python compare.py " + " ".join(argv) in err


@pytest.mark.parametrize("runs_per_gpu", [1, 2])
def test_gpus_pass_a_stop_signal_on_to_their_children(tmp_path, stand_in_children, monkeypatch,
                                                       capsys, runs_per_gpu):
    sent = []

    class TerminatedWhileRunning(StandInChild):
        seconds = 60.0

        def poll(self):  # one SIGTERM (SLURM, kill) arrives while the first runs train
            if len(self.started) == 2 * runs_per_gpu and not sent:
                assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
                sent.append(signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            return super().poll()

    monkeypatch.setattr(sweep.subprocess, "Popen", TerminatedWhileRunning)
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "dkel",
            "--seeds", "0", "1", "--runs-dir", str(tmp_path), "--gpus", "3", "5",
            "--runs-per-gpu", str(runs_per_gpu)]
    assert compare.main(argv) == 143
    children = stand_in_children.started
    assert len(children) == 2 * runs_per_gpu
    assert all(child.signals == [signal.SIGTERM] for child in children)
    assert all(child.returncode == 143 for child in children)        # waited for
    assert "4 of the 4 runs have not finished" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL         # the handler is put back


def test_a_child_stopped_by_a_signal_of_its_own_ends_the_gpus_sweep(tmp_path, stand_in_children,
                                                                    monkeypatch, capsys):
    class OneTerminatedAlone(StandInChild):
        seconds = 60.0

        def poll(self):  # `kill` of the first child alone, while the second trains
            if self is self.started[0] and len(self.started) == 2 and not self.signals:
                self.signals.append(signal.SIGTERM)  # it stops with 143, no signal to compare.py
            return super().poll()

    monkeypatch.setattr(sweep.subprocess, "Popen", OneTerminatedAlone)
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "dkel",
            "--seeds", "0", "1", "--runs-dir", str(tmp_path), "--gpus", "3", "5"]
    assert compare.main(argv) == 143
    children = stand_in_children.started
    assert len(children) == 2                                   # no third run started
    assert children[1].signals == [signal.SIGTERM]              # the stop passed on to the other
    assert "4 of the 4 runs have not finished" in capsys.readouterr().err


def test_gpus_pass_on_a_second_ctrl_c_that_comes_while_the_first_is_passed_on(
        tmp_path, stand_in_children, monkeypatch, capsys):
    pressed = []

    class InterruptedTwice(StandInChild):
        seconds = 60.0

        def poll(self):  # Ctrl-C while both runs train ...
            if len(self.started) == 2 and not pressed:
                pressed.append(signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return super().poll()

        def send_signal(self, number):  # ... and again while compare.py passes the first on
            super().send_signal(number)
            if len(pressed) == 1:
                pressed.append(signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(sweep.subprocess, "Popen", InterruptedTwice)
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "dkel",
            "--seeds", "0", "--runs-dir", str(tmp_path), "--gpus", "3", "5"]
    assert compare.main(argv) == 130
    children = stand_in_children.started
    assert len(children) == 2
    assert all(child.signals == [signal.SIGINT, signal.SIGINT] for child in children)


def test_a_stop_while_a_run_writes_its_summary_ends_the_sequential_sweep(tmp_path, monkeypatch,
                                                                          capsys):
    real_summary = sweep.train.report.write_summary

    def terminated_while_writing(*summary_args):  # after the run's last stop check
        os.kill(os.getpid(), signal.SIGTERM)
        return real_summary(*summary_args)

    monkeypatch.setattr(sweep.train.report, "write_summary", terminated_while_writing)
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "--seeds", "0",
            "1", "--epochs", "1", "--runs-dir", str(tmp_path), *TINY_TRAINING]
    assert compare.main(argv) == 143
    assert (tmp_path / "synthetic_resnet8_baseline_seed0" / "summary.json").exists()
    assert not (tmp_path / "synthetic_resnet8_baseline_seed1").exists()
    err = capsys.readouterr().err
    assert "error: stopped by SIGTERM as the run ended: it has finished" in err
    assert "1 of the 2 runs have not finished" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("number,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_between_two_runs_ends_the_sequential_sweep(tmp_path, monkeypatch, capsys,
                                                                  number, code):
    calls = []

    def finished_then_interrupted(argv):
        calls.append(argv)
        os.kill(os.getpid(), number)  # as the run returns, before the next starts
        return 0

    monkeypatch.setattr(sweep.train, "main", finished_then_interrupted)
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "dkel",
            "--seeds", "0", "--runs-dir", str(tmp_path)]
    try:
        ended_with = compare.main(argv)
    except KeyboardInterrupt:  # a traceback to the user
        ended_with = "KeyboardInterrupt"
    assert ended_with == code and len(calls) == 1
    name = signal.Signals(number).name
    assert f"stopped by {name}: 2 of the 2 runs have not finished" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
