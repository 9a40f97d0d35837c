"""The report of a run: the epoch line on the terminal, curves.png, summary.json and the summary
table, and a run's headline figure (docs/spec.md Sec. 4: what is reported, and how the deployed
model is chosen without looking at the test split), and the warning of a run too short for its
EMA teacher. The files are written through rundir.py.
"""
import argparse
import math
import os
import sys

from ema import EMATeacher
from infra.deploy import write_program
from infra.rundir import atomic_save, atomic_write, write_json, writes_files


def validation_choice(history: list[dict], keys: list[str]) -> tuple[float, int, str]:
    """(validation accuracy, epoch, output): the deployed output and epoch with the best validation
    accuracy, the earliest epoch among equals (--val-size)."""
    rows = [row for row in history if "val_acc_deployed_mean" in row]
    value, negative_epoch, key = max((row[f"val_acc_{k}"], -row["epoch"], k)
                                     for row in rows for k in keys)
    return value, -negative_epoch, key


def keep_if_best(method, row: dict, state: dict) -> None:
    """With a validation split the deployed model follows the validation choice during training:
    the weights of the chosen epoch exist only at that epoch, so they join the run's state and are
    saved with that epoch's checkpoint; deployable.pt is exported from there (`export_deployable`),
    so that it never holds an epoch that no checkpoint and no summary names."""
    _, epoch, key = validation_choice(state["history"] + [row], method.deployed_keys())
    if epoch == row["epoch"]:
        state["deployable"] = {"output": key, "epoch": epoch,
                               "weights": cpu_state(method.deployable(key))}


def cpu_state(module) -> dict:
    """A state dict on the CPU, so that deployable.pt loads on a machine without a GPU."""
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}


def export_deployable(out_dir: str, state: dict) -> None:
    """deployable.pt from the checkpointed choice (--val-size), after the checkpoint is written."""
    if "deployable" in state:
        atomic_save(state["deployable"]["weights"], os.path.join(out_dir, "deployable.pt"))


def write_summary(args: argparse.Namespace, method, data, state: dict) -> dict:
    """summary.json, deployable.pt and deployable.pt2 (deploy.py); the data set (with its
    normalisation) and the image size are recorded for offline KD, which refuses a teacher made on
    another data set or for another size.

    The deployed model is chosen without looking at the test split: with --val-size, the output
    and epoch of the best validation accuracy, reported with its test accuracy, from the last
    checkpoint (`keep_if_best`); without, no selection at all: peer 0 at the final epoch. Beside
    it: the final-epoch mean over the deployed outputs (docs/spec.md Sec. 4) and the paper's
    convention, the best deployed output at its best epoch, which is selected on the test split and
    labelled so. summary.json is written last: a run stopped between the files has none, and
    --resume writes all three again from its checkpoint."""
    history, keys = state["history"], method.deployed_keys()
    final = history[-1]
    evaluated = [row for row in history if "acc_deployed_mean" in row]
    best_value, best_epoch, best_key = max((row[f"acc_{k}"], row["epoch"], k)
                                           for row in evaluated for k in keys)
    if "val_acc_deployed_mean" in final:
        val_value, epoch, key = validation_choice(history, keys)
        test_value = next(row for row in history if row["epoch"] == epoch)[f"acc_{key}"]
        selection = {"on": "validation split", "output": key, "epoch": epoch, "val_acc": val_value,
                     "test_acc": test_value}
        weights = state["deployable"]["weights"]  # the same choice, from the last checkpoint
    else:
        key = keys[0]
        weights = cpu_state(method.deployable(key))
        # No selection: the first deployed output at the final epoch.
        selection = {"on": "none (--val-size 0)",
                     "output": key, "epoch": final["epoch"], "test_acc": final[f"acc_{key}"]}
    atomic_save(weights, os.path.join(args.out_dir, "deployable.pt"))
    deployable = {"file": "deployable.pt", "output": key, "epoch": selection["epoch"],
                  "arch": args.arch, "num_classes": data.num_classes,
                  "image_size": data.image_shape[-1], "dataset": data.name,
                  "mean": list(data.mean), "std": list(data.std),
                  "load": "models.build_deployable(arch, num_classes); "
                          "inputs normalised by mean, std"}
    classes = list(data.classes) or [str(label) for label in range(data.num_classes)]
    deployable["program"] = write_program(args.out_dir, weights, deployable, args.precision,
                                          classes)
    summary = {
        "method": args.method, "dataset": args.dataset, "arch": args.arch, "epochs": args.epochs,
        "final": {k: v for k, v in final.items() if k.startswith("acc_")},
        "best": {k[4:]: max(row[k] for row in evaluated) for k in final if k.startswith("acc_")},
        "headline_final_deployed_mean": final["acc_deployed_mean"],
        "selection": selection,
        "paper_convention_best_peer_best_epoch": {"acc": best_value, "epoch": best_epoch,
                                                  "output": best_key, "selected_on": "test split"},
        "deployable": deployable,
        "summed_term_weights": summed_term_weights(history),
        "train_seconds": sum(row["epoch_seconds"] for row in history),
        "test_images": len(data.test_labels),  # the accuracies' denominator (binomial error)
    }
    write_json(summary, os.path.join(args.out_dir, "summary.json"))
    return summary


