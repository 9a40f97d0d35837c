"""The run directory of train.py and how it is kept: config.json, metrics.csv, checkpoint.pt
(and, written through here by report.py and deploy.py, curves.png, deployable.pt, deployable.pt2
and summary.json); the lock, the stop signals and the process exit codes.

Every file is written to a temporary name beside its final one, synced to the disk and renamed,
so a run killed at any moment, or a machine that loses power, leaves the previous version whole.
The checkpoint holds every module, the optimizer, the schedule, the RNG state, the metrics
history and the deployed model chosen so far: `--resume` continues a run exactly where its last
finished epoch left it, and a run stopped before its first epoch ended starts again from the
beginning (`resumes`). Under torchrun rank 0 alone builds and writes the files (`writes_files`;
the other ranks hold the same state, distributed.py), and while a run trains, its process holds
the directory's lock. A finished run's deployed model is read back from here too: offline KD's
teacher (`load_teacher`).
"""
import argparse
import contextlib
import csv
import fcntl
import json
import math
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

import cli
from backbones import ARCHS
from data import outermost_missing, remove_empty_folders
from models import build_deployable

# Process exit codes of train.py (docs/training.md#exit-codes).
# A bad flag, size, path, data set or run directory: nothing was trained.
EXIT_BAD_INPUT = 2
# The loss became non-finite or the model collapsed: the last good epoch is kept.
EXIT_UNHEALTHY = 3
# A file of the run directory could not be written: the last good epoch is kept.
EXIT_WRITE_FAILED = 4
# torchrun: another rank stopped; every finished epoch is kept; --resume continues.
EXIT_RANK_LOST = 5
# SIGINT (Ctrl-C): every finished epoch is kept; --resume continues.
EXIT_INTERRUPTED = 130
# SIGTERM (SLURM, Kubernetes before a kill): likewise, for a requeue with --resume.
EXIT_TERMINATED = 143
# stdout's reader has gone (`train.py | head`), as a process that SIGPIPE ends: likewise.
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE

# Arguments that may change between a run and its resumption without changing its results.
RESUMABLE = {"resume", "eval_every", "eval_batch_size", "device", "data_dir", "out_dir", "compile"}
# Settings that name a directory: "runs/x", "./runs/x" and its absolute path are one setting.
PATHS = {"teacher_run"}


class RunStopped(Exception):
    """A run cannot go on: a one-line message and the process exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def stdout_gone() -> int:
    """stdout's reader has gone (`... | head`): what is printed from now on, Python's last flush at
    exit included, goes to /dev/null; returns EXIT_CLOSED_PIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_CLOSED_PIPE


def config_of(args: argparse.Namespace, device: torch.device) -> dict:
    """The resolved configuration, as config.json records it."""
    return {**vars(args), "torch": str(torch.__version__), "device_name":
            torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The settings that differ between a checkpoint's (or config.json's) configuration and this
    run's. A setting that `saved` lacks, a run made before its flag existed, was made with the
    flag's default (`with_defaults`); a path is compared as the directory it names."""
    saved = with_defaults(saved)
    ignored = RESUMABLE | {"torch", "device_name", "world_size"}  # world_size: `check_world_size`
    return sorted(k for k in set(saved) | set(current) if k not in ignored
                  and as_compared(k, saved.get(k)) != as_compared(k, current.get(k)))


def with_defaults(saved: dict) -> dict:
    """A saved configuration with each flag it lacks at its default (cli.defaults), but for
    --rampup-scales-de: a DKEL run made before it existed was made with the reading it now names
    (L_de weighted by lambda r(ep) w(ep), docs/spec.md Sec. 2)."""
    made_before = {"rampup_scales_de": saved.get("method") == "dkel"}
    return {**cli.defaults(), **made_before, **saved}


def as_compared(key: str, value):
    """A setting as two runs are compared on it: a path (PATHS) resolved, relative to the current
    directory, with its symbolic links followed."""
    if key in PATHS and isinstance(value, str):
        return os.path.realpath(value)
    return value


def setting_changes(saved: dict, current: dict, keys: list[str]) -> str:
    """The settings `keys` as the user reads them: "--epochs: 1 -> 2, --lr: 0.1 -> 0.05"."""
    saved = with_defaults(saved)
    return ", ".join(f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {current.get(k)!r}"
                     for k in keys)


# Under torchrun the ranks agree on a stop after every AGREE_EVERY-th optimizer step (StopRequests).
AGREE_EVERY = 8


