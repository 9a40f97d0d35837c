"""The paper's Tables 1-4, Fig. 6 and Fig. 7 from runs of train.py, one `--experiment` each: a grid
of runs (data sets x networks x methods x settings x seeds), each in its own directory
<runs-dir>/<dataset>_<arch>_<method>[_<setting>]_seed<seed>. compare.py trains the unfinished ones
in turn (or, with `--gpus`, one per GPU at a time), then writes <runs-dir>/<experiment>_<datasets>.md
-- each run's honest figure (rundir.headline), mean +- std over seeds, the paper's number in
brackets, the paper's best-epoch convention, every missing or failed run -- and a PNG. `--read-only`
trains nothing, `--list` prints the grid, `--cell I` trains its I-th run (a SLURM array task)."""
import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import queue
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import rundir
import train
from backbones import ARCHS
from data import DATASETS
from losses import DECAYS
from rundir import pyplot
from train import METHODS

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
CIFAR = ("cifar10", "cifar100")

# SPEC.md Sec. 9 (paper Tables 1-4, Fig. 6): (mean, std) top-1 %, std None where the paper gives none.
_T1_COLUMNS = ("dml", "cl", "one", "okddip", "kdcl", "pcl", "baseline", "dkel")
_T2_COLUMNS = ("baseline", "kd", "dml", "okddip", "kdcl", "pcl", "dkel")  # Table 2's rows
_T12 = {
    "cifar10": {
        "resnet32": "93.94 .07 94.02 .28 94.20 .12 94.17 .15 94.01 .08 94.33 .06 93.26 .15 94.56 .06",
        "resnet110": "94.53 .25 95.19 .11 95.16 .30 95.14 .10 95.11 .16 95.47 .05 94.69 .10 95.63 .15",
        "vgg16": "94.13 .07 94.14 .15 94.14 .23 93.98 .06 94.09 .12 94.28 .44 93.96 .13 94.89 .10",
        "densenet40_12": "93.59 .26 93.05 .25 93.08 .21 92.64 .22 93.87 .08 93.71 .25 93.19 .02 94.23 .08",
        "wrn20_8": "95.20 .13 94.59 .08 94.70 .14 94.83 .15 95.27 .16 95.42 .05 94.68 .01 95.53 .06",
    },
    "cifar100": {
        "resnet32": "73.68 .14 72.33 .46 73.79 .41 73.25 .38 73.76 .34 74.14 .05 71.28 .19 74.83 .12",
        "resnet110": "77.86 .50 78.83 .58 78.40 .36 78.54 .26 78.28 .32 79.59 .38 76.21 .57 80.01 .32",
        "vgg16": "75.52 .10 74.33 .08 74.37 .39 74.68 .05 75.67 .22 76.96 .03 74.32 .19 77.20 .12",
        "densenet40_12": "72.60 .31 71.45 .34 71.60 .38 71.23 .14 72.52 .42 72.38 .53 71.03 .15 72.78 .18",
        "wrn20_8": "79.77 .07 79.40 .12 79.10 .39 78.83 .06 79.37 .30 80.71 .22 78.03 .40 80.80 .27",
    },
    "tinyimagenet": {  # Table 2, columns _T2_COLUMNS
        "resnet18": "51.43 .03 53.25 .07 53.84 .04 52.61 .07 53.91 .04 64.23 .08 64.33 .07",
        "resnet34": "51.34 .01 53.70 .06 54.02 .13 56.82 .03 53.36 .02 64.62 .09 64.66 .09",
    },
}
# Table 4 as printed (VGG-16 C10, C100, DenseNet-40-12 C10, C100), its beta column lost.
_T4 = ("94.62 76.87 93.95 73.36", "94.25 76.73 93.97 73.21", "94.59 76.74 93.85 72.82",
       "94.89 77.20 94.23 72.78", "94.79 76.76 93.64 72.75")


