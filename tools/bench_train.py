"""Benchmark of a full DKEL training step (Eq. (12) + Eq. (5)): training images per second.

Measures, in one run on the same machine and the same synthetic CIFAR-shaped data:
- ours, in fp32 and under bf16 autocast: train.py's own step (train.student_step on a methods.DKEL
  method): the data set as a uint8 tensor on the device with vectorised M-view augmentation
  (data.train_batches), channels_last networks, fused SGD, the fused multi-tensor EMA of ema.py,
  no host-device sync inside the step; and once more in bf16 with one BatchNorm statistic over
  the M stacked views instead of per-view statistics (models.ViewBatchNorm2d), to price those;
- reference: a straightforward loop as in the authors' code: torchvision transforms per sample
  in a DataLoader with workers, fp32 NCHW networks, the loss read back every step, and a Python
  loop over parameters for the EMA.
All run the same networks, the same objective with the same epoch weights
(losses.distillation_objective) and the same optimizer settings, and alternate --rounds times
(the fastest round of each counts) so that a slow phase of a shared machine hits all of them.
Prints every rate and its ratio to the reference (targets: >= 2x on the 2-core CPU, 5x on a GPU).
Instead, --count-ops counts the ops of one eager bf16 step that launch a kernel (a dispatch mode,
OpCounter), --epoch-overhead times the pieces of an epoch outside its steps (the evaluation, the
checkpoint, curves.png), and --base COMMIT times ours in bf16 against that commit's step, run in
a git worktree of it in the same run.

    python -m tools.bench_train [--arch resnet32] [--batch-size 128] [--steps 8] [--device cpu|cuda]
    python -m tools.bench_train --count-ops --batch-size 16
    python -m tools.bench_train --epoch-overhead
    python -m tools.bench_train --base e96e887 [--compile]
"""
import sys

if not __package__:  # `python tools/bench_train.py`: the root's modules are not on sys.path
    sys.stderr.write("error: run it from the repository root: python -m tools.bench_train ...\n")
    sys.exit(2)

import argparse
import collections
import contextlib
import copy
import itertools
import os
import subprocess
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cli
import data
import train
from infra import report, rundir
from losses import distillation_objective
from methods import DKEL
from models import ViewBatchNorm2d, multi_peer_net
from tools.bench_data import now, reference_loader

WEIGHTS = {"rampup": 0.5, "teacher_ensemble_weight": 0.01}  # r(ep) and w(ep) of an epoch in the ramp-up (both sides)
# Ops that launch no kernel: they allocate memory or alias a tensor (views are told apart by
# their schema, OpOverload.is_view).
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
             "alias", "lift_fresh", "resize_", "set_"}