def summed_term_weights(history: list[dict]) -> dict[str, float]:
    """Each distillation term's weight summed over the run's epochs (metrics.csv's weight_<term>):
    how much the term acted, at a glance (L_de at ~0.02 of L_dk's sum would train as DK)."""
    terms = [k for k in history[-1] if k.startswith("weight_")]
    return {k[len("weight_"):]: sum(row.get(k, 0.0) for row in history) for k in terms}


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
    lines += [f"{k[4:]:<22} {v:>7.2f} {summary['best'][k[4:]]:>7.2f}"
              for k, v in summary["final"].items()]
    best, chosen = summary["paper_convention_best_peer_best_epoch"], summary["selection"]
    lines.append(f"deployed model, one network: {chosen['output']} at epoch {chosen['epoch']} "
                 f"(selected on: {chosen['on']}): test {chosen['test_acc']:.2f}%")
    if chosen["on"] == "validation split":
        lines.append(f"headline (the deployed model): {headline(summary):.2f}%")
    else:
        lines.append(f"headline (deployed_mean at the final epoch; pcl/dk/pcl_de/dkel: the teacher "
                     f"peers' mean): {headline(summary):.2f}%")
    lines.append(f"paper's convention (best deployed output at its best epoch, selected on the "
                 f"test split): {best['acc']:.2f}% ({best['output']}, epoch {best['epoch']})")
    summed = summary.get("summed_term_weights")
    if summed:
        lines.append(f"each distillation term's weight summed over the {summary['epochs']} epochs: "
                     + ", ".join(f"{term} {value:.3g}" for term, value in summed.items()))
    return "\n".join(lines)


def epoch_line(row: dict, epochs: int, history: list[dict], schedules: tuple[str, ...]) -> str:
    """One finished epoch for the terminal: lr, the epoch weights the method uses, the loss parts,
    train accuracy, the test accuracy of deployed_mean (the mean over the outputs that could be
    deployed, the summary table's row of that name; the deployed model is one of them), speed and
    the time left."""
    seconds = sum(r["epoch_seconds"] for r in history) / len(history)
    weights = "".join(f" {'r' if name == 'rampup' else name}={row[name]:.3f}" for name in schedules)
    weights += "".join(f" {k}={v:.3g}" for k, v in row.items() if k.startswith("weight_"))
    names = ("loss", "ce", "ce_ensemble", "ce_leader", "pe", "pm", "dk", "de", "kd", "kd_leader")
    losses = " ".join(f"{k}={row[k]:.3f}" for k in names if k in row)
    test = (f" | test deployed_mean {row['acc_deployed_mean']:.2f}%" if "acc_deployed_mean" in row
            else "")
    return (f"epoch {row['epoch']}/{epochs} lr={row['lr']:.4g}{weights} {losses} "
            f"train {row['train_acc']:.2f}%{test} | {row['images_per_s']:.0f} img/s, "
            f"ETA {(epochs - row['epoch']) * seconds / 60:.1f} min")


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures go to files, no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# metrics.csv columns that are not loss parts (everything else in a row is one).
NOT_LOSSES = {"epoch", "lr", "w", "rampup", "logit_norm", "train_acc", "epoch_seconds",
              "images_per_s", "weight_pe", "weight_pm", "weight_dk", "weight_de"}


# (line style, marker) of a panel's lines in turn: lines that coincide (three student peers at
# 100%, a baseline's loss and its cross-entropy) stay apart by their style and hollow marker.
LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "v"), ("-", "D"), ("--", "x"),
               (":", "P"), ("-.", "*"))


