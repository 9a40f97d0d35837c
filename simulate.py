"""The geometric toy model of Sec. 3.3 and 3.4: the ideal experiment (Fig. 4) and the Monte Carlo
simulation of convergence (Fig. 5).

Distributions are points in the plane, the ground truth Y is the origin and the gap between two
distributions (a loss) is their distance. One gradient step on a sum of distances moves a point by
the learning rate eta times the sum of the unit vectors towards its targets (Eq. (7)); a term with
weight w contributes w times its unit vector. The student ensemble E is the mean of the student
peers (the midpoint of two peers) and each teacher peer follows its student peer by EMA (Eq. (8)).

`python simulate.py ideal` draws one step of Fig. 4 for PCL, for DK with a random teacher and for
DK with the proposed teacher initialisation (Sec. 3.3). `python simulate.py montecarlo` runs
Fig. 5: three peers, eta = 0.1, 90 epochs, 10,000 trials, and reports per epoch the distance
between the teacher and Y for PCL (Eq. (2)), DK (Eq. (6)) and DKEL (Eq. (12) with the decay of
Eq. (11), (13) or (14)). docs/spec.md Sec. 7.

How the methods differ in the plane. A point has no backbone, so PCL's peer mean teacher (Eq. (4),
the EMA branch applied to the student's own backbone) and DK's independent teacher (Eq. (6)) are
both the EMA of their student peer (Eq. (8)) and pull the student by the same term
1/(m-1) * sum_{j != i} unit(T_j - S_i). What tells them apart is where the teacher starts: PCL's
mean teacher starts as a copy of the student, as in Mean Teacher; the decoupled teacher starts from
the initialisation of Sec. 3.3 (copy, then `init_iters` cross-entropy steps, i.e. steps towards Y).
DKEL adds the decaying teacher ensemble of Eq. (9)-(12). One epoch is one simultaneous step of
every student peer followed by one EMA step of every teacher peer (docs/spec.md Sec. 7).
"""
import sys

# Before any other import: this code needs Python 3.10 (`X | None` annotations, evaluated when the
# modules load); an older Python gets this line, not a traceback.
if sys.version_info < (3, 10):
    sys.stderr.write("error: simulate.py needs Python 3.10 or newer, this is Python %d.%d; run it "
                     "with a newer python (README, Quick start)\n" % sys.version_info[:2])
    sys.exit(2)

import argparse
import csv
import math
import time
from pathlib import Path

import matplotlib
import torch

from cli import HelpFormatter, Parser
from losses import teacher_ensemble_decay

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

# The methods of Fig. 5, in the plane (train.py's methods are cli.METHODS).
SIMULATED_METHODS = ("pcl", "dk", "dkel")
# The colours and line styles of the paper's Fig. 5.
STYLES = {"pcl": ("tab:green", ":"), "dk": ("tab:blue", ":"), "dkel": ("tab:orange", "-")}