class OpCounter(TorchDispatchMode):
    """The ops dispatched inside its block that launch a kernel, counted by name (`counts`):
    every op that reaches the dispatcher below autograd (the backward's too), but views and
    NO_KERNEL. A foreach or fused op counts once, as one launch per group of tensors."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(args, dataset, device) -> collections.Counter:
    """The kernel-launching ops (`OpCounter`) of one eager bf16 DKEL step, after a warm-up step."""
    step = dkel_step(argparse.Namespace(**{**vars(args), "compile": False}), dataset, device,
                     "bf16")
    step()
    with OpCounter() as counter:
        step()
    return counter.counts


def dkel_method(args, dataset, device, per_view_bn: bool = True):
    """train.py's DKEL method (`args.arch`, M = 3) and its optimizer, in training mode; with
    `per_view_bn` False the trunks' BatchNorm normalises all M*B stacked images together."""
    method = DKEL(multi_peer_net(args.arch, dataset.num_classes, 3), device=device,
                  temperature=3.0, kd_weight=1.0, ema_decay=0.999, init_iters=1, init_lr=0.01)
    train.channels_last(method)  # NHWC, as train.py runs it
    for module in [*method.student.modules(), *method.teacher.network.modules()]:
        if isinstance(module, ViewBatchNorm2d) and not per_view_bn:
            # The same parameters and buffers, one statistic.
            module.__class__ = torch.nn.BatchNorm2d
    optimizer = train.sgd(method.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    method.set_mode(True)
    return method, optimizer


def dkel_step(args, dataset, device, precision: str, per_view_bn: bool = True):
    """train.py's DKEL step in `precision` on batches of `dataset`, as a function of no argument
    that runs one step (`dkel_method`). Shared with bench_cuda.py."""
    method, optimizer = dkel_method(args, dataset, device, per_view_bn)
    take = train.training_step(method, optimizer, precision, args.compile, device)  # as train.py
    generator = torch.Generator(device=device).manual_seed(0)
    epochs = (data.train_batches(dataset, args.batch_size, 3, generator) for _ in itertools.count())
    batches = itertools.chain.from_iterable(epochs)   # epoch after epoch, as many steps as asked
    counter = itertools.count()

    def step() -> None:
        views, labels = next(batches)
        take(views, labels, WEIGHTS, next(counter))

    return step


def epoch_overhead(args, device) -> dict[str, float]:
    """Seconds of each piece of train.py's epoch outside its steps, for a DKEL run on a synthetic
    set of --test-images test images (the fastest of --rounds): the evaluation at the training
    batch size and at --eval-batch-size, the checkpoint with metrics.csv, and curves.png drawn
    for a 10-epoch history."""
    dataset = data.synthetic_data(args.batch_size, args.test_images, 0, device)
    method, optimizer = dkel_method(args, dataset, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [150, 225], gamma=0.1)
    means = {"loss": 1.0, "train_acc": 50.0}
    rows = [train.epoch_row(epoch, 0.1, WEIGHTS, method.term_weights(WEIGHTS), means,
                            args.batch_size, 1.0) for epoch in range(1, 11)]
    times = collections.defaultdict(list)
    with tempfile.TemporaryDirectory() as out_dir:
        state = {"epoch": 10, "step": 10, "history": rows}
        for _ in range(args.rounds):
            for size in (args.batch_size, args.eval_batch_size):
                start = now(device)
                rows[-1].update(train.evaluate(method, dataset, size, "bf16"))
                times[f"evaluation, batch {size}"].append(now(device) - start)
            start = now(device)
            rundir.save_checkpoint(out_dir, method.modules(), optimizer, scheduler, state, {})
            rundir.write_metrics(os.path.join(out_dir, "metrics.csv"), rows)
            times["checkpoint and metrics.csv"].append(now(device) - start)
            start = now(device)
            report.plot_curves(out_dir, rows)
            times["curves.png"].append(now(device) - start)
    return {name: min(seconds) for name, seconds in times.items()}


def print_epoch_overhead(args, device) -> None:
    """The pieces of `epoch_overhead` and their sum per epoch, before (evaluation at the training
    batch size, curves.png every epoch) and after (--eval-batch-size, curves.png every
    report.CURVES_EVERY epochs)."""
    pieces = epoch_overhead(args, device)
    print(f"per-epoch overhead outside the steps, dkel, {args.arch}, {args.test_images} test "
          f"images, bf16, {machine(device)}")
    for name, seconds in pieces.items():
        print(f"{name:<28} {seconds:7.3f} s")
    fixed = pieces["checkpoint and metrics.csv"]
    before = pieces[f"evaluation, batch {args.batch_size}"] + fixed + pieces["curves.png"]
    after = (pieces[f"evaluation, batch {args.eval_batch_size}"] + fixed
             + pieces["curves.png"] / report.CURVES_EVERY)
    print(f"per epoch: {before:.3f} s before (evaluation at batch {args.batch_size}, curves every "
          f"epoch), {after:.3f} s after (batch {args.eval_batch_size}, curves every "
          f"{report.CURVES_EVERY} epochs): {before / after:.2f}x less")


def print_op_count(args, dataset, device) -> None:
    """`count_ops` with the ten most frequent ops."""
    counts = count_ops(args, dataset, device)
    print(f"one eager DKEL step, {args.arch}, batch {args.batch_size}, 3 views, bf16, "
          f"{machine(device)}: {sum(counts.values()):,} ops that launch a kernel (views, "
          f"detaches and allocations not counted)")
    print("most frequent: " + ", ".join(f"{n} {name}" for name, n in counts.most_common(10)))


def machine(device) -> str:
    """The device's name, or the CPU's threads and whether it computes bf16 natively."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads, native bf16: {cli.native_bf16(device)}"


# A commit's own step, timed in its own worktree (--base): its bench_train.time_ours in bf16.
BASE_STEP = ("import argparse, sys, torch, data; from tools import bench_train; "
             "args = argparse.Namespace(arch=sys.argv[1], batch_size=int(sys.argv[2]), "
             "steps=int(sys.argv[3]), compile=sys.argv[4] == '1'); "
             "torch.set_num_threads(int(sys.argv[5])); "
             "device = torch.device('cpu'); "
             "dataset = data.load_data('synthetic', 'unused', device); "
             "print(bench_train.time_ours(args, dataset, device, 'bf16'))")


def time_base(args, worktree: str) -> float:
    """Seconds per bf16 step of the commit checked out in `worktree`, in a process of its own."""
    command = [sys.executable, "-c", BASE_STEP, args.arch, str(args.batch_size), str(args.steps),
               "1" if args.compile else "0", str(torch.get_num_threads())]
    result = subprocess.run(command, cwd=worktree, capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def print_against_base(args, dataset, device) -> None:
    """Ours in bf16 (compiled with --compile) against --base's step, alternating --rounds times
    in one run, the fastest of each."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    times = {"ours": [], args.base: []}
    with tempfile.TemporaryDirectory() as parent:
        worktree = os.path.join(parent, "base")
        subprocess.run(["git", "-C", root, "worktree", "add", "--detach", worktree, args.base],
                       check=True, capture_output=True)
        try:
            for _ in range(args.rounds):
                times["ours"].append(time_ours(args, dataset, device, "bf16"))
                times[args.base].append(time_base(args, worktree))
        finally:
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", worktree],
                           check=True, capture_output=True)
    best = {name: min(seconds) for name, seconds in times.items()}
    print(f"dkel step, {args.arch}, batch {args.batch_size}, bf16"
          f"{', compiled' if args.compile else ''}, {machine(device)}")
    for name, seconds in best.items():
        print(f"{name:<10} {args.batch_size / seconds:8.1f} images/s  "
              f"({seconds * 1e3:7.1f} ms/step)  {best[args.base] / seconds:5.2f}x {args.base}")


