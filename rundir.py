"""The run directory of train.py: config.json, metrics.csv, checkpoint.pt, deployable.pt and
summary.json (SPEC.md Sec. 4 for what the summary reports).

Every file is written to a temporary name beside its final one and renamed, so a run killed at
any moment leaves the previous version whole. The checkpoint holds every module, the
optimizer, the schedule, the RNG state and the metrics history: `--resume` continues a run
exactly where its last finished epoch left it. Under torchrun rank 0 alone writes (the other ranks
hold the same state, distributed.py), and while a run trains, its process holds the directory's lock.
"""
import argparse
import contextlib
import csv
import fcntl
import json
import os

import torch
import torch.distributed as dist

# Process exit codes of train.py (README, "Nothing lost, nothing silent").
EXIT_BAD_INPUT = 2      # a bad flag, path, data set or run directory: nothing was trained
EXIT_UNHEALTHY = 3      # the loss became non-finite or the model collapsed: the last good epoch is kept
EXIT_RANK_LOST = 4      # torchrun: another rank stopped; every finished epoch is kept; --resume continues
EXIT_INTERRUPTED = 130  # Ctrl-C: every finished epoch is kept; --resume continues

# Arguments that may change between a run and its resumption without changing its results.
RESUMABLE = {"resume", "eval_every", "device", "data_dir", "out_dir", "compile"}


class RunStopped(Exception):
    """A run cannot go on: a one-line message and the process exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def config_of(args: argparse.Namespace, device: torch.device) -> dict:
    """The resolved configuration, as config.json records it."""
    return {**vars(args), "torch": str(torch.__version__), "device_name":
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The settings that differ between a checkpoint's configuration and this run's."""
    ignored = RESUMABLE | {"torch", "device_name", "world_size"}  # world_size: `check_world_size`
    return sorted(k for k in set(saved) | set(current) if k not in ignored and saved.get(k) != current.get(k))


@contextlib.contextmanager
def hold_run_dir(out_dir: str, resume: bool):
    """The run directory, held for the whole run: made for a new run (which it must not already
    hold: that one is continued with --resume) and locked, so that two processes (a pool that
    relaunches, an array task started twice) never train into one directory at once; the second
    gets one line and exit code 2. The lock is `fcntl.flock` on `out_dir/.lock`, which the operating
    system releases when its process ends, however it ends: the file left by a killed run blocks
    nothing, and `--resume` continues it. A `--resume` of a directory that does not exist takes no
    lock and makes no directory (`load_checkpoint` refuses it)."""
    if resume and not os.path.isdir(out_dir):
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunStopped(f"another process is training into {out_dir} (it holds {lock.name}); wait "
                             f"for it to end or choose another --out-dir", EXIT_BAD_INPUT) from None
        if not resume and os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
            raise RunStopped(f"{out_dir} already holds a run; add --resume to continue it, or choose "
                             f"another --out-dir", EXIT_BAD_INPUT)
        yield  # closing the file releases the lock