def paper_numbers() -> dict[tuple[str, str, str, str], tuple[float, float | None]]:
    """(dataset, arch, method, setting tag) -> (mean, std) of the paper's Tables 1-4 and Fig. 6."""
    table = {}
    for dataset, rows in _T12.items():
        for arch, cells in rows.items():
            values = [float(v) for v in cells.split()]
            for k, method in enumerate(_T2_COLUMNS if dataset == "tinyimagenet" else _T1_COLUMNS):
                table[dataset, arch, method, ""] = (values[2 * k], values[2 * k + 1])
    for dataset, arch in itertools.product(CIFAR, ("vgg16", "densenet40_12")):
        table[dataset, arch, "dkel", "beta0.5"] = table[dataset, arch, "dkel", ""]  # Table 4, row 4
    quoted = (("cifar10", "dk", "", 94.54), ("cifar100", "dk", "", 74.67),          # Table 3, "+ L_dk"
              ("cifar10", "dkel", "k1", 94.56), ("cifar10", "dkel", "k10", 94.63),  # Fig. 6's text
              ("cifar100", "dkel", "k1", 74.83), ("cifar100", "dkel", "k5", 74.96))
    for dataset, method, tag, value in quoted:
        table[dataset, "resnet32", method, tag] = (value, None)
    return table


PAPER = paper_numbers()
BETA_HELP = ("table4's beta grid 0.05 0.1 0.2 0.5 2.5 (the paper's values were lost): Table 4's row 4 is "
             "Table 1's DKEL (beta 0.5, Sec. 4.2) and its DenseNet CIFAR-100 column falls row by row as the "
             "prose says smaller beta is better, so its rows are increasing betas, 0.5 fourth; the largest "
             "sends w(ep) below 0.01 (the authors' cut-off) after two epochs (w(2) = exp(-5)), the small "
             "ones after dozens (from epoch 24, 47, 93)")


def sweep(tag: str, name: str, flag: str, values) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """The settings of a sweep of one train.py flag: (run-directory tag, label, flags) per value."""
    return tuple((f"{tag}{v}", f"{name} = {v}", (flag, str(v))) for v in values)


class Experiment(NamedTuple):
    datasets: tuple[str, ...]
    archs: tuple[str, ...]
    methods: tuple[str, ...]
    settings: tuple[tuple[str, str, tuple[str, ...]], ...] = (("", "", ()),)  # (tag, label, flags)
    figure: str = "bars"    # bars: networks x methods; sweep: settings x networks; curves: Fig. 7


