"""The run directory of train.py: config.json, metrics.csv, curves.png, checkpoint.pt,
deployable.pt and summary.json (SPEC.md Sec. 4 for what the summary reports), and the deployed
model of a finished run read back as offline KD's frozen teacher (Table 2).

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
import math
import os
import signal
import threading
import sys

import torch
import torch.distributed as dist

from backbones import ARCHS
from models import build_deployable

# Process exit codes of train.py (README, "Nothing lost, nothing silent").
EXIT_BAD_INPUT = 2       # a bad flag, size, path, data set or run directory: nothing was trained
EXIT_UNHEALTHY = 3       # the loss became non-finite or the model collapsed: the last good epoch is kept
EXIT_WRITE_FAILED = 4    # a file of the run directory could not be written: the last good epoch is kept
EXIT_RANK_LOST = 5       # torchrun: another rank stopped; every finished epoch is kept; --resume continues
EXIT_INTERRUPTED = 130   # SIGINT (Ctrl-C): every finished epoch is kept; --resume continues
EXIT_TERMINATED = 143    # SIGTERM (SLURM, Kubernetes before a kill): likewise, for a requeue with --resume

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


class StopRequests:
    """SIGTERM and SIGINT ask a run to stop at the end of the current optimizer step rather than
    kill it: the loop calls `check`, which raises RunStopped (exit 143 or 130) with the resume
    command. Every finished epoch is already in the checkpoint. A second signal of the same kind
    stops at once. Used as a context manager around a run (main thread only)."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, number: int, frame) -> None:
        if self.received == number:
            raise KeyboardInterrupt
        self.received = number

    def check(self, out_dir: str, epochs_done: int) -> None:
        if self.received is not None:
            name = signal.Signals(self.received).name
            code = EXIT_TERMINATED if self.received == signal.SIGTERM else EXIT_INTERRUPTED
            raise RunStopped(f"stopped by {name}: the {epochs_done} finished epoch(s) are saved in "
                             f"{out_dir}; continue with the same command plus --resume", code)


def prepare(out_dir: str, resume: bool) -> None:
    """Refuse (exit 2) a run directory without a checkpoint (with --resume) or one that cannot be
    created or written; one that already holds a run is refused under the lock (`_locked`)."""
    if resume and not os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
        raise RunStopped(f"--resume: no checkpoint in {out_dir}; run without --resume to start it",
                         EXIT_BAD_INPUT)
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise RunStopped(f"--out-dir {out_dir}: cannot create or write it ({error.strerror})",
                         EXIT_BAD_INPUT) from None


@contextlib.contextmanager
def hold_run_dir(out_dir: str, resume: bool):
    """The run directory, held for the whole run: made for a new run (which it must not already
    hold: that one is continued with --resume) and locked, so that two processes (a pool that
    relaunches, an array task started twice) never train into one directory at once; the second
    gets one line and exit code 2. The lock is `fcntl.flock` on `out_dir/.lock`, which the operating
    system releases when its process ends, however it ends: the file left by a killed run blocks
    nothing, and `--resume` continues it. `prepare` refuses first what cannot work at all; a new
    directory that a refusal (exit 2) leaves holding nothing but its lock is removed again."""
    created = not os.path.isdir(out_dir)
    prepare(out_dir, resume)
    try:
        with _locked(out_dir, resume):
            yield
    except RunStopped as stop:
        if created and stop.exit_code == EXIT_BAD_INPUT and os.listdir(out_dir) == [".lock"]:
            os.remove(os.path.join(out_dir, ".lock"))
            os.rmdir(out_dir)
        raise