class StopRequests:
    """SIGTERM and SIGINT ask a run to stop at the end of the current optimizer step rather than
    kill it: the loop calls `check`, which raises RunStopped (exit 143 or 130) with the resume
    command. Every finished epoch is already in the checkpoint. A second signal of the same kind
    stops at once, with the same exit code (StoppedAtOnce). Used as a context manager around a run
    (main thread only); a signal that came after the last check ends it with its exit code too.

    Under torchrun the signal may reach one rank, or the ranks at different steps, and a rank that
    stopped alone would leave the others waiting in a collective. So the ranks stop together: after
    every AGREE_EVERY-th step and at the end of each epoch, every rank (the same step numbers on
    each) takes part in one all-reduce of the signal it received, and all stop if any received one.
    That is one host sync every AGREE_EVERY steps; one process checks after every step and syncs
    nothing."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle)
                             for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, exc_type, exc, traceback):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
        if exc_type is None and self.received is not None:
            # A stop after the last check (while the summary was written): the run has finished,
            # and the process still ends with the signal's code, so that a sweep stops too.
            raise RunStopped(f"stopped by {signal.Signals(self.received).name} as the run ended: "
                             f"it has finished and every file is written",
                             exit_code_of(self.received))

    def _handle(self, number: int, frame) -> None:
        if self.received == number:
            raise StoppedAtOnce(number)
        self.received = number

    def check(self, out_dir: str, epochs_done: int, step: int | None = None) -> None:
        """After the optimizer step number `step` (1-based), or at the end of an epoch (None)."""
        received = self.received
        if dist.is_initialized():
            if step is not None and step % AGREE_EVERY:
                return
            received = agreed_signal(received)
        if received is not None:
            raise RunStopped(f"stopped by {signal.Signals(received).name}: "
                             f"{saved_so_far(out_dir, epochs_done)}", exit_code_of(received))


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGTERM or SIGINT: the run ends where it is, with that signal's exit code. A
    KeyboardInterrupt, as Ctrl-C, so that no `except Exception` on its way holds it up."""

    def __init__(self, number: int):
        super().__init__(f"stopped at once by a second {signal.Signals(number).name}")
        self.exit_code = exit_code_of(number)


def exit_code_of(number: int) -> int:
    return EXIT_TERMINATED if number == signal.SIGTERM else EXIT_INTERRUPTED


def agreed_signal(received: int | None) -> int | None:
    """The signal that any rank received (SIGTERM over SIGINT: 15 > 2), in one all-reduce (MAX) of
    its number on the collective's device (NCCL's: this rank's GPU)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    number = torch.tensor(received or 0, device=device)
    dist.all_reduce(number, dist.ReduceOp.MAX)
    return int(number.item()) or None


def saved_so_far(out_dir: str, epochs_done: int) -> str:
    """What a stopped run has kept and how to go on: --resume continues it, and starts it again when
    it stopped in its first epoch (`resumes`)."""
    if epochs_done == 0:
        return (f"no epoch was finished, so nothing is saved in {out_dir}; the same command, "
                f"with or without --resume, starts the run again")
    return (f"the {epochs_done} finished epoch(s) are saved in {out_dir}; continue with the same "
            f"command plus --resume")


def has_checkpoint(out_dir: str) -> bool:
    return os.path.exists(os.path.join(out_dir, "checkpoint.pt"))


def prepare(out_dir: str, resume: bool) -> None:
    """Refuse (exit 2) a run directory that cannot be created or written, and, with --resume, one
    that train.py was never started on (no checkpoint and no `.lock`: a mistyped --out-dir); one
    that already holds a run is refused under the lock (`_locked`)."""
    if (resume and not has_checkpoint(out_dir)
            and not os.path.exists(os.path.join(out_dir, ".lock"))):
        raise RunStopped(f"--resume: no run was ever started in {out_dir} (no checkpoint.pt, "
                         f"no .lock); check --out-dir, or run without --resume to start it",
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
    nothing, and `--resume` continues it. `prepare` refuses first what cannot work at all. A new
    directory that a refusal (exit 2) leaves holding nothing but its lock is removed again, by the
    process that holds the lock only, with the parent folders made for it: one refused because
    another process holds it removes nothing."""
    created = outermost_missing(out_dir)
    prepare(out_dir, resume)
    with _locked(out_dir, resume, created):
        yield