# NOTE(paper): the paper's Sec. 3.4 gives the simulation's EMA decay, but the plain-text extraction
# this project worked from lost its digits ("... and [alpha] for EMA"), so the default is a reading.
# The training value 0.999 per iteration would leave a teacher that takes one EMA step per epoch at
# 0.999**90 = 91 % of its starting point after 90 epochs. One toy step is one epoch, so the default
# compounds the training alpha = 0.999 (the authors' code) over the 50,000 // 128 = 390 iterations
# of a CIFAR epoch here (the partial batch dropped, docs/spec.md Sec. 3): the toy teacher then lags
# its student by as many epochs as the real teacher does.
DEFAULT_EMA_DECAY = 0.999 ** (50_000 // 128)  # about 0.677

# NOTE(paper): the initial points are not given. A distance is a loss, and a randomly initialised
# network predicts nearly uniformly, with cross-entropy ln C whatever its seed; the seed decides
# which wrong distribution it predicts, not how wrong it is. So by default every peer starts on the
# circle of radius ln 100 (CIFAR-100) around Y, at a uniformly random angle.
DEFAULT_INIT_RADIUS = math.log(100)

# The configuration drawn for Fig. 4, close enough to Y that a step of eta = 0.1 is visible.
IDEAL_STUDENTS = ((-0.5, 0.3), (0.3, 0.5))  # S_1, S_2
# An unlucky random teacher, the case Sec. 3.3 warns about: T_1 and T_2 lie on the far side of S_1
# from Y (the angles T_1 S_1 Y and T_2 S_1 Y are obtuse).
IDEAL_RANDOM_TEACHERS = ((-0.8, 0.6), (-0.9, 0.45))  # T_1, T_2


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis; a zero vector stays zero (a point on its target)."""
    lengths = vectors.norm(dim=-1, keepdim=True)  # (..., 1)
    return vectors / lengths.clamp_min(torch.finfo(vectors.dtype).tiny)


def peer_sum(points: torch.Tensor) -> torch.Tensor:
    """Sum over the peers, as M slices: torch's reduction over a middle axis of size M is slow."""
    return sum(points.unbind(dim=1))[:, None, :]  # (N, M, 2) -> (N, 1, 2)


def peer_mean(points: torch.Tensor) -> torch.Tensor:
    """Eq. (3) in the plane: the ensemble of the peers is their mean, the midpoint of two peers."""
    return peer_sum(points) / points.shape[1]  # (N, M, 2) -> (N, 1, 2)


def leave_one_out_mean(points: torch.Tensor) -> torch.Tensor:
    """Eq. (10): E_bar_i = 1/(m-1) * sum_{j != i} T_j, for every peer i."""
    return (peer_sum(points) - points) / (points.shape[1] - 1)  # (N, M, 2)


def teacher_pull(students: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
    """Eq. (4) / (6) in the plane: 1/(m-1) * sum_{j != i} unit(T_j - S_i), for every peer i."""
    num_peers = students.shape[1]
    # j runs over the other peers as j = i + shift (mod m), shift = 1 .. m-1.
    pulls = sum(unit(teachers.roll(shift, dims=1) - students)
                for shift in range(1, num_peers))  # (N, M, 2)
    return pulls / (num_peers - 1)


def student_step(students: torch.Tensor, teachers: torch.Tensor, teacher_ensemble_weight: float,
                 eta: float) -> torch.Tensor:
    """Eq. (7) for every student peer at once: one optimizer step on the sum of the peers' losses.

    `teacher_ensemble_weight` is w(ep) of Eq. (12); it is 0 for PCL and DK, which reduces the step to
    Eq. (7) with the targets Y (L_ce), E (L_pe) and the other teacher peers (L_pm or L_dk).
    """
    # NOTE(paper): E is the mean of every student peer, S_i included (Eq. (3); the midpoint of
    # Fig. 4). Leaving S_i out would not change the step: only the direction enters Eq. (7), and
    # E - S_i = (m-1)/m * (mean_{j != i} S_j - S_i) points the same way.
    ensemble = peer_mean(students)  # (N, 1, 2)
    # NOTE(paper): the toy has no ramp-up lambda * r(ep) of Eq. (2); Sec. 3.4 lists none.
    # NOTE(paper): a step of eta along each target's unit vector; "the law of vector summation"
    # fixes no normalisation, and the raw differences P_k - S_i would pull far points harder
    # (docs/spec.md Sec. 2, Eq. (7)). The (1 - w) on the teacher pull is Eq. (12)'s (Sec. 2).
    # Eq. (7) / (12): S_i' = S_i + eta * [unit(Y - S_i) + unit(E - S_i)
    #                  + w * unit(E_bar_i - S_i) + (1 - w) * 1/(m-1) * sum_{j != i} unit(T_j - S_i)]
    direction = (unit(-students) + unit(ensemble - students)
                 + teacher_ensemble_weight * unit(leave_one_out_mean(teachers) - students)
                 + (1 - teacher_ensemble_weight) * teacher_pull(students, teachers))  # (N, M, 2)
    return students + eta * direction


def ema_step(teachers: torch.Tensor, students: torch.Tensor, ema_decay: float) -> torch.Tensor:
    """Eq. (8), the EMA of Eq. (5) in the plane, for every teacher peer."""
    # Eq. (8): T_i' = alpha * T_i + (1 - alpha) * S_i'
    return ema_decay * teachers + (1 - ema_decay) * students


def initialise_teachers(students: torch.Tensor, init_iters: int, init_lr: float) -> torch.Tensor:
    """Sec. 3.3: copy the student, then `init_iters` cross-entropy steps, i.e. steps towards Y."""
    teachers = students.clone()
    for _ in range(init_iters):
        # Eq. (7) with the single target Y: T_i' = T_i + init_lr * unit(Y - T_i)
        teachers = teachers + init_lr * unit(-teachers)
    return teachers


def initial_points(trials: int, num_peers: int, radius: float, shape: str,
                   generator: torch.Generator) -> torch.Tensor:
    """Random student peers around Y = 0: on the circle of `radius` or uniform in its disc."""
    angles = 2 * math.pi * torch.rand(trials, num_peers, generator=generator, dtype=torch.float64)
    radii = torch.full_like(angles, radius)  # (N, M)
    if shape == "disc":
        radii = radius * torch.rand(trials, num_peers, generator=generator,
                                    dtype=torch.float64).sqrt()
    return torch.stack((angles.cos(), angles.sin()), dim=-1) * radii[..., None]  # (N, M, 2)


def teacher_ensemble_weights(method: str, epochs: int, decay: str, beta: float) -> list:
    """w(ep) for ep = 0 .. epochs-1: Eq. (11) / (13) / (14) for DKEL, 0 for PCL and DK."""
    return [teacher_ensemble_decay(epoch, epochs, decay, beta) if method == "dkel" else 0.0
            for epoch in range(epochs)]


def teacher_gap(teachers: torch.Tensor) -> torch.Tensor:
    """Distance between the teacher and Y of every trial, averaged over the teacher peers."""
    return teachers.norm(dim=-1).mean(dim=1)  # (N, M, 2) -> (N,)


def simulate(students: torch.Tensor, teachers: torch.Tensor, weights: list, eta: float,
             ema_decay: float) -> torch.Tensor:
    """Run len(weights) epochs; the teacher gap after each epoch, epoch 0 = before training."""
    gaps = [teacher_gap(teachers)]
    for weight in weights:
        students = student_step(students, teachers, weight, eta)
        teachers = ema_step(teachers, students, ema_decay)
        gaps.append(teacher_gap(teachers))
    return torch.stack(gaps)  # (E+1, N)


def convergence_epoch(curve: list, tolerance: float) -> int:
    """First epoch from which the curve stays within tolerance * |curve[0] - curve[-1]| of its
    last value, curve[-1]."""
    band = tolerance * abs(curve[0] - curve[-1])
    epoch = len(curve) - 1
    while epoch > 0 and abs(curve[epoch - 1] - curve[-1]) <= band:
        epoch -= 1
    return epoch


def run_montecarlo(args: argparse.Namespace) -> dict:
    """Fig. 5: the teacher gap per epoch of every method, from the same random initial points."""
    generator = torch.Generator().manual_seed(args.seed)
    students = initial_points(args.trials, args.num_peers, args.init_radius, args.init_shape,
                              generator)  # (N, M, 2)
    curves = {}
    for method in SIMULATED_METHODS:
        # PCL's mean teacher starts as a copy of the student; DK and DKEL initialise it (Sec. 3.3).
        init_iters = 0 if method == "pcl" else args.init_iters
        teachers = initialise_teachers(students, init_iters, args.init_lr)
        weights = teacher_ensemble_weights(method, args.epochs, args.decay, args.beta)
        curves[method] = simulate(students, teachers, weights, args.eta,
                                  args.ema_decay)  # (E+1, N)
    return curves


def write_montecarlo_csv(path: Path, means: dict, stds: dict) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch"] + [f"{m}_{stat}" for m in SIMULATED_METHODS
                                     for stat in ("mean", "std")])
        for epoch in range(len(means[SIMULATED_METHODS[0]])):
            writer.writerow([epoch] + [f"{values[m][epoch]:.6f}"
                                       for m in SIMULATED_METHODS for values in (means, stds)])


