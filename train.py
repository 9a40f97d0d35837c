"""Train PCL, DK or DKEL end to end (paper Sec. 3.2-3.4, Algorithm 1; protocol of Sec. 4.2).

    python train.py --dataset cifar10 --arch resnet32 --beta 0.5

This is where the paper is wired. One run builds the data (data.py) and the multi-peer student
(models.py); gives it its teacher (ema.py): PCL's peer mean teacher, or the independent teacher
of DK and DKEL, which `initialise_teacher` trains alone for k iterations first (Sec. 3.3); then
epoch by epoch minimises Eq. (2) or Eq. (12) (losses.py), with the ramp-up r(ep) and, for DKEL,
the decaying weight w(ep), by SGD + Nesterov, updates the teacher by Eq. (5) after every
optimizer step, and evaluates every student peer, the student ensemble, every teacher peer and
the teacher ensemble (SPEC.md Sec. 4). The run directory (rundir.py) receives config.json,
metrics.csv, curves.png, checkpoint.pt (every epoch; --resume continues from it), deployable.pt
and summary.json. The compared methods of Tables 1 and 2 (baselines.py) run through the same loop.
"""
import argparse
import inspect
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from backbones import ARCHS
import baselines
import data as datasets
import distributed
from ema import IndependentTeacher, PeerMeanTeacher, ema_lag_warning, initialise_teacher
from losses import DECAYS, decay_weight, distillation_objective, rampup
from models import multi_peer_net
import rundir
from rundir import (EXIT_BAD_INPUT, EXIT_INTERRUPTED, RunStopped, config_of,
                    restore_checkpoint, save_checkpoint, summary_table, write_json, write_metrics,
                    write_summary)

PAPER_EPOCHS = {"tinyimagenet": 100}               # Sec. 4.2; every other data set: 300
PAPER_MILESTONES = {"tinyimagenet": (0.3, 0.6)}    # Sec. 4.2; every other data set: 50% and 75%
PAPER_RAMPUP_FRACTION = 80 / 300                   # PCL's R = 80 of 300 epochs (SPEC.md Sec. 2)
STOP = rundir.StopRequests()                       # SIGTERM / SIGINT end a run at a step's end


