"""The first minutes on a GPU: one command that checks and times train.py's CUDA path
(docs/performance.md says how to run it and where its figures go).

    python -m tools.bench_cuda [--json bench_cuda.json]   # under 10 minutes on one GPU

Four parts, in this order, each under a time cap (what a cap cuts short is reported as skipped):
- correctness: one DKEL step (the Sec. 3.3 initialisation, the loss, every gradient, the SGD step
  and Eq. (5)) on the CPU and on the device in fp32, from the same weights and the same batch;
  then one resnet32 DKEL epoch through train.py's own code (train.main) on a synthetic
  CIFAR-shaped set of 50,000 images, under bf16 and under fp32: the loss finite and falling, the
  teacher moved by Eq. (5) towards the student, the run directory complete, deployable.pt
  loadable on a machine without a GPU, the epoch's peak memory; then a short epoch of
  train.py --compile (under a cap of its own);
- speed, the most valuable figure first: train.py's DKEL step (bench_train.dkel_step; resnet32,
  batch 128, M = 3) compiled, in bf16, under a cap of its own, with its compile seconds; the
  eager bf16 step with its peak memory and its CPU time to enqueue against its time to an idle
  device; the kernels of a step (a dispatch mode; on CUDA also torch.profiler); a few steps under
  torch.cuda.set_sync_debug_mode("error") (no host sync); the epoch's time outside its steps
  (evaluation, checkpoint, curves.png); the eager fp32 step; each step with the projected wall
  time of the paper's run (300 epochs of 390 steps) and of Table 1's 270 runs; the
  straightforward recipe (bench_train.time_reference) and the data pipeline against its
  reference (bench_data), in the same process, as ratios;
- packing: the DKEL steps of 1, 2 and 4 runs at once on the device (separate processes, timed
  together), and how many runs per GPU pay;
- multi-GPU, with 2 CUDA devices or more: train.py under torchrun on 2 GPUs (NCCL, --sync-bn)
  against the one-GPU run, a SIGTERM to rank 1 alone that stops every rank, and --resume.
Prints one report, with the figures as a Markdown table for docs/performance.md, writes it as
JSON (--json) and exits with 1 when a check failed, 0 otherwise
(130 on Ctrl-C and 143 on SIGTERM, after reporting the parts that finished).
With --device cpu and tiny sizes the script runs in the test suite (tests/test_bench_cuda.py).
"""
import sys

if not __package__:  # `python tools/bench_cuda.py`: the root's modules are not on sys.path
    sys.stderr.write("error: run it from the repository root: python -m tools.bench_cuda ...\n")
    sys.exit(2)

import argparse
import contextlib
import csv
import datetime
import functools
import io
import itertools
import json
import math
import os
import signal
import subprocess
import tempfile
import time
from unittest import mock

import torch

import cli
import data
import train
from backbones import ARCHS
from infra import report, rundir
from models import build_deployable
from tools import bench_data, bench_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
TRAIN_PY = os.path.join(ROOT, "train.py")
PARTS = ("correctness", "speed", "packing", "multi-gpu")
RUN_FILES = ("config.json", "checkpoint.pt", "metrics.csv", "summary.json", "deployable.pt")
PAPER_EPOCHS, PAPER_STEPS, TABLE1_RUNS = 300, 390, 270   # Sec. 4.2 (50,000 / 128); Table 1
FULL_WEIGHTS = {"rampup": 1.0, "teacher_ensemble_weight": 0.5}  # r(ep), w(ep): every term of Eq. (12) counts
EVAL_BATCH_SIZE = cli.defaults()["eval_batch_size"]   # train.py's evaluation batch
COMPILE_WARMUP = 3   # a compiled step's first calls: compilation (CUDA: graphs recorded)
SYNC_CHECK_STEPS = 3   # steps under torch.cuda.set_sync_debug_mode("error")
COMPILED_EPOCH_STEPS = 20   # the steps of train.py --compile's epoch in the correctness part
PAY = 1.1   # a further run per GPU pays when it adds at least 10% to the throughput
# torchrun's epoch-1 loss within 10% of the one-GPU run's: with --sync-bn the two compute the
# same steps up to rounding (infra/distributed.py); per-rank BatchNorm statistics, without it,
# made them 31% apart on the CPU (gloo, resnet8). Our choice, not yet measured on GPUs.
LOSS_AGREEMENT = 0.10


class CheckFailed(Exception):
    """A check that did not hold: one line saying what was found."""


class TimeCap(BaseException):
    """The part's time ran out (a BaseException, so that no `except Exception` holds it up)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: the bench stops as on Ctrl-C (its child processes killed, the finished parts
    reported), with exit code 143."""
    exit_code = rundir.EXIT_TERMINATED


def terminate(number, frame):
    raise Terminated()


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ----------------------------------------------------------------------------- parts and items
@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeCap in the main thread once `seconds` have passed inside the block."""
    def expire(number, frame):
        raise TimeCap()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(name: str, cap: float, items: list, skip: str | None = None,
             end: float = math.inf) -> dict:
    """Run the part's items in order within `cap` seconds: (name, function) pairs, or (name,
    function, own cap) triples, an item under a cap of its own that its time does not take from
    the part's (the part's cap includes it); none past the time `end` (time.perf_counter).
    A function gets a dict to fill with its values and returns a one-line summary; CheckFailed or
    an error fails the item, the time cap skips it and every later one; `skip` skips them all,
    and an item whose function is a string is skipped for that reason."""
    start, results, own = time.perf_counter(), [], 0.0
    for label, function, *own_cap in items:
        item_cap = own_cap[0] if own_cap else cap
        left = min(item_cap - (0 if own_cap else time.perf_counter() - start - own),
                   end - time.perf_counter())
        reason = skip or (function if isinstance(function, str) else None)
        if not reason and left <= 0:
            reason = f"the part's time cap of {cap:g} s was used up"
        if reason:
            results.append({"name": label, "status": "skipped", "reason": reason, "values": {},
                            "seconds": 0.0})
            continue
        results.append(run_item(name, label, function, left, item_cap))
        own += results[-1]["seconds"] if own_cap else 0.0
        if results[-1]["status"] == "skipped" and not own_cap:
            skip = f"the part's time cap of {cap:g} s was used up"
    statuses = {item["status"] for item in results}
    status = ("failed" if "failed" in statuses else "skipped" if statuses == {"skipped"}
              else "passed")
    own_caps = sum(item[2] for item in items if len(item) == 3)
    return {"status": status, "cap_seconds": cap + own_caps,
            "seconds": time.perf_counter() - start, "items": results}


def run_item(part: str, label: str, function, seconds: float, cap: float) -> dict:
    """One item under the part's remaining `seconds`, reported on stderr as it goes."""
    print(f"bench_cuda.py: {part}: {label} ...", file=sys.stderr, flush=True)
    values, start = {}, time.perf_counter()
    item = {"name": label, "values": values}
    try:
        with deadline(seconds):
            item.update(status="passed", summary=function(values))
    except TimeCap:
        item.update(status="skipped", reason=f"stopped at the part's time cap of {cap:g} s")
    except CheckFailed as failure:
        item.update(status="failed", reason=str(failure))
    except Exception as error:  # anything else on the device path is a failure to report
        item.update(status="failed", reason=f"{type(error).__name__}: {one_line(str(error))}")
    item["seconds"] = time.perf_counter() - start
    print(f"bench_cuda.py: {part}: {label}: {item['status']} ({item['seconds']:.1f} s)",
          file=sys.stderr, flush=True)
    return item


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


