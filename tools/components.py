"""What each part of DKEL does, measured with this project's own functions (docs/components.md).

Every formula of the project matches the paper; what each part then does depends on how the parts
combine. This recomputes, from losses.py, ema.py, methods.py and train.py:

1. L_de against L_dk: the gradient each gives the student's logits (Eq. (9) against Eq. (6)),
   their relative distance and cosine, on random logits of three scales and on a DKEL run
   (synthetic data, and real images with --data-dir), at several epochs.
2. The early teacher against its students while w(ep) is large: the EMA's lag in epochs, and the
   teacher ensemble's test accuracy against the mean student peer's in the epochs with w >= 0.1.
3. The Sec. 3.3 initialisation at the paper's k = 1, lr 0.01: how far it moves the teacher, what
   it does to the teacher's CE and outputs, against the student's first step, and how fast Eq. (5)
   forgets it.
4. The authors' code taken together (docs/spec.md Sec. 8): what its ramp-up, cut-off and EMA
   warm-up leave of L_de and of the initialisation.
And the weight that each distillation term gets summed over a 300-epoch run (docs/spec.md Sec. 2).

    python -m tools.components                   # items 1-4 on synthetic data, a few CPU minutes
    python -m tools.components --data-dir DIR    # item 1 on an imagefolder tree's real images
    python -m tools.components --run DIR [DIR ...]   # those runs' own figures (items 1, 2, weights)
    python -m tools.components --weights-table   # docs/spec.md Sec. 2's table, in Markdown
"""
import sys

if not __package__:  # `python tools/components.py`: the root's modules are not on sys.path
    sys.stderr.write("error: run it from the repository root: python -m tools.components ...\n")
    sys.exit(2)

import argparse
import copy
import csv
import json
import math
import os

import torch

import cli
import data
import train
from ema import EMATeacher
from losses import (authors_rampup, authors_weight_cutoff, decaying_ensemble_kd, leave_one_out_kd,
                    teacher_ensemble_decay)
from infra import rundir

CIFAR_STEPS = 390                        # steps of a CIFAR epoch at batch 128 (Sec. 4.2)
PAPER_ALPHA = 0.999                      # alpha of Eq. (5) (docs/spec.md Sec. 3)
LOGIT_SCALES = (0.5, 2.0, 5.0)           # item 1 on random logits
LARGE_W = 0.1                            # item 2: the epochs with w(ep) >= 0.1
TABLE4_BETAS = (0.05, 0.1, 0.2, 0.5, 1.0)
# docs/spec.md Sec. 2's table: a label and train.py's flags (besides --method dkel), per row.
WEIGHT_ROWS = ([(f"β = {beta}" + (" (paper)" if beta == 0.5 else ""), ["--beta", str(beta)])
                for beta in TABLE4_BETAS]
               + [("cos, Eq. (13)", ["--decay", "cos"]), ("linear, Eq. (14)", ["--decay", "linear"]),
                  ("--authors-code", ["--authors-code"])])


# ------------------------------------------------------------------ the weights of the terms
def method_for(argv: list[str], dataset=None):
    """train.py's args and method for `argv` (resnet8, CPU: the weights depend on neither)."""
    args = cli.resolve_args(["--arch", "resnet8", "--device", "cpu", *argv])
    dataset = dataset or data.synthetic_data(1, 1, 0)
    return args, train.build_method(args, dataset, torch.device("cpu"))


def summed_weights(argv: list[str]) -> dict[str, float]:
    """Each distillation term's weight in the epoch's objective (method.term_weights, metrics.csv's
    weight_<term>) summed over the run's epochs, for train.py's flags `argv`."""
    args, method = method_for(argv)
    sums: dict[str, float] = {}
    for epoch in range(args.epochs):
        for term, weight in method.term_weights(train.epoch_weights(args, epoch)).items():
            sums[term] = sums.get(term, 0.0) + weight
    return sums