# ----------------------------------------------------------------------------- the paper's methods
class OnlineDistillation:
    """The multi-peer student with the ensemble head of Eq. (3), its EMA teacher, and how a step
    and an evaluation use them. PCL, DK and DKEL differ only in the teacher (a subclass's
    `make_teacher`), in its initialisation (`initialise`) and in whether w(ep) decays (`decays`)."""
    min_peers = 2
    decays = False          # Eq. (2): w(ep) = 0
    schedules = ("rampup",)

    def __init__(self, arch: str, num_classes: int, num_peers: int, device: torch.device, *,
                 temperature: float, kd_weight: float, ema_decay: float, authors_ema_warmup: bool = False,
                 compile: bool = False):
        self.temperature, self.kd_weight = temperature, kd_weight
        self.student = multi_peer_net(arch, num_classes, num_peers).to(device)
        self.teacher = self.make_teacher(ema_decay, authors_ema_warmup, compile)
        # NHWC convolutions: the tensor cores' layout on CUDA, and about 1.3x faster than NCHW for
        # resnet32 on this project's 2-core CPU as well (oneDNN).
        self.student.to(memory_format=torch.channels_last)
        self.teacher.teacher.to(memory_format=torch.channels_last)
        self.student_forward = torch.compile(self.student) if compile else self.student
        self.num_views = num_peers  # every peer its own augmented view (Sec. 3.2)

    def initialise(self, batches) -> None:
        """Before the first epoch: nothing (PCL)."""

    def teacher_logits(self, views: torch.Tensor, student_out) -> torch.Tensor:
        """Teacher peer logits (M, B, C), under no_grad: the teacher learns only by Eq. (5), so
        every distillation target it gives is detached by construction."""
        with torch.no_grad():
            return self.teacher.logits(views, student_out)

    def loss(self, views: torch.Tensor, labels: torch.Tensor, weights: dict[str, float]):
        out = self.student_forward(views)
        teacher_logits = self.teacher_logits(views, out)
        loss, parts = distillation_objective(out.logits, out.ensemble, teacher_logits, labels,
                                             temperature=self.temperature, kd_weight=self.kd_weight,
                                             rampup=weights["rampup"],
                                             ensemble_weight=weights["w"] if self.decays else 0.0)
        # The teacher term is L_pm (PCL's peer mean teacher) or L_dk (the independent teacher).
        parts = {self.teacher.term if name == "teacher_kd" else name: value for name, value in parts.items()}
        parts["correct"] = (out.logits.argmax(-1) == labels).float().mean(-1).mean()
        parts["logit_norm"] = teacher_logits.float().norm(dim=-1).mean()  # collapse watch
        return loss, parts

    def after_step(self, step: int) -> None:
        self.teacher.update(step)

    def eval_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """SPEC.md Sec. 4: every student peer, e, every teacher peer, the teacher ensemble."""
        out = self.student(images)  # the same image to every peer
        teacher = self.teacher_logits(images, out)
        logits = {f"student_peer{i}": peer for i, peer in enumerate(out.logits)}
        logits["student_ensemble"] = out.ensemble
        logits.update({f"teacher_peer{i}": peer for i, peer in enumerate(teacher)})
        logits["teacher_ensemble"] = teacher.float().mean(0)
        return logits

    def deployed_keys(self) -> list[str]:
        return [f"teacher_peer{i}" for i in range(self.student.num_peers)]

    def deployable(self, name: str) -> torch.nn.Module:
        """The teacher peer of the output `name` as a plain network (SPEC.md Sec. 4)."""
        return self.teacher.deployable(self.deployed_keys().index(name))

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, "teacher": self.teacher.teacher}

    def set_mode(self, train: bool) -> None:
        # Teacher in train mode while training: batch-statistics BatchNorm (ema.py, Mean Teacher).
        for module in self.modules().values():
            module.train(train)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.student.parameters())


class PCL(OnlineDistillation):
    """Eq. (2): PCL's peer mean teacher (Eq. (4), L_pm), no initialisation (Table 3, row 1)."""
    label = "PCL"

    def make_teacher(self, ema_decay: float, authors_warmup: bool, compile: bool):
        return PeerMeanTeacher(self.student, ema_decay, authors_warmup)


class DK(OnlineDistillation):
    """Eq. (2) with L_dk of Eq. (6): the independent teacher, initialised by Sec. 3.3."""
    label = "PCL+L_dk"

    def __init__(self, arch: str, num_classes: int, num_peers: int, device: torch.device, *,
                 temperature: float, kd_weight: float, ema_decay: float, init_iters: int, init_lr: float,
                 authors_init: bool = False, authors_ema_warmup: bool = False, compile: bool = False):
        super().__init__(arch, num_classes, num_peers, device, temperature=temperature, kd_weight=kd_weight,
                         ema_decay=ema_decay, authors_ema_warmup=authors_ema_warmup, compile=compile)
        # (iterations, lr, weight decay) of Sec. 3.3's step 2: the paper's k at --init-lr, no decay.
        # DEVIATION (opt-in, SPEC.md Sec. 8): the authors' code runs k + 1 SGD steps (its loop stops
        # after the step at which its counter reaches k) at lr 0.001 with weight decay 5e-4.
        self.init = (init_iters + 1, 0.001, 5e-4) if authors_init else (init_iters, init_lr, 0.0)

    def make_teacher(self, ema_decay: float, authors_warmup: bool, compile: bool):
        return IndependentTeacher(self.student, ema_decay, authors_warmup, compile)

    def initialise(self, batches) -> None:
        iters, lr, weight_decay = self.init
        if iters > 0:
            initialise_teacher(self.teacher.teacher, batches, iters, lr, weight_decay)