# ----------------------------------------------------------------------------- shared pieces
@functools.cache
def synthetic(train_images: int, test_images: int, device: str) -> data.ImageData:
    """The synthetic CIFAR-shaped set of that size on `device` (built once per process)."""
    return data.synthetic_data(train_images, test_images, 0, device)


def fitted_ema_decay(steps: int) -> float:
    """An EMA decay whose time constant is a quarter of a run of `steps` optimizer steps, so that
    the teacher visibly follows the student (the paper's 0.999 lags any short run)."""
    return min(0.999, max(0.0, round(1.0 - 4.0 / steps, 4)))


def train_flags(settings, out_dir: str, epochs: int, steps_per_epoch: int) -> list[str]:
    """train.py's flags of a bench run: DKEL on the synthetic set, the bench's size."""
    return ["--dataset", "synthetic", "--arch", settings.arch, "--method", "dkel",
            "--batch-size", str(settings.batch_size), "--epochs", str(epochs),
            "--ema-decay", str(fitted_ema_decay(epochs * steps_per_epoch)),
            "--out-dir", out_dir]


def state_of(method) -> dict[str, torch.Tensor]:
    """Every floating-point parameter and buffer of the method's modules, copied to the CPU."""
    return {f"{module}.{name}": tensor.detach().cpu().clone()
            for module, network in method.modules().items()
            for name, tensor in network.state_dict().items() if tensor.is_floating_point()}


