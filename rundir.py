"""The run directory of train.py: config.json, metrics.csv, curves.png, checkpoint.pt,
deployable.pt and summary.json (SPEC.md Sec. 4 for what the summary reports), and the deployed
model of a finished run read back as offline KD's frozen teacher (Table 2).

Every file is written to a temporary name beside its final one and renamed, so a run killed at
any moment leaves the previous version whole. The checkpoint holds every module, the
optimizer, the schedule, the RNG state and the metrics history: `--resume` continues a run
exactly where its last finished epoch left it.
"""
import argparse
import contextlib
import csv
import json
import os
import sys

import torch

from models import ARCHS, build_deployable

# Process exit codes of train.py (README, "Nothing lost, nothing silent").
EXIT_BAD_INPUT = 2      # a bad flag, path, data set or run directory: nothing was trained
EXIT_UNHEALTHY = 3      # the loss became non-finite or the model collapsed: the last good epoch is kept
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
    differing = changed_settings(saved, config)
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in differing[:4])
        raise RunStopped(f"the checkpoint in {out_dir} was made with a different configuration ({details}); "
                         f"resume with the original flags or choose another --out-dir", EXIT_BAD_INPUT)
    return checkpoint


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


def write_summary(args: argparse.Namespace, method, num_classes: int, history: list[dict],
                  image_size: int) -> dict:
    """summary.json and deployable.pt: the headline is the deployed model at the final epoch (for
    pcl/dk/dkel the mean over teacher peers); the paper's convention (the best deployed output at
    its best epoch) is reported beside it. The image size is recorded for offline KD, which
    refuses a teacher made for another size."""
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
                       "num_classes": num_classes, "image_size": image_size,
                       "load": "models.build_deployable(arch, num_classes)"},
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