# Not in Fig. 5: a hollow marker per method, on staggered epochs, tells apart curves that coincide.
MARKERS = {"pcl": "o", "dk": "s", "dkel": "^"}
# The epochs of the left panel's inset: at the defaults, around DKEL's largest lead over PCL
# after epoch 0 (the right panel).
ZOOM = (10, 14)


def plot_montecarlo(path: Path, means: dict, stds: dict, converged: dict, decay: str) -> None:
    """Left: Fig. 5, the mean teacher gap (thick) between the edges of its band of one std (thin),
    with an inset that zooms on the means; right: each gap minus PCL's."""
    figure, (axis, difference) = plt.subplots(1, 2, figsize=(12, 4.2))
    epochs = range(len(means[SIMULATED_METHODS[0]]))
    for index, method in enumerate(SIMULATED_METHODS):
        colour, line = STYLES[method]
        name = method.upper() + (f" ({decay})" if method == "dkel" and decay != "exp" else "")
        mean, std = torch.tensor(means[method]), torch.tensor(stds[method])
        marks = {"marker": MARKERS[method], "fillstyle": "none",
                 "markevery": (3 * index, 9)}  # staggered: every method shows its markers
        axis.plot(epochs, mean, line, color=colour, lw=2, label=f"{name}, converged at epoch "
                  f"{converged[method]}", **marks)
        for edge in (mean - std, mean + std):
            axis.plot(epochs, edge, line, color=colour, lw=0.8)
        axis.axvline(converged[method], color=colour, ls="--", lw=0.8)
        difference.plot(epochs, mean - torch.tensor(means["pcl"]), line, color=colour, lw=2,
                        label=name, **marks)
    draw_zoom(axis, means)
    axis.set_title("Monte Carlo simulation (thin: mean ± 1 std over trials; dashed: convergence)",
                   fontsize=10)
    axis.set_ylabel("distance between teacher and Y")
    axis.set_ylim(bottom=0)
    difference.set_title("gap minus PCL's gap (below 0: closer to Y than PCL)", fontsize=10)
    difference.set_ylabel("difference of mean distance")
    for panel in (axis, difference):
        panel.set_xlabel("epoch")
        panel.set_xlim(0, len(epochs) - 1)
    axis.legend(loc="lower left", fontsize=8)
    difference.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def draw_zoom(axis, means: dict) -> None:
    """An inset on `axis` with the means over the epochs ZOOM, in runs that reach them."""
    if len(means[SIMULATED_METHODS[0]]) <= ZOOM[1]:
        return
    zoom = axis.inset_axes([0.38, 0.5, 0.42, 0.45])  # clear of the bands and convergence lines
    epochs = range(ZOOM[0], ZOOM[1] + 1)
    for method in SIMULATED_METHODS:
        colour, line = STYLES[method]
        zoom.plot(epochs, means[method][ZOOM[0]:ZOOM[1] + 1], line, color=colour, lw=2,
                  marker=MARKERS[method], fillstyle="none")
    zoom.set_xlabel(f"the means, epochs {ZOOM[0]} to {ZOOM[1]}", fontsize=7, labelpad=1)
    zoom.tick_params(labelsize=7)
    axis.indicate_inset_zoom(zoom, edgecolor="grey")


