"""The command line of train.py: every flag with the paper's value and section, the schedule
defaults scaled to --epochs (docs/spec.md Sec. 3), and one-line refusals of bad input (exit 2).
It sits at the root, beside the paper's modules: a reader of the paper finds its hyperparameters
here, and `METHODS` is the one table of the methods of Tables 1-3 (simulate.py uses its parser).

    python train.py --dataset cifar10 --arch resnet32 --beta 0.5
"""
import argparse
import json
import os
from typing import NamedTuple

import torch

import baselines
import data
import methods
from backbones import ARCHS
from losses import DECAYS

PAPER_EPOCHS = {"tinyimagenet": 100}               # Sec. 4.2; every other data set: 300
PAPER_MILESTONES = {"tinyimagenet": (0.3, 0.6)}    # Sec. 4.2; every other data set: 50% and 75%
PAPER_RAMPUP_FRACTION = 80 / 300                   # PCL's R = 80 of 300 epochs (docs/spec.md Sec. 2)

class MethodEntry(NamedTuple):
    """A method of the command line: its class, its column header in the paper's tables, the
    --num-peers it needs, and the epoch weights its objective uses (the columns of metrics.csv
    that the epoch line prints: "rampup" is r(ep), "w" is w(ep))."""
    build: type
    label: str
    min_peers: int = 2
    schedules: tuple[str, ...] = ("rampup",)