def seconds_per_step(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of `step` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    start = now(device)
    for _ in range(steps):
        step()
    return (now(device) - start) / steps


def time_ours(args, dataset, device, precision: str, per_view_bn: bool = True) -> float:
    """Seconds per step of train.py's step in `precision` (after the warm-up steps; `dkel_step`)."""
    step = dkel_step(args, dataset, device, precision, per_view_bn)
    warmup = 4 if args.compile else 2  # compilation happens in the first steps
    return seconds_per_step(step, args.steps, warmup, device)


def time_reference(args, dataset, loader, device) -> float:
    """Seconds per step of the straightforward fp32 loop (after 2 warm-up steps)."""
    student = multi_peer_net(args.arch, dataset.num_classes, 3).to(device)
    teacher = copy.deepcopy(student)
    teacher.ensemble_head = None
    teacher.requires_grad_(False)
    pairs = [(p_t, dict(student.named_parameters())[name]) for name, p_t in teacher.named_parameters()]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    student.train(), teacher.train()
    batches = iter(loader)
    for step in range(args.steps + 2):
        if step == 2:
            start = now(device)
        views, labels = next(batches)
        views, labels = views.to(device).transpose(0, 1), labels.to(device)   # (M, B, 3, H, W)
        out = student(views)
        with torch.no_grad():
            teacher_logits = teacher(views).logits
        loss, _ = distillation_objective(out.logits, out.ensemble, teacher_logits, labels,
                                         temperature=3.0, kd_weight=1.0, rampup=WEIGHTS["rampup"],
                                         teacher_ensemble_weight=WEIGHTS["teacher_ensemble_weight"],
                                         de_rampup=1.0, teacher_term="dk", with_de=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the per-step logging of a straightforward loop
        with torch.no_grad():
            for p_t, p_s in pairs:
                p_t.mul_(0.999).add_(p_s, alpha=0.001)
    return (now(device) - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet32", help="architecture (default resnet32, paper Table 3)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (paper: 128, Sec. 4.2)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (default 8)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating measurements of each; the fastest counts")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers of the reference (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="ours with train.py --compile (the whole step compiled)")
    parser.add_argument("--count-ops", action="store_true",
                        help="instead: count the kernel-launching ops of one eager bf16 step")
    parser.add_argument("--epoch-overhead", action="store_true",
                        help="instead: time the pieces of an epoch outside its steps")
    parser.add_argument("--base", metavar="COMMIT",
                        help="instead: ours in bf16 against this commit's step (run in a git "
                             "worktree of it, CPU only), as a ratio")
    parser.add_argument("--test-images", type=int, default=10_000,
                        help="--epoch-overhead: synthetic test images (CIFAR's 10,000)")
    parser.add_argument("--eval-batch-size", type=int, default=1024,
                        help="--epoch-overhead: the evaluation's batch size (train.py's default)")
    args = parser.parse_args()
    if min(args.steps, args.batch_size, args.rounds, args.test_images, args.eval_batch_size) < 1 \
            or args.workers < 0:
        parser.error("--steps, --batch-size, --rounds, --test-images and --eval-batch-size must "
                     "be >= 1 and --workers >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device on this machine; use --device cpu")
    if args.base and args.device != "cpu":
        parser.error("--base times the CPU only; add --device cpu")
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train.train: kernels chosen once
    torch.manual_seed(0)
    if args.epoch_overhead:
        return print_epoch_overhead(args, device)
    dataset = data.load_data("synthetic", "unused", device)
    if args.count_ops:
        return print_op_count(args, dataset, device)
    if args.base:
        return print_against_base(args, dataset, device)
    loader = reference_loader(dataset, 3, args.batch_size, args.workers, device)
    times = {"reference (fp32)": [], "ours fp32": [], "ours bf16": [], "bf16, stacked BN": []}
    for _ in range(args.rounds):
        times["reference (fp32)"].append(time_reference(args, dataset, loader, device))
        times["ours fp32"].append(time_ours(args, dataset, device, "fp32"))
        times["ours bf16"].append(time_ours(args, dataset, device, "bf16"))
        times["bf16, stacked BN"].append(time_ours(args, dataset, device, "bf16", per_view_bn=False))
    best = {name: min(seconds) for name, seconds in times.items()}
    print(f"dkel step, {args.arch}, batch {args.batch_size}, 3 peers, {machine(device)}")
    for label, seconds in best.items():
        ratio = best["reference (fp32)"] / seconds
        print(f"{label:<17} {args.batch_size / seconds:8.1f} images/s  ({seconds * 1e3:7.1f} ms/step)  "
              f"{ratio:5.2f}x the reference")
    print(f"per-view BatchNorm statistics cost {best['ours bf16'] / best['bf16, stacked BN'] - 1:+.1%} "
          f"against one statistic over the stacked views (target: within 5%)")
    print("targets: >= 2x the reference on the CPU (bf16), 5x on a GPU")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
