"""Train PCL, DK or DKEL end to end (paper Sec. 3.2-3.4, Algorithm 1; protocol of Sec. 4.2).

    python train.py --dataset cifar10 --arch resnet32 --beta 0.5

One run builds the data (data.py), the multi-peer student and its teacher (models.py, ema.py),
initialises an independent teacher (dk, dkel; Sec. 3.3), then epoch by epoch minimises Eq. (2)
or Eq. (12) (losses.py) with SGD + Nesterov, updates the teacher by Eq. (5) after every optimizer
step and evaluates every student peer, the student ensemble, every teacher peer and the teacher
ensemble (SPEC.md Sec. 4). The run directory receives config.json, metrics.csv, checkpoint.pt
(written atomically every epoch; --resume continues from it), deployable.pt and summary.json.
The six compared methods of Table 1 (SPEC.md Sec. 6) run through the same loop (methods.py).
"""
import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import data as datasets
from losses import DECAYS, decay_weight, rampup
from methods import METHODS, build_method
from models import ARCHS

PAPER_EPOCHS = {"tinyimagenet": 100}               # Sec. 4.2; every other data set: 300
PAPER_MILESTONES = {"tinyimagenet": (0.3, 0.6)}    # Sec. 4.2; every other data set: 50% and 75%
PAPER_RAMPUP_FRACTION = 80 / 300                   # PCL's R = 80 of 300 epochs (SPEC.md Sec. 2)
# Arguments that may change between a run and its resumption without changing its results.
RESUMABLE = {"resume", "eval_every", "device", "data_dir", "out_dir", "compile"}


