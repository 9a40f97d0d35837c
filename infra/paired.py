"""Each method against the baseline (and against DK, where it ran) on the same seeds: the section of
compare.py's Tables 1-3 that says whether a method's difference stands out of the seed noise.

For every seed that both finished, d = the method's final deployed accuracy minus the baseline's.
The paired t statistic mean(d) / (std(d) / sqrt(n)) is compared with the two-sided 5% quantile of
Student's t with n - 1 degrees of freedom (computed here by integrating the density, so that no
statistics package is needed); the binomial standard error of one accuracy on the test split gives
the scale of the test set's own noise. A run's record is compare.run_record's: its seed, final and
student-ensemble accuracies, number of test images, median images/s, and the lowest logit norm and
test accuracy after the ramp-up. The choice of test is our reading: the paper reports mean ± std
over runs and no test.
"""
import functools
import math
import statistics

from cli import METHODS


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and sample standard deviation over seeds (None for one seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(mean: float, std: float | None) -> str:
    """A table cell "mean±std", two decimals."""
    return f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"


@functools.cache
def t_quantile(dof: int, coverage: float = 0.95) -> float:
    """The two-sided quantile q of Student's t with `dof` degrees of freedom, P(|T| < q) =
    `coverage`: bisection on the density's integral (Simpson's rule)."""
    scale = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)

    def density(x: float) -> float:
        return scale * (1 + x * x / dof) ** (-(dof + 1) / 2)

    def mass(q: float, steps: int = 2000) -> float:  # P(|T| < q)
        h = q / steps
        odd = sum(density((2 * k - 1) * h) for k in range(1, steps // 2 + 1))
        even = sum(density(2 * k * h) for k in range(1, steps // 2))
        return 2 * h / 3 * (density(0.0) + 4 * odd + 2 * even + density(q))

    low, high = 0.0, 100.0
    for _ in range(50):
        middle = (low + high) / 2
        if mass(middle) < coverage:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def paired_t(differences: list[float]) -> float | None:
    """The paired t statistic mean(d) / (std(d) / sqrt(n)) of per-seed differences; None for
    fewer than two."""
    if len(differences) < 2:
        return None
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    if std == 0.0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / (std / math.sqrt(len(differences)))


def verdict(differences: list[float]) -> str:
    """Whether a method's mean difference from the baseline stands out of the seed noise: |t|
    above the two-sided 5% quantile of Student's t with n - 1 degrees of freedom."""
    t = paired_t(differences)
    if t is None:
        return "one seed: no test"
    if abs(t) <= t_quantile(len(differences) - 1):
        return "within the seed noise"
    return "stands out: better" if t > 0 else "stands out: worse"


def differences(records: list[dict], reference: list[dict]) -> list[float]:
    """A method's final accuracy minus the reference's (the baseline's), seed by seed (the seeds
    both finished)."""
    base = {record["seed"]: record["final"] for record in reference}
    return [record["final"] - base[record["seed"]] for record in records if record["seed"] in base]


def standard_error(records: list[dict]) -> tuple[int, float, float] | None:
    """(test images n, mean accuracy p, the binomial standard error of one accuracy p on n images
    in points), or None when the runs do not record n."""
    sizes = {record["test_images"] for record in records if record.get("test_images")}
    if not sizes:
        return None
    n, p = max(sizes), statistics.fmean(record["final"] for record in records) / 100
    return n, p, 100 * math.sqrt(p * (1 - p) / n)


def binomial_error(records: list[dict]) -> str:
    """The binomial standard error of one accuracy at the records' mean, on their test images."""
    known = standard_error(records)
    if known is None:
        return "the runs do not record their number of test images (summary.json test_images)"
    n, p, error = known
    return (f"binomial standard error of one accuracy of {100 * p:.1f}% on {n} test images: "
            f"{error:.2f} points ({error * math.sqrt(2):.2f} for the difference of two "
            f"independent ones)")


def details(label: str, records: list[dict]) -> str:
    """A method's row of the details table: its seeds, the mean ± std of its final deployed and
    student-ensemble accuracies, the mean over its runs of their median images/s and, over its
    runs, the lowest logit norm and test accuracy after the ramp-up ("—" where not recorded)."""
    def values(key: str) -> list[float]:
        return [record[key] for record in records if record.get(key) is not None]

    def spread(key: str) -> str:
        return cell(*mean_std(values(key))) if values(key) else "—"

    def number(key: str, reduce, digits: int) -> str:
        return f"{reduce(values(key)):.{digits}f}" if values(key) else "—"

    seeds = " ".join(str(record["seed"]) for record in records)
    return (f"| {label} | {seeds} | {spread('final')} | {spread('ensemble')} | "
            f"{number('images_per_s', statistics.fmean, 0)} | "
            f"{number('lowest_logit_norm', min, 3)} | {number('lowest_acc', min, 1)} |")


def seed_by_seed(entries: dict) -> list[str]:
    """Tables 1-3 with the baseline among the methods: each method's per-seed difference from the
    baseline, its paired t and verdict, and likewise from PCL+L_dk (DK) where DK ran, which asks
    what L_de adds (Table 3); each method's student ensemble, speed and health."""
    lines = ["## Against the baseline, seed by seed (final epoch, deployed model)", "",
             "d = the method's final accuracy minus the baseline's on the same seed, in points; "
             "t = mean(d) / (std(d) / √n); a difference stands out of the seed noise when |t| "
             "exceeds the two-sided 5% quantile of Student's t with n - 1 degrees of freedom.", ""]
    for (dataset, arch), methods in entries.items():
        baseline = methods.get(METHODS["baseline"].label, [])
        lines += [f"### {dataset} {arch}", "", f"Baseline: {binomial_error(baseline)}.", ""]
        lines += against(METHODS["baseline"].label, methods)
        if methods.get(METHODS["dk"].label) and len(methods) > 2:
            lines += ["", f"Against {METHODS['dk'].label} (DK) on the same seed, the same way:", ""]
            lines += against(METHODS["dk"].label, methods)
        lines += ["", "| method | seeds | deployed, final | student ensemble, final | images/s "
                  "(median epoch) | lowest logit norm after ramp-up | lowest test % after ramp-up "
                  "|", "|---|---|---|---|---|---|---|"]
        lines += [details(label, records) for label, records in methods.items()]
        lines.append("")
    return lines


def against(reference: str, methods: dict[str, list[dict]]) -> list[str]:
    """The table of every other method's per-seed differences from the method `reference`."""
    lines = ["| method | d per seed | mean ± std | t (5% quantile) | verdict |", "|---|---|---|---|---|"]
    for label, records in methods.items():
        d = differences(records, methods[reference])
        if label in (reference, METHODS["baseline"].label) or not d:
            continue
        t = paired_t(d)
        quantile = f"{t:.2f} ({t_quantile(len(d) - 1):.2f})" if t is not None else "—"
        lines.append(f"| {label} | {' '.join(f'{v:+.2f}' for v in d)} | "
                     f"{cell(*mean_std(d))} | {quantile} | {verdict(d)} |")
    return lines
