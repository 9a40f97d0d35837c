"""The grid of train.py runs behind one of compare.py's experiments: which runs it has (data sets
x networks x methods x settings x seeds, a kd run's teacher run first), each in its own directory
<runs-dir>/<dataset>_<arch>_<method>[_<setting>]_seed<seed>, and their training: the unfinished
ones in turn, K at a time on each GPU with `--gpus` (child processes), or the I-th alone with
`--cell I`; `--list` prints them. It serves compare.py, the one command. Arguments after -- that
train.py refuses for some runs are refused before any run starts; a run that fails is named with
train.py's one-line reason.

A run directory that holds a run made with other settings than the experiment's (its config.json
against train.py's resolution of the command compare.py would give it) is never tabulated nor
resumed: it is named with the settings that differ, and `--retrain-mismatched` moves it aside
(under its lock: not while a process trains in it) and trains it again. One whose config.json
cannot be read is named, and neither tabulated nor trained. SIGTERM or SIGINT ends the sweep, with
its exit code."""
import contextlib
import io
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
import train
from infra import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
TRAIN_PY = os.path.join(ROOT, "train.py")


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


def check_train_args(args, runs: list[Run]) -> None:
    """Refuse (exit 2), before any run starts, arguments after -- that train.py refuses for some
    runs of the grid (e.g. --ensemble-lr-per-peer, which only pcl, dk and dkel take): one line
    naming their methods and train.py's reason. One seed of each cell stands for the others."""
    refused, reason = [], ""
    for run in {run.key(): run for run in runs}.values():
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                cli.resolve_args([*command(args, run), "--device", "cpu"])
            except SystemExit:  # cli.Parser's one-line refusal, on stderr
                if run.method not in refused:
                    refused.append(run.method)
                reason = reason or err.getvalue().strip().splitlines()[-1]
    if refused:
        reason = reason.removeprefix("train.py: error: ").removesuffix(" (see train.py --help)")
        raise rundir.RunStopped(
            f"train.py refuses the arguments after -- for --methods {' '.join(refused)} "
            f"({reason}); change them, or leave those methods out of --methods and run them with "
            f"other arguments in another --runs-dir", rundir.EXIT_BAD_INPUT)


class Unreadable(Exception):
    """A run directory's config.json that cannot be read (truncated, corrupt): nothing says how
    its run was made."""

    def __init__(self, what: str):
        super().__init__(f"its config.json cannot be read ({what}), so nothing says how the run "
                         f"was made: it is neither tabulated nor trained; move the directory "
                         f"aside (or delete it) to train the run again")