def weights_table() -> str:
    """docs/spec.md Sec. 2: the summed weights of DKEL's terms at 300 epochs (CIFAR), under Eq. (12)
    as printed and under the earlier reading (--rampup-scales-de), with DK and PCL beside them."""
    lines = ["| DKEL, 300 epochs | Σ λ·r (L_pe) | Σ λ·r·(1 − w) (L_dk) | Σ λ·w (L_de, Eq. (12)) "
             "| Σ λ·r·w (L_de, `--rampup-scales-de`) |", "|---|---|---|---|---|"]
    for label, flags in WEIGHT_ROWS:
        printed = summed_weights(["--method", "dkel", *flags])
        if "--authors-code" in flags:  # it implies the earlier reading: no Eq. (12) column
            earlier, printed["de"] = printed["de"], None
        else:
            earlier = summed_weights(["--method", "dkel", "--rampup-scales-de", *flags])["de"]
        cells = (printed["pe"], printed["dk"], printed["de"], earlier)
        lines.append(f"| {label} | " + " | ".join(map(figure, cells)) + " |")
    for method, term in (("dk", "dk"), ("pcl", "pm")):
        sums = summed_weights(["--method", method])
        cells = (sums["pe"], sums[term], None, None)
        lines.append(f"| {method} (no L_de; L_{term}: Σ λ·r) | " + " | ".join(map(figure, cells))
                     + " |")
    return "\n".join(lines)


def figure(value: float | None) -> str:
    """A summed weight as the table prints it: three significant digits, whole numbers from 100."""
    if value is None:
        return "—"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


