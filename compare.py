"""The paper's comparison tables (Table 1, Table 2, Table 3) from runs of train.py.

    python compare.py --dataset cifar10 --archs resnet32 --seeds 0 1 2

For every network x method x seed, compare.py trains the run with train.py (same data, schedule
and evaluation for every method; an unfinished run is resumed, a finished one is read back) and
then writes, beside the runs:
- `compare_<dataset>.md`: one row per network, one column per method in the paper's order, the
  mean +- std over seeds of the deployed model's final accuracy (SPEC.md Sec. 4 and 6), with the
  paper's own number beside ours where SPEC.md Sec. 9 has it; a second table in the paper's
  convention (best deployed output at its best test epoch); and the runs that are missing or
  failed, by name;
- `compare_<dataset>.png`: the first table as grouped bars, the paper's numbers as markers.
Arguments after `--` go to every train.py run (e.g. `-- --device cuda --data-dir /data`).
"""
import argparse
import json
import math
import os
import statistics
import sys

import train
from train import METHODS

# SPEC.md Sec. 9 (paper Tables 1-3): (mean, std) top-1 %, std None where the paper gives none.
_T1_COLUMNS = ("dml", "cl", "one", "okddip", "kdcl", "pcl", "baseline", "dkel")
_T1 = {
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
}