def saved_config(path: str) -> dict:
    """A run's config.json; Unreadable if it cannot be read as one."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise Unreadable(type(error).__name__) from None
    if not isinstance(saved, dict):
        raise Unreadable(f"a JSON {type(saved).__name__}, not an object")
    return saved


def settings_changed(args, run: Run) -> str:
    """How the run in `run`'s directory was made otherwise than this experiment would make it now
    ("--epochs: 1 -> 2, ..."; "" if not): its config.json against train.py's own resolution of
    the command, in the settings that change results (rundir.changed_settings)."""
    path = os.path.join(run_dir(args, run), "config.json")
    if not os.path.exists(path):
        return "no config.json says how it was made"
    saved = saved_config(path)
    # --device cpu: resolves on any machine (a RESUMABLE setting); --precision auto resolves to
    # the run's recorded precision, as in train.py (cli.recorded_precision)
    wanted = vars(cli.resolve_args([*command(args, run), "--device", "cpu"]))
    return rundir.setting_changes(saved, wanted, rundir.changed_settings(saved, wanted))


def made_otherwise(args, runs: list[Run]) -> tuple[dict[Run, str], dict[Run, str]]:
    """The runs whose directory holds a run (a checkpoint or a summary) made with other settings
    (run -> what differs), and those whose config.json cannot be read (run -> why: counted as not
    finished, and neither trained nor tabulated). A kd run whose teacher run is among either is
    among the same."""
    mismatched, unreadable = {}, {}
    for run in runs:
        if run.teacher in unreadable:
            unreadable[run] = (f"the config.json of its teacher run {run_dir(args, run.teacher)} "
                               f"cannot be read: it is neither tabulated nor trained")
        elif not any(os.path.exists(os.path.join(run_dir(args, run), name))
                     for name in ("checkpoint.pt", "summary.json")):
            continue
        elif run.teacher in mismatched:
            mismatched[run] = f"its teacher run {run_dir(args, run.teacher)} was made otherwise"
        else:
            try:
                changed = settings_changed(args, run)
            except Unreadable as error:
                unreadable[run] = str(error)
                continue
            if changed:
                mismatched[run] = changed
    return mismatched, unreadable


def retrain_or_refuse(args, mismatched: dict[Run, str]) -> dict[Run, str]:
    """Before training: refuse (exit 2) the runs made otherwise, naming each with what differs, or
    (--retrain-mismatched) move each to <its directory>.mismatched-N, to be trained again. One that
    a process is training in (it holds the directory's lock) is left where it is, with a line, as
    is a kd run whose teacher run is: those runs -> why."""
    if mismatched and not args.retrain_mismatched:
        lines = [f"{len(mismatched)} run(s) in {args.runs_dir} were made with other settings than "
                 f"this experiment's (made with -> now); nothing was trained:"]
        lines += [f"  {run_dir(args, run)}: {why}" for run, why in mismatched.items()]
        raise rundir.RunStopped("\n".join([*lines, HOW_TO_PROCEED]), rundir.EXIT_BAD_INPUT)
    left_alone = {}
    for run, why in mismatched.items():
        out_dir = run_dir(args, run)
        aside = next(f"{out_dir}.mismatched-{n}" for n in itertools.count(1)
                     if not os.path.exists(f"{out_dir}.mismatched-{n}"))
        if run.teacher not in left_alone and rundir.move_aside(out_dir, aside):
            print(f"moved {out_dir} (made with other settings) to {aside}; training it again")
            continue
        held = (f"its teacher run {run_dir(args, run.teacher)} is" if run.teacher in left_alone
                else f"a process is training in it (it holds {os.path.join(out_dir, '.lock')}):")
        left_alone[run] = (f"made with other settings ({why}); {held} left alone, neither moved "
                           f"nor trained: run compare.py again once that process has ended")
        print(f"{out_dir}: {left_alone[run]}")
    return left_alone


# ----------------------------------------------------------------------------- training the grid
STOP_CODES = (rundir.EXIT_INTERRUPTED, rundir.EXIT_TERMINATED)  # 128 + SIGINT, 128 + SIGTERM
POLL_SECONDS = 0.5  # how often --gpus looks at its children
OUTPUT_TAIL = 8192  # the characters at the end of a run's output searched for its reason


class Ended(NamedTuple):
    """How a train.py run ended: its exit code and, if not 0, train.py's one-line reason."""
    code: int
    reason: str = ""


def ended(argv: list[str], code: int, output: str, where: str = "") -> Ended:
    """The end of the run of `argv` from its exit code and the end of its output; a failure is
    said in one line."""
    if code == 0:
        return Ended(code)
    end = Ended(code, one_line_reason(output))
    out_dir = argv[argv.index("--out-dir") + 1]
    how = "stopped" if code in STOP_CODES else "failed"
    print(f"== {where}{out_dir} {how} (exit code {code}): {end.reason}", flush=True)
    return end


def one_line_reason(output: str) -> str:
    """train.py's reason for stopping in its output: its last line that starts with "error:" (or
    argparse's "train.py: error:"), else the last line (a traceback's names the exception)."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "train.py: error:"))]
    return (errors or lines or ["no output"])[-1]


class OutputTail:
    """A text stream (stderr) passed through, keeping its last OUTPUT_TAIL characters."""

    def __init__(self, stream):
        self.stream, self.text = stream, ""

    def write(self, text: str) -> int:
        self.text = (self.text + text)[-OUTPUT_TAIL:]
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding: the stream's
        return getattr(self.stream, name)


def train_in_process(argv: list[str]) -> Ended:
    """One train.py run in this process, its stderr passed through (and its end kept for the
    reason of a failure)."""
    print(f"== train.py {shlex.join(argv)}", flush=True)
    with contextlib.redirect_stderr(OutputTail(sys.stderr)) as stderr:
        try:
            code = train.main(argv)
        except SystemExit as exit_info:  # argparse rejected the arguments
            code = exit_info.code
    return ended(argv, code, stderr.text)


def train_in_turn(argvs: list[list[str]]) -> tuple[list[Ended], int | None]:
    """The runs one after another in this process; how each ended, and the code of a run that
    SIGINT or SIGTERM stopped (130, 143), at which the sweep ends. A Ctrl-C or a SIGTERM between
    two runs (train.py takes them within one) ends the sweep too."""
    ends = []
    try:
        with terminate_as_interrupt():
            for argv in argvs:
                ends.append(train_in_process(argv))
                if ends[-1].code in STOP_CODES:
                    return ends, ends[-1].code
    except KeyboardInterrupt as stop:
        return ends, getattr(stop, "exit_code", rundir.EXIT_INTERRUPTED)
    return ends, None


class Terminated(KeyboardInterrupt):
    """SIGTERM where no run holds the signals (between two runs, or while train.py starts): a
    KeyboardInterrupt, as Ctrl-C there, with exit code 143."""
    exit_code = rundir.EXIT_TERMINATED

    def __init__(self):
        super().__init__("stopped by SIGTERM")


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises Terminated instead of ending the process without a word."""
    def raise_terminated(number, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch_on_gpu(argv: list[str], gpu: str) -> tuple[subprocess.Popen, str, int]:
    """One train.py child process that sees GPU `gpu` alone, its output appended to the run's
    train.log (returned with where this run's output starts); in a session of its own, so that a
    Ctrl-C in the terminal reaches it once, passed on by compare.py."""
    out_dir = argv[argv.index("--out-dir") + 1]
    os.makedirs(out_dir, exist_ok=True)
    print(f"== GPU {gpu}: train.py {shlex.join(argv)}", flush=True)
    with open(os.path.join(out_dir, "train.log"), "a") as log:
        start = log.tell()
        child = subprocess.Popen([sys.executable, TRAIN_PY, *argv], stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
    return child, log.name, start


def output_since(path: str, start: int) -> str:
    """The end (OUTPUT_TAIL characters at most) of what was appended to `path` after `start`."""
    with open(path, "rb") as f:
        f.seek(max(start, os.path.getsize(path) - OUTPUT_TAIL))
        return f.read().decode(errors="replace")


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


def train_parallel(argvs: list[list[str]], gpus: list[str],
                   runs_per_gpu: int = 1) -> tuple[list[Ended | None], int | None]:
    """The runs as child processes, `runs_per_gpu` at a time on each GPU; how each ended (None: not
    started). SIGTERM or SIGINT ends the launches and is passed on to every running child (train.py
    stops at the end of its step, its finished epochs saved; a second signal stops it at once); the
    children are waited for, and the second value is then the first signal's exit code (128 + its
    number). A child stopped by a signal that reached it alone (exit code 130 or 143) ends the
    sweep in the same way, as a stopped run ends a sequential one."""
    # The places to run in, the GPUs in turn: fewer runs than places still spread over every GPU.
    slots = [(gpu, k) for k in range(runs_per_gpu) for gpu in gpus]
    ends, waiting, running = [None] * len(argvs), list(enumerate(argvs)), {}
    with stop_signals() as received:
        passed_on = 0
        while running or (waiting and not received):
            for slot in slots:
                if slot not in running and waiting and not received:
                    index, argv = waiting.pop(0)
                    running[slot] = index, *launch_on_gpu(argv, slot[0])
            while passed_on < len(received):  # one more may arrive while these are passed on
                for _, child, *_ in list(running.values()):
                    child.send_signal(received[passed_on])
                passed_on += 1
            for slot, (index, child, log, start) in list(running.items()):
                if child.poll() is not None:
                    output = output_since(log, start) if child.returncode else ""
                    ends[index] = ended(argvs[index], child.returncode, output, f"GPU {slot[0]}: ")
                    del running[slot]
                    if child.returncode in STOP_CODES and not received:  # a signal to it alone
                        received.append(child.returncode - 128)
            if running:
                time.sleep(POLL_SECONDS)
    return ends, (128 + received[0] if received else None)


def sweep_stopped(args, runs: list[Run], code: int) -> rundir.RunStopped:
    """The end of a sweep that a stop signal ended: which runs remain, and how to continue."""
    left = sum(not finished(args, run) for run in runs)
    return rundir.RunStopped(
        f"stopped by {signal.Signals(code - 128).name}: {left} of the {len(runs)} runs have not "
        f"finished; continue with: python compare.py {shlex.join(args.argv)}", code)


def train_missing(args, runs: list[Run], mismatched: dict[Run, str],
                  unreadable: dict[Run, str]) -> dict[Run, str]:
    """Train (or resume) every unfinished run (--gpus: in parallel), kd runs last; the runs not
    tabulated, with why: those that failed, those that cannot be read (`made_otherwise`) and those
    left alone. The runs made otherwise are refused or moved aside first (`retrain_or_refuse`); a
    stop signal ends the sweep (RunStopped with its exit code)."""
    untabulated = {**unreadable, **retrain_or_refuse(args, mismatched)}
    without_teacher = [run for run in runs if run.teacher is None]  # kd's teachers among them
    kd_students = [run for run in runs if run.teacher is not None]
    for wave in (without_teacher, kd_students):
        todo = [run for run in wave if not finished(args, run) and run not in untabulated]
        argvs = [launch_argv(args, run) for run in todo]
        if args.gpus:
            ends, stop = train_parallel(argvs, args.gpus, args.runs_per_gpu)
        else:
            ends, stop = train_in_turn(argvs)
        if stop:
            raise sweep_stopped(args, runs, stop)
        for run, end in zip(todo, ends):
            if end.code != 0:
                untabulated[run] = f"failed (exit code {end.code}): {end.reason}"
    return untabulated


def train_cell(args, runs: list[Run], mismatched: dict[Run, str],
               unreadable: dict[Run, str]) -> int:
    """--cell I: train the I-th run of the grid alone (nothing if it has finished; refused or moved
    aside first if made otherwise, exit code 2 if it cannot be read or is left alone); its exit
    code."""
    if not 0 <= args.cell < len(runs):
        print(f"error: --cell {args.cell} is outside the grid's runs 0..{len(runs) - 1}",
              file=sys.stderr)
        return 2
    run = runs[args.cell]
    if run in unreadable:
        print(f"error: {run_dir(args, run)}: {unreadable[run]}", file=sys.stderr)
        return rundir.EXIT_BAD_INPUT
    if retrain_or_refuse(args, {run: mismatched[run]} if run in mismatched else {}):
        return rundir.EXIT_BAD_INPUT  # left alone, and said so
    if finished(args, run):
        print(f"{run_dir(args, run)} has finished; nothing to train")
        return 0
    return train_in_process(launch_argv(args, run)).code


def print_lines(lines) -> int:
    """Print; a reader that has gone (`compare.py --list | head`) ends it quietly, with the exit
    code of a process that SIGPIPE ends (141)."""
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:
        return rundir.stdout_gone()
    return 0


def list_runs(args, runs: list[Run]) -> int:
    """--list: the grid, one train.py command per line; print_lines's exit code."""
    return print_lines(shlex.join(["python", "train.py", *command(args, run)]) for run in runs)