@contextlib.contextmanager
def _locked(out_dir: str, resume: bool):
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
    """Write to a temporary file beside `path`, then rename: a kill never leaves half a file, and a
    failed write (disk full, permission lost) leaves the previous version whole and stops the run
    with one line (exit 4). Under torchrun the ranks other than 0 write nothing: they hold the
    same state as rank 0."""
    if dist.is_initialized() and dist.get_rank() > 0:
        with open(os.devnull, "wb" if binary else "w") as f:
            yield f
        return
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", newline="") as f:
            yield f
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise RunStopped(f"cannot write {path} ({error.strerror}); the previous version is intact: free "
                         f"space or fix the permissions, then continue with --resume",
                         EXIT_WRITE_FAILED) from None


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
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["config"]
    except Exception as error:  # any unreadable file is a corrupt checkpoint to the user
        raise RunStopped(f"cannot read the checkpoint {path} ({type(error).__name__}); delete the run "
                         f"directory or choose another --out-dir", EXIT_BAD_INPUT) from None
    check_world_size(out_dir, saved.get("world_size", 1), config.get("world_size", 1))
    differing = changed_settings(saved, config)
    if differing:
        details = ", ".join(f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {config.get(k)!r}"
                            for k in differing[:4])
        raise RunStopped(f"the checkpoint in {out_dir} was made with a different configuration ({details}); "
                         f"resume with the original flags or choose another --out-dir", EXIT_BAD_INPUT)
    return checkpoint


def check_health(row: dict, out_dir: str, collapse_threshold: float) -> None:
    """Stop on a non-finite loss or on collapse (Sec. 3.3: all logits shrink to zero)."""
    if not math.isfinite(row["loss"]):
        raise RunStopped(f"the loss became {row['loss']} in epoch {row['epoch']}; the checkpoint of the last "
                         f"good epoch is kept in {out_dir} (try a lower --lr)", EXIT_UNHEALTHY)
    if row["logit_norm"] < collapse_threshold:
        raise RunStopped(f"collapse in epoch {row['epoch']}: the deployed model's mean logit norm is "
                         f"{row['logit_norm']:.2e} < --collapse-threshold {collapse_threshold} "
                         f"(paper Sec. 3.3); the last good checkpoint is kept in {out_dir}",
                         EXIT_UNHEALTHY)


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


def validation_choice(history: list[dict], keys: list[str]) -> tuple[float, int, str]:
    """(validation accuracy, epoch, output): the deployed output and epoch with the best validation
    accuracy, the earliest epoch among equals (--val-size)."""
    rows = [row for row in history if "val_acc_deployed_mean" in row]
    value, negative_epoch, key = max((row[f"val_acc_{k}"], -row["epoch"], k) for row in rows for k in keys)
    return value, -negative_epoch, key


def keep_if_best(out_dir: str, method, row: dict, history: list[dict]) -> None:
    """With a validation split, deployable.pt follows the validation choice during training: the
    weights of the chosen epoch exist only at that epoch."""
    _, epoch, key = validation_choice(history + [row], method.deployed_keys())
    if epoch == row["epoch"]:
        atomic_save(method.deployable(key).state_dict(), os.path.join(out_dir, "deployable.pt"))


