"""The paper's Tables 1-4, Fig. 6 and Fig. 7 from runs of train.py, one `--experiment` each: a
grid of runs (data sets x networks x methods x settings x seeds), each in its own directory
<runs-dir>/<dataset>_<arch>_<method>[_<setting>]_seed<seed>. compare.py trains the unfinished
ones in turn (or, with `--gpus`, `--runs-per-gpu` at a time on each GPU), then writes
<runs-dir>/<experiment>_<datasets>.md -- each run's honest figure (report.headline), mean +- std
over seeds, the paper's number in brackets (docs/paper_results.csv), the paper's best-epoch
convention, every missing or failed run -- and a PNG. `--read-only` trains nothing, `--list`
prints the grid, `--cell I` trains its I-th run (a SLURM array task).

This file is what the paper's tables and figures are and how they are drawn; the grid of runs
and their training (the runs made otherwise, `--retrain-mismatched`, `--gpus`, stop signals) are
infra/sweep.py's, and the statistics of each method against the baseline seed by seed are
infra/paired.py's."""
import sys

# Before any other import: this code needs Python 3.10 (`X | None` annotations, evaluated when the
# modules load); an older Python gets this line, not a traceback.
if sys.version_info < (3, 10):
    sys.stderr.write("error: compare.py needs Python 3.10 or newer, this is Python %d.%d; run it "
                     "with a newer python (README, Quick start)\n" % sys.version_info[:2])
    sys.exit(2)

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import statistics
from typing import NamedTuple

from backbones import ARCHS
from cli import METHODS, HelpFormatter, Parser
from data import DATASETS
from losses import DECAYS
# The machinery beyond the paper (infra/): the grid of runs, their records and the statistics.
from infra import paired, report, rundir, sweep
from infra.report import pyplot

CIFAR = ("cifar10", "cifar100")

# The paper's Tables 1-4 and the numbers Fig. 6's text quotes (top-1 %), beside docs/spec.md.
PAPER_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs",
                             "paper_results.csv")
# Table 2's rows, in the paper's order.
TABLE2_METHODS = ("baseline", "kd", "dml", "okddip", "kdcl", "pcl", "dkel")


def paper_tables(path: str = PAPER_RESULTS) -> dict[str, list[dict[str, str]]]:
    """The paper's tables as docs/paper_results.csv prints them: table name -> its rows,
    column -> cell.

    Each block opens with its header row: table, dataset, network, then the table's columns in the
    paper's order (methods for Tables 1-2; Table 3's rows PCL, +L_dk, +L_de, both as pcl, dk, de,
    dkel; Table 4's printed rows 1-5, beta 0.05 to 1.0 in our reading (BETA_HELP); Fig. 6's k).
    A cell is "mean±std", the mean alone where the paper gives no std, empty where it gives no
    number."""
    tables, header = {}, []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if row and row[0] == "table":
                header = row
            elif row:
                tables.setdefault(row[0], []).append(dict(zip(header, row)))
    return tables


def paper_cell(text: str) -> tuple[float, float | None]:
    """'74.83±0.12' -> (74.83, 0.12); '74.67' -> (74.67, None)."""
    mean, _, std = text.partition("±")
    return float(mean), (float(std) if std else None)


def paper_numbers() -> dict[tuple[str, str, str, str], tuple[float, float | None]]:
    """(dataset, arch, method, setting tag) -> (mean, std) of the paper's Tables 1-4 and Fig. 6."""
    tables = paper_tables()
    numbers = {}
    for row in tables["table1"] + tables["table2"]:
        for method, text in list(row.items())[3:]:
            numbers[row["dataset"], row["network"], method, ""] = paper_cell(text)
    for row in tables["table3"]:  # its PCL and both-terms rows are Table 1's
        numbers[row["dataset"], row["network"], "dk", ""] = paper_cell(row["dk"])
        numbers[row["dataset"], row["network"], "pcl_de", ""] = paper_cell(row["de"])
    for row in tables["table4"]:  # its row 4 is Table 1's DKEL (beta 0.5, Sec. 4.2), std and all
        dkel = row["dataset"], row["network"], "dkel"
        numbers[(*dkel, "beta0.5")] = numbers[(*dkel, "")]
    for row in tables["fig6"]:    # Fig. 6 prints no numbers; its text quotes these
        for tag, text in list(row.items())[3:]:
            if text:
                numbers[row["dataset"], row["network"], "dkel", tag] = paper_cell(text)
    return numbers