def montecarlo_command(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    # The tensors are small (N x M x 2): intra-op threads save little, and on a busy shared CPU
    # their synchronisation stalls the loop for seconds, so the simulation runs on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curves = run_montecarlo(args)
    finally:
        torch.set_num_threads(threads)
    means = {m: c.mean(dim=1).tolist() for m, c in curves.items()}
    stds = {m: c.std(dim=1, correction=0).tolist() for m, c in curves.items()}
    seconds = time.perf_counter() - start
    converged = {m: convergence_epoch(means[m], args.tolerance) for m in SIMULATED_METHODS}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_montecarlo_csv(out_dir / "montecarlo.csv", means, stds)
    plot_montecarlo(out_dir / "montecarlo.png", means, stds, converged, args.decay)
    checkpoint = min(10, args.epochs)
    header = ("method", "gap@0", f"gap@{checkpoint}", "converged", "final gap (mean ± std)")
    print("{:<7}{:>8}{:>9}{:>11}   {}".format(*header))
    for m in SIMULATED_METHODS:
        print(f"{m:<7}{means[m][0]:8.3f}{means[m][checkpoint]:9.3f}{converged[m]:11d}"
              f"   {means[m][-1]:.4f} ± {stds[m][-1]:.4f}")
    print(f"simulated {len(SIMULATED_METHODS)} methods x {args.trials} trials x {args.epochs} "
          f"epochs in {seconds:.2f} s; wrote montecarlo.csv and montecarlo.png to {out_dir}")


def angle_degrees(first: torch.Tensor, vertex: torch.Tensor, second: torch.Tensor) -> float:
    """The angle first-vertex-second, in degrees."""
    cosine = torch.dot(unit(first - vertex), unit(second - vertex))
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine.item()))))


