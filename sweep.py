"""The grid of train.py runs behind one of compare.py's experiments: which runs it has (data sets
x networks x methods x settings x seeds, a kd run's teacher run first), each in its own directory
<runs-dir>/<dataset>_<arch>_<method>[_<setting>]_seed<seed>, and their training: the unfinished
ones in turn, one per GPU at a time with `--gpus` (child processes), or the I-th alone with
`--cell I`; `--list` prints them. It serves compare.py, the one command.

A run directory that holds a run made with other settings than the experiment's (its config.json
against train.py's resolution of the command compare.py would give it) is never tabulated nor
resumed: it is named with the settings that differ, and `--retrain-mismatched` moves it aside and
trains it again. SIGTERM or SIGINT ends the sweep, with its exit code."""
import contextlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import cli
import rundir
import train

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


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
    teacher = f"teacher-{run.teacher.arch}" if run.teacher else ""
    parts = [run.dataset, run.arch, run.method, run.tag, teacher]
    return os.path.join(args.runs_dir, "_".join(p for p in parts if p) + f"_seed{run.seed}")


def grid(args) -> list[Run]:
    """Every run of the experiment, in the order of --list; a kd run's teacher run comes first."""
    runs = []
    for dataset, arch, method, (tag, _, flags), seed in itertools.product(
            args.dataset, args.archs, args.methods, args.settings, args.seeds):
        if method == "kd":
            teacher = Run(dataset, args.kd_teacher_arch or arch, "baseline", "", (), seed)
            new = [teacher, Run(dataset, arch, method, tag, flags, seed, teacher)]
        else:
            new = [Run(dataset, arch, method, tag, flags, seed)]
        runs += [run for run in new if run not in runs]
    return runs


def command(args, run: Run, *extra: str) -> list[str]:
    """train.py's arguments for `run`; the pass-through arguments come last, so they win."""
    argv = ["--dataset", run.dataset, "--arch", run.arch, "--method", run.method,
            "--seed", str(run.seed), "--out-dir", run_dir(args, run), *run.flags]
    argv += ["--epochs", str(args.epochs)] if args.epochs else []
    argv += ["--teacher-run", run_dir(args, run.teacher)] if run.teacher else []
    return [*argv, *extra, *args.train_args]


def finished(args, run: Run) -> bool:
    return os.path.exists(os.path.join(run_dir(args, run), "summary.json"))


def launch_argv(args, run: Run) -> list[str]:
    """The command that trains `run` now: resumed from its checkpoint if it has one, on CUDA with
    --gpus."""
    extra = []
    if os.path.exists(os.path.join(run_dir(args, run), "checkpoint.pt")):
        extra.append("--resume")
    if args.gpus:
        extra += ["--device", "cuda"]
    return command(args, run, *extra)


# ----------------------------------------------------------------------------- runs made otherwise
HOW_TO_PROCEED = ("choose another --runs-dir for this experiment, or add --retrain-mismatched to "
                  "move each to <its directory>.mismatched-N and train it again")


def settings_changed(args, run: Run) -> str:
    """How the run in `run`'s directory was made otherwise than this experiment would make it now
    ("--epochs: 1 -> 2, ..."; "" if not): its config.json against train.py's own resolution of
    the command, in the settings that change results (rundir.changed_settings)."""
    path = os.path.join(run_dir(args, run), "config.json")
    if not os.path.exists(path):
        return "no config.json says how it was made"
    with open(path) as f:
        saved = json.load(f)
    argv = [*command(args, run), "--device", "cpu"]  # resolves on any machine; RESUMABLE
    wanted = vars(cli.resolve_args(argv))
    if cli.build_parser().parse_args(argv).precision == "auto":
        wanted["precision"] = saved.get("precision")  # auto: what the run's machine computes in
    return rundir.setting_changes(saved, wanted, rundir.changed_settings(saved, wanted))


def made_otherwise(args, runs: list[Run]) -> dict[Run, str]:
    """The runs whose directory holds a run (a checkpoint or a summary) made with other settings:
    run -> what differs. A kd run whose teacher run is among them is, too."""
    mismatched = {}
    for run in runs:
        if not any(os.path.exists(os.path.join(run_dir(args, run), name))
                   for name in ("checkpoint.pt", "summary.json")):
            continue
        if run.teacher in mismatched:
            mismatched[run] = f"its teacher run {run_dir(args, run.teacher)} was made otherwise"
        elif changed := settings_changed(args, run):
            mismatched[run] = changed
    return mismatched


def retrain_or_refuse(args, mismatched: dict[Run, str]) -> None:
    """Before training: refuse (exit 2) the runs made otherwise, naming each with what differs, or
    (--retrain-mismatched) move each to <its directory>.mismatched-N, to be trained again."""
    if mismatched and not args.retrain_mismatched:
        lines = [f"{len(mismatched)} run(s) in {args.runs_dir} were made with other settings than "
                 f"this experiment's (made with -> now); nothing was trained:"]
        lines += [f"  {run_dir(args, run)}: {why}" for run, why in mismatched.items()]
        raise rundir.RunStopped("\n".join([*lines, HOW_TO_PROCEED]), rundir.EXIT_BAD_INPUT)
    for run in mismatched:
        out_dir = run_dir(args, run)
        aside = next(f"{out_dir}.mismatched-{n}" for n in itertools.count(1)
                     if not os.path.exists(f"{out_dir}.mismatched-{n}"))
        os.rename(out_dir, aside)
        print(f"moved {out_dir} (made with other settings) to {aside}; training it again")


