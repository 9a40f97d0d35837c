"""Algorithm 1 of the paper: online distillation of a multi-peer student and its EMA teacher
(Sec. 3.2-3.4), with the training protocol of Sec. 4.2.

    python train.py --dataset cifar10 --arch resnet32 --beta 0.5

`train` is Algorithm 1, top to bottom: the data (data.py); the method, i.e. the multi-peer
student (models.py) and its teacher (ema.py), PCL, DK or DKEL (methods.py) or a compared method
(baselines.py); the Sec. 3.3 initialisation of the teacher; then, epoch by epoch, r(ep) and w(ep),
the student's SGD step on Eq. (2) or Eq. (12) (losses.py) followed by the teacher's Eq. (5), and
the evaluation of every student peer, the student ensemble, every teacher peer and the teacher
ensemble (docs/spec.md Sec. 4). Each piece of infrastructure is one named call: the command line
(cli.py), the run directory and its checkpoints (infra/rundir.py), the report (infra/report.py),
torchrun (infra/distributed.py), the stop signals (`stop`), the precision (`autocast`) and, with
--compile, the whole step as one compiled graph (`training_step`, infra/compiled.py).
"""
import sys

# Before any other import: this code needs Python 3.10 (`X | None` annotations, evaluated when the
# modules load); an older Python gets this line, not a traceback.
if sys.version_info < (3, 10):
    sys.stderr.write("error: train.py needs Python 3.10 or newer, this is Python %d.%d; run it "
                     "with a newer python (README, Quick start)\n" % sys.version_info[:2])
    sys.exit(2)

import gc
import os
import time

import torch
from tqdm import tqdm

import data
from baselines import KD, Baseline
from cli import METHODS, ONLINE_DISTILLATION, resolve_args
from losses import authors_rampup, authors_weight_cutoff, teacher_ensemble_decay, rampup
from methods import DK, DKEL, PCL, PCLDE
from models import multi_peer_net
# The machinery beyond the paper (infra/): the compiled step, torchrun, the report, the run
# directory.
from infra import compiled, distributed, report, rundir