class RunStopped(Exception):
    """A run cannot go on: a one-line message and the process exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train DKEL, DK, PCL or a compared method of Table 1 (Shao & Chen, DKEL).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", choices=datasets.DATASETS, help="data set (paper Sec. 4.1); synthetic is for smoke runs only")
    a("--arch", default="resnet32", help=f"architecture (paper Sec. 4.2, SPEC.md Sec. 5): {', '.join(ARCHS)}")
    a("--method", default="dkel", choices=METHODS, help="dkel = Eq. (12), dk = Eq. (2) with L_dk, pcl = Eq. (2) (Table 3); the others: Table 1 (SPEC.md Sec. 6)")
    a("--decay", default="exp", choices=DECAYS, help="w(ep) in Eq. (12): exp = Eq. (11) (paper), cos = Eq. (13), linear = Eq. (14)")
    a("--beta", type=float, default=0.5, help="beta of Eq. (11), per epoch, never scaled (paper: 0.5, Sec. 4.2)")
    a("--num-peers", type=int, default=3, help="number of peers, branches or networks m (paper: 3, Sec. 4.3); baseline ignores it")
    a("--temperature", type=float, default=3.0, help="distillation temperature T of Eq. (1) (SPEC.md: 3)")
    a("--ema-decay", type=float, default=0.999, help="EMA decay alpha of Eq. (5) (SPEC.md: 0.999)")
    a("--kd-weight", type=float, default=1.0, help="lambda of Eq. (2)/(12), from PCL (SPEC.md: 1.0)")
    a("--rampup-epochs", type=int, default=None, help="ramp-up length R of r(ep); 0 disables (PCL: 80 of 300 epochs; default scales with --epochs)")
    a("--init-iters", type=int, default=1, help="teacher initialisation iterations k (paper: 1, Sec. 4.2; Fig. 6: 1 to 20)")
    a("--init-lr", type=float, default=0.01, help="teacher initialisation learning rate (paper: 0.01, Sec. 4.2; authors' code: 0.001)")
    a("--epochs", type=int, default=None, help="epochs (paper: 300 on CIFAR, 100 on TinyImageNet, Sec. 4.2; synthetic: 300 too)")
    a("--batch-size", type=int, default=128, help="batch size (paper: 128, Sec. 4.2)")
    a("--lr", type=float, default=0.1, help="initial learning rate (paper: 0.1, Sec. 4.2)")
    a("--momentum", type=float, default=0.9, help="Nesterov momentum (paper: 0.9, Sec. 4.2)")
    a("--weight-decay", type=float, default=5e-4, help="weight decay (paper: 5e-4, Sec. 4.2)")
    a("--milestones", type=int, nargs="+", default=None, help="epochs at which lr is multiplied by 0.1 (paper: 150 225 of 300 on CIFAR, 30 60 of 100 on TinyImageNet; default scales with --epochs)")
    a("--seed", type=int, default=0, help="random seed (initialisation, data order, augmentation)")
    a("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    a("--data-dir", default="./data", help="where the data set is, or is downloaded to")
    a("--out-dir", default=None, help="run directory (default: runs/<dataset>_<arch>_<method>_seed<seed>)")
    a("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    a("--eval-every", type=int, default=1, help="evaluate on the test split every N epochs (and always after the last)")
    a("--compile", action="store_true", help="torch.compile the forward passes of the trained networks (and teacher)")
    a("--collapse-threshold", type=float, default=0.01, help="stop when the deployed model's mean logit norm falls below this (collapse, paper Sec. 3.3)")
    a("--authors-rampup", action="store_true", help="authors' code: r(ep) = exp(-5(1 - ep/0.1)^2) before R, 0.1 after (SPEC.md Sec. 8)")
    a("--authors-ema-warmup", action="store_true", help="authors' code: alpha = min(1 - 1/(step + 1), alpha) (SPEC.md Sec. 8)")
    a("--authors-weight-cutoff", action="store_true", help="authors' code: w(ep) = 0 once exp(-beta ep) < 0.01 (SPEC.md Sec. 8)")
    return p


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, fill the schedule defaults scaled to --epochs (SPEC.md Sec. 3) and validate.
    Bad input exits with one line and code 2 (argparse's `error`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.arch not in ARCHS:
        parser.error(f"unknown --arch {args.arch!r}; choose one of: {', '.join(ARCHS)}")
    args.epochs = PAPER_EPOCHS.get(args.dataset, 300) if args.epochs is None else args.epochs
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.milestones is None:
        fractions = PAPER_MILESTONES.get(args.dataset, (0.5, 0.75))
        args.milestones = sorted({min(args.epochs, max(1, round(f * args.epochs))) for f in fractions})
    if args.rampup_epochs is None:
        args.rampup_epochs = round(PAPER_RAMPUP_FRACTION * args.epochs)
    checks = [
        (args.beta < 0, f"--beta must be >= 0, got {args.beta}"),
        (args.num_peers < 2 and args.method != "baseline", f"--method {args.method} needs --num-peers >= 2, got {args.num_peers}"),
        (args.num_peers < 3 and args.method == "okddip", f"--method okddip needs --num-peers >= 3 (2 auxiliary peers + the leader), got {args.num_peers}"),
        (args.temperature <= 0, f"--temperature must be > 0, got {args.temperature}"),
        (not 0.0 <= args.ema_decay <= 1.0, f"--ema-decay must be in [0, 1], got {args.ema_decay}"),
        (args.kd_weight < 0, f"--kd-weight must be >= 0, got {args.kd_weight}"),
        (args.rampup_epochs < 0, f"--rampup-epochs must be >= 0, got {args.rampup_epochs}"),
        (args.init_iters < 0, f"--init-iters must be >= 0, got {args.init_iters}"),
        (args.lr <= 0 or args.init_lr <= 0, "--lr and --init-lr must be > 0"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.eval_every < 1, f"--eval-every must be >= 1, got {args.eval_every}"),
        (args.weight_decay < 0 or not 0.0 <= args.momentum < 1.0, "--weight-decay must be >= 0 and --momentum in [0, 1)"),
        (any(not 1 <= m <= args.epochs for m in args.milestones),
         f"--milestones {' '.join(map(str, args.milestones))} must lie within 1..{args.epochs} (--epochs {args.epochs})"),
    ]
    for bad, message in checks:
        if bad:
            parser.error(message)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    args.out_dir = args.out_dir or os.path.join("runs", f"{args.dataset}_{args.arch}_{args.method}_seed{args.seed}")
    return args


def epoch_weights(args: argparse.Namespace, epoch: int) -> dict[str, float]:
    """r(ep) of Eq. (2)/(12) and w(ep) of Eq. (11)/(13)/(14) for a 0-based epoch."""
    if args.authors_rampup:
        # DEVIATION (opt-in, SPEC.md Sec. 8): the authors' code uses 0.1 where R was meant.
        ramp = math.exp(-5.0 * (1.0 - epoch / 0.1) ** 2) if epoch < args.rampup_epochs else 0.1
    else:
        ramp = rampup(epoch, args.rampup_epochs)
    weight = decay_weight(epoch, args.epochs, args.decay, args.beta)
    if args.authors_weight_cutoff and math.exp(-args.beta * epoch) < 0.01:
        weight = 0.0  # DEVIATION (opt-in, SPEC.md Sec. 8): the authors' code.
    return {"rampup": ramp, "w": weight}


# ----------------------------------------------------------------------------- training
def autocast(device: torch.device):
    """bf16 autocast for the forward passes on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """All randomness of an epoch's data (order, crops, flips) from (seed, epoch) alone, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch + 1)


def train_epoch(args, method, optimizer, data, epoch: int, state: dict) -> dict:
    """One epoch; the device is synchronised once, at its end, for the logged means."""
    weights = epoch_weights(args, epoch)
    batches = datasets.train_batches(data, args.batch_size, method.num_views,
                                     epoch_generator(args.seed, epoch, data.device))
    num_batches = datasets.num_train_batches(data, args.batch_size)
    totals: dict[str, torch.Tensor] = {}
    method.set_mode(True)
    start = time.perf_counter()
    for views, labels in tqdm(batches, total=num_batches, desc=f"epoch {epoch + 1}/{args.epochs}",
                              leave=False, dynamic_ncols=True, file=sys.stderr):
        with autocast(data.device):
            loss, parts = method.loss(views, labels, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(state["step"])
        state["step"] += 1
        for name, value in {"loss": loss.detach(), **parts}.items():
            totals[name] = totals.get(name, 0.0) + value.float()
    means = {name: value.item() / num_batches for name, value in totals.items()}  # the one sync
    seconds = time.perf_counter() - start
    means["train_acc"] = 100.0 * means.pop("correct")
    return {**weights, **means, "epoch_seconds": seconds, "images_per_s": num_batches * args.batch_size / seconds}


@torch.no_grad()
def evaluate(method, data, batch_size: int) -> dict[str, float]:
    """Top-1 test accuracy (%) of every output of SPEC.md Sec. 4 (eval-mode BatchNorm)."""
    method.set_mode(False)
    correct: dict[str, torch.Tensor] = {}
    for images, labels in datasets.test_batches(data, batch_size):
        with autocast(data.device):
            logits = method.eval_logits(images)
        for name, value in logits.items():
            correct[name] = correct.get(name, 0) + (value.argmax(-1) == labels).sum()
    total = data.test_labels.numel()
    accuracies = {f"acc_{name}": 100.0 * value.item() / total for name, value in correct.items()}
    deployed = [accuracies[f"acc_{key}"] for key in method.deployed_keys()]
    accuracies["acc_deployed_mean"] = sum(deployed) / len(deployed)
    return accuracies


def check_health(args, row: dict) -> None:
    """Stop on a non-finite loss or on collapse (Sec. 3.3: all logits shrink to zero)."""
    if not math.isfinite(row["loss"]):
        raise RunStopped(f"the loss became {row['loss']} in epoch {row['epoch']}; the checkpoint of the last "
                         f"good epoch is kept in {args.out_dir} (try a lower --lr)", 3)
    if row["logit_norm"] < args.collapse_threshold:
        raise RunStopped(f"collapse in epoch {row['epoch']}: the deployed model's mean logit norm is "
                         f"{row['logit_norm']:.2e} < --collapse-threshold {args.collapse_threshold} "
                         f"(paper Sec. 3.3); the last good checkpoint is kept in {args.out_dir}", 3)


# ----------------------------------------------------------------------------- run directory
def config_of(args: argparse.Namespace, device: torch.device) -> dict:
    return {**vars(args), "torch": str(torch.__version__), "device_name":
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def same_config(saved: dict, current: dict) -> list[str]:
    ignored = RESUMABLE | {"torch", "device_name"}
    return sorted(k for k in set(saved) | set(current) if k not in ignored and saved.get(k) != current.get(k))


@contextlib.contextmanager
def atomic_write(path: str, binary: bool = False):
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") if binary else open(tmp, "w", newline="") as f:
        yield f
    os.replace(tmp, path)


def atomic_save(obj, path: str) -> None:
    with atomic_write(path, binary=True) as f:
        torch.save(obj, f)


def write_json(obj, path: str) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)


def write_metrics(path: str, history: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in history for k in row))
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def load_checkpoint(path: str, config: dict, args: argparse.Namespace) -> dict:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["config"]
    except Exception as error:  # any unreadable file is a corrupt checkpoint to the user
        raise RunStopped(f"cannot read the checkpoint {path} ({type(error).__name__}); delete the run "
                         f"directory or choose another --out-dir", 2) from None
    differing = same_config(saved, config)
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in differing[:4])
        raise RunStopped(f"the checkpoint in {args.out_dir} was made with a different configuration ({details}); "
                         f"resume with the original flags or choose another --out-dir", 2)
    return checkpoint


def start_or_resume(args, method, optimizer, scheduler, data, config: dict) -> dict:
    """A fresh run (teacher initialisation included) or the state of the checkpoint."""
    path = os.path.join(args.out_dir, "checkpoint.pt")
    if not args.resume:
        if os.path.exists(path):
            raise RunStopped(f"{args.out_dir} already holds a run; add --resume to continue it, "
                             f"or choose another --out-dir", 2)
        os.makedirs(args.out_dir, exist_ok=True)
        write_json(config, os.path.join(args.out_dir, "config.json"))
        method.initialise(repeated_batches(args, data, method.num_views))
        return {"epoch": 0, "step": 0, "history": []}
    if not os.path.exists(path):
        raise RunStopped(f"--resume: no checkpoint in {args.out_dir}; run without --resume to start it", 2)
    checkpoint = load_checkpoint(path, config, args)
    for name, module in method.modules().items():
        module.load_state_dict(checkpoint[name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    if torch.cuda.is_available() and checkpoint.get("rng_cuda") is not None:
        torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
    return {k: checkpoint[k] for k in ("epoch", "step", "history")}


def repeated_batches(args, data, num_views: int):
    """The teacher initialisation's batches: their own seeded order, repeated as long as needed."""
    while True:
        yield from datasets.train_batches(data, args.batch_size, num_views,
                                          epoch_generator(args.seed, -1, data.device))


