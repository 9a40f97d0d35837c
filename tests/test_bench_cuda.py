"""tools/bench_cuda.py on the CPU at a tiny size: the report and its JSON, the figures against their
formulas, a broken check that makes it exit 1, what is skipped and why, the time cap, the packing
runs' protocol, the clean-up of child processes, and bad flags."""
import io
import json
import os
import signal
import sys
import time

import pytest
import torch

import ema
from models import multi_peer_net
from tools import bench_cuda

TINY = ["--device", "cpu", "--arch", "resnet8", "--batch-size", "16", "--train-images", "128",
        "--test-images", "32", "--steps", "1", "--data-seconds", "0.1", "--workers", "0",
        "--no-compile", "--packing-steps", "2"]
# A packing run that speaks packing_worker's protocol without torch: ready, then, once started,
# 32 images between the wall-clock times 1000 and 1002 (16 images/s a run, all runs at once).
FAKE_WORKER = ("import json, sys; print('ready', flush=True); sys.stdin.readline(); "
               "print(json.dumps({'start': 1000.0, 'end': 1002.0, 'images': 32}), flush=True)")
ITEMS = {
    "correctness": ["the DKEL step on the CPU and on the device, fp32",
                    "one epoch through train.py, bf16", "one epoch through train.py, fp32",
                    "deployable.pt loads without a GPU",
                    "one short epoch through train.py --compile, bf16"],
    "speed": ["DKEL step, bf16, compiled", "DKEL step, bf16", "kernels of a DKEL step, bf16",
              "no host sync in a DKEL step, bf16", "the epoch outside its steps",
              "DKEL step, fp32", "straightforward recipe (reference), fp32",
              "data pipeline, ours", "data pipeline, reference"],
    "packing": ["1 run at once", "2 runs at once"],
    "multi-gpu": ["one GPU, 2 epochs", "torchrun, 2 GPUs, NCCL, --sync-bn, 2 epochs",
                  "torchrun: SIGTERM to rank 1 alone", "torchrun: --resume after the SIGTERM"],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy CPU two threads stall each other (30x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(path, *flags) -> tuple[int, dict]:
    """bench_cuda.main at the tiny size without train.py's curves.png (half the time of a tiny
    epoch; the bench does not check it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("infra.report.plot_curves", lambda out_dir, history: None)
        code = bench_cuda.main([*TINY, "--json", str(path / "report.json"), *flags])
    return code, json.loads((path / "report.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """Every part of the tiny CPU run, packing with the stand-in runs; its exit code and JSON."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_cuda, "WORKER", FAKE_WORKER)
        return run(tmp_path_factory.mktemp("bench"), "--packing-runs", "1", "2")


def test_the_tiny_cpu_run_passes_and_reports_every_part_and_item(tiny):
    code, report = tiny
    assert code == 0 and report["passed"] is True
    assert report["machine"]["device"] == "cpu" and report["machine"]["device_name"] == "cpu"
    assert list(report["parts"]) == list(ITEMS)
    for name, part in report["parts"].items():
        assert [item["name"] for item in part["items"]] == ITEMS[name]
        assert part["seconds"] <= part["cap_seconds"]
        for item in part["items"]:
            if item["status"] == "passed":
                assert item["summary"] and item["values"] and item["seconds"] >= 0
    statuses = {name: [item["status"] for item in part["items"]]
                for name, part in report["parts"].items()}
    assert statuses == {"correctness": ["passed"] * 4 + ["skipped"],
                        "speed": ["skipped", "passed", "passed", "skipped"] + ["passed"] * 5,
                        "packing": ["passed"] * 2, "multi-gpu": ["skipped"] * 4}
    assert [p["status"] for p in report["parts"].values()] == ["passed"] * 3 + ["skipped"]


def test_skipped_items_say_why(tiny):
    _, report = tiny
    speed, correctness = report["parts"]["speed"]["items"], report["parts"]["correctness"]["items"]
    assert [item["reason"] for item in (speed[0], correctness[4])] == ["--no-compile"] * 2
    assert speed[3]["reason"] == "needs CUDA"   # set_sync_debug_mode is CUDA's
    assert {item["reason"] for item in report["parts"]["multi-gpu"]["items"]} == {
        "needs 2 CUDA devices; 0 visible"}


def test_the_figures_follow_from_the_measurements(tiny):
    _, report = tiny
    speed = {item["name"]: item["values"] for item in report["parts"]["speed"]["items"]}
    for name in ("DKEL step, bf16", "DKEL step, fp32", "straightforward recipe (reference), fp32"):
        seconds = speed[name]["ms_per_step"] / 1e3
        assert speed[name]["images_per_s"] == pytest.approx(16 / seconds)
        # 300 epochs of 390 steps (Sec. 4.2), 270 runs (Table 1).
        assert speed[name]["paper_run_hours"] == pytest.approx(300 * 390 * seconds / 3600)
        assert speed[name]["table1_gpu_days"] == pytest.approx(270 * 300 * 390 * seconds / 86400)
    bf16 = speed["DKEL step, bf16"]
    assert bf16["enqueue_share"] == pytest.approx(bf16["enqueue_ms"] / bf16["synchronised_step_ms"])
    assert "peak_memory_gib" not in bf16   # CUDA's
    # Each of resnet8's convolutions once forward in the student and in the teacher.
    student = multi_peer_net("resnet8", 10, 3)
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in student.modules())
    kernels = speed["kernels of a DKEL step, bf16"]
    assert kernels["most_frequent_ops"]["convolution"] == 2 * convolutions
    assert kernels["ops"] > sum(kernels["most_frequent_ops"].values())
    epoch = speed["the epoch outside its steps"]
    assert epoch["per_epoch_seconds"] == pytest.approx(
        epoch["evaluation, batch 1024 (s)"] + epoch["checkpoint and metrics.csv (s)"]
        + epoch["curves.png (s)"] / 10)
    assert epoch["evaluation, batch 16 (s)"] > 0
    reference = speed["straightforward recipe (reference), fp32"]["ms_per_step"]
    assert speed["DKEL step, fp32"]["times_the_reference"] == pytest.approx(
        reference / speed["DKEL step, fp32"]["ms_per_step"])
    # The stand-in runs: 32 images in 2 s each, all at once: 16 and 32 images/s together.
    packing = report["parts"]["packing"]
    assert [item["values"]["images_per_s"] for item in packing["items"]] == [16.0, 32.0]
    # 2 runs pay; at their 32 images/s, a step of 16 images takes 0.5 s.
    assert packing["verdict"] == {"runs_per_gpu_that_pay": 2, "gain_over_fewest": 2.0,
                                  "fewest_runs": 1,
                                  "table1_gpu_days": pytest.approx(270 * 300 * 390 * 0.5 / 86400)}
    # The CPU against itself: the same arithmetic, no error at all.
    step = report["parts"]["correctness"]["items"][0]["values"]
    assert step["loss_error"] == step["worst_gradients_error"] == step["worst_step_error"] == 0
    epoch = report["parts"]["correctness"]["items"][1]["values"]
    assert epoch["steps"] == 128 // 16
    assert epoch["loss_last_quarter"] < epoch["loss_first_quarter"]


def test_a_broken_check_fails_the_run_with_exit_code_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ema.EMATeacher, "update", lambda self, step=0: None)  # no Eq. (5)
    code, report = run(tmp_path, "--parts", "correctness")
    assert code == 1 and report["passed"] is False
    correctness = report["parts"]["correctness"]
    assert correctness["status"] == "failed"
    # The teacher does not move on the CPU or on the device alike: that check still agrees.
    assert [item["status"] for item in correctness["items"]] == ["passed", "failed", "failed",
                                                                 "passed", "skipped"]
    for item in correctness["items"][1:3]:
        assert item["reason"] == "the teacher did not change in the epoch (Eq. (5))"
    assert "FAILED: 2 passed, 2 failed" in capsys.readouterr().out
    assert {item["reason"] for item in report["parts"]["speed"]["items"]} == {
        "not selected (--parts)"}