class DKEL(DK):
    """Eq. (12): DK plus the decaying ensemble term L_de of Eq. (9), weighted by w(ep)."""
    label = "DKEL"
    decays = True
    schedules = ("rampup", "w")


# The one list of methods, in the column order of the paper's Table 1 (dk: Table 3; kd: Table 2).
METHODS = {"dml": baselines.DML, "cl": baselines.CL, "one": baselines.ONE, "okddip": baselines.OKDDip,
           "kdcl": baselines.KDCL, "pcl": PCL, "baseline": baselines.Baseline, "dk": DK, "dkel": DKEL,
           "kd": baselines.KD}


def build_method(args: argparse.Namespace, num_classes: int, device: torch.device, image_size: int = 32):
    """The method object of `args.method`, given the values its constructor names."""
    method_class = METHODS[args.method]
    values = {**vars(args), "num_classes": num_classes, "image_size": image_size, "device": device}
    names = inspect.signature(method_class).parameters
    return method_class(**{name: values[name] for name in names})


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py",
                                description="Train DKEL, DK, PCL or a compared method of Table 1 "
                                            "(Shao & Chen, DKEL).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="cifar10", choices=datasets.DATASETS,
      help="data set (paper Sec. 4.1); synthetic is for smoke runs only")
    a("--arch", default="resnet32", help=f"architecture (paper Sec. 4.2, SPEC.md Sec. 5): {', '.join(ARCHS)}")
    a("--method", default="dkel", choices=list(METHODS),
      help="dkel = Eq. (12), dk = Eq. (2) with L_dk, pcl = Eq. (2) (Table 3); kd = offline KD (Table 2); "
           "the others: Table 1 (SPEC.md Sec. 6)")
    a("--teacher-run", help="kd: finished run whose deployable.pt is the frozen teacher (Table 2, Sec. 4.3)")
    a("--decay", default="exp", choices=DECAYS,
      help="w(ep) in Eq. (12): exp = Eq. (11) (paper), cos = Eq. (13), linear = Eq. (14)")
    a("--beta", type=float, default=0.5,
      help="beta of Eq. (11), per epoch, never scaled (paper: 0.5, Sec. 4.2)")
    a("--num-peers", type=int, default=3,
      help="number of peers, branches or networks m (paper: 3, Sec. 4.3); baseline ignores it")
    a("--temperature", type=float, default=3.0, help="distillation temperature T of Eq. (1) (SPEC.md: 3)")
    a("--ema-decay", type=float, default=0.999, help="EMA decay alpha of Eq. (5) (SPEC.md: 0.999)")
    a("--kd-weight", type=float, default=1.0, help="lambda of Eq. (2)/(12), from PCL (SPEC.md: 1.0)")
    a("--rampup-epochs", type=int, default=None,
      help="ramp-up length R of r(ep); 0 disables (PCL: 80 of 300 epochs; default scales with --epochs)")
    a("--init-iters", type=int, default=1,
      help="teacher initialisation iterations k (paper: 1, Sec. 4.2; Fig. 6: 1 to 20)")
    a("--init-lr", type=float, default=0.01,
      help="teacher initialisation learning rate (paper: 0.01, Sec. 4.2; authors' code: 0.001)")
    a("--epochs", type=int, default=None,
      help="epochs (paper: 300 on CIFAR, 100 on TinyImageNet, Sec. 4.2; synthetic: 300 too)")
    a("--batch-size", type=int, default=128, help="batch size (paper: 128, Sec. 4.2)")
    a("--lr", type=float, default=0.1, help="initial learning rate (paper: 0.1, Sec. 4.2)")
    a("--momentum", type=float, default=0.9, help="Nesterov momentum (paper: 0.9, Sec. 4.2)")
    a("--weight-decay", type=float, default=5e-4, help="weight decay (paper: 5e-4, Sec. 4.2)")
    a("--milestones", type=int, nargs="+", default=None,
      help="epochs at which lr is multiplied by 0.1 (paper: 150 225 of 300 on CIFAR, 30 60 of 100 on "
           "TinyImageNet; default scales with --epochs)")
    a("--seed", type=int, default=0, help="random seed (initialisation, data order, augmentation)")
    a("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    a("--data-dir", default="./data", help="where the data set is, or is downloaded to")
    a("--out-dir", default=None, help="run directory (default: runs/<dataset>_<arch>_<method>_seed<seed>)")
    a("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    a("--eval-every", type=int, default=1,
      help="evaluate on the test split every N epochs (and always after the last)")
    a("--precision", default="auto", choices=("auto", "bf16", "fp32"),
      help="forward passes under bf16 autocast or in fp32 (losses, EMA, BatchNorm statistics and master "
           "weights stay fp32); auto: bf16 on CUDA and on a CPU with native bf16, fp32 elsewhere")
    a("--compile", action="store_true",
      help="torch.compile the forward passes of the trained networks (and teacher)")
    a("--sync-bn", action="store_true", help="torchrun: SyncBatchNorm across ranks (CUDA; default per rank)")
    a("--collapse-threshold", type=float, default=0.01,
      help="stop when the deployed model's mean logit norm falls below this (collapse, paper Sec. 3.3)")
    a("--val-size", type=int, default=0,
      help="hold this many training images out (stratified, fixed by --seed) to choose the deployed "
           "peer and epoch on; 0: no selection, the deployed model is peer 0 at the final epoch")
    a("--authors-code", action="store_true",
      help="every --authors-* behaviour below at once: the authors' code as they ran it (SPEC.md Sec. 8)")
    a("--authors-rampup", action="store_true",
      help="authors' code: r(ep) = 0.1 exp(-5(1 - ep/0.1)^2) for ep <= 80, 0.1 after (SPEC.md Sec. 8)")
    a("--authors-init", action="store_true",
      help="authors' code: k + 1 initialisation steps at lr 0.001 with weight decay 5e-4 (SPEC.md Sec. 8)")
    a("--authors-ema-warmup", action="store_true",
      help="authors' code: alpha = min(1 - 1/(step + 1), alpha) (SPEC.md Sec. 8)")
    a("--authors-weight-cutoff", action="store_true",
      help="authors' code: w(ep) = 0 once exp(-beta ep) < 0.01, --decay exp only (SPEC.md Sec. 8)")
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
        # NOTE(paper): PCL's R = 80 of 300 epochs, scaled; on TinyImageNet's 100 epochs R = 27.
        args.rampup_epochs = round(PAPER_RAMPUP_FRACTION * args.epochs)
    if args.authors_code:
        args.authors_rampup = args.authors_ema_warmup = args.authors_weight_cutoff = args.authors_init = True
    min_peers = METHODS[args.method].min_peers
    checks = [
        (args.beta < 0, f"--beta must be >= 0, got {args.beta}"),
        (args.teacher_run is not None and args.method != "kd", "--teacher-run is for --method kd only"),
        (args.num_peers < min_peers,
         f"--method {args.method} needs --num-peers >= {min_peers}, got {args.num_peers}"),
        (args.temperature <= 0, f"--temperature must be > 0, got {args.temperature}"),
        (not 0.0 <= args.ema_decay <= 1.0, f"--ema-decay must be in [0, 1], got {args.ema_decay}"),
        (args.kd_weight < 0, f"--kd-weight must be >= 0, got {args.kd_weight}"),
        (args.rampup_epochs < 0, f"--rampup-epochs must be >= 0, got {args.rampup_epochs}"),
        (args.init_iters < 0, f"--init-iters must be >= 0, got {args.init_iters}"),
        (args.val_size < 0, f"--val-size must be >= 0, got {args.val_size}"),
        (args.lr <= 0 or args.init_lr <= 0, "--lr and --init-lr must be > 0"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.eval_every < 1, f"--eval-every must be >= 1, got {args.eval_every}"),
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
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    if args.precision == "auto":  # config.json records what ran
        args.precision = "bf16" if native_bf16(torch.device(args.device)) else "fp32"
    default_dir = os.path.join("runs", f"{args.dataset}_{args.arch}_{args.method}_seed{args.seed}")
    args.out_dir = args.out_dir or default_dir
    return args


def epoch_weights(args: argparse.Namespace, epoch: int) -> dict[str, float]:
    """r(ep) of Eq. (2)/(12) and w(ep) of Eq. (11)/(13)/(14) for a 0-based epoch."""
    if args.authors_rampup:
        # DEVIATION (opt-in, SPEC.md Sec. 8): the authors' code scales by 0.1, uses 0.1 where R was
        # meant and switches at its hard-coded epoch 80 whatever the data set and --epochs.
        ramp = 0.1 * math.exp(-5.0 * (1.0 - epoch / 0.1) ** 2) if epoch <= 80 else 0.1
    else:
        ramp = rampup(epoch, args.rampup_epochs)
    weight = decay_weight(epoch, args.epochs, args.decay, args.beta)
    if args.authors_weight_cutoff and args.decay == "exp" and weight < 0.01:
        weight = 0.0  # DEVIATION (opt-in, SPEC.md Sec. 8): the authors' code, exponential decay only.
    return {"rampup": ramp, "w": weight}


# ----------------------------------------------------------------------------- training
def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that does, or a CPU with AVX512-BF16 or
    AMX (oneDNN emulates bf16 on older AVX512 CPUs, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(capabilities.get(name) for name in ("avx512_bf16", "amx_bf16", "bf16"))


def autocast(device: torch.device, precision: str):
    """The forward passes under bf16 autocast (convolutions and linear layers in bf16), the same on
    the CPU as on CUDA, or in fp32. BatchNorm keeps fp32 parameters and statistics either way, the
    losses cast the logits to fp32, and the EMA and the optimizer work on fp32 master weights."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def sgd(parameters, *, lr: float, momentum: float, weight_decay: float):
    """SGD with Nesterov momentum (paper Sec. 4.2), one fused kernel over all parameters."""
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=momentum > 0, fused=True)


def train_step(method, optimizer, views: torch.Tensor, labels: torch.Tensor, weights: dict[str, float],
               step: int, precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step of the student, then the teacher's Eq. (5); no host-device sync."""
    with autocast(views.device, precision):
        loss, parts = method.loss(views, labels, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.after_step(step)
    return loss, parts


def train_epoch(args, method, optimizer, data, epoch: int, state: dict) -> dict:
    """One epoch; the device is synchronised once, at its end, for the logged means."""
    weights = epoch_weights(args, epoch)
    generator = datasets.epoch_generator(args.seed, epoch, data.device)
    batches = datasets.train_batches(data, args.batch_size, method.num_views, generator, distributed.part())
    num_batches = datasets.num_train_batches(data, args.batch_size)
    totals: dict[str, torch.Tensor] = {}
    method.set_mode(True)
    start = time.perf_counter()
    for views, labels in tqdm(batches, total=num_batches, desc=f"epoch {epoch + 1}/{args.epochs}",
                              leave=False, dynamic_ncols=True, file=sys.stderr):
        loss, parts = train_step(method, optimizer, views, labels, weights, state["step"], args.precision)
        STOP.check(args.out_dir, epoch)  # SIGTERM / SIGINT: stop here, the finished epochs are saved
        state["step"] += 1
        for name, value in {"loss": loss.detach(), **parts}.items():
            totals[name] = totals.get(name, 0.0) + value.float()
    means = {k: v.item() / num_batches for k, v in distributed.end_of_epoch(method, totals).items()}  # sync
    seconds = time.perf_counter() - start
    means["train_acc"] = 100.0 * means.pop("correct")
    return {**weights, **means, "epoch_seconds": seconds,
            "images_per_s": num_batches * args.batch_size / seconds}


@torch.no_grad()
def evaluate(method, data, batch_size: int, precision: str, split: str = "test") -> dict[str, float]:
    """Top-1 accuracy (%) on the test split ("acc_*") or the validation split ("val_acc_*") of
    every output of SPEC.md Sec. 4 (eval-mode BatchNorm)."""
    method.set_mode(False)
    correct: dict[str, torch.Tensor] = {}
    share = distributed.evaluation_share(data, split)  # torchrun: this rank's part of the split
    for images, labels in datasets.test_batches(share, batch_size, split):
        with autocast(data.device, precision):
            logits = method.eval_logits(images)
        for name, value in logits.items():
            correct[name] = correct.get(name, 0) + (value.argmax(-1) == labels).sum()
    prefix, total = ("acc" if split == "test" else "val_acc"), getattr(data, f"{split}_labels").numel()
    accuracies = {f"{prefix}_{k}": 100.0 * v.item() / total for k, v in distributed.summed(correct).items()}
    deployed = [accuracies[f"{prefix}_{key}"] for key in method.deployed_keys()]
    accuracies[f"{prefix}_deployed_mean"] = sum(deployed) / len(deployed)
    return accuracies


def start_or_resume(args, method, optimizer, scheduler, data, config: dict) -> dict:
    """A fresh run (teacher initialisation included) or the state of the checkpoint."""
    if not args.resume:  # rundir.hold_run_dir made the directory and refuses one that holds a run
        write_json(config, os.path.join(args.out_dir, "config.json"))
        method.initialise(datasets.repeated_batches(data, args.batch_size, method.num_views, args.seed))
        return {"epoch": 0, "step": 0, "history": []}
    return restore_checkpoint(args.out_dir, config, method.modules(), optimizer, scheduler)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: pick the fastest kernels once
    try:
        data = datasets.load_data(args.dataset, args.data_dir, device, seed=args.seed)
        datasets.check_batch_size(data, args.batch_size, args.val_size)
        if args.val_size:
            data = datasets.hold_out_validation(data, args.val_size, args.seed)
    except datasets.DataError as error:
        raise RunStopped(str(error), EXIT_BAD_INPUT) from None
    method = build_method(args, data.num_classes, device, data.image_shape[-1])
    optimizer = sgd(method.trainable_parameters(), lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)
    config = config_of(args, device)
    state = start_or_resume(args, method, optimizer, scheduler, data, config)
    distributed.prepare(method, args)  # torchrun: DDP, rank 0's weights everywhere (distributed.py)
    lag = hasattr(method, "teacher") and ema_lag_warning(args.ema_decay, datasets.num_train_batches(
        data, args.batch_size), args.epochs)
    if lag:
        print(f"warning: {lag}", file=sys.stderr)
    for epoch in range(state["epoch"], args.epochs):
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
               **train_epoch(args, method, optimizer, data, epoch, state)}
        rundir.check_health(row, args.out_dir, args.collapse_threshold)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            row.update(evaluate(method, data, args.batch_size, args.precision))
            if data.val_labels is not None:
                row.update(evaluate(method, data, args.batch_size, args.precision, "val"))
                rundir.keep_if_best(args.out_dir, method, row, state["history"])
        scheduler.step()
        state["history"].append(row)
        state["epoch"] = epoch + 1
        save_checkpoint(args.out_dir, method.modules(), optimizer, scheduler, state, config)
        write_metrics(os.path.join(args.out_dir, "metrics.csv"), state["history"])
        rundir.plot_curves(args.out_dir, state["history"])
        print(rundir.epoch_line(row, args.epochs, state["history"], method.schedules), flush=True)
        STOP.check(args.out_dir, epoch + 1)
    return write_summary(args, method, data.num_classes, state["history"], data.image_shape[-1])


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    try:
        with distributed.session(args), STOP:  # torchrun's process group, the run-directory lock
            print(summary_table(run(args)))
    except RunStopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished epoch is saved in {args.out_dir}; continue with the same "
              f"command plus --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