def ideal_scenarios(args: argparse.Namespace) -> list:
    """Fig. 4: (title, S, T, S', T') of each case; each point set is (2, 2), peers 1 and 2."""
    students = torch.tensor([IDEAL_STUDENTS], dtype=torch.float64)  # (1, 2, 2)
    cases = (("PCL (teacher = copy of student)", students.clone()),
             ("DK, random teacher", torch.tensor([IDEAL_RANDOM_TEACHERS], dtype=torch.float64)),
             (f"DK, proposed init (init_iters = {args.init_iters})",
              initialise_teachers(students, args.init_iters, args.init_lr)))
    scenarios = []
    for title, teachers in cases:
        stepped = student_step(students, teachers, 0.0, args.eta)
        scenarios.append((title, students[0], teachers[0], stepped[0],
                          ema_step(teachers, stepped, args.ema_decay)[0]))
    return scenarios


def ideal_distances(students, teachers, stepped, stepped_teachers) -> dict:
    """The quantities Fig. 4 illustrates, with Y = 0."""
    truth = torch.zeros(2, dtype=students.dtype)
    return {"angle T2 S1 Y": angle_degrees(teachers[1], students[0], truth),
            "|S1 Y|": students[0].norm().item(), "|S1' Y|": stepped[0].norm().item(),
            "|T1 Y|": teachers[0].norm().item(), "|T1' Y|": stepped_teachers[0].norm().item(),
            "|S1' T1'|": (stepped[0] - stepped_teachers[0]).norm().item()}