def test_a_part_whose_time_is_used_up_reports_each_item_skipped(tmp_path):
    code, report = run(tmp_path, "--parts", "speed", "--speed-seconds", "0")
    assert code == 0 and report["passed"] is True
    assert report["parts"]["speed"]["status"] == "skipped"
    assert {item["reason"] for item in report["parts"]["speed"]["items"]} == {
        "the part's time cap of 0 s was used up", "--no-compile", "needs CUDA"}


def test_the_figures_are_printed_as_a_table_to_paste():
    report = {"machine": {"device_name": "NVIDIA H100", "torch": "2.14.1", "cuda": "12.8"},
              "command": "python -m tools.bench_cuda",
              "parts": {"speed": {"items": [
                  {"name": "DKEL step, bf16", "status": "passed", "summary": "9 images/s",
                   "values": {"times_the_reference": 2.0}},
                  {"name": "DKEL step, fp32", "status": "skipped", "reason": "cap"}]}}}
    assert bench_cuda.paste_lines(report) == [
        "", "For docs/performance.md:", "",
        "NVIDIA H100, torch 2.14.1, CUDA 12.8: `python -m tools.bench_cuda`", "",
        "| part | measurement | result |", "|---|---|---|",
        "| speed | DKEL step, bf16 | 9 images/s; 2.00x the reference |"]