def worst_error(reference: dict, other: dict) -> tuple[float, str]:
    """The largest relative error ||other - reference|| / ||reference|| over the tensors."""
    errors = [((other[k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-12)).item()
              for k, v in reference.items()]
    worst = max(range(len(errors)), key=errors.__getitem__)
    return errors[worst], list(reference)[worst]


def difference(after: dict, before: dict) -> dict:
    return {name: after[name] - before[name] for name in before}


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def check_run_dir(out_dir: str, arch: str, epochs: int) -> dict:
    """The run directory holds every file, `epochs` rows of metrics with finite losses, and a
    deployable.pt that loads into models.build_deployable; returns its summary.json."""
    missing = [name for name in RUN_FILES if not os.path.exists(os.path.join(out_dir, name))]
    check(not missing, f"{out_dir} lacks {', '.join(missing)}")
    rows = read_metrics(out_dir)
    check(len(rows) == epochs, f"metrics.csv has {len(rows)} rows, expected {epochs}")
    check(all(math.isfinite(float(row["loss"])) for row in rows),
          "metrics.csv: a loss is not finite")
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    deployable = build_deployable(arch, summary["deployable"]["num_classes"])
    weights = torch.load(os.path.join(out_dir, "deployable.pt"), map_location="cpu",
                         weights_only=True)
    deployable.load_state_dict(weights)
    return summary


# ----------------------------------------------------------------------------- correctness
def first_batch(settings) -> tuple[torch.Tensor, torch.Tensor]:
    """train.py's first training batch (epoch 0 of seed 0) of a small set, on the CPU."""
    small = synthetic(settings.batch_size, 1, "cpu")
    generator = data.epoch_generator(0, 0, small.device)
    return next(data.train_batches(small, settings.batch_size, 3, generator))


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 convolutions and matrix products on (PyTorch's default for convolutions) or off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def one_step(settings, device: torch.device, batch, allow_tf32: bool) -> dict:
    """One DKEL step of train.py's pieces in fp32 on `device` from seed 0's weights: the teacher's
    initialisation (Sec. 3.3), the loss and the student's gradients at FULL_WEIGHTS, then the SGD
    step and Eq. (5). Returns the loss, the gradients and both updates of every tensor (CPU)."""
    args = cli.resolve_args(["--arch", settings.arch, "--device", device.type, "--precision",
                             "fp32", "--batch-size", str(settings.batch_size)])
    torch.manual_seed(0)
    method = train.build_method(args, synthetic(settings.batch_size, 1, "cpu"), device)
    train.channels_last(method)  # NHWC, as train.py runs it
    views, labels = (tensor.to(device) for tensor in batch)
    with tf32(allow_tf32):
        start = state_of(method)
        method.initialise(itertools.repeat((views, labels)))
        initialised = state_of(method)
        optimizer = train.sgd(method.trainable_parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
        method.set_mode(True)
        loss, _ = train.student_step(method, optimizer, views, labels, FULL_WEIGHTS, "fp32")
        method.after_step(0)
    gradients = {f"{module}.{name}": p.grad.cpu() for module, network in method.modules().items()
                 for name, p in network.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "gradients": gradients,
            "initialisation": difference(initialised, start),
            "step": difference(state_of(method), initialised)}


def cpu_versus_device(settings, values: dict) -> str:
    """The same DKEL step on the CPU and on the device, fp32 with TF32 off: the loss, every
    gradient, the initialisation's and the step's updates agree within --tolerance. The
    device's step with TF32 on, train.py's fp32 on an Ampere or later GPU, is reported."""
    batch, device = first_batch(settings), torch.device(settings.device)
    cpu = one_step(settings, torch.device("cpu"), batch, allow_tf32=False)
    values["loss_cpu"] = cpu["loss"]
    for label, allow_tf32 in (("", False), ("tf32_", True)):
        ours = one_step(settings, device, batch, allow_tf32)
        values[f"{label}loss_device"] = ours["loss"]
        values[f"{label}loss_error"] = abs(ours["loss"] - cpu["loss"]) / abs(cpu["loss"])
        for part in ("gradients", "initialisation", "step"):
            error, name = worst_error(cpu[part], ours[part])
            values[f"{label}worst_{part}_error"] = error
            values[f"{label}worst_{part}_tensor"] = name
    values["tolerance"] = tolerance = settings.tolerance
    for key in ("loss_error", "worst_gradients_error", "worst_initialisation_error",
                "worst_step_error"):
        where = values.get(key.replace("error", "tensor"), "")
        check(values[key] <= tolerance, f"{key} {values[key]:.2e} > {tolerance:g} {where}")
    return (f"TF32 off: loss {cpu['loss']:.5f} (CPU) / {values['loss_device']:.5f}, worst "
            f"relative error of a gradient {values['worst_gradients_error']:.1e}, of an update "
            f"{max(values['worst_initialisation_error'], values['worst_step_error']):.1e} "
            f"(<= {tolerance:g}); with TF32 on, of a gradient "
            f"{values['tf32_worst_gradients_error']:.1e}")


def epoch_through_train(settings, work_dir: str, precision: str, values: dict) -> str:
    """One DKEL epoch of train.main on the CIFAR-sized synthetic set in `precision`, with the first
    epoch's weights of the paper's recipe (r(0) = exp(-5), w(0) = 1, lr 0.1); each step's loss
    is kept on the device and read at the end."""
    dataset = synthetic(settings.train_images, settings.test_images, settings.device)
    steps = data.num_train_batches(dataset, settings.batch_size)
    out_dir = os.path.join(work_dir, f"epoch_{precision}")
    argv = train_flags(settings, out_dir, 1, steps) + [
        "--rampup-epochs", "1", "--device", settings.device, "--precision", precision]
    real_step, log, losses, start = train.student_step, io.StringIO(), [], {}

    def recorded_step(method, optimizer, views, labels, weights, precision):
        if not start:   # the teacher as the loop starts, after its initialisation
            teacher = method.modules()["teacher"]
            start.update({name: p.detach().clone() for name, p in teacher.named_parameters()})
        loss, parts = real_step(method, optimizer, views, labels, weights, precision)
        losses.append(loss.detach())
        return loss, parts

    with mock.patch.object(train, "student_step", recorded_step):
        run_train(settings, dataset, argv, values)
    return check_epoch(settings, out_dir, torch.stack(losses).float().cpu(), start, values)


def run_train(settings, dataset, argv: list[str], values: dict) -> None:
    """train.main(argv) on `dataset`, its output kept; exit code 0, else a failed check. On CUDA
    the run's peak memory (an epoch's: its steps, evaluation and checkpoint) into `values`."""
    device, log = torch.device(settings.device), io.StringIO()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with (mock.patch.object(train.data, "load_data", lambda *args, **kwargs: dataset),
          contextlib.redirect_stdout(log), contextlib.redirect_stderr(log)):
        code = train.main(argv)
    if code in (rundir.EXIT_INTERRUPTED, rundir.EXIT_TERMINATED):
        raise KeyboardInterrupt()   # a Ctrl-C or SIGTERM that train.py's own handler took
    check(code == 0, f"train.py exited with {code}: {one_line(log.getvalue()[-400:])}")
    if device.type == "cuda":
        values["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30


def compiled_epoch(settings, work_dir: str, values: dict) -> str:
    """One short epoch (COMPILED_EPOCH_STEPS steps) of train.py --compile in bf16: exit 0, a
    complete run directory with a finite loss."""
    images = min(settings.train_images, COMPILED_EPOCH_STEPS * settings.batch_size)
    dataset = synthetic(images, settings.test_images, settings.device)
    steps = data.num_train_batches(dataset, settings.batch_size)
    out_dir = os.path.join(work_dir, "epoch_compiled")
    argv = train_flags(settings, out_dir, 1, steps) + [
        "--rampup-epochs", "1", "--device", settings.device, "--precision", "bf16", "--compile"]
    start = time.perf_counter()
    run_train(settings, dataset, argv, values)
    check_run_dir(out_dir, settings.arch, 1)
    values.update(steps=steps, seconds=time.perf_counter() - start,
                  loss=float(read_metrics(out_dir)[0]["loss"]))
    return (f"{steps} steps in {values['seconds']:.0f} s (compilation included), loss "
            f"{values['loss']:.3f}, run directory complete")


def distance(a: dict, b: dict) -> float:
    """The Euclidean distance between two sets of tensors of the same names."""
    return torch.cat([(a[name].cpu().float() - b[name].cpu().float()).flatten()
                      for name in a]).norm().item()


def check_epoch(settings, out_dir: str, losses: torch.Tensor, teacher_start: dict,
                values: dict) -> str:
    """The epoch's checks: a finite, falling loss; the teacher's parameters moved by Eq. (5)
    towards the student's; the run directory complete."""
    quarter = max(1, len(losses) // 4)
    first, last = losses[:quarter].mean().item(), losses[-quarter:].mean().item()
    values.update(steps=len(losses), loss_first_quarter=first, loss_last_quarter=last)
    check(bool(torch.isfinite(losses).all()), f"a step's loss is not finite: {losses.tolist()}")
    check(last < first, f"the loss did not fall: {first:.4f} in the first quarter of the epoch, "
                        f"{last:.4f} in the last")
    summary = check_run_dir(out_dir, settings.arch, 1)
    checkpoint = torch.load(os.path.join(out_dir, "checkpoint.pt"), map_location="cpu",
                            weights_only=True)
    end = {name: checkpoint["teacher"][name] for name in teacher_start}
    student = {name: checkpoint["student"][name] for name in teacher_start}
    values.update(teacher_moved=distance(end, teacher_start),
                  teacher_to_student_start=distance(teacher_start, student),
                  teacher_to_student_end=distance(end, student))
    check(values["teacher_moved"] > 0, "the teacher did not change in the epoch (Eq. (5))")
    check(values["teacher_to_student_end"] < values["teacher_to_student_start"],
          "the teacher did not move towards the student")
    values["test_deployed_mean"] = summary["headline_final_deployed_mean"]
    values["images_per_s"] = float(read_metrics(out_dir)[0]["images_per_s"])
    memory = (f", peak memory {values['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in values
              else "")
    return (f"{len(losses)} steps, loss {first:.3f} -> {last:.3f} (quarter means), teacher "
            f"{values['teacher_to_student_start']:.3g} -> {values['teacher_to_student_end']:.3g} "
            f"from the student, {values['images_per_s']:,.0f} images/s{memory}, run directory "
            f"complete")


def deployable_without_gpu(work_dir: str, values: dict) -> str:
    """deployable.pt of the bf16 epoch loads with a plain torch.load (docs/training.md), which
    on a machine without a GPU needs every tensor saved on the CPU."""
    path = os.path.join(work_dir, "epoch_bf16", "deployable.pt")
    check(os.path.exists(path), "no deployable.pt: the bf16 epoch did not finish")
    devices = sorted({str(t.device) for t in torch.load(path, weights_only=True).values()})
    values["devices"] = devices
    check(devices == ["cpu"], f"deployable.pt holds tensors on {', '.join(devices)}: a plain "
                              f"torch.load of it fails on a machine without a GPU")
    return "every tensor saved on the CPU"


def correctness_items(settings, work_dir: str) -> list:
    return [("the DKEL step on the CPU and on the device, fp32",
             functools.partial(cpu_versus_device, settings)),
            ("one epoch through train.py, bf16",
             functools.partial(epoch_through_train, settings, work_dir, "bf16")),
            ("one epoch through train.py, fp32",
             functools.partial(epoch_through_train, settings, work_dir, "fp32")),
            ("deployable.pt loads without a GPU",
             functools.partial(deployable_without_gpu, work_dir)),
            ("one short epoch through train.py --compile, bf16",
             "--no-compile" if settings.no_compile
             else functools.partial(compiled_epoch, settings, work_dir), settings.compiled_seconds)]


# ----------------------------------------------------------------------------- speed
def projections(seconds_per_step: float, batch_size: int) -> dict:
    """Images/s of a step and the projected training time of the paper's run and of Table 1's
    270 runs at that step time (training steps only: no evaluation, no initialisation)."""
    hours = PAPER_EPOCHS * PAPER_STEPS * seconds_per_step / 3600
    return {"ms_per_step": 1e3 * seconds_per_step, "images_per_s": batch_size / seconds_per_step,
            "paper_run_hours": hours, "table1_gpu_days": TABLE1_RUNS * hours / 24}


def bench_options(settings, compiled: bool = False) -> argparse.Namespace:
    """bench_train's options at the bench's size."""
    return argparse.Namespace(arch=settings.arch, batch_size=settings.batch_size,
                              steps=settings.steps, compile=compiled, rounds=1,
                              test_images=settings.test_images, eval_batch_size=EVAL_BATCH_SIZE)


def timed(step, device: torch.device) -> float:
    """Seconds of one call of `step`, from and to an idle device."""
    start = bench_data.now(device)
    step()
    return bench_data.now(device) - start


def speed_summary(values: dict) -> str:
    return (f"{values['images_per_s']:,.0f} images/s ({values['ms_per_step']:.1f} ms/step): "
            f"the paper's run {values['paper_run_hours']:.2f} h, Table 1 "
            f"{values['table1_gpu_days']:.1f} GPU-days")


def compiled_speed(settings, values: dict) -> str:
    """train.py --compile's DKEL step in bf16 (bench_train.dkel_step): the seconds of its first
    steps (compilation; on CUDA also the CUDA graphs' recording), then its speed."""
    device = torch.device(settings.device)
    dataset = synthetic(settings.train_images, settings.test_images, settings.device)
    step = bench_train.dkel_step(bench_options(settings, True), dataset, device, "bf16")
    values["compile_seconds"] = sum(timed(step, device) for _ in range(COMPILE_WARMUP))
    values.update(projections(bench_train.seconds_per_step(step, settings.steps, 0, device),
                              settings.batch_size))
    return f"compiled in {values['compile_seconds']:.0f} s; " + speed_summary(values)


def step_speed(settings, precision: str, values: dict) -> str:
    """train.py's eager DKEL step (bench_train.dkel_step), timed after 2 warm-up steps; in bf16
    also the CPU's time to enqueue a step against the step's time to an idle device (equal
    times: the step waits on its launches) and, on CUDA, the peak memory a step allocates."""
    device = torch.device(settings.device)
    dataset = synthetic(settings.train_images, settings.test_images, settings.device)
    step = bench_train.dkel_step(bench_options(settings), dataset, device, precision)
    for _ in range(2):   # the warm-up: on CUDA, cuDNN chooses its kernels
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    values.update(projections(bench_train.seconds_per_step(step, settings.steps, 0, device),
                              settings.batch_size))
    if device.type == "cuda":
        values["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    text = speed_summary(values)
    if precision == "bf16":
        enqueue_and_step(step, device, settings.steps, values)
        text += (f"; enqueued in {values['enqueue_ms']:.1f} ms of the CPU, "
                 f"{values['synchronised_step_ms']:.1f} ms to an idle device")
    if "peak_memory_gib" in values:
        text += f"; peak memory {values['peak_memory_gib']:.2f} GiB"
    return text


def enqueue_and_step(step, device: torch.device, steps: int, values: dict) -> None:
    """The median over `steps` steps, each from an idle device, of the CPU's time until the
    step's call returns (its kernels enqueued) and of the time until the device is idle again."""
    enqueue, total = [], []
    for _ in range(steps):
        start = bench_data.now(device)
        step()
        enqueue.append(time.perf_counter() - start)
        total.append(bench_data.now(device) - start)
    values["enqueue_ms"] = 1e3 * sorted(enqueue)[len(enqueue) // 2]
    values["synchronised_step_ms"] = 1e3 * sorted(total)[len(total) // 2]
    values["enqueue_share"] = values["enqueue_ms"] / values["synchronised_step_ms"]


def kernel_count(settings, values: dict) -> str:
    """The ops of one eager bf16 DKEL step that launch a kernel (bench_train.count_ops); on CUDA
    also the kernels torch.profiler sees the step launch."""
    device = torch.device(settings.device)
    dataset = synthetic(settings.train_images, settings.test_images, settings.device)
    counts = bench_train.count_ops(bench_options(settings), dataset, device)
    values.update(ops=sum(counts.values()), most_frequent_ops=dict(counts.most_common(10)))
    text = f"{values['ops']:,} kernel-launching ops"
    if device.type == "cuda":
        values["cuda_kernels"] = profiled_kernels(settings, dataset, device)
        text += f", {values['cuda_kernels']:,} CUDA kernels (torch.profiler)"
    return text + " in a step"


def profiled_kernels(settings, dataset, device: torch.device) -> int:
    """The CUDA kernels torch.profiler records in one eager bf16 step, after a warm-up step."""
    step = bench_train.dkel_step(bench_options(settings), dataset, device, "bf16")
    timed(step, device)
    activity = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[activity.CPU, activity.CUDA]) as profile:
        timed(step, device)
    return sum(event.count for event in profile.key_averages()
               if event.device_type == torch.autograd.DeviceType.CUDA)


def no_host_sync(settings, values: dict) -> str:
    """SYNC_CHECK_STEPS eager bf16 steps under torch.cuda.set_sync_debug_mode("error"), which
    raises at any host-device sync: none in the step's hot loop."""
    device = torch.device(settings.device)
    dataset = synthetic(settings.train_images, settings.test_images, settings.device)
    step = bench_train.dkel_step(bench_options(settings), dataset, device, "bf16")
    timed(step, device)   # the warm-up: cuDNN's choice of kernels may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(SYNC_CHECK_STEPS):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    values["steps"] = SYNC_CHECK_STEPS
    return f"{SYNC_CHECK_STEPS} steps, no host-device sync"


def epoch_overhead(settings, values: dict) -> str:
    """The pieces of an epoch outside its steps (bench_train.epoch_overhead): the evaluation of
    --test-images at the training batch size and at train.py's --eval-batch-size, the
    checkpoint with metrics.csv, curves.png."""
    pieces = bench_train.epoch_overhead(bench_options(settings), torch.device(settings.device))
    values.update({f"{name} (s)": seconds for name, seconds in pieces.items()})
    values["per_epoch_seconds"] = (pieces[f"evaluation, batch {EVAL_BATCH_SIZE}"]
                                   + pieces["checkpoint and metrics.csv"]
                                   + pieces["curves.png"] / report.CURVES_EVERY)
    return (f"{values['per_epoch_seconds']:.2f} s per epoch: "
            + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in pieces.items()))


def shared_reference_loader(settings, state: dict):
    """bench_data's reference loader, made once for both items that use it."""
    if "loader" not in state:
        dataset = synthetic(settings.train_images, settings.test_images, settings.device)
        state["loader"] = bench_data.reference_loader(dataset, 3, settings.batch_size,
                                                      settings.workers,
                                                      torch.device(settings.device))
    return state["loader"]


def reference_speed(settings, state: dict, values: dict) -> str:
    """The straightforward recipe's step (bench_train.time_reference), fp32."""
    options = argparse.Namespace(arch=settings.arch, batch_size=settings.batch_size,
                                 steps=settings.steps)
    dataset = synthetic(settings.train_images, settings.test_images, settings.device)
    seconds = bench_train.time_reference(options, dataset, shared_reference_loader(settings, state),
                                         torch.device(settings.device))
    values.update(projections(seconds, settings.batch_size))
    return (f"{values['images_per_s']:,.0f} images/s ({values['ms_per_step']:.1f} ms/step; "
            f"{settings.workers} DataLoader workers)")


def pipeline_speed(settings, state: dict, ours: bool, values: dict) -> str:
    """Augmented views per second of our loader or of the reference (bench_data)."""
    device = torch.device(settings.device)
    if ours:
        dataset = synthetic(settings.train_images, settings.test_images, settings.device)
        generator = torch.Generator(device=device).manual_seed(0)
        epochs = functools.partial(data.train_batches, dataset, settings.batch_size, 3, generator)
    else:
        loader = shared_reference_loader(settings, state)
        epochs = functools.partial(iter, loader)
    values["views_per_s"] = bench_data.images_per_second(epochs, settings.data_seconds, device)
    return f"{values['views_per_s']:,.0f} augmented views/s"


def speed_items(settings, state: dict) -> list:
    """The speed part's items, the most valuable first: the compiled bf16 step under a cap of its
    own (--compiled-seconds, within the part's), then the eager bf16 step and the rest."""
    cuda = torch.device(settings.device).type == "cuda"
    return [("DKEL step, bf16, compiled",
             "--no-compile" if settings.no_compile else functools.partial(compiled_speed, settings),
             settings.compiled_seconds),
            ("DKEL step, bf16", functools.partial(step_speed, settings, "bf16")),
            ("kernels of a DKEL step, bf16", functools.partial(kernel_count, settings)),
            ("no host sync in a DKEL step, bf16",
             functools.partial(no_host_sync, settings) if cuda else "needs CUDA"),
            ("the epoch outside its steps", functools.partial(epoch_overhead, settings)),
            ("DKEL step, fp32", functools.partial(step_speed, settings, "fp32")),
            ("straightforward recipe (reference), fp32", functools.partial(reference_speed,
                                                                            settings, state)),
            ("data pipeline, ours", functools.partial(pipeline_speed, settings, state, True)),
            ("data pipeline, reference", functools.partial(pipeline_speed, settings, state, False))]


def add_ratios(items: list, batch_size: int) -> None:
    """Each step's speed against the reference recipe's, our data pipeline against the
    reference's, and the data pipeline's share of a bf16 step (views it needs / views per s)."""
    done = {item["name"]: item["values"] for item in items if item["status"] == "passed"}
    reference = done.get("straightforward recipe (reference), fp32")
    for name, values in done.items():
        if name.startswith("DKEL step") and reference:
            values["times_the_reference"] = reference["ms_per_step"] / values["ms_per_step"]
    ours, theirs = done.get("data pipeline, ours"), done.get("data pipeline, reference")
    if ours and theirs:
        ours["times_the_reference"] = ours["views_per_s"] / theirs["views_per_s"]
    if ours and "DKEL step, bf16" in done:
        seconds = 3 * batch_size / ours["views_per_s"]
        ours["share_of_a_bf16_step"] = 1e3 * seconds / done["DKEL step, bf16"]["ms_per_step"]


# ----------------------------------------------------------------------------- packing
WORKER = "import sys; from tools import bench_cuda; bench_cuda.packing_worker(sys.argv[1])"


def packing_worker(settings_json: str) -> None:
    """A packing run (a child process): train.py's DKEL step, warmed up; "ready" on stdout; on a
    line from stdin the timed steps; then its start, end (wall clock) and image count as JSON."""
    settings = argparse.Namespace(**json.loads(settings_json))
    device = torch.device(settings.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train.train
    dataset = synthetic(settings.images, 1, settings.device)
    options = argparse.Namespace(arch=settings.arch, batch_size=settings.batch_size, compile=False)
    step = bench_train.dkel_step(options, dataset, device, settings.precision)
    bench_train.seconds_per_step(step, 1, 1, device)   # warm-up: kernels chosen, memory held
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    bench_train.seconds_per_step(step, settings.steps, 0, device)
    print(json.dumps({"start": start, "end": time.time(),
                      "images": settings.steps * settings.batch_size}), flush=True)


@contextlib.contextmanager
def started(command: list[str], log_path: str, env: dict | None = None, **popen):
    """A child process in a session of its own (its output in `log_path` unless `popen` says
    otherwise), killed with its whole process group (torchrun's ranks too) if it is still running
    when the block ends: a time cap, a failed check."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                                   **{"stdout": log, "stderr": log, **popen})
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return one_line(f.read()[-400:])


def packed_runs(settings, work_dir: str, runs: int, values: dict) -> str:
    """`runs` packing workers started together; once all are warmed up, they time their steps at
    the same time. The throughput: all their images over the span from the first start to the
    last end."""
    worker = {"device": settings.device, "arch": settings.arch, "steps": settings.packing_steps,
              "batch_size": settings.batch_size, "images": min(settings.train_images, 5000),
              "precision": "bf16" if cli.native_bf16(torch.device(settings.device)) else "fp32"}
    logs = [os.path.join(work_dir, f"packing_{runs}_{i}.log") for i in range(runs)]
    with contextlib.ExitStack() as stack:
        processes = [stack.enter_context(started(
            [sys.executable, "-c", WORKER, json.dumps(worker)], log, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)) for log in logs]
        for process, log in zip(processes, logs):
            check(process.stdout.readline() == "ready\n", f"a run did not start: {tail(log)}")
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        lines = [process.stdout.readline() for process in processes]
        for process, line, log in zip(processes, lines, logs):
            check(process.wait() == 0 and line, f"a run failed: {tail(log)}")
    results = [json.loads(line) for line in lines]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    values.update(runs=runs, precision=worker["precision"],
                  images_per_s=sum(r["images"] for r in results) / span)
    return f"{values['images_per_s']:,.0f} images/s together ({worker['precision']})"


def packing_items(settings, work_dir: str) -> list:
    return [(f"{runs} run{'s' if runs > 1 else ''} at once",
             functools.partial(packed_runs, settings, work_dir, runs))
            for runs in settings.packing_runs]


def packing_verdict(items: list, batch_size: int) -> dict:
    """How many runs per GPU pay: starting from the fewest, a count that adds at least 10% to
    the best throughput so far; and Table 1's GPU-days at that count's throughput."""
    done = [item["values"] for item in items if item["status"] == "passed"]
    if not done:
        return {}
    best = done[0]
    for values in done[1:]:
        if values["images_per_s"] >= PAY * best["images_per_s"]:
            best = values
    table1 = projections(batch_size / best["images_per_s"], batch_size)["table1_gpu_days"]
    return {"runs_per_gpu_that_pay": best["runs"],
            "gain_over_fewest": best["images_per_s"] / done[0]["images_per_s"],
            "fewest_runs": done[0]["runs"], "table1_gpu_days": table1}


# ----------------------------------------------------------------------------- multi-GPU
def run_command(settings, out_dir: str, epochs: int, ranks: int, *extra: str) -> list[str]:
    """train.py on the built-in synthetic set (5,000 images), alone or under torchrun."""
    steps = 5000 // settings.batch_size
    flags = train_flags(settings, out_dir, epochs, steps) + ["--device", settings.device, *extra]
    if ranks == 1:
        return [sys.executable, TRAIN_PY, *flags]
    sync_bn = ["--sync-bn"] if settings.device.startswith("cuda") else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(ranks), TRAIN_PY, *flags, *sync_bn]


def finished_run(settings, work_dir: str, name: str, ranks: int, values: dict) -> str:
    """A 2-epoch run, alone or on 2 ranks: exit 0 and a complete run directory; on 2 ranks its
    first epoch's loss within LOSS_AGREEMENT of the one-process run's, when that one ran."""
    out_dir = os.path.join(work_dir, name)
    with started(run_command(settings, out_dir, 2, ranks), out_dir + ".log") as process:
        code = process.wait()
    check(code == 0, f"exit code {code}: {tail(out_dir + '.log')}")
    check_run_dir(out_dir, settings.arch, 2)
    rows = read_metrics(out_dir)
    values.update(loss_epoch1=float(rows[0]["loss"]), images_per_s=float(rows[1]["images_per_s"]))
    with open(os.path.join(out_dir, "config.json")) as f:
        check(json.load(f)["world_size"] == ranks, f"config.json: world_size is not {ranks}")
    if ranks == 1:
        return f"epoch 2 at {values['images_per_s']:,.0f} images/s"
    one = os.path.join(work_dir, "one_gpu")
    if not os.path.exists(os.path.join(one, "summary.json")):
        return f"epoch 2 at {values['images_per_s']:,.0f} images/s (no one-GPU run to compare)"
    alone = read_metrics(one)
    values["loss_error"] = abs(values["loss_epoch1"] / float(alone[0]["loss"]) - 1)
    values["speedup"] = values["images_per_s"] / float(alone[1]["images_per_s"])
    check(values["loss_error"] <= LOSS_AGREEMENT,
          f"epoch 1's loss {values['loss_epoch1']:.4f} differs by {values['loss_error']:.1%} "
          f"from the one-GPU run's {float(alone[0]['loss']):.4f}")
    return (f"epoch 1's loss within {values['loss_error']:.2%} of the one-GPU run's; epoch 2 "
            f"{values['speedup']:.2f}x its images/s")


def rank_pid(tag: str, rank: int) -> int | None:
    """The process of torchrun's rank `rank` among those started with BENCH_CUDA_RUN=`tag` (the
    topmost, not a child it started), from /proc (Linux)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                parent = f.read().rsplit(")", 1)[1].split()[1]
            if f"BENCH_CUDA_RUN={tag}".encode() in environ and f"RANK={rank}".encode() in environ:
                found[pid] = parent
    top = [int(pid) for pid, parent in found.items() if parent not in found]
    return top[0] if top else None


def sigterm_to_one_rank(settings, work_dir: str, values: dict) -> str:
    """torchrun, 2 ranks, 3 epochs; once epoch 1 is saved, SIGTERM to rank 1 alone: every rank
    stops at one step with the finished epochs saved: rank 0, which no signal reached, says so,
    and torchrun's report gives exit code 143."""
    out_dir = os.path.join(work_dir, "sigterm")
    env = {**os.environ, "BENCH_CUDA_RUN": out_dir}
    with started(run_command(settings, out_dir, 3, 2), out_dir + ".log", env) as process:
        while process.poll() is None and not os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
            time.sleep(0.05)
        check(process.poll() is None, f"the run ended before its first checkpoint: "
                                      f"{tail(out_dir + '.log')}")
        pid = rank_pid(out_dir, 1)
        check(pid is not None, "rank 1's process was not found in /proc")
        os.kill(pid, signal.SIGTERM)
        sent = time.perf_counter()
        code = process.wait()
    values["seconds_to_stop"] = time.perf_counter() - sent
    with open(out_dir + ".log", errors="replace") as f:
        log = f.read()
    values["epochs_saved"] = len(read_metrics(out_dir))
    check(code != 0, "torchrun ended with 0 after the SIGTERM")
    check("error: stopped by SIGTERM" in log,
          f"rank 0 did not stop by the SIGTERM: {tail(out_dir + '.log')}")
    # torchrun's report: a rank that it stops while its interpreter shuts down may show a signal.
    codes = [line.split(":", 1)[1].split()[0] for line in log.splitlines()
             if line.strip().startswith("exitcode")]
    values["exit_codes"] = codes
    check("143" in codes, f"torchrun's report gives exit codes {codes}, none 143")
    check(1 <= values["epochs_saved"] < 3, f"{values['epochs_saved']} epochs saved")
    return (f"every rank stopped {values['seconds_to_stop']:.1f} s after the signal, "
            f"{values['epochs_saved']} epoch(s) saved")


def resume_after_sigterm(settings, work_dir: str, values: dict) -> str:
    """The stopped run continued by the same torchrun command plus --resume, to its 3 epochs."""
    out_dir = os.path.join(work_dir, "sigterm")
    check(os.path.exists(os.path.join(out_dir, "checkpoint.pt")), "no stopped run to resume")
    with started(run_command(settings, out_dir, 3, 2, "--resume"), out_dir + ".resume.log") as run:
        code = run.wait()
    check(code == 0, f"exit code {code}: {tail(out_dir + '.resume.log')}")
    check_run_dir(out_dir, settings.arch, 3)
    return "3 epochs"


def multi_gpu_items(settings, work_dir: str) -> list:
    return [("one GPU, 2 epochs", functools.partial(finished_run, settings, work_dir,
                                                    "one_gpu", 1)),
            ("torchrun, 2 GPUs, NCCL, --sync-bn, 2 epochs",
             functools.partial(finished_run, settings, work_dir, "two_gpus", 2)),
            ("torchrun: SIGTERM to rank 1 alone",
             functools.partial(sigterm_to_one_rank, settings, work_dir)),
            ("torchrun: --resume after the SIGTERM",
             functools.partial(resume_after_sigterm, settings, work_dir))]


# ----------------------------------------------------------------------------- the command
def build_parser() -> cli.Parser:
    p = cli.Parser(prog="python -m tools.bench_cuda", formatter_class=cli.HelpFormatter,
                   description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="the device checked and timed: cuda, cuda:N, or cpu (the tests' tiny run); default: "
           "cuda when present, else cpu")
    a("--json", default="bench_cuda.json", help="where the report is written as JSON")
    a("--work-dir", help="keep the runs' directories and logs here (default: a temporary "
                         "directory, removed at the end)")
    a("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run")
    a("--arch", default="resnet32", help="architecture (the paper's Table 3 network)")
    a("--batch-size", type=int, default=128, help="batch size (paper: 128, Sec. 4.2)")
    a("--train-images", type=int, default=50_000,
      help="synthetic training images of the epoch checks (CIFAR's 50,000)")
    a("--test-images", type=int, default=10_000, help="synthetic test images (CIFAR's 10,000)")
    a("--steps", type=int, default=50, help="timed steps of each step measurement")
    a("--data-seconds", type=float, default=3.0, help="timed seconds of each data pipeline")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1),
      help="DataLoader workers of the reference recipe (default: 4, or the cores if fewer)")
    a("--no-compile", action="store_true", help="skip the torch.compile measurements")
    a("--tolerance", type=float, default=1e-3,
      help="largest relative error of the loss, of a gradient and of an update between the CPU "
           "and the device in fp32 (TF32 off)")
    a("--packing-runs", type=int, nargs="+", default=[1, 2, 4],
      help="numbers of runs at once on the device")
    a("--packing-steps", type=int, default=50, help="timed steps of each packed run")
    a("--compiled-seconds", type=float, default=300.0,
      help="time cap of each compiled item (train.py --compile's epoch, the compiled step), on "
           "top of its part's; ours: the 2-core CPU took 252 s to compile the whole step")
    a("--budget-seconds", type=float, default=590.0,
      help="time cap of all parts together (ours: under 10 minutes; what it cuts are the last "
           "parts)")
    for part, seconds in zip(PARTS, (110, 150, 90, 120)):
        a(f"--{part}-seconds", type=float, default=seconds, help=f"time cap of the {part} part")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    settings = parser.parse_args(argv)
    if settings.arch not in ARCHS:
        parser.error(f"unknown --arch {settings.arch!r}; choose one of: {', '.join(ARCHS)}")
    sizes = (settings.batch_size, settings.test_images, settings.steps, settings.packing_steps,
             *settings.packing_runs)
    if min(sizes) < 1 or settings.workers < 0 or settings.data_seconds <= 0:
        parser.error("--batch-size, --test-images, --steps, --packing-steps and --packing-runs "
                     "must be >= 1, --workers >= 0 and --data-seconds > 0")
    if settings.train_images < settings.batch_size:
        parser.error(f"--train-images {settings.train_images} must hold one batch of "
                     f"--batch-size {settings.batch_size}")
    try:
        device = torch.device(settings.device)
    except RuntimeError:
        parser.error(f"--device {settings.device!r} is not a device; use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {settings.device}: no CUDA device on this machine; use "
                     f"--device cpu")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {settings.device}: use cuda, cuda:N or cpu")
    return settings


def machine(device: torch.device) -> dict:
    """What ran the bench: the device's name, torch, CUDA, the visible GPUs, native bf16."""
    cuda = device.type == "cuda"
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "native_bf16": cli.native_bf16(device), "cpu_threads": torch.get_num_threads()}


def part_skip(settings, part: str, gpus: int) -> str | None:
    """Why a whole part is skipped, or None."""
    if part not in settings.parts:
        return "not selected (--parts)"
    if part == "multi-gpu" and not (settings.device.startswith("cuda") and gpus >= 2):
        return f"needs 2 CUDA devices; {gpus} visible"
    return None


def run_parts(settings, work_dir: str, info: dict, parts: dict) -> None:
    """Every part in order into `parts`, within its own cap and what is left of
    --budget-seconds."""
    state, end = {}, time.perf_counter() + settings.budget_seconds
    items = {"correctness": correctness_items(settings, work_dir),
             "speed": speed_items(settings, state),
             "packing": packing_items(settings, work_dir),
             "multi-gpu": multi_gpu_items(settings, work_dir)}
    for part in PARTS:
        cap = max(0.0, min(getattr(settings, f"{part.replace('-', '_')}_seconds"),
                           end - time.perf_counter()))
        skip = part_skip(settings, part, info["gpus_visible"])
        parts[part] = run_part(part, cap, items[part], skip, end)
        if part == "speed":
            add_ratios(parts[part]["items"], settings.batch_size)
            state.clear()   # the reference loader's worker processes end here
        if part == "packing":
            parts[part]["verdict"] = packing_verdict(parts[part]["items"], settings.batch_size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()   # the child processes of the next parts get the memory


def item_text(item: dict) -> str:
    """An item's summary (or why it failed or was skipped) and its ratios, for the terminal."""
    text, values = item.get("summary") or item.get("reason", ""), item.get("values", {})
    if "times_the_reference" in values:
        text += f"; {values['times_the_reference']:.2f}x the reference"
    if "share_of_a_bf16_step" in values:
        text += f"; {values['share_of_a_bf16_step']:.1%} of a bf16 step's time"
    return text


def render(report: dict) -> str:
    """The report for the terminal: one line per part and per item."""
    info = report["machine"]
    lines = [f"bench_cuda.py on {info['device_name']} ({info['device']}), torch {info['torch']}, "
             f"CUDA {info['cuda']}, {info['gpus_visible']} GPU(s) visible, native bf16: "
             f"{info['native_bf16']}"]
    for name, part in report["parts"].items():
        lines.append(f"{name}: {part['status']} ({part['seconds']:.0f} s of its "
                     f"{part['cap_seconds']:.0f} s cap)")
        for item in part["items"]:
            lines.append(f"  {item['status']:<7} {item['name']}: {item_text(item)}")
        verdict = part.get("verdict")
        if verdict:
            lines.append(f"  runs per GPU that pay: {verdict['runs_per_gpu_that_pay']} "
                         f"({verdict['gain_over_fewest']:.2f}x the throughput of "
                         f"{verdict['fewest_runs']}; Table 1 in {verdict['table1_gpu_days']:.1f} "
                         f"GPU-days)")
    counts = {s: sum(i["status"] == s for p in report["parts"].values() for i in p["items"])
              for s in ("passed", "failed", "skipped")}
    if report["interrupted"]:
        lines.append("INTERRUPTED (Ctrl-C or SIGTERM): the parts not listed above did not finish")
    lines.append(f"{'PASSED' if report['passed'] else 'FAILED'}: {counts['passed']} passed, "
                 f"{counts['failed']} failed, {counts['skipped']} skipped in "
                 f"{report['seconds']:.0f} s; the report is in {report['json']}")
    return "\n".join(lines + paste_lines(report))


def paste_lines(report: dict) -> list[str]:
    """The figures of every passed item as lines to paste into docs/performance.md: the machine
    and the command, then a Markdown table."""
    info = report["machine"]
    rows = [f"| {name} | {item['name']} | {item_text(item)} |"
            for name, part in report["parts"].items() for item in part["items"]
            if item["status"] == "passed"]
    return ["", "For docs/performance.md:", "",
            f"{info['device_name']}, torch {info['torch']}, CUDA {info['cuda']}: "
            f"`{report['command']}`", "", "| part | measurement | result |", "|---|---|---|", *rows]


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    start, device = time.perf_counter(), torch.device(settings.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"   # as train.train
    report = {"command": " ".join(["python -m tools.bench_cuda", *(argv or sys.argv[1:])]),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(device), "settings": vars(settings), "parts": {},
              "interrupted": False}
    previous, code = signal.signal(signal.SIGTERM, terminate), None
    try:
        with contextlib.ExitStack() as stack:
            work_dir = settings.work_dir or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench_cuda_"))
            os.makedirs(work_dir, exist_ok=True)
            run_parts(settings, work_dir, report["machine"], report["parts"])
    except KeyboardInterrupt as stop:   # the finished parts are reported all the same
        report["interrupted"], code = True, getattr(stop, "exit_code", rundir.EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = any(p["status"] == "failed" for p in report["parts"].values())
    report.update(passed=not (failed or report["interrupted"]), json=settings.json,
                  seconds=time.perf_counter() - start)
    with open(settings.json, "w") as f:
        json.dump(report, f, indent=2)
    print(render(report))
    return code or (0 if report["passed"] else 1)


if __name__ == "__main__":
    sys.exit(main())