@contextlib.contextmanager
def atomic_write(path: str, binary: bool = False):
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a file.
    Under torchrun the ranks other than 0 write nothing: they hold the same state as rank 0."""
    if dist.is_initialized() and dist.get_rank() > 0:
        with open(os.devnull, "wb" if binary else "w") as f:
            yield f
        return
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


def load_checkpoint(out_dir: str, config: dict) -> dict:
    """The checkpoint of `out_dir`, refused (exit 2) when unreadable or made with other settings."""
    path = os.path.join(out_dir, "checkpoint.pt")
    if not os.path.exists(path):
        raise RunStopped(f"--resume: no checkpoint in {out_dir}; run without --resume to start it",
                         EXIT_BAD_INPUT)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["config"]
    except Exception as error:  # any unreadable file is a corrupt checkpoint to the user
        raise RunStopped(f"cannot read the checkpoint {path} ({type(error).__name__}); delete the run "
                         f"directory or choose another --out-dir", EXIT_BAD_INPUT) from None
    check_world_size(out_dir, saved.get("world_size", 1), config.get("world_size", 1))
    differing = changed_settings(saved, config)
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in differing[:4])
        raise RunStopped(f"the checkpoint in {out_dir} was made with a different configuration ({details}); "
                         f"resume with the original flags or choose another --out-dir", EXIT_BAD_INPUT)
    return checkpoint


def check_world_size(out_dir: str, saved: int, current: int) -> None:
    """A run resumes with the number of processes it was trained with: its BatchNorm statistics
    are taken over the B/N images of each rank (distributed.py), so another N changes the results."""
    if saved != current:
        raise RunStopped(f"the checkpoint in {out_dir} was trained by {saved} process(es) (torchrun's world "
                         f"size) and this run has {current}: resume with {saved}, or choose another "
                         f"--out-dir", EXIT_BAD_INPUT)


def restore_checkpoint(out_dir: str, config: dict, modules: dict, optimizer, scheduler) -> dict:
    """Load the checkpoint of `out_dir` into the modules, the optimizer, the schedule and the RNG;
    returns the run's state (epoch, step, history)."""
    checkpoint = load_checkpoint(out_dir, config)
    for name, module in modules.items():
        module.load_state_dict(checkpoint[name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    if torch.cuda.is_available() and checkpoint.get("rng_cuda") is not None:
        torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
    return {k: checkpoint[k] for k in ("epoch", "step", "history")}


def save_checkpoint(out_dir: str, modules: dict, optimizer, scheduler, state: dict, config: dict) -> None:
    checkpoint = {name: module.state_dict() for name, module in modules.items()}
    checkpoint.update(state, config=config, optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(),
                      rng_cpu=torch.get_rng_state(),
                      rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    atomic_save(checkpoint, os.path.join(out_dir, "checkpoint.pt"))


def write_summary(args: argparse.Namespace, method, num_classes: int, history: list[dict]) -> dict:
    """summary.json and deployable.pt: the headline is the deployed model at the final epoch (for
    pcl/dk/dkel the mean over teacher peers); the paper's convention (the best deployed output at
    its best epoch) is reported beside it."""
    final = history[-1]
    keys = method.deployed_keys()
    best_peer = max(keys, key=lambda k: final[f"acc_{k}"])
    evaluated = [row for row in history if "acc_deployed_mean" in row]
    best_value, best_epoch, best_key = max((row[f"acc_{k}"], row["epoch"], k)
                                           for row in evaluated for k in keys)
    atomic_save(method.deployable(best_peer).state_dict(), os.path.join(args.out_dir, "deployable.pt"))
    summary = {
        "method": args.method, "dataset": args.dataset, "arch": args.arch, "epochs": args.epochs,
        "final": {k: v for k, v in final.items() if k.startswith("acc_")},
        "best": {k[4:]: max(row[k] for row in evaluated) for k in final if k.startswith("acc_")},
        "headline_final_deployed_mean": final["acc_deployed_mean"],
        "paper_convention_best_peer_best_epoch": {"acc": best_value, "epoch": best_epoch, "output": best_key},
        "deployable": {"file": "deployable.pt", "output": best_peer, "arch": args.arch,
                       "num_classes": num_classes, "load": "models.build_deployable(arch, num_classes)"},
        "train_seconds": sum(row["epoch_seconds"] for row in history),
    }
    write_json(summary, os.path.join(args.out_dir, "summary.json"))
    return summary


def summary_table(summary: dict) -> str:
    """The summary as a small table for the terminal."""
    lines = [f"{'output':<22} {'final':>7} {'best':>7}"]
    lines += [f"{k[4:]:<22} {v:>7.2f} {summary['best'][k[4:]]:>7.2f}" for k, v in summary["final"].items()]
    best = summary["paper_convention_best_peer_best_epoch"]
    lines.append(f"headline (deployed model, final epoch; pcl/dk/dkel: mean over teacher peers): "
                 f"{summary['headline_final_deployed_mean']:.2f}%")
    lines.append(f"paper's convention (best deployed output at its best epoch): {best['acc']:.2f}% "
                 f"({best['output']}, epoch {best['epoch']})")
    return "\n".join(lines)