def train(args, stop: rundir.StopRequests) -> dict:
    """Algorithm 1: train `args.method` and return the run's summary (infra/report.py). `stop`
    holds the SIGTERM / SIGINT received, which end the run at the end of a step."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: choose kernels once
    # The data set, on the device, where every batch is augmented (data.py).
    dataset = load_data(args, device)
    # The multi-peer student and its teacher (methods.py), or a compared method (baselines.py).
    method = build_method(args, dataset, device)
    channels_last(method)  # how they run, not what they compute
    optimizer = sgd(method.trainable_parameters(), lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.milestones, gamma=0.1)
    config = rundir.config_of(args, device)
    if rundir.resumes(args.out_dir, config, args.resume):
        state = rundir.restore_checkpoint(args.out_dir, config, method.modules(), optimizer,
                                          scheduler)
    else:
        rundir.write_json(config, os.path.join(args.out_dir, "config.json"))
        # Sec. 3.3: the teacher, a copy of the student, trains alone for k iterations (DK, DKEL).
        batches = data.repeated_batches(dataset, args.batch_size, method.num_views, args.seed)
        method.initialise(batches)
        state = {"epoch": 0, "step": 0, "history": []}
    distributed.prepare(method, args)  # torchrun: DDP, rank 0's weights on every rank
    # The student's step and Eq. (5); --compile: both as one compiled graph (infra/compiled.py).
    step = training_step(method, optimizer, args.precision, args.compile, device)
    num_batches = data.num_train_batches(dataset, args.batch_size)
    report.warn_if_teacher_lags(method, num_batches, args.epochs)
    for epoch in range(state["epoch"], args.epochs):
        weights = epoch_weights(args, epoch)  # r(ep) and w(ep)
        lr = optimizer.param_groups[0]["lr"]
        generator = data.epoch_generator(args.seed, epoch, device)
        batches = data.train_batches(dataset, args.batch_size, method.num_views, generator,
                                     distributed.part())
        method.set_mode(True)
        totals, start = {}, time.perf_counter()
        for views, labels in progress(batches, num_batches, epoch, args.epochs):
            loss, parts = step(views, labels, weights, state["step"])
            state["step"] += 1
            add_to(totals, {"loss": loss.detach(), **parts})
            # SIGTERM / SIGINT: the finished epochs are saved (torchrun: every rank at one step).
            stop.check(args.out_dir, epoch, state["step"])
        # The epoch's one host-device sync: the logged means (torchrun: over every rank).
        means = report.epoch_means(distributed.end_of_epoch(method, totals), num_batches)
        row = epoch_row(epoch, lr, weights, method.term_weights(weights), means,
                        num_batches * args.batch_size, time.perf_counter() - start)
        rundir.check_health(row, args.out_dir, args.collapse_threshold)
        # Evaluation (docs/spec.md Sec. 4); with a validation split, the model selection too.
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            row.update(evaluate(method, dataset, args.eval_batch_size, args.precision))
            if dataset.val_labels is not None:
                row.update(evaluate(method, dataset, args.eval_batch_size, args.precision, "val"))
                report.keep_if_best(method, row, state)
        scheduler.step()
        state["history"].append(row)
        state["epoch"] = epoch + 1
        save_epoch(args, method, optimizer, scheduler, state, config)
        stop.check(args.out_dir, epoch + 1)
    return report.write_summary(args, method, dataset, state)


def student_step(method, optimizer, views: torch.Tensor, labels: torch.Tensor,
                 weights: dict[str, float], precision: str):
    """One SGD step of the student on the method's objective (Eq. (12) for DKEL); no host sync."""
    with autocast(views.device, precision):
        loss, parts = method.loss(views, labels, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, parts


def training_step(method, optimizer, precision: str, compile: bool, device: torch.device):
    """`step(views, labels, weights, index)`: the student's SGD step (`student_step`), then the
    teacher's Eq. (5) after optimizer step `index` (method.after_step); with `compile`, the two as
    one torch.compile'd graph (infra/compiled.py). Returns the loss and its parts."""
    if compile:
        return compiled.CompiledStep(method, optimizer, precision, device)

    def step(views, labels, weights, index):
        loss, parts = student_step(method, optimizer, views, labels, weights, precision)
        method.after_step(index)  # Eq. (5): the teacher follows the student after every step
        return loss, parts

    return step


def epoch_weights(args, epoch: int) -> dict[str, float]:
    """r(ep) of Eq. (2)/(12) and w(ep) of Eq. (11)/(13)/(14) for a 0-based epoch, the paper's or,
    opt-in, the authors' code's (losses.authors_rampup, losses.authors_weight_cutoff)."""
    ramp = authors_rampup(epoch) if args.authors_rampup else rampup(epoch, args.rampup_epochs)
    w = teacher_ensemble_decay(epoch, args.epochs, args.decay, args.beta)
    if args.authors_weight_cutoff and args.decay == "exp":
        w = authors_weight_cutoff(w)
    return {"rampup": ramp, "teacher_ensemble_weight": w}


@torch.no_grad()
def evaluate(method, dataset, batch_size: int, precision: str, split: str = "test"
             ) -> dict[str, float]:
    """Top-1 accuracy (%) on the test split ("acc_*") or the validation split ("val_acc_*") of
    every output of docs/spec.md Sec. 4 (eval-mode BatchNorm)."""
    method.set_mode(False)
    correct: dict[str, torch.Tensor] = {}
    # torchrun: this rank's share of the split
    for images, labels in distributed.evaluation_batches(dataset, batch_size, split):
        with autocast(dataset.device, precision):
            logits = method.eval_logits(images)
        for name, value in logits.items():
            correct[name] = correct.get(name, 0) + (value.argmax(-1) == labels).sum()
    prefix = "acc" if split == "test" else "val_acc"
    total = getattr(dataset, f"{split}_labels").numel()
    correct = distributed.summed(correct)
    accuracies = {f"{prefix}_{k}": 100.0 * v.item() / total for k, v in correct.items()}
    deployed = [accuracies[f"{prefix}_{key}"] for key in method.deployed_keys()]
    accuracies[f"{prefix}_deployed_mean"] = sum(deployed) / len(deployed)
    return accuracies


# ----------------------------------------------------------------------------- the pieces it calls
def load_data(args, device: torch.device) -> data.ImageData:
    """The data set on `device`, checked against the batch size, with its validation split."""
    try:
        dataset = data.load_data(args.dataset, args.data_dir, device, seed=args.seed)
        data.check_batch_size(dataset, args.batch_size, args.val_size)
        if args.val_size:
            dataset = data.hold_out_validation(dataset, args.val_size, args.seed)
    except data.DataError as error:
        raise rundir.RunStopped(str(error), rundir.EXIT_BAD_INPUT) from None
    return dataset


def build_method(args, dataset: data.ImageData, device: torch.device):
    """The method of `args.method` and the flags that reach it: the paper's methods (pcl, dk,
    pcl_de, dkel) take the multi-peer student, offline KD its frozen teacher, the others an architecture."""
    num_classes = dataset.num_classes
    distillation = {"temperature": args.temperature, "kd_weight": args.kd_weight}
    if args.method in ONLINE_DISTILLATION:
        student = multi_peer_net(args.arch, num_classes, args.num_peers)
        online = {"ema_decay": args.ema_decay, "device": device,
                  "authors_ema_warmup": args.authors_ema_warmup,
                  "ensemble_lr_per_peer": args.ensemble_lr_per_peer,
                  "rampup_scales_de": args.rampup_scales_de, **distillation}
        if args.method in ("pcl", "pcl_de"):
            return (PCL if args.method == "pcl" else PCLDE)(
                student, authors_pcl_teacher=args.authors_pcl_teacher, **online)
        initialisation = {"init_iters": args.init_iters, "init_lr": args.init_lr,
                          "authors_init": args.authors_init}
        return (DK if args.method == "dk" else DKEL)(student, **initialisation, **online)
    if args.method == "baseline":
        return Baseline(args.arch, num_classes, device)
    if args.method == "kd":  # the deployed model of a finished run (refused with one line)
        teacher = rundir.load_teacher(args.teacher_run, dataset)
        teacher.to(memory_format=torch.channels_last)
        return KD(args.arch, num_classes, teacher, device, **distillation)
    # dml, kdcl, one, cl, okddip
    return METHODS[args.method].build(args.arch, num_classes, args.num_peers, device,
                                      **distillation)


def channels_last(method) -> None:
    """Every network in NHWC layout (channels_last: the tensor cores' layout on CUDA, and about
    1.3x faster than NCHW for resnet32 on a 2-core CPU as well, oneDNN). How the networks run,
    not what they compute."""
    for module in method.modules().values():
        module.to(memory_format=torch.channels_last)


def sgd(parameters, *, lr: float, momentum: float, weight_decay: float):
    """SGD with Nesterov momentum (paper Sec. 4.2), one fused kernel over all parameters.
    `parameters` may be groups: a group's "lr_scale" sets its learning rate to lr_scale * lr (the
    schedule then multiplies every group's rate by the same factors)."""
    parameters = [scaled_group(group, lr) if isinstance(group, dict) else group
                  for group in parameters]
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=momentum > 0, fused=True)