# ----------------------------------------------------------------------------- training the grid
STOP_CODES = (rundir.EXIT_INTERRUPTED, rundir.EXIT_TERMINATED)  # 128 + SIGINT, 128 + SIGTERM
POLL_SECONDS = 0.5  # how often --gpus looks at its children


def train_in_process(argv: list[str]) -> int:
    """One train.py run in this process; its exit code."""
    print(f"== train.py {shlex.join(argv)}", flush=True)
    try:
        return train.main(argv)
    except SystemExit as exit_info:  # argparse rejected the arguments
        return exit_info.code


def train_in_turn(argvs: list[list[str]]) -> tuple[list[int], int | None]:
    """The runs one after another in this process; their exit codes, and the code of a run that
    SIGINT or SIGTERM stopped (130, 143), at which the sweep ends."""
    codes = []
    for argv in argvs:
        codes.append(train_in_process(argv))
        if codes[-1] in STOP_CODES:
            return codes, codes[-1]
    return codes, None


def launch_on_gpu(argv: list[str], gpu: str) -> subprocess.Popen:
    """One train.py child process that sees GPU `gpu` alone, its output in the run's train.log; in
    a session of its own, so that a Ctrl-C in the terminal reaches it once, passed on by
    compare.py."""
    out_dir = argv[argv.index("--out-dir") + 1]
    os.makedirs(out_dir, exist_ok=True)
    print(f"== GPU {gpu}: train.py {shlex.join(argv)}", flush=True)
    with open(os.path.join(out_dir, "train.log"), "a") as log:
        return subprocess.Popen([sys.executable, TRAIN_PY, *argv], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGINT recorded (their numbers, in order of arrival) instead of acted on."""
    received = []
    previous = {number: signal.signal(number, lambda n, frame: received.append(n))
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def train_parallel(argvs: list[list[str]], gpus: list[str]) -> tuple[list[int | None], int | None]:
    """The runs as child processes, one at a time per GPU; their exit codes (None: not started).
    SIGTERM or SIGINT ends the launches and is passed on to every running child (train.py stops
    at the end of its step, its finished epochs saved); the children are waited for, and the
    second value is then the signal's exit code (128 + its number)."""
    codes, waiting, running = [None] * len(argvs), list(enumerate(argvs)), {}  # gpu: index, child
    with stop_signals() as received:
        passed_on = 0
        while running or (waiting and not received):
            for gpu in gpus:
                if gpu not in running and waiting and not received:
                    index, argv = waiting.pop(0)
                    running[gpu] = index, launch_on_gpu(argv, gpu)
            for number in received[passed_on:]:
                for _, child in running.values():
                    child.send_signal(number)
            passed_on = len(received)
            for gpu, (index, child) in list(running.items()):
                if child.poll() is not None:
                    codes[index] = child.returncode
                    del running[gpu]
            if running:
                time.sleep(POLL_SECONDS)
    return codes, (128 + received[0] if received else None)


def sweep_stopped(args, runs: list[Run], code: int) -> rundir.RunStopped:
    """The end of a sweep that a stop signal ended: which runs remain, and how to continue."""
    left = sum(not finished(args, run) for run in runs)
    return rundir.RunStopped(
        f"stopped by {signal.Signals(code - 128).name}: {left} of the {len(runs)} runs have not "
        f"finished; continue with: python compare.py {shlex.join(args.argv)}", code)


def train_missing(args, runs: list[Run], mismatched: dict[Run, str]) -> dict[Run, str]:
    """Train (or resume) every unfinished run (--gpus: in parallel), kd runs last; the failures.
    The runs made otherwise are refused or moved aside first (`retrain_or_refuse`); a stop signal
    ends the sweep (RunStopped with its exit code)."""
    retrain_or_refuse(args, mismatched)
    failed = {}
    without_teacher = [run for run in runs if run.teacher is None]  # kd's teachers among them
    kd_students = [run for run in runs if run.teacher is not None]
    for wave in (without_teacher, kd_students):
        todo = [run for run in wave if not finished(args, run)]
        argvs = [launch_argv(args, run) for run in todo]
        codes, stop = train_parallel(argvs, args.gpus) if args.gpus else train_in_turn(argvs)
        if stop:
            raise sweep_stopped(args, runs, stop)
        for run, code in zip(todo, codes):
            if code != 0:
                failed[run] = f"failed (exit code {code})"
    return failed


def train_cell(args, runs: list[Run], mismatched: dict[Run, str]) -> int:
    """--cell I: train the I-th run of the grid alone (nothing if it has finished; refused or moved
    aside first if made otherwise); its exit code."""
    if not 0 <= args.cell < len(runs):
        print(f"error: --cell {args.cell} is outside the grid's runs 0..{len(runs) - 1}",
              file=sys.stderr)
        return 2
    run = runs[args.cell]
    retrain_or_refuse(args, {run: mismatched[run]} if run in mismatched else {})
    if finished(args, run):
        print(f"{run_dir(args, run)} has finished; nothing to train")
        return 0
    return train_in_process(launch_argv(args, run))


def print_lines(lines) -> int:
    """Print; a reader that has gone (`compare.py --list | head`) ends it quietly, with the exit
    code of a process that SIGPIPE ends (141)."""
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # Python's last flush at exit goes there
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    return 0


def list_runs(args, runs: list[Run]) -> int:
    """--list: the grid, one train.py command per line; print_lines's exit code."""
    return print_lines(shlex.join(["python", "train.py", *command(args, run)]) for run in runs)