# ------------------------------------------------------------------ item 1: L_de against L_dk
def gradient_gap(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 temperature: float = 3.0) -> dict[str, float]:
    """The gradients of sum_i L_dk(s_i) (Eq. (6)) and of sum_i L_de(s_i) (Eq. (9)) on the student
    logits s (M, B, C): ||g_de - g_dk|| / ||g_dk|| and their cosine."""
    s = student_logits.detach().float().requires_grad_(True)            # (M, B, C)
    t = teacher_logits.detach().float()                                 # (M, B, C)
    g_dk, = torch.autograd.grad(leave_one_out_kd(t, s, temperature).sum(), s)
    g_de, = torch.autograd.grad(decaying_ensemble_kd(t, s, temperature).sum(), s)
    gap = ((g_de - g_dk).norm() / g_dk.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(g_de.flatten(), g_dk.flatten(), dim=0).item()
    return {"relative_gap": gap, "cosine": cosine}


def random_logit_gaps(seed: int = 0, peers: int = 3, batch: int = 128, classes: int = 10) -> dict:
    """Item 1 on independent random logits (student and teacher alike) of each scale."""
    generator = torch.Generator().manual_seed(seed)
    gaps = {}
    for scale in LOGIT_SCALES:
        s, t = (scale * torch.randn(peers, batch, classes, generator=generator) for _ in range(2))
        gaps[str(scale)] = gradient_gap(s, t)
    return gaps


@torch.no_grad()
def probe_logits(method, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher peer logits (M, B, C) on fixed training views, every peer on its own
    view, as a training step computes them (train-mode BatchNorm), on a copy of the method, so
    that the probe changes no running statistic of the run."""
    probe = copy.deepcopy(method)
    probe.set_mode(True)
    out = probe.student(views)
    return out.logits.float(), probe.teacher.logits(views, out).float()


def mean_student_peer(row: dict, prefix: str = "acc") -> float:
    peers = [float(v) for k, v in row.items() if k.startswith(f"{prefix}_student_peer")]
    return sum(peers) / len(peers)


def dkel_run(dataset, argv: list[str], measure_epochs: list[int]) -> list[dict]:
    """A DKEL run of train.py's flags `argv` on `dataset`, trained with train.py's own pieces up to
    the last of `measure_epochs`. After each of those epochs (0: after the initialisation): item 1
    on a fixed batch of training views, and the test accuracy of the teacher ensemble against the
    mean student peer (item 2)."""
    # fp32: the figures then do not depend on whether the CPU computes bf16 natively.
    args = cli.resolve_args(["--method", "dkel", "--device", "cpu", "--precision", "fp32", *argv])
    torch.manual_seed(args.seed)
    method = train.build_method(args, dataset, torch.device("cpu"))
    train.channels_last(method)
    optimizer = train.sgd(method.trainable_parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)
    method.initialise(data.repeated_batches(dataset, args.batch_size, method.num_views, args.seed))
    probe, _ = next(data.train_batches(dataset, args.batch_size, method.num_views,
                                       data.epoch_generator(args.seed, 10 ** 6, dataset.device)))
    step = train.training_step(method, optimizer, args.precision, False, torch.device("cpu"))
    records, index = [], 0
    for epoch in range(max(measure_epochs) + 1):
        if epoch in measure_epochs:
            record = {"epoch": epoch, "w": train.epoch_weights(args, epoch)["teacher_ensemble_weight"]}
            record.update(gradient_gap(*probe_logits(method, probe)))
            accuracies = train.evaluate(method, dataset, args.batch_size, args.precision)
            record["teacher_ensemble"] = accuracies["acc_teacher_ensemble"]
            record["mean_student_peer"] = mean_student_peer(accuracies)
            records.append(record)
        if epoch == max(measure_epochs):
            break
        weights = train.epoch_weights(args, epoch)
        method.set_mode(True)
        for views, labels in data.train_batches(dataset, args.batch_size, method.num_views,
                                                data.epoch_generator(args.seed, epoch,
                                                                     dataset.device)):
            step(views, labels, weights, index)
            index += 1
        scheduler.step()
    return records


# ------------------------------------------------------------------ item 2: the early teacher
def ema_lag(alpha: float = PAPER_ALPHA, steps_per_epoch: int = CIFAR_STEPS, epochs: int = 5) -> dict:
    """Eq. (5)'s time constant in steps and epochs, and the share of the teacher's starting weights
    left at the end of each of the first epochs (alpha ** steps)."""
    return {"time_constant_steps": 1.0 / (1.0 - alpha),
            "time_constant_epochs": 1.0 / (1.0 - alpha) / steps_per_epoch,
            "start_left_after_epoch": [alpha ** (steps_per_epoch * (n + 1)) for n in range(epochs)]}


def large_w_epochs(beta: float = 0.5) -> list[int]:
    """The 0-based epochs with w(ep) = exp(-beta ep) >= LARGE_W."""
    return [ep for ep in range(300) if teacher_ensemble_decay(ep, 300, "exp", beta) >= LARGE_W]


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def early_teacher(run_dirs: list[str]) -> dict:
    """Item 2 on finished runs: in their epochs with w >= 0.1 (metrics.csv's w; runs that log no w
    take Eq. (11)'s at their beta), how often the teacher ensemble's test accuracy is below the
    mean student peer's, and by how much at most."""
    below, total, worst = 0, 0, 0.0
    for run_dir in run_dirs:
        for row in read_metrics(run_dir):
            if "acc_teacher_ensemble" not in row or not row.get("acc_teacher_ensemble"):
                continue
            if float(row.get("w", 0.0)) < LARGE_W:
                continue
            gap = mean_student_peer(row) - float(row["acc_teacher_ensemble"])
            total += 1
            below += gap > 0
            worst = max(worst, gap)
    return {"run_epochs": total, "teacher_below_students": below, "largest_gap_points": worst}


def early_epochs_table(runs_dirs: list[str], epochs: int = 3) -> str:
    """docs/evidence.md's start of training: for each method of each runs directory (the run
    directories <runs_dir>/*_<method>_seed<n>), the mean over its seeds of the train accuracy, the
    mean student peer's and the deployed model's test accuracy in each of the first epochs."""
    header = " | ".join(f"epoch {e}: train / student / deployed" for e in range(1, epochs + 1))
    lines = [f"| runs | method | seeds | {header} |", "|---|---|---|" + "---|" * epochs]
    for runs_dir in runs_dirs:
        for method, paths in runs_by_method(runs_dir).items():
            runs = [read_metrics(path)[:epochs] for path in paths]
            cells = []
            for e in range(epochs):
                rows = [run[e] for run in runs]
                train_acc = sum(float(row["train_acc"]) for row in rows) / len(rows)
                student = sum(mean_student_peer(row) for row in rows) / len(rows)
                deployed = sum(float(row["acc_deployed_mean"]) for row in rows) / len(rows)
                cells.append(f"{train_acc:.1f} / {student:.1f} / {deployed:.1f}")
            name = os.path.basename(os.path.normpath(runs_dir))
            lines.append(f"| {name} | {cli.METHODS[method].label} | {len(runs)} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def runs_by_method(runs_dir: str) -> dict[str, list[str]]:
    """The finished runs of a compare.py runs directory, <dataset>_<arch>_<method>_seed<n>, by
    method."""
    groups: dict[str, list[str]] = {}
    for name in sorted(os.listdir(runs_dir)):
        path = os.path.join(runs_dir, name)
        if os.path.exists(os.path.join(path, "summary.json")):
            method = name.rsplit("_seed", 1)[0].split("_", 2)[2]
            groups.setdefault(method, []).append(path)
    return groups


def early_teacher_table(runs_dirs: list[str]) -> str:
    """docs/components.md's item 2 on finished runs: per runs directory and method of the paper's
    (the others have no teacher), `early_teacher` over its runs."""
    lines = ["| runs | method | runs | run-epochs with w ≥ 0.1 | teacher ensemble below the mean "
             "student peer | by up to (points) |", "|---|---|---|---|---|---|"]
    for runs_dir in runs_dirs:
        for method, paths in runs_by_method(runs_dir).items():
            if method not in cli.ONLINE_DISTILLATION:
                continue
            figures = early_teacher(paths)
            lines.append(f"| {os.path.basename(os.path.normpath(runs_dir))} | "
                         f"{cli.METHODS[method].label} | {len(paths)} | {figures['run_epochs']} | "
                         f"{figures['teacher_below_students']} | "
                         f"{figures['largest_gap_points']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ item 3: the initialisation
def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(softmax(p) || softmax(q)) at T = 1, batch mean, mean over the peers: (M, B, C) x2."""
    log_p, log_q = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float() for p in module.parameters()])


def initialisation(arch: str = "resnet32", seed: int = 0) -> dict:
    """Item 3 on a synthetic CIFAR-shaped batch: one Sec. 3.3 step (k = 1, lr 0.01) against the
    student's first step, and what Eq. (5) leaves of it."""
    dataset = data.synthetic_data(1024, 128, seed)
    args = cli.resolve_args(["--method", "dk", "--arch", arch, "--device", "cpu", "--seed", str(seed)])
    torch.manual_seed(seed)
    method = train.build_method(args, dataset, torch.device("cpu"))
    batches = data.repeated_batches(dataset, args.batch_size, method.num_views, seed)
    probe, _ = next(data.train_batches(dataset, args.batch_size, method.num_views,
                                       data.epoch_generator(seed, 10 ** 6, dataset.device)))
    teacher = method.teacher.network
    # The batch of the initialisation's step (the first of `batches`, drawn alike).
    init_views, init_labels = next(data.repeated_batches(dataset, args.batch_size,
                                                         method.num_views, seed))
    start = flat(teacher)
    logits_k0 = train_mode_logits(teacher, probe)
    ce_before = ce_of(teacher, init_views, init_labels)
    method.initialise(batches)                                 # Sec. 3.3, step 2
    moved = (flat(teacher) - start).norm().item() / start.norm().item()
    ce_after = ce_of(teacher, init_views, init_labels)
    logits_k1 = train_mode_logits(teacher, probe)
    student_start = flat(method.student)
    optimizer = train.sgd(method.trainable_parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    views, labels = next(data.train_batches(dataset, args.batch_size, method.num_views,
                                            data.epoch_generator(seed, 0, dataset.device)))
    train.student_step(method, optimizer, views, labels, train.epoch_weights(args, 0), "fp32")
    student_moved = (flat(method.student) - student_start).norm().item() / student_start.norm().item()
    student_logits = train_mode_logits(method.student, probe)
    return {"arch": arch, "teacher_moved": moved, "teacher_ce_drop_nats": ce_before - ce_after,
            "student_first_step_moved": student_moved, "student_over_teacher": student_moved / moved,
            "kl_teacher_k1_k0": kl(logits_k1, logits_k0),
            "kl_teacher_student_after_one_step": kl(logits_k1, student_logits),
            **offset_decay()}


@torch.no_grad()
def train_mode_logits(network, views: torch.Tensor) -> torch.Tensor:
    """A multi-peer network's peer logits (M, B, C), every peer on its own view, as a training step
    computes them (train-mode BatchNorm), on a copy, so that no running statistic changes."""
    return copy.deepcopy(network).train()(views).logits.float()


def ce_of(network, views: torch.Tensor, labels: torch.Tensor) -> float:
    """The Sec. 3.3 loss, the mean over peers of L_ce(t_j(x_j), y), as its step computes it."""
    logits = train_mode_logits(network, views)                             # (M, B, C)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                             labels.repeat(logits.shape[0])).item()


def offset_decay(alpha: float = PAPER_ALPHA) -> dict:
    """What Eq. (5) leaves of the initialisation's offset (alpha ** steps) after 1 and 10 CIFAR
    epochs, and the offset's reach into the student: DK's L_dk weight per epoch times the share left
    at the epoch's start, summed over the paper's 300 epochs (DK's L_dk weight alone sums to ~251)."""
    args, method = method_for(["--method", "dk"])
    reach = sum(method.term_weights(train.epoch_weights(args, epoch))["dk"]
                * alpha ** (CIFAR_STEPS * epoch) for epoch in range(args.epochs))
    return {"offset_left_after_1_epoch": alpha ** CIFAR_STEPS,
            "offset_left_after_10_epochs": alpha ** (10 * CIFAR_STEPS),
            "offset_reach_summed_dk_weight": reach,
            "dk_summed_weight": summed_weights(["--method", "dk"])["dk"]}


# ------------------------------------------------------------------ item 4: the authors' code
def authors_code() -> dict:
    """Item 4: their ramp-up, cut-off and EMA warm-up taken together (the --authors-* functions)."""
    in_float32 = [torch.tensor(authors_rampup(ep), dtype=torch.float32).item()
                  for ep in range(1, 81)]
    cutoff_beta = math.log(100.0) / 81       # exp(-beta * 81) < 0.01 from this beta on
    objectives = {beta: authors_objective(beta) for beta in TABLE4_BETAS}
    identical = [b for b in TABLE4_BETAS if objectives[b] == objectives[0.5]]
    warmup = EMATeacher(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), PAPER_ALPHA, True)
    return {"rampup_zero_in_float32_epochs_1_80": all(r == 0.0 for r in in_float32),
            "cutoff_from_epoch_81_for_beta_at_least": cutoff_beta,
            "de_weight_epoch_0": summed_weights(["--method", "dkel", "--authors-code"])["de"],
            "betas_with_identical_objectives": identical,
            "table4_spread_of_those_rows": table4_spread(identical),
            "ema_decay_at_step_0": warmup.ema_decay_at(0),
            "pcl_reproduction_summed_rampup": sum(pcl_reproduction_rampup(ep) for ep in range(300)),
            "dkel_summed_rampup": sum(authors_rampup(ep) for ep in range(300))}


def authors_objective(beta: float) -> list[tuple[float, ...]]:
    """The weights of L_pe, L_dk and L_de in every epoch of their 300-epoch DKEL run at `beta`, as
    their float32 losses see them (their loss_wrapper.py multiplies the tensors by these floats)."""
    weights = []
    for epoch in range(300):
        r = authors_rampup(epoch)
        w = authors_weight_cutoff(teacher_ensemble_decay(epoch, 300, "exp", beta))
        weights.append(tuple(torch.tensor(x, dtype=torch.float32).item()
                             for x in (r, r * (1 - w), r * w)))
    return weights


def pcl_reproduction_rampup(epoch: int) -> float:
    """r(ep) of their PCL reproduction: compute_rampup_weight(epoch) with its default lambd = 1.0,
    exp(-5 (1 - ep)^2) for ep <= 80, 1 after (docs/spec.md Sec. 8, "The ramp-up's scale")."""
    return 1.0 if epoch > 80 else math.exp(-5.0 * (1.0 - epoch) ** 2)


def table4_spread(betas: list[float]) -> list[float]:
    """The spread (max - min, points) per column of the paper's Table 4 over the rows of `betas`
    (our reading of its rows: increasing beta, compare.BETA_HELP)."""
    import compare
    rows = [f"row{TABLE4_BETAS.index(beta) + 1}" for beta in betas]
    return [round(max(float(c[r]) for r in rows) - min(float(c[r]) for r in rows), 2)
            for c in compare.PAPER_TABLES["table4"]]


# ------------------------------------------------------------------ a finished run
def run_figures(run_dir: str) -> dict:
    """A finished run's own figures: its terms' summed weights (metrics.csv's, or recomputed from
    config.json for a run made before they were logged), item 2 from its metrics.csv and, where
    its checkpoint.pt and its data are at hand, item 1 at its final epoch."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = rundir.with_defaults(json.load(f))
    rows = read_metrics(run_dir)
    logged = [k for k in rows[0] if k.startswith("weight_")]
    if logged:
        sums = {k[len("weight_"):]: sum(float(row[k]) for row in rows) for k in logged}
    else:
        sums = summed_weights(config_argv(config))
    figures = {"run": run_dir, "method": config["method"], "summed_weights": sums,
               "early_teacher": early_teacher([run_dir])}
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        figures["final_gap"] = checkpoint_gap(os.path.join(run_dir, "checkpoint.pt"))
    return figures


def config_argv(config: dict) -> list[str]:
    """train.py's flags for the schedule settings of a config.json."""
    argv = ["--method", config["method"], "--epochs", str(config["epochs"]), "--beta",
            str(config["beta"]), "--decay", config["decay"], "--kd-weight", str(config["kd_weight"]),
            "--rampup-epochs", str(config["rampup_epochs"])]
    flags = ("authors_rampup", "authors_weight_cutoff", "rampup_scales_de")
    return argv + [f"--{flag.replace('_', '-')}" for flag in flags if config.get(flag)]


def checkpoint_gap(path: str) -> dict | str:
    """Item 1 at a checkpoint's epoch (a run's checkpoint.pt, or a copy kept from an earlier
    epoch): its student and teacher on training views of the run's own data set."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    config = rundir.with_defaults(checkpoint["config"])
    try:
        dataset = data.load_data(config["dataset"], config["data_dir"], "cpu", seed=config["seed"])
    except data.DataError as error:
        return f"not measured: {error}"
    _, method = method_for(config_argv(config) + ["--arch", config["arch"]], dataset)
    for name, module in method.modules().items():
        module.load_state_dict(checkpoint[name])
    views, _ = next(data.train_batches(dataset, config["batch_size"], method.num_views,
                                       data.epoch_generator(config["seed"], 10 ** 6, "cpu")))
    return {"epoch": checkpoint["epoch"], **gradient_gap(*probe_logits(method, views))}


# ------------------------------------------------------------------ the report
def report(figures: dict) -> str:
    """Items 1-4 as lines."""
    lines = ["1. L_de against L_dk: ||g_de - g_dk|| / ||g_dk|| and cosine of their gradients on "
             "the student's logits"]
    for scale, gap in figures.get("random_logits", {}).items():
        lines.append(f"   random logits, scale {scale}: gap {gap['relative_gap']:.3f}, "
                     f"cosine {gap['cosine']:.4f}")
    for name, records in figures.get("runs", {}).items():
        for record in records:
            lines.append(f"   {name}, after epoch {record['epoch']} (w = {record['w']:.3f}): gap "
                         f"{record['relative_gap']:.4f}, cosine {record['cosine']:.5f}; test acc "
                         f"teacher ensemble {record['teacher_ensemble']:.1f}%, mean student peer "
                         f"{record['mean_student_peer']:.1f}%")
    lag = figures["ema_lag"]
    left = " / ".join(f"{100 * x:.0f}%" for x in lag["start_left_after_epoch"])
    lines += [f"2. The early teacher: w >= {LARGE_W} in epochs {figures['large_w_epochs']} "
              f"(beta 0.5); alpha {PAPER_ALPHA} lags {lag['time_constant_steps']:.0f} steps = "
              f"{lag['time_constant_epochs']:.1f} CIFAR epochs; starting weights left after "
              f"epochs 0-4: {left}"]
    init = figures["initialisation"]
    lines += [f"3. The initialisation ({init['arch']}, k = 1, lr 0.01): teacher moved "
              f"{init['teacher_moved']:.2e} of ||theta||, its CE down {init['teacher_ce_drop_nats']:.3f}"
              f" nats; the student's first step {init['student_over_teacher']:.0f}x larger; "
              f"KL(T_k1 || T_k0) {init['kl_teacher_k1_k0']:.4f} against KL(T || S) "
              f"{init['kl_teacher_student_after_one_step']:.2f} after one student step; offset left "
              f"{init['offset_left_after_1_epoch']:.2f} after 1 epoch, "
              f"{init['offset_left_after_10_epochs']:.2f} after 10; its reach "
              f"{init['offset_reach_summed_dk_weight']:.3f} of DK's summed L_dk weight "
              f"{init['dk_summed_weight']:.0f}"]
    authors = figures["authors_code"]
    lines += [f"4. The authors' code: r(ep) is 0 in float32 in epochs 1-80: "
              f"{authors['rampup_zero_in_float32_epochs_1_80']}; the cut-off sets w to 0 from "
              f"epoch 81 for beta >= {authors['cutoff_from_epoch_81_for_beta_at_least']:.3f}; L_de's "
              f"weight {authors['de_weight_epoch_0']:.2g}, in epoch 0 only; identical objectives "
              f"at every step for beta in {authors['betas_with_identical_objectives']}, whose Table 4 "
              f"rows spread by {authors['table4_spread_of_those_rows']} points; EMA alpha at step 0: "
              f"{authors['ema_decay_at_step_0']:.0f}; summed r(ep): their PCL "
              f"{authors['pcl_reproduction_summed_rampup']:.0f}, their DKEL "
              f"{authors['dkel_summed_rampup']:.1f}"]
    for path, gap in figures.get("checkpoints", {}).items():
        lines.append(f"   checkpoint {path}: {gap}")
    for run in figures.get("finished_runs", []):
        lines.append(f"   run {run['run']} ({run['method']}): summed weights "
                     + ", ".join(f"{k} {v:.3g}" for k, v in run["summed_weights"].items())
                     + f"; {run['early_teacher']}" + (f"; final gap {run['final_gap']}"
                                                      if "final_gap" in run else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m tools.components", formatter_class=cli.HelpFormatter,
                   description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet8", help="the network of item 1's DKEL runs")
    p.add_argument("--train-images", type=int, default=1024,
                   help="synthetic training images of item 1's synthetic run (and 512 test images)")
    p.add_argument("--epochs", type=int, default=30, help="the schedule of item 1's runs (train.py "
                   "--epochs; they train only up to the last of --measure-epochs)")
    p.add_argument("--measure-epochs", type=int, nargs="+", default=[0, 1, 2, 5],
                   help="item 1: measure after these epochs (0: after the initialisation)")
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="alpha of item 1's runs (docs/evidence.md's protocol: 0.99)")
    p.add_argument("--data-dir", help="an imagefolder tree: item 1 on its real images instead of "
                   "synthetic ones")
    p.add_argument("--init-arch", default="resnet32", help="the network of item 3 (paper: resnet32)")
    p.add_argument("--run", nargs="+", default=[], metavar="DIR",
                   help="finished run directories: their own figures")
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="FILE",
                   help="checkpoints of DKEL runs (checkpoint.pt, or copies kept from earlier "
                        "epochs): item 1 at each")
    p.add_argument("--weights-table", action="store_true",
                   help="print docs/spec.md Sec. 2's table of summed weights and stop")
    p.add_argument("--early-table", nargs="+", metavar="RUNS_DIR",
                   help="print docs/evidence.md's table of the first three epochs of the runs in "
                        "these runs directories (compare.py's) and stop")
    p.add_argument("--teacher-table", nargs="+", metavar="RUNS_DIR",
                   help="print docs/components.md's item 2 on the runs in these runs directories "
                        "and stop")
    p.add_argument("--json", help="write every figure to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.weights_table:
        print(weights_table())
        return 0
    if options.early_table:
        print(early_epochs_table(options.early_table))
        return 0
    if options.teacher_table:
        print(early_teacher_table(options.teacher_table))
        return 0
    for run_dir in options.run:
        if not os.path.exists(os.path.join(run_dir, "metrics.csv")):
            parser.error(f"--run {run_dir}: no metrics.csv there; give a run directory of train.py")
    if min(options.measure_epochs) < 0 or max(options.measure_epochs) > options.epochs:
        parser.error(f"--measure-epochs must lie within 0..--epochs ({options.epochs})")
    torch.manual_seed(0)
    run_flags = ["--arch", options.arch, "--epochs", str(options.epochs), "--ema-decay",
                 str(options.ema_decay)]
    figures = {"random_logits": random_logit_gaps(), "runs": {}}
    if options.data_dir:
        try:
            real = data.load_data("imagefolder", options.data_dir, "cpu")
        except data.DataError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        figures["runs"][f"imagefolder {options.arch}"] = dkel_run(
            real, ["--dataset", "imagefolder", "--data-dir", options.data_dir, *run_flags],
            options.measure_epochs)
    else:
        synthetic = data.synthetic_data(options.train_images, 512, 0)
        figures["runs"][f"synthetic {options.arch}"] = dkel_run(
            synthetic, ["--dataset", "synthetic", *run_flags], options.measure_epochs)
    figures.update(ema_lag=ema_lag(), large_w_epochs=large_w_epochs(),
                   initialisation=initialisation(options.init_arch), authors_code=authors_code(),
                   finished_runs=[run_figures(run_dir) for run_dir in options.run],
                   checkpoints={path: checkpoint_gap(path) for path in options.checkpoint})
    print(report(figures))
    if options.json:
        rundir.write_json(figures, options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