def draw_ideal_panel(axis, title: str, students, teachers, stepped, stepped_teachers) -> None:
    """Points, supervision lines, the step of S_1 and the EMA step of T_1, as in Fig. 4."""
    ensemble, truth = students.mean(dim=0), torch.zeros(2, dtype=students.dtype)
    for target in (truth, ensemble, teachers[1]):  # the supervisions of S_1 in Eq. (7)
        axis.plot(*zip(students[0], target), color="grey", ls="--", lw=0.8)
    for start, end, colour in ((students[0], stepped[0], "tab:blue"),
                               (teachers[0], stepped_teachers[0], "tab:orange")):
        axis.annotate("", end.tolist(), start.tolist(),
                      arrowprops={"arrowstyle": "->", "color": colour, "lw": 2})
    axis.plot(*students.T, "o", color="tab:blue", ms=8)
    axis.plot(*teachers.T, "s", color="tab:orange", mfc="none", ms=11, mew=1.5)
    axis.plot(*stepped[0], "o", color="tab:blue", mfc="none", ms=8)
    axis.plot(*stepped_teachers[0], "s", color="tab:orange", ms=6)
    axis.plot(*ensemble, "D", color="tab:purple")
    axis.plot(0, 0, "*", color="black", ms=15)
    labels = ((students[0], "$S_1$", (-20, 6)), (teachers[0], "$T_1$", (-20, -16)),
              (stepped[0], "$S_1'$", (4, 6)), (stepped_teachers[0], "$T_1'$", (4, -16)),
              (students[1], "$S_2$", (6, 6)), (teachers[1], "$T_2$", (6, -16)),
              (ensemble, "$E$", (6, 4)), (truth, "$Y$", (8, -4)))
    for point, text, offset in labels:
        axis.annotate(text, point.tolist(), xytext=offset, textcoords="offset points", fontsize=12)
    measured = ideal_distances(students, teachers, stepped, stepped_teachers)
    angle, student_gap, gap = (measured[k] for k in ("angle T2 S1 Y", "|S1' Y|", "|T1' Y|"))
    axis.set_title(f"{title}\n$\\angle T_2S_1Y$ = {angle:.0f}°,  |$S_1'Y$| = {student_gap:.3f},"
                   f"  |$T_1'Y$| = {gap:.3f}", fontsize=10)
    axis.set_aspect("equal")


def ideal_command(args: argparse.Namespace) -> None:
    scenarios = ideal_scenarios(args)
    figure, axes = plt.subplots(1, len(scenarios), figsize=(15, 4.0), sharex=True, sharey=True)
    columns = list(ideal_distances(*scenarios[0][1:]))
    print(f"{'case':<36}" + "".join(f"{name:>{len(name) + 3}}" for name in columns))
    for axis, (title, *points) in zip(axes, scenarios):
        draw_ideal_panel(axis, title, *points)
        measured = ideal_distances(*points)
        print(f"{title:<36}" + "".join(f"{measured[n]:{len(n) + 3}.3f}" for n in columns))
    # Shared limits: every point of every case and Y, with a margin.
    corners = torch.cat([torch.cat(points) for _, *points in scenarios]
                        + [torch.zeros(1, 2, dtype=torch.float64)])  # (P, 2)
    low = (corners.min(dim=0).values - 0.12).tolist()
    high = (corners.max(dim=0).values + 0.12).tolist()
    axes[0].set_xlim(low[0], high[0])
    axes[0].set_ylim(low[1], high[1])
    figure.suptitle("Ideal experiment: one step of $S_1$ (Eq. 7) and of its teacher $T_1$ (Eq. 8)")
    figure.tight_layout()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_dir / "ideal.png", dpi=150)
    plt.close(figure)
    print(f"wrote {out_dir / 'ideal.png'}")