def save_checkpoint(args, method, optimizer, scheduler, state: dict, config: dict) -> None:
    checkpoint = {name: module.state_dict() for name, module in method.modules().items()}
    checkpoint.update(state, config=config, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                      rng_cpu=torch.get_rng_state(),
                      rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    atomic_save(checkpoint, os.path.join(args.out_dir, "checkpoint.pt"))


def finish(args, method, data, history: list[dict]) -> dict:
    """summary.json and deployable.pt: the headline is the deployed model at the final epoch (for
    pcl/dk/dkel the mean over teacher peers); the paper's convention (the best deployed output at
    its best epoch) is reported beside it."""
    final = history[-1]
    keys = method.deployed_keys()
    best_peer = max(keys, key=lambda k: final[f"acc_{k}"])
    evaluated = [row for row in history if "acc_deployed_mean" in row]
    best_epoch_value, best_epoch, best_key = max((row[f"acc_{k}"], row["epoch"], k) for row in evaluated for k in keys)
    peer_index = keys.index(best_peer)
    atomic_save(method.deployable(peer_index).state_dict(), os.path.join(args.out_dir, "deployable.pt"))
    summary = {
        "method": args.method, "dataset": args.dataset, "arch": args.arch, "epochs": args.epochs,
        "final": {k: v for k, v in final.items() if k.startswith("acc_")},
        "best": {k[4:]: max(row[k] for row in evaluated) for k in final if k.startswith("acc_")},
        "headline_final_deployed_mean": final["acc_deployed_mean"],
        "paper_convention_best_peer_best_epoch": {"acc": best_epoch_value, "epoch": best_epoch, "output": best_key},
        "deployable": {"file": "deployable.pt", "output": best_peer, "arch": args.arch,
                       "num_classes": data.num_classes, "load": "models.build_deployable(arch, num_classes)"},
        "train_seconds": sum(row["epoch_seconds"] for row in history),
    }
    write_json(summary, os.path.join(args.out_dir, "summary.json"))
    return summary


def epoch_line(row: dict, epochs: int, history: list[dict]) -> str:
    seconds = sum(r["epoch_seconds"] for r in history) / len(history)
    losses = " ".join(f"{k}={row[k]:.3f}" for k in ("loss", "ce", "ce_ensemble", "ce_leader", "pe", "pm", "dk", "de", "kd", "kd_leader") if k in row)
    test = f" | test deployed {row['acc_deployed_mean']:.2f}%" if "acc_deployed_mean" in row else ""
    return (f"epoch {row['epoch']}/{epochs} lr={row['lr']:.4g} w={row['w']:.3f} r={row['rampup']:.3f} {losses} "
            f"train {row['train_acc']:.2f}%{test} | {row['images_per_s']:.0f} img/s, "
            f"ETA {(epochs - row['epoch']) * seconds / 60:.1f} min")


def summary_table(summary: dict) -> str:
    lines = [f"{'output':<22} {'final':>7} {'best':>7}"]
    lines += [f"{k[4:]:<22} {v:>7.2f} {summary['best'][k[4:]]:>7.2f}" for k, v in summary["final"].items()]
    best = summary["paper_convention_best_peer_best_epoch"]
    lines.append(f"headline (deployed model, final epoch; pcl/dk/dkel: mean over teacher peers): {summary['headline_final_deployed_mean']:.2f}%")
    lines.append(f"paper's convention (best deployed output at its best epoch): {best['acc']:.2f}% "
                 f"({best['output']}, epoch {best['epoch']})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: pick the fastest kernels once
    try:
        data = datasets.load_data(args.dataset, args.data_dir, device, seed=args.seed)
    except datasets.DataError as error:
        raise RunStopped(str(error), 2) from None
    method = build_method(args, data.num_classes, device)
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.momentum > 0,
                                fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)
    config = config_of(args, device)
    state = start_or_resume(args, method, optimizer, scheduler, data, config)
    for epoch in range(state["epoch"], args.epochs):
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **train_epoch(args, method, optimizer, data, epoch, state)}
        check_health(args, row)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            row.update(evaluate(method, data, args.batch_size))
        scheduler.step()
        state["history"].append(row)
        state["epoch"] = epoch + 1
        save_checkpoint(args, method, optimizer, scheduler, state, config)
        write_metrics(os.path.join(args.out_dir, "metrics.csv"), state["history"])
        print(epoch_line(row, args.epochs, state["history"]), flush=True)
    return finish(args, method, data, state["history"])


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    try:
        summary = run(args)
    except RunStopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished epoch is saved in {args.out_dir}; continue with the same "
              f"command plus --resume", file=sys.stderr)
        return 130
    print(summary_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