EXPERIMENTS = {
    "table1": Experiment(CIFAR, ("resnet32", "resnet110", "vgg16", "densenet40_12", "wrn20_8"),
                         tuple(m for m in METHODS if m != "kd")),
    "table2": Experiment(("tinyimagenet",), ("resnet18", "resnet34"), _T2_COLUMNS),
    "table3": Experiment(CIFAR, ("resnet32",), ("pcl", "dk", "dkel")),
    # NOTE(paper): Table 4's beta values were lost from the paper's text; BETA_HELP says how ours were chosen.
    "table4": Experiment(CIFAR, ("vgg16", "densenet40_12"), ("dkel",),
                         sweep("beta", "β", "--beta", (0.05, 0.1, 0.2, 0.5, 2.5)), "sweep"),
    "fig6": Experiment(CIFAR, ("resnet32", "densenet40_12"), ("dkel",),         # k of Sec. 3.3
                       sweep("k", "k", "--init-iters", (1, 2, 5, 10, 20)), "sweep"),
    # NOTE(paper): Fig. 7's data set is not named in the text; both CIFAR sets are drawn.
    "fig7": Experiment(CIFAR, ("resnet32",), ("dkel",), sweep("decay", "decay", "--decay", DECAYS), "curves"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The paper's tables and figures (Sec. 4.3) from train.py runs; "
                                            "arguments after -- are passed to every train.py run.",
                                epilog="small scale on a CPU, with an EMA decay fit for 78 steps: compare.py "
                                       "--dataset synthetic --archs resnet8 --epochs 2 -- --ema-decay 0.7")
    a = p.add_argument
    a("--experiment", default="table1", choices=list(EXPERIMENTS),
      help="table1: Table 1 (C10/100, five networks, every online method); table2: TinyImageNet with KD; "
           "table3: the ablation (pcl, dk, dkel); table4: DKEL's beta sensitivity, vgg16 and densenet40_12; "
           "fig6: initialisation iterations k = 1 2 5 10 20; fig7: the exp/cos/linear decays against the "
           f"epoch (resnet32). {BETA_HELP}")
    a("--dataset", nargs="+", choices=DATASETS, help="data sets (default: the experiment's)")
    a("--archs", nargs="+", choices=list(ARCHS), help="networks (default: the experiment's)")
    a("--methods", nargs="+", choices=list(METHODS), help="methods (default: the experiment's, paper order)")
    a("--kd-teacher-arch", choices=list(ARCHS), help="kd's teacher: the baseline run of this network "
      "(default: the student's; the paper does not say which teacher its KD row used, Table 2)")
    a("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every cell (mean +- std over them)")
    a("--epochs", type=int, help="epochs of every run (default: train.py's, the paper's 300 / 100)")
    a("--runs-dir", default="runs", help="where the runs and the tables live")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--read-only", action="store_true",
                      help="train nothing: tabulate the finished runs, list the others as missing")
    mode.add_argument("--list", action="store_true", help="print the grid, one train.py command per line")
    mode.add_argument("--cell", type=int, metavar="I",
                      help="train only the I-th run of --list (0-based; e.g. $SLURM_ARRAY_TASK_ID)")
    mode.add_argument("--gpus", nargs="+", metavar="ID",
                      help="train in parallel, one run at a time per listed GPU (CUDA_VISIBLE_DEVICES)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options over the experiment's defaults, `train_args` after --; bad input: one line, exit 2."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    args.train_args = argv[split + 1:]
    experiment = EXPERIMENTS[args.experiment]
    args.dataset = args.dataset or list(experiment.datasets)
    args.archs = args.archs or list(experiment.archs)
    args.methods = args.methods or list(experiment.methods)
    args.settings, args.figure = experiment.settings, experiment.figure
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    return args


# ----------------------------------------------------------------------------- the grid of runs
class Run(NamedTuple):
    dataset: str
    arch: str
    method: str
    tag: str                     # the setting: "", "beta0.5", "k5", "decaycos"
    flags: tuple[str, ...]       # train.py's flags of the setting
    seed: int
    teacher: "Run | None" = None  # kd: the finished baseline run whose deployed model teaches

    def key(self) -> tuple[str, str, str, str]:
        return self.dataset, self.arch, self.method, self.tag


def run_dir(args, run: Run) -> str:
    """<runs-dir>/<dataset>_<arch>_<method>[_<setting>][_teacher-<arch>]_seed<seed>."""
    parts = [run.dataset, run.arch, run.method, run.tag, run.teacher and f"teacher-{run.teacher.arch}"]
    return os.path.join(args.runs_dir, "_".join(p for p in parts if p) + f"_seed{run.seed}")


def grid(args) -> list[Run]:
    """Every run of the experiment, in the order of --list; a kd run's teacher run comes before it."""
    runs = []
    for dataset, arch, method, (tag, _, flags), seed in itertools.product(
            args.dataset, args.archs, args.methods, args.settings, args.seeds):
        teacher = Run(dataset, args.kd_teacher_arch or arch, "baseline", "", (), seed)
        new = [teacher, Run(dataset, arch, method, tag, flags, seed, teacher)] if method == "kd" else \
            [Run(dataset, arch, method, tag, flags, seed)]
        runs += [run for run in new if run not in runs]
    return runs


def command(args, run: Run, *extra: str) -> list[str]:
    """train.py's arguments for `run`; the pass-through arguments come last, so they win."""
    argv = ["--dataset", run.dataset, "--arch", run.arch, "--method", run.method, "--seed", str(run.seed),
            "--out-dir", run_dir(args, run), *run.flags]
    argv += ["--epochs", str(args.epochs)] if args.epochs else []
    argv += ["--teacher-run", run_dir(args, run.teacher)] if run.teacher else []
    return [*argv, *extra, *args.train_args]


def finished(args, run: Run) -> bool:
    return os.path.exists(os.path.join(run_dir(args, run), "summary.json"))


def launch_argv(args, run: Run) -> list[str]:
    """The command that trains `run` now: resumed from its checkpoint if it has one, on CUDA with --gpus."""
    extra = ["--resume"] if os.path.exists(os.path.join(run_dir(args, run), "checkpoint.pt")) else []
    return command(args, run, *extra, *(["--device", "cuda"] if args.gpus else []))


# ----------------------------------------------------------------------------- training the grid
def train_in_process(argv: list[str]) -> int:
    """One train.py run in this process; its exit code."""
    print(f"== train.py {shlex.join(argv)}", flush=True)
    try:
        return train.main(argv)
    except SystemExit as exit_info:  # argparse rejected the arguments
        return exit_info.code


def launch_on_gpu(argv: list[str], gpu: str) -> int:
    """One train.py child process that sees GPU `gpu` alone, its output in the run's train.log."""
    out_dir = argv[argv.index("--out-dir") + 1]
    os.makedirs(out_dir, exist_ok=True)
    print(f"== GPU {gpu}: train.py {shlex.join(argv)}", flush=True)
    with open(os.path.join(out_dir, "train.log"), "a") as log:
        return subprocess.run([sys.executable, TRAIN_PY, *argv], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}).returncode