def build_parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--eta", type=float, default=0.1,
                        help="learning rate, the step length per unit-weight target "
                             "(paper Sec. 3.4: 0.1)")
    shared.add_argument("--ema-decay", type=float, default=DEFAULT_EMA_DECAY,
                        help="EMA decay alpha per epoch, Eq. (8) (paper Sec. 3.4 gives one; the "
                             "text this project worked from lost its digits). Default "
                             "0.999**390 = %(default).3f: the training alpha 0.999 compounded "
                             "over the 390 iterations of a CIFAR epoch (docs/spec.md Sec. 7)")
    shared.add_argument("--init-iters", type=int, default=1,
                        help="teacher initialisation steps towards Y for DK and DKEL "
                             "(Sec. 3.3 and 3.4: 1)")
    shared.add_argument("--init-lr", type=float, default=0.1,
                        help="step length of the initialisation steps (Sec. 3.4 uses one "
                             "learning rate, 0.1, for the whole simulation)")
    shared.add_argument("--out-dir", default="runs/simulate", help="where the CSV and PNGs go")
    parser = Parser(prog="simulate.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="{ideal,montecarlo}")
    commands.add_parser("ideal", parents=[shared], formatter_class=HelpFormatter,
                        help="one step of Fig. 4, saved as ideal.png")
    montecarlo = commands.add_parser(
        "montecarlo", parents=[shared], formatter_class=HelpFormatter,
        help="Fig. 5, saved as montecarlo.csv and montecarlo.png",
        description="Monte Carlo simulation of Fig. 5. A method converges at the first epoch from "
                    "which its mean teacher gap stays within --tolerance times its total decrease "
                    "(gap at epoch 0 minus gap at the last epoch) of its final gap.")
    montecarlo.add_argument("--num-peers", type=int, default=3, help="peers m (paper: 3)")
    montecarlo.add_argument("--epochs", type=int, default=90, help="epochs E (paper: 90)")
    montecarlo.add_argument("--trials", type=int, default=10_000, help="trials N (paper: 10,000)")
    montecarlo.add_argument("--decay", choices=("exp", "cos", "linear"), default="exp",
                            help="DKEL ensemble weight: Eq. (11) exp (paper), (13) cos, "
                                 "(14) linear")
    montecarlo.add_argument("--beta", type=float, default=0.5, help="beta of Eq. (11) (paper: 0.5)")
    montecarlo.add_argument("--init-shape", choices=("circle", "disc"), default="circle",
                            help="initial student peers on the circle of --init-radius around Y "
                                 "(equal initial loss) or uniform in its disc; not in the paper")
    montecarlo.add_argument("--init-radius", type=float, default=DEFAULT_INIT_RADIUS,
                            help="initial distance to Y; not in the paper. Default ln 100 = "
                                 "%(default).3f, the cross-entropy of a uniform CIFAR-100 guess")
    montecarlo.add_argument("--tolerance", type=float, default=0.02,
                            help="convergence band as a fraction of the total decrease (default "
                                 "0.02, the 2%% settling time)")
    montecarlo.add_argument("--seed", type=int, default=0, help="seed of the initial points")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One clear line and exit code 2 for values the simulation cannot use."""
    rules = [(args.eta > 0, f"--eta must be positive (paper: 0.1), got {args.eta}"),
             (args.init_lr > 0, f"--init-lr must be positive (paper: 0.1), got {args.init_lr}"),
             (0 <= args.ema_decay <= 1, f"--ema-decay must lie in [0, 1], got {args.ema_decay}"),
             (args.init_iters >= 0, f"--init-iters must be 0 or more, got {args.init_iters}")]
    if args.command == "montecarlo":
        rules += [(args.num_peers >= 2, f"--num-peers must be at least 2, got {args.num_peers}"),
                  (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
                  (args.trials >= 1, f"--trials must be at least 1, got {args.trials}"),
                  (args.beta >= 0, f"--beta must be 0 or more (paper: 0.5), got {args.beta}"),
                  (args.init_radius > 0, f"--init-radius must be positive, got {args.init_radius}"),
                  (0 < args.tolerance < 1, f"--tolerance must lie in (0, 1), got {args.tolerance}")]
    for valid, message in rules:
        if not valid:
            parser.error(message)


def main(argv: list = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("name a command: ideal (one step of Fig. 4) or montecarlo (Fig. 5)")
    check_args(parser, args)
    if args.command == "ideal":
        ideal_command(args)
    else:
        montecarlo_command(args)


if __name__ == "__main__":
    main()