def test_an_item_under_its_own_cap_takes_no_time_from_the_parts():
    def slow(values):
        time.sleep(0.6)
        return "slow"

    part = bench_cuda.run_part("part", 0.5, [("own", slow, 1.0), ("later", lambda v: "ran")])
    assert [item["status"] for item in part["items"]] == ["passed", "passed"]
    assert part["cap_seconds"] == 1.5
    part = bench_cuda.run_part("part", 0.5, [("own", slow, 0.3), ("later", lambda v: "ran")])
    assert [item["status"] for item in part["items"]] == ["skipped", "passed"]


def ctrl_c(*args):
    raise KeyboardInterrupt


def sigterm(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)


@pytest.mark.parametrize("stop,code", [(ctrl_c, 130), (sigterm, 143)])
def test_ctrl_c_or_sigterm_reports_the_finished_parts_and_exits_with_its_code(
        tmp_path, monkeypatch, capsys, stop, code):
    monkeypatch.setattr(bench_cuda, "packed_runs", stop)   # in the packing part's first item
    handler = signal.getsignal(signal.SIGTERM)
    assert run(tmp_path, "--parts", "packing")[0] == code
    assert signal.getsignal(signal.SIGTERM) is handler
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["interrupted"] is True and report["passed"] is False
    assert list(report["parts"]) == ["correctness", "speed"]   # the finished parts (skipped)
    assert "INTERRUPTED" in capsys.readouterr().out


def test_the_time_cap_stops_an_item_and_skips_the_later_ones():
    def slow(values):
        values["started"] = True
        time.sleep(10)

    def broken(values):
        raise ValueError("a device error\non two lines")

    items = [("fails", lambda values: bench_cuda.check(False, "did not hold")),
             ("errs", broken), ("slow", slow), ("later", lambda values: "never")]
    previous = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    part = bench_cuda.run_part("part", 0.5, items)
    assert time.perf_counter() - start < 5
    assert signal.getsignal(signal.SIGALRM) is previous
    assert part["status"] == "failed"
    assert [(item["status"], item["reason"]) for item in part["items"]] == [
        ("failed", "did not hold"), ("failed", "ValueError: a device error on two lines"),
        ("skipped", "stopped at the part's time cap of 0.5 s"),
        ("skipped", "the part's time cap of 0.5 s was used up")]
    assert part["items"][2]["values"] == {"started": True}


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie, not yet reaped
    except FileNotFoundError:
        return True


def test_a_time_cap_kills_a_child_and_every_process_it_started(tmp_path):
    # A shell (as torchrun) whose own child (as a rank) runs on.
    command = ["sh", "-c", f"sleep 60 & echo $! > {tmp_path / 'pid'}; wait"]

    def waits(values):
        with bench_cuda.started(command, str(tmp_path / "log")) as process:
            while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
                time.sleep(0.01)
            process.wait()

    part = bench_cuda.run_part("part", 1.0, [("child", waits)])
    assert part["items"][0]["status"] == "skipped"
    grandchild = int((tmp_path / "pid").read_text())
    deadline = time.perf_counter() + 5
    while not dead(grandchild) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert dead(grandchild)


def test_the_packing_worker_reports_its_timed_steps_after_the_start(monkeypatch, capsys):
    settings = {"device": "cpu", "arch": "resnet8", "steps": 2, "batch_size": 4, "images": 8,
                "precision": "fp32"}
    monkeypatch.setattr(sys, "stdin", io.StringIO("go\n"))
    before = time.time()
    bench_cuda.packing_worker(json.dumps(settings))
    ready, result = capsys.readouterr().out.splitlines()
    assert ready == "ready"
    result = json.loads(result)
    assert result["images"] == 2 * 4
    assert before <= result["start"] <= result["end"] <= time.time()


@pytest.mark.parametrize("flags,message", [
    (["--train-images", "8"], "--train-images 8 must hold one batch of --batch-size 16"),
    (["--arch", "resnet9"], "unknown --arch 'resnet9'"),
    (["--packing-runs", "0"], "--packing-runs must be >= 1"),
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA device on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_flags_get_one_line_and_exit_code_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        bench_cuda.main([*TINY, "--json", str(tmp_path / "r.json"), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err
    assert not os.path.exists(tmp_path / "r.json")