def write_summary(args: argparse.Namespace, method, num_classes: int, history: list[dict],
                  image_size: int) -> dict:
    """summary.json (and, without a validation split, deployable.pt); the image size is recorded
    for offline KD, which refuses a teacher made for another size.

    The deployed model is chosen without looking at the test split: with --val-size, the output
    and epoch of the best validation accuracy, reported with its test accuracy; without, no
    selection at all: peer 0 at the final epoch. Beside it: the final-epoch mean over the deployed
    outputs (SPEC.md Sec. 4) and the paper's convention, the best deployed output at its best
    epoch, which is selected on the test split and labelled so."""
    final, keys = history[-1], method.deployed_keys()
    evaluated = [row for row in history if "acc_deployed_mean" in row]
    best_value, best_epoch, best_key = max((row[f"acc_{k}"], row["epoch"], k)
                                           for row in evaluated for k in keys)
    if "val_acc_deployed_mean" in final:
        val_value, epoch, key = validation_choice(history, keys)
        test_value = next(row for row in history if row["epoch"] == epoch)[f"acc_{key}"]
        selection = {"on": "validation split", "output": key, "epoch": epoch, "val_acc": val_value,
                     "test_acc": test_value}
    else:
        key = keys[0]
        atomic_save(method.deployable(key).state_dict(), os.path.join(args.out_dir, "deployable.pt"))
        selection = {"on": "none: no selection was made (--val-size 0), the deployed model is the first "
                           "deployed output at the final epoch", "output": key, "epoch": final["epoch"],
                     "test_acc": final[f"acc_{key}"]}
    summary = {
        "method": args.method, "dataset": args.dataset, "arch": args.arch, "epochs": args.epochs,
        "final": {k: v for k, v in final.items() if k.startswith("acc_")},
        "best": {k[4:]: max(row[k] for row in evaluated) for k in final if k.startswith("acc_")},
        "headline_final_deployed_mean": final["acc_deployed_mean"],
        "selection": selection,
        "paper_convention_best_peer_best_epoch": {"acc": best_value, "epoch": best_epoch, "output": best_key,
                                                  "selected_on": "test split"},
        "deployable": {"file": "deployable.pt", "output": key, "epoch": selection["epoch"], "arch": args.arch,
                       "num_classes": num_classes, "image_size": image_size,
                       "load": "models.build_deployable(arch, num_classes)"},
        "train_seconds": sum(row["epoch_seconds"] for row in history),
    }
    write_json(summary, os.path.join(args.out_dir, "summary.json"))
    return summary


def headline(summary: dict) -> float:
    """A run's honest figure: the test accuracy of the model chosen on the validation split
    (train.py --val-size), else the final-epoch mean over the deployed outputs (no selection)."""
    selection = summary.get("selection", {})
    if selection.get("on") == "validation split":
        return selection["test_acc"]
    return summary["headline_final_deployed_mean"]


def summary_table(summary: dict) -> str:
    """The summary as a small table for the terminal."""
    lines = [f"{'output':<22} {'final':>7} {'best':>7}"]
    lines += [f"{k[4:]:<22} {v:>7.2f} {summary['best'][k[4:]]:>7.2f}" for k, v in summary["final"].items()]
    best, chosen = summary["paper_convention_best_peer_best_epoch"], summary["selection"]
    lines.append(f"deployed model ({chosen['output']}, epoch {chosen['epoch']}; selected on: "
                 f"{chosen['on']}): test {chosen['test_acc']:.2f}%")
    lines.append(f"headline (deployed model, final epoch; pcl/dk/dkel: mean over teacher peers): "
                 f"{summary['headline_final_deployed_mean']:.2f}%")
    lines.append(f"paper's convention (best deployed output at its best epoch, selected on the test split): "
                 f"{best['acc']:.2f}% ({best['output']}, epoch {best['epoch']})")
    return "\n".join(lines)


def epoch_line(row: dict, epochs: int, history: list[dict], schedules: tuple[str, ...]) -> str:
    """One finished epoch for the terminal: lr, the epoch weights the method uses, the loss parts,
    train and test accuracy, speed and the time left."""
    seconds = sum(r["epoch_seconds"] for r in history) / len(history)
    weights = "".join(f" {'r' if name == 'rampup' else name}={row[name]:.3f}" for name in schedules)
    names = ("loss", "ce", "ce_ensemble", "ce_leader", "pe", "pm", "dk", "de", "kd", "kd_leader")
    losses = " ".join(f"{k}={row[k]:.3f}" for k in names if k in row)
    test = f" | test deployed {row['acc_deployed_mean']:.2f}%" if "acc_deployed_mean" in row else ""
    return (f"epoch {row['epoch']}/{epochs} lr={row['lr']:.4g}{weights} {losses} "
            f"train {row['train_acc']:.2f}%{test} | {row['images_per_s']:.0f} img/s, "
            f"ETA {(epochs - row['epoch']) * seconds / 60:.1f} min")