def scaled_group(group: dict, lr: float) -> dict:
    """An optimizer parameter group with its "lr_scale", if any, turned into its learning rate."""
    if "lr_scale" not in group:
        return group
    return {"lr": lr * group["lr_scale"], **{k: v for k, v in group.items() if k != "lr_scale"}}


def autocast(device: torch.device, precision: str):
    """The forward passes under bf16 autocast (convolutions and linear layers in bf16), the same on
    the CPU as on CUDA, or in fp32. BatchNorm keeps fp32 parameters and statistics either way, the
    losses cast the logits to fp32, and the EMA and the optimizer work on fp32 master weights."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def progress(batches, num_batches: int, epoch: int, epochs: int):
    """The epoch's batches behind a progress bar on stderr."""
    return tqdm(batches, total=num_batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                dynamic_ncols=True, file=sys.stderr)


def add_to(totals: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Sum a step's logged values on the device (no host sync)."""
    for name, value in values.items():
        totals[name] = totals.get(name, 0.0) + value.float()


def epoch_row(epoch: int, lr: float, weights: dict[str, float], term_weights: dict[str, float],
              means: dict[str, float], images: int, seconds: float) -> dict:
    """The epoch's row of metrics.csv: r(ep) and w(ep) are its columns "rampup" and "w", the weight
    each distillation term gets in the epoch's objective (lambda times all that multiplies it) its
    columns "weight_<term>"."""
    return {"epoch": epoch + 1, "lr": lr, "rampup": weights["rampup"],
            "w": weights["teacher_ensemble_weight"],
            **{f"weight_{term}": value for term, value in term_weights.items()},
            **means, "epoch_seconds": seconds, "images_per_s": images / seconds}


def save_epoch(args, method, optimizer, scheduler, state: dict, config: dict) -> None:
    """Every epoch, so that --resume continues from the last finished one: the checkpoint, then
    deployable.pt from the choice it holds (--val-size), metrics.csv, the epoch line; curves.png
    every report.CURVES_EVERY epochs and after the last."""
    rundir.save_checkpoint(args.out_dir, method.modules(), optimizer, scheduler, state, config)
    report.export_deployable(args.out_dir, state)
    rundir.write_metrics(os.path.join(args.out_dir, "metrics.csv"), state["history"])
    report.end_of_epoch(args.out_dir, state["history"][-1], state["history"], args.epochs,
                        METHODS[args.method].schedules)


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    code = run(args)
    if code:
        # A stop's exception holds the run's frames in a reference cycle (the method, and under
        # torchrun DDP's reducer with its process group): freed now, while the interpreter is
        # whole, rather than in its shutdown, where a stopped torchrun rank here once aborted
        # (SIGABRT) after its exit code was set.
        gc.collect()
    return code


def run(args) -> int:
    """train(args, stop) with its summary table; a stop, as one line and the exit code."""
    stop = rundir.StopRequests()  # holds SIGTERM and SIGINT while the run trains
    try:
        with distributed.session(args), stop:  # torchrun's process group, the run-directory lock
            print(report.summary_table(train(args, stop)))
    except rundir.RunStopped as stopped:
        print(f"error: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except BrokenPipeError:  # `train.py | head`: the reader of stdout has gone
        print(f"stdout was closed: every finished epoch is saved in {args.out_dir}; continue with "
              f"the same command plus --resume", file=sys.stderr)
        return rundir.stdout_gone()
    except KeyboardInterrupt as stopped:  # Ctrl-C before `stop` holds the signals, or a second one
        print(f"\n{str(stopped) or 'interrupted'}: every finished epoch is saved in "
              f"{args.out_dir}; continue with the same command plus --resume", file=sys.stderr)
        return getattr(stopped, "exit_code", rundir.EXIT_INTERRUPTED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