def paper_numbers() -> dict[tuple[str, str, str], tuple[float, float | None]]:
    """(dataset, arch, method) -> (mean, std) of the paper's Tables 1-3."""
    table = {}
    for dataset, rows in _T1.items():
        for arch, cells in rows.items():
            values = [float(v) for v in cells.split()]
            for k, method in enumerate(_T1_COLUMNS):
                table[dataset, arch, method] = (values[2 * k], values[2 * k + 1])
    tiny = {"baseline": ((51.43, .03), (51.34, .01)), "dml": ((53.84, .04), (54.02, .13)),
            "okddip": ((52.61, .07), (56.82, .03)), "kdcl": ((53.91, .04), (53.36, .02)),
            "pcl": ((64.23, .08), (64.62, .09)), "dkel": ((64.33, .07), (64.66, .09))}
    for method, (r18, r34) in tiny.items():                      # Table 2
        table["tinyimagenet", "resnet18", method], table["tinyimagenet", "resnet34", method] = r18, r34
    table["cifar10", "resnet32", "dk"] = (94.54, None)           # Table 3, "Baseline + L_dk"
    table["cifar100", "resnet32", "dk"] = (74.67, None)
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build the paper's comparison table from train.py runs.",
                                epilog="Arguments after -- are passed to every train.py run.")
    p.add_argument("--dataset", default="cifar10",
                   help="data set of every run (paper: cifar10, cifar100, tinyimagenet)")
    p.add_argument("--archs", nargs="+", default=["resnet32"],
                   help="networks, one table row each (paper Table 1: resnet32 resnet110 vgg16 densenet40_12 "
                        "wrn20_8)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="methods, one column each (default: all, in the paper's order)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="seeds of every cell (mean +- std over them)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every run (default: train.py's, the paper's 300 / 100)")
    p.add_argument("--runs-dir", default="runs",
                   help="where the runs live: <runs-dir>/<dataset>_<arch>_<method>_seed<seed>")
    p.add_argument("--read-only", action="store_true",
                   help="train nothing: tabulate the runs that exist, list the others as missing")
    return p


def run_dir(args, arch: str, method: str, seed: int) -> str:
    return os.path.join(args.runs_dir, f"{args.dataset}_{arch}_{method}_seed{seed}")


def ensure_run(args, train_args: list[str], arch: str, method: str, seed: int) -> tuple[dict | None, str]:
    """The run's summary.json, training (or resuming) it first unless --read-only.
    Returns (summary or None, status): status is "ok", "missing" or "failed (...)"."""
    out_dir = run_dir(args, arch, method, seed)
    summary_path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(summary_path) and not args.read_only:
        argv = ["--dataset", args.dataset, "--arch", arch, "--method", method, "--seed", str(seed),
                "--out-dir", out_dir, *(["--epochs", str(args.epochs)] if args.epochs else []), *train_args]
        if os.path.exists(os.path.join(out_dir, "checkpoint.pt")):
            argv.append("--resume")
        print(f"== train.py {' '.join(argv)}", flush=True)
        try:
            code = train.main(argv)
        except SystemExit as exit_info:  # argparse rejected the arguments
            code = exit_info.code
        if code != 0:
            return None, f"failed (exit code {code})"
    if not os.path.exists(summary_path):
        return None, "missing"
    with open(summary_path) as f:
        return json.load(f), "ok"


def headline(summary: dict) -> float:
    """A run's honest figure: the test accuracy of the model chosen on the validation split
    (train.py --val-size), else the final-epoch mean over the deployed outputs (no selection)."""
    selection = summary.get("selection", {})
    if selection.get("on") == "validation split":
        return selection["test_acc"]
    return summary["headline_final_deployed_mean"]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"


def collect(args, train_args: list[str]) -> tuple[dict, list[str]]:
    """(arch, method) -> {"final": [...], "best": [...]} over the seeds that finished, and the
    problems (missing or failed runs) by run directory."""
    results, problems = {}, []
    for arch in args.archs:
        for method in args.methods:
            for seed in args.seeds:
                summary, status = ensure_run(args, train_args, arch, method, seed)
                if summary is None:
                    problems.append(f"{run_dir(args, arch, method, seed)}: {status}")
                    continue
                entry = results.setdefault((arch, method), {"final": [], "best": []})
                entry["final"].append(headline(summary))
                entry["best"].append(summary["paper_convention_best_peer_best_epoch"]["acc"])
    return results, problems


def markdown(args, results: dict, problems: list[str]) -> str:
    paper = paper_numbers()
    header = "| network | " + " | ".join(METHODS[m].label for m in args.methods) + " |"
    rule = "|---|" + "---|" * len(args.methods)
    lines = [f"# {args.dataset}: top-1 % of the deployed model, mean ± std over seeds {args.seeds}", ""]
    for key, title in (("final", "Final epoch (this project's headline; SPEC.md Sec. 4)"),
                       ("best", "Paper's convention: best deployed output at its best test epoch")):
        lines += [f"## {title}", "", "ours (paper's number in brackets, SPEC.md Sec. 9)", "", header, rule]
        for arch in args.archs:
            cells = []
            for method in args.methods:
                ours = results.get((arch, method))
                text = cell(*mean_std(ours[key])) + f" (n={len(ours[key])})" if ours else "—"
                if (args.dataset, arch, method) in paper:
                    text += f" ({cell(*paper[args.dataset, arch, method])})"
                cells.append(text)
            lines.append(f"| {arch} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Missing or failed runs", ""] + ([f"- {p}" for p in problems] or ["none"])
    return "\n".join(lines) + "\n"


def bar_chart(args, results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = paper_numbers()
    width = 0.8 / len(args.methods)
    fig, ax = plt.subplots(figsize=(max(7.0, 2.0 + 0.5 * len(args.archs) * len(args.methods)), 4.5))
    for k, method in enumerate(args.methods):
        xs = [i + (k - (len(args.methods) - 1) / 2) * width for i in range(len(args.archs))]
        stats = [mean_std(results[arch, method]["final"]) if (arch, method) in results else (math.nan, None)
                 for arch in args.archs]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s or 0.0 for _, s in stats], capsize=2,
               label=METHODS[method].label, color=f"C{k}")
        marks = [paper.get((args.dataset, arch, method), (math.nan,))[0] for arch in args.archs]
        ax.plot(xs, marks, "k_", markersize=10, markeredgewidth=2)
    ax.plot([], [], "k_", markersize=10, markeredgewidth=2, label="paper")
    ax.set_xticks(range(len(args.archs)), args.archs)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{args.dataset}: deployed model at the final epoch\nmean ± std over seeds "
                 f"{', '.join(map(str, args.seeds))}; black marks: the paper's numbers where it has them",
                 fontsize=10)
    values = [v for entry in results.values() for v in entry["final"]]
    if values:
        ax.set_ylim(max(0.0, min(values) - 5.0), min(100.0, max(values) + 3.0))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args, train_args = parser.parse_args(argv[:split]), argv[split + 1:]
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    results, problems = collect(args, train_args)
    os.makedirs(args.runs_dir, exist_ok=True)
    base = os.path.join(args.runs_dir, f"compare_{args.dataset}")
    text = markdown(args, results, problems)
    with open(f"{base}.md", "w") as f:
        f.write(text)
    bar_chart(args, results, f"{base}.png")
    print(text)
    print(f"wrote {base}.md and {base}.png")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