def load_teacher(teacher_run: str | None, num_classes: int, image_size: int) -> torch.nn.Module:
    """Offline KD's teacher (Table 2): the deployed model of the finished train.py run
    `teacher_run`, its architecture, classes and image size read from that run's summary.json,
    frozen (no parameter requires a gradient) and in eval mode. Refused with one line and exit
    code 2 when missing, unfinished, unreadable, or made for other classes or another image size."""
    def refuse(why: str) -> RunStopped:
        return RunStopped(f"--teacher-run {teacher_run}: {why} (offline KD, Table 2)", EXIT_BAD_INPUT)

    if teacher_run is None:
        raise RunStopped("--method kd needs --teacher-run DIR, a finished train.py run (Table 2)",
                         EXIT_BAD_INPUT)
    if not os.path.exists(os.path.join(teacher_run, "summary.json")):
        raise refuse("not a finished run (no summary.json); finish it first")
    try:
        with open(os.path.join(teacher_run, "summary.json")) as f:
            deployed = json.load(f)["deployable"]
        # Runs written before summary.json recorded the image size: the size the arch was made for.
        size = deployed.get("image_size", ARCHS[deployed["arch"]]().input_size)
        teacher = build_deployable(deployed["arch"], deployed["num_classes"])
        state = torch.load(os.path.join(teacher_run, deployed["file"]), map_location="cpu", weights_only=True)
        teacher.load_state_dict(state)
    except Exception as error:  # any unreadable file or mismatched state dict is a broken run to the user
        raise refuse(f"cannot load its deployed model ({type(error).__name__})") from None
    if (deployed["num_classes"], size) != (num_classes, image_size):
        raise refuse(f"its model has {deployed['num_classes']} classes and {size}x{size} images, "
                     f"this run {num_classes} and {image_size}x{image_size}")
    return teacher.requires_grad_(False).eval()


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures go to files, no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# metrics.csv columns that are not loss parts (everything else in a row is one).
NOT_LOSSES = {"epoch", "lr", "w", "rampup", "logit_norm", "train_acc", "epoch_seconds", "images_per_s"}


def draw_curves(path: str, history: list[dict]) -> None:
    """Four panels against the epoch: accuracies, loss parts, w(ep) and r(ep), learning rate."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    epochs = [row["epoch"] for row in history]
    evaluated = [row for row in history if "acc_deployed_mean" in row]
    tested = [k for k in history[-1] if k == "acc_deployed_mean" or k.startswith("acc_student_peer")]
    for key in tested:  # test accuracy: the deployed model bold black, the student peers thin
        style = {"color": "black", "linewidth": 2.5} if key == "acc_deployed_mean" else {"linewidth": 1.0}
        axes[0, 0].plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated], label=f"test {key[4:]}",
                        **style)
    axes[0, 0].plot(epochs, [r["train_acc"] for r in history], "--", color="grey", label="train (student)")
    losses = [k for k in history[-1] if k not in NOT_LOSSES and not k.startswith("acc_")]
    for key in losses:
        axes[0, 1].plot(epochs, [r[key] for r in history], label=key)
    for key, label in (("w", "w(ep), Eq. (11)/(13)/(14)"), ("rampup", "r(ep), ramp-up")):
        if key in history[-1]:
            axes[1, 0].plot(epochs, [r[key] for r in history], label=label)
    axes[1, 1].plot(epochs, [r["lr"] for r in history], drawstyle="steps-post", label="learning rate")
    axes[1, 1].set_yscale("log")
    for ax, title in zip(axes.flat, ("accuracy (%)", "loss parts (epoch means)", "epoch weights", "lr")):
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


def plot_curves(out_dir: str, history: list[dict]) -> None:
    """Refresh curves.png in the run directory. A picture is a convenience: a failure to draw is
    reported on one line and never stops the run."""
    try:
        draw_curves(os.path.join(out_dir, "curves.png"), history)
    except Exception as error:  # matplotlib missing or broken, a full disk: the run goes on
        print(f"warning: curves.png not drawn ({type(error).__name__}: {error})", file=sys.stderr)