def line_style(index: int, points: int) -> dict:
    """The `index`-th line of a panel of `points` epochs: its style, a hollow marker whose size
    falls with the index (coinciding markers nest), on every epoch or about 15 of them."""
    linestyle, marker = LINE_STYLES[index % len(LINE_STYLES)]
    return {"linestyle": linestyle, "marker": marker, "fillstyle": "none",
            "markersize": 10 - 2 * (index % 4), "markevery": max(1, points // 15)}


def draw_curves(path: str, history: list[dict]) -> None:
    """Four panels against the epoch (integer ticks, a marker per epoch in short runs):
    accuracies, loss parts, w(ep) and r(ep), and the learning rate each epoch trained with."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    epochs, points = [row["epoch"] for row in history], len(history)
    evaluated = [row for row in history if "acc_deployed_mean" in row]
    last = evaluated[-1] if evaluated else {}  # --eval-every: the last epoch evaluated so far
    peers = [k for k in last if k.startswith("acc_student_peer")]
    tested = (["acc_deployed_mean"] if last else []) + peers
    # Test accuracy: deployed_mean bold black, below the student peers' thin lines.
    for index, key in enumerate(tested):
        colour = {"color": "black", "linewidth": 2.5} if key == "acc_deployed_mean" else {}
        axes[0, 0].plot([r["epoch"] for r in evaluated], [r[key] for r in evaluated],
                        label=f"test {key[4:]}", **colour, **line_style(index, len(evaluated)))
    axes[0, 0].plot(epochs, [r["train_acc"] for r in history], color="grey",
                    label="train (student)", **line_style(len(tested), points))
    losses = [k for k in history[-1] if k not in NOT_LOSSES and not k.startswith("acc_")]
    for index, key in enumerate(losses):
        axes[0, 1].plot(epochs, [r[key] for r in history], label=key, **line_style(index, points))
    weights = [(k, label) for k, label in (("w", "w(ep), Eq. (11)/(13)/(14)"),
                                           ("rampup", "r(ep), ramp-up")) if k in history[-1]]
    for index, (key, label) in enumerate(weights):
        axes[1, 0].plot(epochs, [r[key] for r in history], label=label,
                        **line_style(index, points))
    # The rate an epoch trained with, level across that epoch's tick (metrics.csv's lr).
    axes[1, 1].plot(epochs, [r["lr"] for r in history], drawstyle="steps-mid",
                    label="learning rate of the epoch", **line_style(0, points))
    axes[1, 1].set_yscale("log")
    titles = ("accuracy (%)", "loss parts (epoch means)", "epoch weights", "lr")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower left" if title == "lr" else "best")  # lr only falls
    axes[1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # shared by every panel
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_write(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


# Ours: drawing curves.png took about 0.4 s on the 2-core CPU, a share of the epoch's time outside
# its steps (docs/performance.md); every 10 epochs keeps it current enough.
CURVES_EVERY = 10


def plot_curves(out_dir: str, history: list[dict]) -> None:
    """Refresh curves.png in the run directory. A picture is a convenience: a failure to draw is
    reported on one line and never stops the run. Rank 0 alone draws it (`writes_files`)."""
    if not writes_files():
        return
    try:
        draw_curves(os.path.join(out_dir, "curves.png"), history)
    except Exception as error:  # matplotlib missing or broken, a full disk: the run goes on
        print(f"warning: curves.png not drawn ({type(error).__name__}: {error})", file=sys.stderr)


def epoch_means(totals: dict, num_batches: int) -> dict[str, float]:
    """The epoch's logged sums (on the device) as means per step; the share of correct
    predictions becomes the train accuracy (%). Reading them is the epoch's host sync."""
    means = {name: value.item() / num_batches for name, value in totals.items()}
    means["train_acc"] = 100.0 * means.pop("correct")
    return means


def end_of_epoch(out_dir: str, row: dict, history: list[dict], epochs: int,
                 schedules: tuple[str, ...]) -> None:
    """The epoch line printed; curves.png redrawn every CURVES_EVERY epochs and after the last
    (the whole history each time, so the last figure is the one an every-epoch redraw leaves)."""
    if len(history) % CURVES_EVERY == 0 or len(history) == epochs:
        plot_curves(out_dir, history)
    print(epoch_line(row, epochs, history, schedules), flush=True)


def warn_if_teacher_lags(method, steps_per_epoch: int, epochs: int) -> None:
    """One line on stderr when the run is too short for its EMA teacher (`ema_lag_warning`); a
    method without one (offline KD's teacher is frozen) has nothing to warn about."""
    teacher = getattr(method, "teacher", None)
    if not isinstance(teacher, EMATeacher):
        return
    lag = ema_lag_warning(teacher.ema_decay, steps_per_epoch, epochs)
    if lag:
        print(f"warning: {lag}", file=sys.stderr)


def ema_lag_warning(ema_decay: float, steps_per_epoch: int, epochs: int) -> str | None:
    """A warning when a run is too short for its EMA teacher, None otherwise.

    By Eq. (5), after S steps the teacher still holds alpha^S = exp(-S / tau) of its starting
    weights, tau = 1 / (1 - alpha) being its time constant, the number of steps by which it lags the
    student. The rule: warn when the time constant is longer than the whole run (tau > S), so that
    more than e^-1 = 37% of the final teacher, the deployed model, is still its start. The suggested
    alpha is the largest of four decimals that the rule accepts."""
    steps = steps_per_epoch * epochs
    if steps * (1.0 - ema_decay) > 1.0 - 1e-9:  # tau <= S, up to the rounding of alpha's decimals
        return None
    time_constant = math.inf if ema_decay == 1.0 else 1.0 / (1.0 - ema_decay)
    fitting = math.floor(1e4 * (steps - 1) / steps) / 1e4  # 1 - 1/S, rounded down
    return (f"the teacher will lag: its EMA time constant 1/(1 - {ema_decay}) is {time_constant:,.0f} "
            f"optimizer steps, longer than this run's {steps:,}, so {ema_decay ** steps:.0%} of the final "
            f"teacher is still its starting weights; --ema-decay {fitting:g} or lower fits the run")