# The one table of methods, in the column order of the paper's Table 1 (dk: Table 3; kd: Table 2).
METHODS = {
    "dml": MethodEntry(baselines.DML, "DML", schedules=()),
    "cl": MethodEntry(baselines.CL, "CL"),
    "one": MethodEntry(baselines.ONE, "ONE"),
    "okddip": MethodEntry(baselines.OKDDip, "OKDDip", min_peers=3),  # 2 auxiliary peers + leader
    "kdcl": MethodEntry(baselines.KDCL, "KDCL"),
    "pcl": MethodEntry(methods.PCL, "PCL"),
    "baseline": MethodEntry(baselines.Baseline, "Baseline", min_peers=1, schedules=()),
    "dk": MethodEntry(methods.DK, "PCL+L_dk"),
    "pcl_de": MethodEntry(methods.PCLDE, "PCL+L_de", schedules=("rampup", "w")),  # Table 3
    "dkel": MethodEntry(methods.DKEL, "DKEL", schedules=("rampup", "w")),
    "kd": MethodEntry(baselines.KD, "KD", min_peers=1),  # one network whatever --num-peers says
}
# The paper's methods (methods.py): the multi-peer student and its EMA teacher.
ONLINE_DISTILLATION = ("pcl", "dk", "pcl_de", "dkel")
# Those whose objective has the decaying-ensemble term L_de of Eq. (9).
WITH_DE = ("pcl_de", "dkel")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line refusal: a bad flag prints what is wrong and how to get help
    (not the whole usage) and exits with code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default once: argparse's "(default: X)" only where the text does not
    already say it (nor for a switch, whose default is off)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train.py", formatter_class=HelpFormatter,
               description="Train DKEL, DK, PCL or a compared method of Table 1 (Shao & Chen, DKEL).")
    a = p.add_argument
    a("--dataset", default="cifar10", choices=data.DATASETS,
      help="data set (paper Sec. 4.1); synthetic is for smoke runs only")
    a("--arch", default="resnet32",
      help=f"architecture (paper Sec. 4.2, docs/spec.md Sec. 5): {', '.join(ARCHS)}")
    a("--method", default="dkel", choices=list(METHODS),
      help="dkel = Eq. (12), dk = Eq. (2) with L_dk, pcl = Eq. (2), pcl_de = Eq. (2) + L_de "
           "(Table 3); kd = offline KD (Table 2); the others: Table 1 (docs/spec.md Sec. 6)")
    a("--teacher-run",
      help="kd: finished run whose deployable.pt is the frozen teacher (Table 2, Sec. 4.3)")
    a("--decay", default="exp", choices=DECAYS,
      help="w(ep) in Eq. (12): exp = Eq. (11) (paper), cos = Eq. (13), linear = Eq. (14)")
    a("--rampup-scales-de", action="store_true",
      help="dkel, pcl_de: weight L_de by lambda r(ep) w(ep), the earlier reading of Eq. (12) and "
           "the authors' code's (default, Eq. (12) as printed: lambda w(ep); docs/spec.md Sec. 2)")
    a("--beta", type=float, default=0.5,
      help="beta of Eq. (11), per epoch, never scaled (paper: 0.5, Sec. 4.2)")
    a("--num-peers", type=int, default=3,
      help="number of peers, branches or networks m (paper: 3, Sec. 4.3); baseline ignores it")
    a("--temperature", type=float, default=3.0,
      help="distillation temperature T of Eq. (1) (docs/spec.md Sec. 3: 3)")
    a("--ema-decay", type=float, default=0.999,
      help="EMA decay alpha of Eq. (5) (docs/spec.md Sec. 3: 0.999)")
    a("--kd-weight", type=float, default=1.0,
      help="lambda of Eq. (2)/(12), from PCL (docs/spec.md Sec. 3: 1.0)")
    a("--rampup-epochs", type=int, default=None,
      help="ramp-up length R of r(ep); 0 disables (PCL: 80 of 300 epochs; default: scaled with "
           "--epochs)")
    a("--init-iters", type=int, default=1,
      help="teacher initialisation iterations k (paper: 1, Sec. 4.2; Fig. 6: 1 to 20)")
    a("--init-lr", type=float, default=0.01,
      help="teacher initialisation learning rate (paper: 0.01, Sec. 4.2; authors' code: 0.001)")
    a("--epochs", type=int, default=None,
      help="epochs (default: the paper's, 300 on CIFAR and 100 on TinyImageNet, Sec. 4.2; "
           "synthetic: 300 too)")
    a("--batch-size", type=int, default=128, help="batch size (paper: 128, Sec. 4.2)")
    a("--lr", type=float, default=0.1, help="initial learning rate (paper: 0.1, Sec. 4.2)")
    a("--momentum", type=float, default=0.9, help="Nesterov momentum (paper: 0.9, Sec. 4.2)")
    a("--weight-decay", type=float, default=5e-4, help="weight decay (paper Sec. 4.2; its digits lost in our copy: 5e-4 from the "
           "authors' src/optimizer/optimizer_config.yml)")
    a("--milestones", type=int, nargs="+", default=None,
      help="epochs at which lr is multiplied by 0.1 (paper Sec. 4.2, values from the authors' "
           "src/schemes/scheme_config.yml: 150 225 of 300 on CIFAR, 30 60 of 100 on TinyImageNet; "
           "default: scaled with --epochs)")
    a("--seed", type=int, default=0, help="random seed (initialisation, data order, augmentation)")
    a("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    a("--data-dir", default="./data", help="where the data set is, or is downloaded to")
    a("--out-dir", default=None,
      help="run directory (default: runs/<dataset>_<arch>_<method>_seed<seed>)")
    a("--resume", action="store_true",
      help="continue the run in --out-dir from its checkpoint; a run stopped in its first epoch "
           "starts again (docs/training.md, Resume)")
    a("--eval-every", type=int, default=1,
      help="evaluate on the test split every N epochs (and always after the last)")
    a("--eval-batch-size", type=int, default=1024,
      help="images per batch of the evaluation (ours: fewer, larger batches than training's cut "
           "the per-epoch overhead; eval-mode BatchNorm makes the accuracies independent of it)")
    a("--precision", default="auto", choices=("auto", "bf16", "fp32"),
      help="forward passes under bf16 autocast or in fp32 (losses, EMA, BatchNorm statistics and "
           "master weights stay fp32); auto: the precision the run in --out-dir was started in "
           "(its config.json), else bf16 on CUDA and on a CPU with native bf16, fp32 elsewhere")
    a("--compile", action="store_true",
      help="ours: torch.compile the whole step, forward, loss, backward, SGD and Eq. (5), as one "
           "graph (on CUDA with CUDA graphs; docs/performance.md)")
    a("--sync-bn", action="store_true",
      help="torchrun: BatchNorm statistics of the global batch, synchronised across the ranks "
           "(docs/distributed.md; default: each rank's own B/N images)")
    a("--collapse-threshold", type=float, default=0.01,
      help="stop when the deployed model's mean logit norm falls below this (collapse, Sec. 3.3)")
    a("--val-size", type=int, default=0,
      help="hold this many training images out (stratified, fixed by --seed) to choose the "
           "deployed peer and epoch on; 0: no selection, the deployed model is peer 0 at the final "
           "epoch")
    a("--ensemble-lr-per-peer", action="store_true",
      help="pcl/dk/pcl_de/dkel, not in the paper: the ensemble head h of Eq. (3) learns at lr/M, a peer "
           "classifier's step size. h sees M stacked non-negative features, ~M times a peer "
           "classifier's curvature: at lr 0.1 it is unstable and can stall the peers near chance "
           "on some seeds (docs/training.md). A fixed 1/M from that curvature, not a tuned value")
    a("--authors-code", action="store_true",
      help="the four behaviours of the authors' DKEL code below at once, as they ran it, and "
           "--rampup-scales-de for dkel and pcl_de (docs/spec.md Sec. 8; not "
           "--authors-pcl-teacher)")
    a("--authors-rampup", action="store_true",
      help="authors' DKEL code (lambd = 0.1): r(ep) = 0.1 exp(-5(1 - ep/0.1)^2) for ep <= 80, 0.1 after")
    a("--authors-init", action="store_true",
      help="authors' code: k + 1 initialisation steps at lr 0.001 with weight decay 5e-4")
    a("--authors-ema-warmup", action="store_true",
      help="authors' code: alpha = min(1 - 1/(step + 1), alpha)")
    a("--authors-weight-cutoff", action="store_true",
      help="authors' code: w(ep) = 0 once exp(-beta ep) < 0.01, --decay exp only")
    a("--authors-pcl-teacher", action="store_true",
      help="pcl only, authors' code: PCL's temporal mean teacher is a whole EMA copy of the "
           "student network, trunk included (default, the paper's reading: EMA branches on the "
           "student's own trunk, docs/spec.md Sec. 2, 8); not part of --authors-code")
    return p


def scaled_milestones(epochs: int, fractions: tuple[float, float]) -> list[int]:
    """The paper's two lr milestones at `fractions` of a run of `epochs`, rounded, kept apart, and
    from 3 epochs on both before the last epoch, so that both act (a milestone at the last epoch
    never does): [1, 2] at 2 and 3 epochs, [1] at 1 (docs/spec.md Sec. 3)."""
    first = max(1, round(fractions[0] * epochs))
    second = max(first + 1, round(fractions[1] * epochs))
    if epochs >= 3 and second >= epochs:
        second = epochs - 1
        first = min(first, second - 1)
    return sorted({first, min(second, epochs)})


def defaults() -> dict:
    """Every flag's default as argparse gives it (before `resolve_args` scales the schedules): what
    a run's config.json that lacks a flag (a run made before the flag existed) was made with."""
    return vars(build_parser().parse_args([]))


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse, fill the schedule defaults scaled to --epochs (docs/spec.md Sec. 3) and validate.
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
        args.milestones = scaled_milestones(args.epochs, fractions)
    if args.rampup_epochs is None:
        # NOTE(paper): PCL's R = 80 of 300 epochs, scaled; on TinyImageNet's 100 epochs R = 27.
        # From 2 epochs on R >= 1 (r(0) = e^-5); one epoch has R = 0, no ramp-up (docs/spec.md Sec. 3).
        args.rampup_epochs = round(PAPER_RAMPUP_FRACTION * args.epochs)
    if args.rampup_scales_de and args.method not in WITH_DE:
        parser.error(f"--rampup-scales-de is for --method {' or '.join(WITH_DE)} only")
    if args.authors_code:
        for flag in ("authors_rampup", "authors_ema_warmup", "authors_weight_cutoff", "authors_init"):
            setattr(args, flag, True)
        # Their loss multiplies L_de by their r(ep) too (src/losses/loss_wrapper.py).
        args.rampup_scales_de = args.method in WITH_DE
    min_peers = METHODS[args.method].min_peers
    checks = [
        (args.beta < 0, f"--beta must be >= 0, got {args.beta}"),
        (args.teacher_run is not None and args.method != "kd",
         "--teacher-run is for --method kd only"),
        (args.num_peers < min_peers,
         f"--method {args.method} needs --num-peers >= {min_peers}, got {args.num_peers}"),
        (args.temperature <= 0, f"--temperature must be > 0, got {args.temperature}"),
        (not 0.0 <= args.ema_decay <= 1.0, f"--ema-decay must be in [0, 1], got {args.ema_decay}"),
        (args.kd_weight < 0, f"--kd-weight must be >= 0, got {args.kd_weight}"),
        (args.rampup_epochs < 0, f"--rampup-epochs must be >= 0, got {args.rampup_epochs}"),
        (args.init_iters < 0, f"--init-iters must be >= 0, got {args.init_iters}"),
        (args.val_size < 0, f"--val-size must be >= 0, got {args.val_size}"),
        (args.ensemble_lr_per_peer and args.method not in ONLINE_DISTILLATION,
         "--ensemble-lr-per-peer is for --method pcl, dk, pcl_de or dkel only"),
        (args.authors_pcl_teacher and args.method not in ("pcl", "pcl_de"),
         "--authors-pcl-teacher is for --method pcl or pcl_de only"),
        (args.lr <= 0 or args.init_lr <= 0, "--lr and --init-lr must be > 0"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.eval_every < 1, f"--eval-every must be >= 1, got {args.eval_every}"),
        (args.eval_batch_size < 1, f"--eval-batch-size must be >= 1, got {args.eval_batch_size}"),
        (args.weight_decay < 0 or not 0.0 <= args.momentum < 1.0,
         "--weight-decay must be >= 0 and --momentum in [0, 1)"),
        (any(not 1 <= m <= args.epochs for m in args.milestones),
         f"--milestones {' '.join(map(str, args.milestones))} must lie within 1..{args.epochs} "
         f"(--epochs {args.epochs})"),
    ]
    for bad, message in checks:
        if bad:
            parser.error(message)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use "
                     f"--device cpu")
    default_dir = os.path.join("runs", f"{args.dataset}_{args.arch}_{args.method}_seed{args.seed}")
    args.out_dir = args.out_dir or default_dir
    if args.precision == "auto":  # config.json records what ran
        args.precision = recorded_precision(args.out_dir) or (
            "bf16" if native_bf16(torch.device(args.device)) else "fp32")
    return args


def recorded_precision(out_dir: str) -> str | None:
    """The precision that the run in `out_dir` was started in, as its config.json records it;
    None without a readable one. Under --precision auto a run goes on in it, on any machine: another
    precision would change its numbers (and `rundir.resumes` would refuse it)."""
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            precision = json.load(f).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
    return precision if precision in ("bf16", "fp32") else None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that does, or a CPU with AVX512-BF16 or
    AMX (oneDNN emulates bf16 on older AVX512 CPUs, slower than fp32)."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # the GPU the run uses, not the current one
            return torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(capabilities.get(name) for name in ("avx512_bf16", "amx_bf16", "bf16"))