def train_parallel(argvs: list[list[str]], gpus: list[str]) -> list[int]:
    """The runs in parallel, one at a time per GPU: a worker takes a free GPU, runs, gives it back."""
    free = queue.Queue()
    for gpu in gpus:
        free.put(gpu)

    def on_a_free_gpu(argv: list[str]) -> int:
        gpu = free.get()
        try:
            return launch_on_gpu(argv, gpu)
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(len(gpus)) as pool:
        return list(pool.map(on_a_free_gpu, argvs))


def train_missing(args, runs: list[Run]) -> dict[Run, str]:
    """Train (or resume) every unfinished run (--gpus: in parallel), kd runs last; the failures."""
    failed = {}
    for wave in ([r for r in runs if r.teacher is None], [r for r in runs if r.teacher is not None]):
        todo = [run for run in wave if not finished(args, run)]
        argvs = [launch_argv(args, run) for run in todo]
        codes = train_parallel(argvs, args.gpus) if args.gpus else [train_in_process(a) for a in argvs]
        failed.update({run: f"failed (exit code {code})" for run, code in zip(todo, codes) if code != 0})
    return failed


def train_cell(args, runs: list[Run]) -> int:
    """--cell I: train the I-th run of the grid alone (nothing if it has finished); its exit code."""
    if not 0 <= args.cell < len(runs):
        print(f"error: --cell {args.cell} is outside the grid's runs 0..{len(runs) - 1}", file=sys.stderr)
        return 2
    run = runs[args.cell]
    if finished(args, run):
        print(f"{run_dir(args, run)} has finished; nothing to train")
        return 0
    return train_in_process(launch_argv(args, run))


# ----------------------------------------------------------------------------- tables
def collect(args, runs: list[Run], failed: dict[Run, str]) -> tuple[dict, list[str]]:
    """Run key -> {"final": [...], "best": [...]} over the finished seeds; the others by directory."""
    results, problems = {}, []
    for run in runs:
        path = os.path.join(run_dir(args, run), "summary.json")
        if not os.path.exists(path):
            problems.append(f"{run_dir(args, run)}: {failed.get(run, 'missing')}")
            continue
        with open(path) as f:
            summary = json.load(f)
        entry = results.setdefault(run.key(), {"final": [], "best": []})
        entry["final"].append(rundir.headline(summary))
        entry["best"].append(summary["paper_convention_best_peer_best_epoch"]["acc"])
    return results, problems


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"