PAPER_TABLES = paper_tables()
PAPER = paper_numbers()
BETA_HELP = ("table4's beta grid 0.05 0.1 0.2 0.5 1.0: the betas of the VGG-16 runs that the "
             "authors' run script run_cifar10.sh lists (0.05, 0.1, 0.2, 1.0 and their "
             "configured 0.5). "
             "Which row of Table 4 is which beta is our reading: increasing betas, 0.5 fourth, "
             "since its row 4 is Table 1's DKEL (beta 0.5, Sec. 4.2) and its DenseNet CIFAR-100 "
             "column falls row by row as the prose says smaller beta is better. w(ep) falls "
             "below 0.01 (the authors' cut-off) from epoch 5 at beta 1.0, from epoch 24, 47, 93 "
             "at 0.2, 0.1, 0.05")


def flag_sweep(tag: str, name: str, flag: str,
               values) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
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
                         tuple(m for m in METHODS if m not in ("kd", "pcl_de"))),
    "table2": Experiment(("tinyimagenet",), ("resnet18", "resnet34"), TABLE2_METHODS),
    "table3": Experiment(CIFAR, ("resnet32",), ("pcl", "dk", "pcl_de", "dkel")),
    # Table 4's betas are those of the authors' run scripts; NOTE(paper): which printed row is
    # which beta is our reading (BETA_HELP).
    "table4": Experiment(CIFAR, ("vgg16", "densenet40_12"), ("dkel",),
                         flag_sweep("beta", "β", "--beta", (0.05, 0.1, 0.2, 0.5, 1.0)), "sweep"),
    "fig6": Experiment(CIFAR, ("resnet32", "densenet40_12"), ("dkel",),         # k of Sec. 3.3
                       flag_sweep("k", "k", "--init-iters", (1, 2, 5, 10, 20)), "sweep"),
    # NOTE(paper): Fig. 7's data set is not named in the text; both CIFAR sets are drawn.
    "fig7": Experiment(CIFAR, ("resnet32",), ("dkel",),
                       flag_sweep("decay", "decay", "--decay", DECAYS), "curves"),
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="compare.py", formatter_class=HelpFormatter,
        description="The paper's tables and figures (Sec. 4.3) from train.py runs; "
                    "arguments after -- are passed to every train.py run.",
        epilog="small scale on a CPU, in a runs directory of its own, with an EMA decay fit for "
               "its 78 steps: compare.py --dataset synthetic --archs resnet8 --epochs 2 "
               "--runs-dir runs/small_ema0.7 -- --ema-decay 0.7")
    a = p.add_argument
    a("--experiment", default="table1", choices=list(EXPERIMENTS),
      help="table1: Table 1 (C10/100, five networks, every online method); "
           "table2: TinyImageNet with KD; table3: the ablation (pcl, dk, pcl_de, dkel); "
           "table4: DKEL's beta sensitivity, vgg16 and densenet40_12; "
           "fig6: initialisation iterations k = 1 2 5 10 20; "
           f"fig7: the exp/cos/linear decays against the epoch (resnet32). {BETA_HELP}")
    a("--dataset", nargs="+", choices=DATASETS, help="data sets (default: the experiment's)")
    a("--archs", nargs="+", choices=list(ARCHS), help="networks (default: the experiment's)")
    a("--methods", nargs="+", choices=list(METHODS),
      help="methods (default: the experiment's, paper order)")
    a("--kd-teacher-arch", choices=list(ARCHS),
      help="kd's teacher: the baseline run of this network (default: the student's; "
           "the paper does not say which teacher its KD row used, Table 2)")
    a("--seeds", nargs="+", type=int, default=[0, 1, 2],
      help="seeds of every cell (mean +- std over them)")
    a("--epochs", type=int, help="epochs of every run (default: train.py's, the paper's 300 / 100)")
    a("--runs-dir", default="runs",
      help="where the runs and the tables live; one per experiment protocol (--epochs, the flags "
           "after --): a run made with other settings is never tabulated")
    a("--paired-runs-dir", nargs="+", default=[], metavar="DIR",
      help="runs directories of the same data sets, networks, epochs and seeds whose methods "
           "are also compared with this grid's baseline, seed by seed (e.g. DKEL with a flag the "
           "baseline does not take); their runs are read as they are, their protocol unchecked")
    a("--retrain-mismatched", action="store_true",
      help="move each run of the grid made with other settings to <its directory>.mismatched-N "
           "and train it again (default: name them and train nothing)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--read-only", action="store_true",
                      help="train nothing: tabulate the finished runs, list the others as missing")
    mode.add_argument("--list", action="store_true",
                      help="print the grid, one train.py command per line")
    mode.add_argument("--cell", type=int, metavar="I",
                      help="train only the I-th run of --list (0-based; e.g. $SLURM_ARRAY_TASK_ID)")
    mode.add_argument("--gpus", nargs="+", metavar="ID",
                      help="train in parallel, one child process per run, each seeing one listed "
                           "GPU (CUDA_VISIBLE_DEVICES); list each GPU once")
    a("--runs-per-gpu", type=int, default=1, metavar="K",
      help="with --gpus: K runs at a time on each GPU (small CIFAR networks leave a large GPU "
           "mostly idle; each run holds its own copy of the data set on the GPU)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The options over the experiment's defaults, `train_args` after --.

    Bad input: one line, exit 2."""
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:split])
    args.train_args = argv[split + 1:]
    args.argv = argv  # the command that continues a stopped sweep
    experiment = EXPERIMENTS[args.experiment]
    args.dataset = args.dataset or list(experiment.datasets)
    args.archs = args.archs or list(experiment.archs)
    args.methods = args.methods or list(experiment.methods)
    args.settings = experiment.settings
    args.figure = experiment.figure
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.retrain_mismatched and (args.read_only or args.list):
        parser.error("--retrain-mismatched trains: not with --read-only or --list")
    check_gpus(parser, args)
    return args


def check_gpus(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--gpus names each GPU once (K runs at a time on each: --runs-per-gpu K)."""
    twice = sorted({gpu for gpu in args.gpus or [] if args.gpus.count(gpu) > 1})
    if twice:
        parser.error(f"--gpus lists GPU {' '.join(twice)} more than once; list each GPU once and "
                     f"give the runs at a time on each with --runs-per-gpu K")
    if args.runs_per_gpu < 1:
        parser.error(f"--runs-per-gpu must be at least 1, got {args.runs_per_gpu}")
    if args.runs_per_gpu > 1 and not args.gpus:
        parser.error("--runs-per-gpu is for --gpus (the runs without it go one at a time)")


# ----------------------------------------------------------------------------- tables
def collect(args, runs: list[sweep.Run],
            untabulated: dict[sweep.Run, str]) -> tuple[dict, list[str]]:
    """Run key -> {"final": [...], "best": [...], "runs": [run_record, ...]} over the finished
    seeds; the others (missing, or in `untabulated`: failed, made otherwise) by directory."""
    results, problems = {}, []
    for run in runs:
        out_dir = sweep.run_dir(args, run)
        if run in untabulated or not os.path.exists(os.path.join(out_dir, "summary.json")):
            problems.append(f"{out_dir}: {untabulated.get(run, 'missing')}")
            continue
        record = {"seed": run.seed}
        for name, figures in (("summary.json", summary_figures), ("metrics.csv", metrics_figures)):
            try:
                record.update(figures(out_dir))
            except (OSError, ValueError, LookupError, TypeError) as error:
                problems.append(f"{out_dir}: its {name} cannot be read ({type(error).__name__}); "
                                f"move the directory aside to train it again")
                break
        else:
            entry = results.setdefault(run.key(), {"final": [], "best": [], "runs": []})
            entry["final"].append(record["final"])
            entry["best"].append(record["best"])
            entry["runs"].append(record)
    return results, problems


def run_record(out_dir: str, seed: int) -> dict:
    """A finished run's figures (summary_figures, metrics_figures) and its seed."""
    return {"seed": seed, **summary_figures(out_dir), **metrics_figures(out_dir)}


def summary_figures(out_dir: str) -> dict:
    """From summary.json: the headline and the paper's convention; where the run recorded them, the
    student ensemble's final accuracy and the number of test images."""
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    return {"final": report.headline(summary),
            "best": summary["paper_convention_best_peer_best_epoch"]["acc"],
            "ensemble": summary.get("final", {}).get("acc_student_ensemble"),
            "test_images": summary.get("test_images")}


def metrics_figures(out_dir: str) -> dict:
    """From metrics.csv, where the run wrote them: the median images/s over the epochs and, after
    the ramp-up (r(ep) = 1), the lowest logit norm and test accuracy of the deployed model (the
    health check's collapse watch)."""
    path, figures = os.path.join(out_dir, "metrics.csv"), {}
    if not os.path.exists(path):
        return figures
    with open(path) as f:
        rows = list(csv.DictReader(f))
    speeds = [float(row["images_per_s"]) for row in rows if row.get("images_per_s")]
    if speeds:
        figures["images_per_s"] = statistics.median(speeds)
    ramped = [row for row in rows if row.get("rampup") and float(row["rampup"]) >= 1.0
              and row.get("logit_norm") and row.get("acc_deployed_mean")]
    if ramped:
        figures["lowest_logit_norm"] = min(float(row["logit_norm"]) for row in ramped)
        figures["lowest_acc"] = min(float(row["acc_deployed_mean"]) for row in ramped)
    return figures


def layout(args):
    """Corner label, rows and columns ((id, label) each), a cell's run key. Tables 1-3: a row per
    data set and network, a column per method; Table 4, Figs. 6-7: a row per setting (as the
    paper's)."""
    if args.figure == "bars":
        rows = [((d, a), f"{d} {a}") for d, a in itertools.product(args.dataset, args.archs)]
        columns = [(m, METHODS[m].label) for m in args.methods]
        return "network", rows, columns, lambda row, col: (*row, col, "")
    rows = [(tag, label) for tag, label, _ in args.settings]
    columns = []
    for a, d, m in itertools.product(args.archs, args.dataset, args.methods):
        method = f" {METHODS[m].label}" if len(args.methods) > 1 else ""
        columns.append(((d, a, m), f"{a} {d}{method}"))
    return "setting", rows, columns, lambda row, col: (*col, row)


NOTES = {
    "fig6": "Fig. 6 prints no numbers; the bracketed ones are quoted in its text (ResNet-32).",
    "fig7": "Fig. 7 prints no numbers: exp is best at almost every epoch, "
            "cos worst (late overfitting).",
}


def table3_note() -> str:
    """What Table 3's rows change besides their loss terms (docs/spec.md Sec. 2)."""
    return ("Table 3's rows: PCL (pcl), +L_dk (dk), +L_de (pcl_de: L_de on PCL's own peer mean "
            "teacher), +L_dk+L_de (dkel). The rows with L_dk also change the deployed network: PCL "
            "deploys the student's own trunk with an EMA branch, DK and DKEL a network that is an "
            "EMA all through (its own trunk).")


def table4_as_printed() -> list[str]:
    """The paper's Table 4 laid out as printed: a row per beta, a column per network and data
    set."""
    columns = PAPER_TABLES["table4"]     # paper_results.csv has a row per column of the paper's
    printed_rows = list(columns[0])[3:]  # row1 .. row5
    header = " | ".join(f"{column['network']} {column['dataset']}" for column in columns)
    lines = [f"| paper's row | {header} |", "|---|" + "---|" * len(columns)]
    for i, name in enumerate(printed_rows, 1):
        lines.append(f"| {i} | " + " | ".join(column[name] for column in columns) + " |")
    return lines


def notes(args) -> list[str]:
    """What the experiment's table needs said beneath it."""
    if args.experiment in NOTES:
        return [NOTES[args.experiment], ""]
    if args.experiment == "table3":
        return [table3_note(), ""]
    if args.experiment == "table2" and "kd" in args.methods:
        teacher = args.kd_teacher_arch or "the same network"
        return ["KD: CE + λ·r(ep)·L_kd of Eq. (1) from the frozen deployed model of the "
                f"baseline run of {teacher}, same seed. NOTE(paper): the paper does not name its "
                "KD row's teacher (`--kd-teacher-arch` picks another).", ""]
    if args.experiment == "table4":
        title = ("The paper's Table 4, rows in their printed order "
                 "(read as β = 0.05, 0.1, 0.2, 0.5, 1.0)")
        return [f"## {title}", "", *table4_as_printed(), "", f"NOTE(paper): {BETA_HELP}.", ""]
    return []


def table_cell(ours: dict | None, stat: str, paper: tuple[float, float | None] | None) -> str:
    """Our mean ± std over the seeds and their count ("—" before any finished), the paper's
    number in brackets where it has one."""
    text = f"{paired.cell(*paired.mean_std(ours[stat]))} (n={len(ours[stat])})" if ours else "—"
    return f"{text} ({paired.cell(*paper)})" if paper else text


def markdown(args, results: dict, problems: list[str]) -> str:
    corner, rows, columns, key = layout(args)
    title = f"{args.experiment}: top-1 % of the deployed model, mean ± std over seeds {args.seeds}"
    lines = [f"# {title}", ""]
    sections = (("final", "Final epoch (this project's headline; docs/spec.md Sec. 4)"),
                ("best", "Paper's convention: best deployed output at its best test epoch"))
    for stat, title in sections:
        lines += [f"## {title}", "",
                  "ours (the paper's number in brackets; docs/spec.md Sec. 9)", "",
                  f"| {corner} | " + " | ".join(label for _, label in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for row, row_label in rows:
            cells = [table_cell(results.get(key(row, col)), stat, PAPER.get(key(row, col)))
                     for col, _ in columns]
            lines.append(f"| {row_label} | " + " | ".join(cells) + " |")
        lines.append("")
    if compares_with_baseline(args):
        lines += paired.seed_by_seed(method_entries(args, results))
    lines += notes(args)
    lines += ["## Missing or failed runs", ""]
    lines += [f"- {problem}" for problem in problems] or ["none"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- seed by seed
# The section's statistics and text are infra/paired.py's; here, which runs it reads.
def compares_with_baseline(args) -> bool:
    """Tables 1-3 with the baseline and another method (or --paired-runs-dir)."""
    others = [m for m in args.methods if m != "baseline"] or args.paired_runs_dir
    return args.figure == "bars" and "baseline" in args.methods and bool(others)


def method_entries(args, results: dict) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(data set, network) -> method label -> its finished runs' records (run_record): this
    grid's methods, then those found in each --paired-runs-dir."""
    entries = {}
    for (dataset, arch, method, _), entry in results.items():
        entries.setdefault((dataset, arch), {})[METHODS[method].label] = entry["runs"]
    for runs_dir in args.paired_runs_dir:
        other = argparse.Namespace(runs_dir=runs_dir)
        name = os.path.basename(os.path.normpath(runs_dir))
        for dataset, arch, method in itertools.product(args.dataset, args.archs, METHODS):
            done = [run for run in (sweep.Run(dataset, arch, method, "", (), seed)
                                    for seed in args.seeds) if sweep.finished(other, run)]
            if method != "baseline" and done:
                records = [run_record(sweep.run_dir(other, run), run.seed) for run in done]
                label = f"{METHODS[method].label} ({name})"
                entries.setdefault((dataset, arch), {})[label] = records
    return entries


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
        groups = [(a, a) for a in args.archs]
        series = [(m, METHODS[m].label) for m in args.methods]
        colours = [f"C{k}" for k in range(10)]

        def key(dataset, group, one_series):
            return dataset, group, one_series, ""
    else:
        groups = [(tag, label) for tag, label, _ in args.settings]
        series = []
        for a, m in itertools.product(args.archs, args.methods):
            series.append(((a, m), a + (f" {METHODS[m].label}" if len(args.methods) > 1 else "")))
        colours = ["wheat", "salmon"] + [f"C{k}" for k in range(10)]

        def key(dataset, group, one_series):
            return dataset, *one_series, group
    width = 0.8 / len(series)
    with panels(path, len(args.dataset), 2.0 + 0.5 * len(groups) * len(series)) as axes:
        for ax, dataset in zip(axes, args.dataset):
            for k, (s, label) in enumerate(series):
                xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
                runs = [results.get(key(dataset, g, s), {"final": []})["final"] for g, _ in groups]
                stats = [paired.mean_std(finals) if finals else (math.nan, None) for finals in runs]
                means = [mean for mean, _ in stats]
                stds = [std or math.nan for _, std in stats]
                ax.bar(xs, means, width, yerr=stds, capsize=2, label=label,
                       color=colours[k % len(colours)], edgecolor="grey")
                for x, finals in zip(xs, runs):  # each seed a point
                    ax.plot([x] * len(finals), finals, ".", color="dimgrey", markersize=4)
                paper = [PAPER.get(key(dataset, g, s), (math.nan,))[0] for g, _ in groups]
                ax.plot(xs, paper, "k_", markersize=10, markeredgewidth=2)
            finals = [v for (g, _), (s, _) in itertools.product(groups, series)
                      for v in results.get(key(dataset, g, s), {"final": []})["final"]]
            if finals:  # the bars' tops, not their feet: accuracies differ by tenths of a point
                ax.set_ylim(max(0.0, min(finals) - 5.0), min(100.0, max(finals) + 3.0))
            ax.set_xticks(range(len(groups)), [label for _, label in groups])
            ax.set_title(dataset, fontsize=10)
        axes[0].plot([], [], "k_", markersize=10, markeredgewidth=2, label="paper")
        axes[0].set_ylabel(f"deployed model's final top-1 %\n(mean ± std over seeds {args.seeds}; "
                           "dots: the seeds)")
        axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def paired_chart(entries: dict, path: str) -> None:
    """One panel per data set and network: each method's final accuracy minus the baseline's, a
    point per seed and a bar at their mean; the grey band is the binomial 95% band (±1.96 standard
    errors) of the difference of two independent accuracies at the baseline's mean."""
    with panels(path, len(entries), 1.5 + 1.2 * max(len(m) for m in entries.values())) as axes:
        for ax, ((dataset, arch), methods) in zip(axes, entries.items()):
            baseline = methods.get(METHODS["baseline"].label, [])
            compared = [(label, paired.differences(records, baseline))
                        for label, records in methods.items() if label != METHODS["baseline"].label]
            compared = [(label, d) for label, d in compared if d]
            error = paired.standard_error(baseline) if compared else None
            if error:
                n, _, one = error
                band = 1.96 * math.sqrt(2) * one
                ax.axhspan(-band, band, color="lightgrey", label=f"binomial 95% ({n} test images)")
            for x, (label, d) in enumerate(compared):
                ax.plot([x] * len(d), d, "o", color=f"C{x % 10}", alpha=0.7)
                ax.plot([x], [statistics.fmean(d)], "k_", markersize=24, markeredgewidth=2)
            ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
            # A --paired-runs-dir's name on a line of its own under the method's: labels stay apart.
            labels = [label.replace(" (", "\n(") for label, _ in compared]
            ax.set_xticks(range(len(compared)), labels, fontsize=8)
            ax.set_title(f"{dataset} {arch}", fontsize=10)
            if error:
                ax.legend(fontsize=8)
        axes[0].set_ylabel("final top-1 % minus the baseline's,\nsame seed (points; bar: mean)")


def deployed_curve(out_dir: str) -> dict[int, float]:
    """Epoch -> the deployed model's test accuracy, from a finished run's metrics.csv."""
    curve = {}
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            if row.get("acc_deployed_mean"):  # empty on the epochs that were not evaluated
                curve[int(row["epoch"])] = float(row["acc_deployed_mean"])
    return curve


def curve_chart(args, runs: list[sweep.Run], path: str) -> None:
    """Fig. 7: the deployed model's test accuracy against the epoch, one line per setting (decay),
    the mean over the seeds that reached the epoch; one panel per data set and network."""
    panel_keys = list(itertools.product(args.dataset, args.archs, args.methods))
    with panels(path, len(panel_keys), 5.0) as axes:
        for ax, panel in zip(axes, panel_keys):
            for i, (tag, label, _) in enumerate(args.settings):
                curves = [deployed_curve(sweep.run_dir(args, r)) for r in runs
                          if r.key() == (*panel, tag) and sweep.finished(args, r)]
                epochs = sorted(set().union(*curves))
                means = [statistics.fmean(c[e] for c in curves if e in c) for e in epochs]
                style = ("-", "--", ":")[i % 3]  # overlapping lines stay visible
                ax.plot(epochs, means, style, marker="o", label=label)
            ax.set(title=" ".join(panel), xlabel="epoch")
            ax.legend(fontsize=8)
        axes[0].set_ylabel(f"test top-1 % of the deployed model\n(mean over seeds {args.seeds})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = sweep.grid(args)
    try:
        sweep.check_train_args(args, runs)
        if args.list:
            return sweep.list_runs(args, runs)
        mismatched, unreadable = sweep.made_otherwise(args, runs)
        if args.cell is not None:
            return sweep.train_cell(args, runs, mismatched, unreadable)
        for run, why in unreadable.items():
            print(f"{sweep.run_dir(args, run)}: {why}", file=sys.stderr)
        if args.read_only:
            untabulated = {**unreadable, **{run: f"made with other settings ({why})"
                                            for run, why in mismatched.items()}}
        else:
            untabulated = sweep.train_missing(args, runs, mismatched, unreadable)
    except rundir.RunStopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    results, problems = collect(args, runs, untabulated)
    os.makedirs(args.runs_dir, exist_ok=True)
    base = os.path.join(args.runs_dir, f"{args.experiment}_{'_'.join(args.dataset)}")
    text = markdown(args, results, problems)
    with open(f"{base}.md", "w") as f:
        f.write(text)
    if args.figure == "curves":
        curve_chart(args, [run for run in runs if run not in untabulated], f"{base}.png")
    else:
        bar_chart(args, results, f"{base}.png")
    written = f"{base}.md and {base}.png"
    entries = method_entries(args, results) if compares_with_baseline(args) else {}
    if entries:  # some run has finished
        paired_chart(entries, f"{base}_paired.png")
        written = f"{base}.md, {base}.png and {base}_paired.png"
    print(text)
    print(f"wrote {written}")
    if args.read_only and mismatched:
        print(f"{len(mismatched)} run(s) made with other settings are not tabulated: "
              f"{sweep.HOW_TO_PROCEED}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