@contextlib.contextmanager
def lock_of(out_dir: str):
    """The run directory's lock, taken without waiting: the open lock file, or None when another
    process holds it. Leaving the block closes the file, which releases the lock."""
    with open(os.path.join(out_dir, ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield lock


@contextlib.contextmanager
def _locked(out_dir: str, resume: bool, created: str | None):
    with lock_of(out_dir) as lock:
        if lock is None:
            raise RunStopped(f"another process is training into {out_dir} (it holds "
                             f"{os.path.join(out_dir, '.lock')}); wait for it to end or choose "
                             f"another --out-dir", EXIT_BAD_INPUT)
        try:
            if not resume and has_checkpoint(out_dir):
                raise RunStopped(f"{out_dir} already holds a run; add --resume to continue it, "
                                 f"or choose another --out-dir", EXIT_BAD_INPUT)
            yield  # closing the file releases the lock
        except RunStopped as stop:
            if created and stop.exit_code == EXIT_BAD_INPUT and os.listdir(out_dir) == [".lock"]:
                with contextlib.suppress(OSError):  # still held: no other process trains in it
                    os.remove(lock.name)
                    remove_empty_folders(out_dir, created)
            raise


def move_aside(out_dir: str, aside: str) -> bool:
    """Rename the run directory `out_dir` to `aside` while holding its lock (`hold_run_dir`), so
    that no train.py is training in it meanwhile (it would write on into the new name); False, and
    nothing moved, when a process holds it."""
    with lock_of(out_dir) as lock:
        if lock is None:
            return False
        os.rename(out_dir, aside)
    return True


def writes_files() -> bool:
    """Whether this process writes the run directory: under torchrun rank 0 alone; the other ranks
    hold the same state and build and write nothing."""
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def atomic_write(path: str, binary: bool = False):
    """Write to a temporary file beside `path`, sync it to the disk, then rename: neither a kill nor
    a power loss leaves half a file, and a failed write (disk full, permission lost) leaves the
    previous version whole and stops the run with one line (exit 4). Rank 0 alone calls it
    (`writes_files`)."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_directory(os.path.dirname(path))
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise RunStopped(f"cannot write {path} ({error.strerror}); the previous version is "
                         f"intact: free space or fix the permissions, then continue with --resume",
                         EXIT_WRITE_FAILED) from None


def sync_directory(path: str) -> None:
    """The rename itself on the disk. Some file systems cannot sync a directory: the file is."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def atomic_save(obj, path: str) -> None:
    if writes_files():
        with atomic_write(path, binary=True) as f:
            torch.save(obj, f)


def write_json(obj, path: str) -> None:
    if writes_files():
        with atomic_write(path) as f:
            json.dump(obj, f, indent=2)


def write_metrics(path: str, history: list[dict]) -> None:
    if not writes_files():
        return
    columns = list(dict.fromkeys(k for row in history for k in row))
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def resumes(out_dir: str, config: dict, resume: bool) -> bool:
    """Whether the run continues from its checkpoint. --resume on a run that train.py started but
    that stopped before its first epoch ended (no checkpoint: `prepare` refused any other directory)
    starts it from the beginning, with one line on stderr, unless its config.json holds other
    settings (refused, exit 2): a requeue that always adds --resume then does the right thing."""
    if not resume or has_checkpoint(out_dir):
        return resume
    path = os.path.join(out_dir, "config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as error:
            raise RunStopped(f"cannot read {path} ({type(error).__name__}); delete the run "
                             f"directory or choose another --out-dir", EXIT_BAD_INPUT) from None
        check_same_settings(out_dir, saved, config, "run")
    print(f"--resume: no epoch of {out_dir} was finished; starting the run from the beginning",
          file=sys.stderr)
    return False


def load_checkpoint(out_dir: str, config: dict) -> dict:
    """The checkpoint of `out_dir`, refused (exit 2) when unreadable or made with other settings."""
    path = os.path.join(out_dir, "checkpoint.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["config"]
    except Exception as error:  # any unreadable file is a corrupt checkpoint to the user
        raise RunStopped(f"cannot read the checkpoint {path} ({type(error).__name__}); delete "
                         f"the run directory or choose another --out-dir",
                         EXIT_BAD_INPUT) from None
    check_same_settings(out_dir, saved, config, "checkpoint")
    return checkpoint


def check_same_settings(out_dir: str, saved: dict, config: dict, what: str) -> None:
    """Refuse (exit 2) to go on with a run made with other settings or another number of
    processes."""
    check_world_size(out_dir, saved.get("world_size", 1), config.get("world_size", 1))
    differing = changed_settings(saved, config)
    if differing:
        details = setting_changes(saved, config, differing[:4])
        raise RunStopped(f"the {what} in {out_dir} was made with a different configuration "
                         f"({details}); resume with the original flags or choose another "
                         f"--out-dir", EXIT_BAD_INPUT)


def check_health(row: dict, out_dir: str, collapse_threshold: float) -> None:
    """Stop on a non-finite loss or on collapse (Sec. 3.3: all logits shrink to zero)."""
    if not math.isfinite(row["loss"]):
        raise RunStopped(f"the loss became {row['loss']} in epoch {row['epoch']}; the checkpoint "
                         f"of the last good epoch is kept in {out_dir} (try a lower --lr)",
                         EXIT_UNHEALTHY)
    if row["logit_norm"] < collapse_threshold:
        raise RunStopped(f"collapse in epoch {row['epoch']}: the deployed model's mean logit "
                         f"norm is {row['logit_norm']:.2e} < --collapse-threshold "
                         f"{collapse_threshold} (paper Sec. 3.3); the last good checkpoint is kept "
                         f"in {out_dir}",
                         EXIT_UNHEALTHY)


def check_world_size(out_dir: str, saved: int, current: int) -> None:
    """A run resumes with the number of processes it was trained with: its BatchNorm statistics
    are taken over the B/N images of each rank (distributed.py), so another N changes the
    results."""
    if saved != current:
        raise RunStopped(f"the checkpoint in {out_dir} was trained by {saved} process(es) "
                         f"(torchrun's world size) and this run has {current}: resume with "
                         f"{saved}, or choose another --out-dir", EXIT_BAD_INPUT)


def restore_checkpoint(out_dir: str, config: dict, modules: dict, optimizer, scheduler) -> dict:
    """Load the checkpoint of `out_dir` into the modules, the optimizer, the schedule and the RNG;
    returns the run's state (epoch, step, history, and with --val-size the deployed model chosen
    so far)."""
    checkpoint = load_checkpoint(out_dir, config)
    for name, module in modules.items():
        module.load_state_dict(checkpoint[name])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    # The CUDA generators of the GPUs this process sees, which may be fewer than the run was
    # started with (compare.py --gpus shows each child one); the data draws from generators of its
    # own, seeded by (seed, epoch) (data.epoch_generator).
    cuda_states = checkpoint.get("rng_cuda") or []
    for index, state in enumerate(cuda_states[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)
    return {k: checkpoint[k] for k in ("epoch", "step", "history", "deployable") if k in checkpoint}


def save_checkpoint(out_dir: str, modules: dict, optimizer, scheduler, state: dict,
                    config: dict) -> None:
    if not writes_files():
        return
    checkpoint = {name: module.state_dict() for name, module in modules.items()}
    checkpoint.update(state, config=config, optimizer=optimizer.state_dict(),
                      scheduler=scheduler.state_dict(),
                      rng_cpu=torch.get_rng_state(),
                      rng_cuda=(torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                                else None))
    atomic_save(checkpoint, os.path.join(out_dir, "checkpoint.pt"))


# ------------------------------------------------------------------------ a finished run's model
def load_teacher(teacher_run: str | None, data) -> torch.nn.Module:
    """Offline KD's teacher (Table 2): the deployed model of the finished train.py run
    `teacher_run`, its architecture, classes, image size and data set read from that run's
    summary.json, frozen (no parameter requires a gradient) and in eval mode. Refused with one line
    (exit code 2) when missing, unfinished, unreadable, or made for other classes, another image
    size or another data set than `data` (data.ImageData)."""
    def refuse(why: str) -> RunStopped:
        return RunStopped(f"--teacher-run {teacher_run}: {why} (offline KD, Table 2)",
                          EXIT_BAD_INPUT)

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
        state = torch.load(os.path.join(teacher_run, deployed["file"]), map_location="cpu",
                           weights_only=True)
        teacher.load_state_dict(state)
    except Exception as error:
        # Any unreadable file or mismatched state dict is a broken run to the user.
        raise refuse(f"cannot load its deployed model ({type(error).__name__})") from None
    image_size = data.image_shape[-1]
    if (deployed["num_classes"], size) != (data.num_classes, image_size):
        raise refuse(f"its model has {deployed['num_classes']} classes and {size}x{size} images, "
                     f"this run {data.num_classes} and {image_size}x{image_size}")
    # Runs written before summary.json recorded the data set: accepted, as the image size above.
    if "dataset" in deployed and not same_data_set(deployed, data):
        theirs = described(deployed["dataset"], deployed["mean"], deployed["std"])
        raise refuse(f"its model was trained on {theirs}, this run is on "
                     f"{described(data.name, data.mean, data.std)}")
    return teacher.requires_grad_(False).eval()


def same_data_set(deployed: dict, data) -> bool:
    """The teacher's inputs are this run's: the same data set, normalised by the same mean and
    std."""
    recorded = [*deployed["mean"], *deployed["std"]]
    return deployed["dataset"] == data.name and all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip(recorded, [*data.mean, *data.std]))


def described(name: str, mean, std) -> str:
    """A data set and its normalisation, for a one-line refusal."""
    return (f"{name} (mean {' '.join(f'{v:.4g}' for v in mean)}, "
            f"std {' '.join(f'{v:.4g}' for v in std)})")