def layout(args):
    """Corner label, rows and columns ((id, label) each), a cell's run key. Tables 1-3: a row per data
    set and network, a column per method; Table 4, Figs. 6-7: a row per setting (as the paper's)."""
    if args.figure == "bars":
        rows = [((d, a), f"{d} {a}") for d, a in itertools.product(args.dataset, args.archs)]
        columns = [(m, METHODS[m].label) for m in args.methods]
        return "network", rows, columns, lambda row, col: (*row, col, "")
    rows = [(tag, label) for tag, label, _ in args.settings]
    columns = [((d, a, m), f"{a} {d}" + (f" {METHODS[m].label}" if len(args.methods) > 1 else ""))
               for a, d, m in itertools.product(args.archs, args.dataset, args.methods)]
    return "setting", rows, columns, lambda row, col: (*col, row)


NOTES = {
    "table3": "Table 3's +L_de row (PCL's teacher with the decaying ensemble, not trained here): "
              "94.35 (CIFAR-10) / 74.64 (CIFAR-100), not reproduced; the other rows are PCL, dk, dkel.",
    "fig6": "Fig. 6 prints no numbers; the bracketed ones are quoted in its text (ResNet-32).",
    "fig7": "Fig. 7 prints no numbers: exp is best at almost every epoch, cos worst (late overfitting).",
}


def notes(args) -> list[str]:
    """What the experiment's table needs said beneath it."""
    if args.experiment in NOTES:
        return [NOTES[args.experiment], ""]
    if args.experiment == "table2" and "kd" in args.methods:
        return ["KD: CE + λ·r(ep)·L_kd of Eq. (1) from the frozen deployed model of the baseline run of "
                f"{args.kd_teacher_arch or 'the same network'}, same seed. NOTE(paper): the paper does not "
                "name its KD row's teacher (`--kd-teacher-arch` picks another).", ""]
    if args.experiment == "table4":
        rows = [f"| {i} | " + " | ".join(r.split()) + " |" for i, r in enumerate(_T4, 1)]
        return ["## The paper's Table 4, rows in their printed order (its β values were lost from the text)",
                "", "| paper's row | vgg16 cifar10 | vgg16 cifar100 | densenet40_12 cifar10 | densenet40_12 "
                "cifar100 |", "|---|---|---|---|---|", *rows, "", f"NOTE(paper): {BETA_HELP}.", ""]
    return []


def markdown(args, results: dict, problems: list[str]) -> str:
    corner, rows, columns, key = layout(args)
    lines = [f"# {args.experiment}: top-1 % of the deployed model, mean ± std over seeds {args.seeds}", ""]
    for stat, title in (("final", "Final epoch (this project's headline; SPEC.md Sec. 4)"),
                        ("best", "Paper's convention: best deployed output at its best test epoch")):
        lines += [f"## {title}", "", "ours (the paper's number in brackets; SPEC.md Sec. 9)", "",
                  f"| {corner} | " + " | ".join(label for _, label in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for row, row_label in rows:
            cells = []
            for col, _ in columns:
                ours = results.get(key(row, col))
                text = cell(*mean_std(ours[stat])) + f" (n={len(ours[stat])})" if ours else "—"
                cells.append(text + (f" ({cell(*PAPER[key(row, col)])})" if key(row, col) in PAPER else ""))
            lines.append(f"| {row_label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += notes(args) + ["## Missing or failed runs", ""] + ([f"- {p}" for p in problems] or ["none"])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
@contextlib.contextmanager
def panels(path: str, count: int, width: float):
    """A figure of `count` side-by-side panels (their axes), saved to `path` at the end."""
    plt = pyplot()
    fig, axes = plt.subplots(1, count, figsize=(max(7.0, width * count), 4.5), squeeze=False)
    yield axes[0]
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bar_chart(args, results: dict, path: str) -> None:
    """One panel per data set. Tables 1-3: the methods' bars grouped by network; Table 4 and Fig. 6:
    the networks' bars grouped by setting (Fig. 6's wheat and salmon). Black marks: the paper."""
    if args.figure == "bars":
        groups, series = [(a, a) for a in args.archs], [(m, METHODS[m].label) for m in args.methods]
        colours, key = [f"C{k}" for k in range(10)], lambda d, g, s: (d, g, s, "")
    else:
        groups = [(tag, label) for tag, label, _ in args.settings]
        series = [((a, m), a + (f" {METHODS[m].label}" if len(args.methods) > 1 else ""))
                  for a, m in itertools.product(args.archs, args.methods)]
        colours, key = ["wheat", "salmon"] + [f"C{k}" for k in range(10)], lambda d, g, s: (d, *s, g)
    width = 0.8 / len(series)
    with panels(path, len(args.dataset), 2.0 + 0.5 * len(groups) * len(series)) as axes:
        for ax, dataset in zip(axes, args.dataset):
            for k, (s, label) in enumerate(series):
                xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
                runs = [results.get(key(dataset, g, s), {"final": []})["final"] for g, _ in groups]
                stats = [mean_std(finals) if finals else (math.nan, None) for finals in runs]
                ax.bar(xs, [m for m, _ in stats], width, yerr=[sd or math.nan for _, sd in stats], capsize=2,
                       label=label, color=colours[k % len(colours)], edgecolor="grey")
                ax.plot(xs, [PAPER.get(key(dataset, g, s), (math.nan,))[0] for g, _ in groups], "k_",
                        markersize=10, markeredgewidth=2)
            finals = [v for (g, _), (s, _) in itertools.product(groups, series)
                      for v in results.get(key(dataset, g, s), {"final": []})["final"]]
            if finals:  # the bars' tops, not their feet: accuracies differ by tenths of a point
                ax.set_ylim(max(0.0, min(finals) - 5.0), min(100.0, max(finals) + 3.0))
            ax.set_xticks(range(len(groups)), [label for _, label in groups])
            ax.set_title(dataset, fontsize=10)
        axes[0].plot([], [], "k_", markersize=10, markeredgewidth=2, label="paper")
        axes[0].set_ylabel(f"deployed model's final top-1 %\n(mean ± std over seeds {args.seeds})")
        axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def deployed_curve(out_dir: str) -> dict[int, float]:
    """Epoch -> the deployed model's test accuracy, from a finished run's metrics.csv."""
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return {int(r["epoch"]): float(r["acc_deployed_mean"]) for r in csv.DictReader(f)
                if r.get("acc_deployed_mean")}


def curve_chart(args, runs: list[Run], path: str) -> None:
    """Fig. 7: the deployed model's test accuracy against the epoch, one line per setting (decay),
    the mean over the seeds that reached the epoch; one panel per data set and network."""
    panel_keys = list(itertools.product(args.dataset, args.archs, args.methods))
    with panels(path, len(panel_keys), 5.0) as axes:
        for ax, panel in zip(axes, panel_keys):
            for i, (tag, label, _) in enumerate(args.settings):
                curves = [deployed_curve(run_dir(args, r)) for r in runs
                          if r.key() == (*panel, tag) and finished(args, r)]
                epochs = sorted(set().union(*curves))
                means = [statistics.fmean(c[e] for c in curves if e in c) for e in epochs]
                ax.plot(epochs, means, ("-", "--", ":")[i % 3], marker="o", label=label)  # overlaps show
            ax.set(title=" ".join(panel), xlabel="epoch")
            ax.legend(fontsize=8)
        axes[0].set_ylabel(f"test top-1 % of the deployed model\n(mean over seeds {args.seeds})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = grid(args)
    if args.list:
        print("\n".join(shlex.join(["python", "train.py", *command(args, run)]) for run in runs))
        return 0
    if args.cell is not None:
        return train_cell(args, runs)
    failed = {} if args.read_only else train_missing(args, runs)
    results, problems = collect(args, runs, failed)
    os.makedirs(args.runs_dir, exist_ok=True)
    base = os.path.join(args.runs_dir, f"{args.experiment}_{'_'.join(args.dataset)}")
    text = markdown(args, results, problems)
    with open(f"{base}.md", "w") as f:
        f.write(text)
    if args.figure == "curves":
        curve_chart(args, runs, f"{base}.png")
    else:
        bar_chart(args, results, f"{base}.png")
    print(text)
    print(f"wrote {base}.md and {base}.png")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
