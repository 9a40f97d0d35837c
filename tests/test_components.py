"""The figures the docs give of what each part of DKEL does, held to the code that computes them:
docs/spec.md's table of summed weights (tools/components.py --weights-table) and its table of what
a short run gets (cli.resolve_args), and tools/components.py's items, each against a hand
computation."""
import math
import os
import re

import pytest
import torch

import cli
from tools import components

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = open(os.path.join(ROOT, "docs", "spec.md"), encoding="utf-8").read()


def table_after(text: str, header_start: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table whose header line starts with `header_start`."""
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_spec_table_of_summed_weights_is_the_tools():
    page = SPEC[SPEC.index("| DKEL, 300 epochs |"):]
    page = page[:page.index("\n\n")]
    assert page == components.weights_table()


def test_summed_weights_by_hand():
    """Eq. (12) as printed at beta 0.5: L_de's weight sums exp(-0.5 ep) over 300 epochs; under the
    earlier reading each term is times r(ep) = exp(-5 (1 - ep/80)^2) (1 from epoch 80)."""
    sums = components.summed_weights(["--method", "dkel"])
    assert sums["de"] == pytest.approx(sum(math.exp(-0.5 * ep) for ep in range(300)), rel=1e-12)
    r = [math.exp(-5 * (1 - ep / 80) ** 2) if ep < 80 else 1.0 for ep in range(300)]
    assert sums["pe"] == pytest.approx(sum(r), rel=1e-12)
    earlier = components.summed_weights(["--method", "dkel", "--rampup-scales-de"])
    assert earlier["de"] == pytest.approx(sum(r[ep] * math.exp(-0.5 * ep) for ep in range(300)))
    assert earlier["de"] == pytest.approx(0.0214, abs=1e-4)  # docs/spec.md Sec. 2 and the issue


@pytest.mark.parametrize("row", table_after(SPEC, "| `--epochs` | R (CIFAR and TinyImageNet) |"))
def test_what_a_short_run_gets_is_what_the_spec_says(row):
    epochs, rampup, cifar, tiny = row[:4]
    for dataset, milestones in (("cifar10", cifar), ("tinyimagenet", tiny)):
        args = cli.resolve_args(["--dataset", dataset, "--epochs", epochs, "--device", "cpu"])
        assert args.rampup_epochs == int(rampup)
        assert args.milestones == [int(m) for m in milestones.split(", ")]


def test_from_three_epochs_on_both_milestones_act():
    """A milestone at the last epoch never changes the lr; from 3 epochs on both come earlier."""
    for epochs in range(3, 400):
        for fractions in ((0.5, 0.75), (0.3, 0.6)):
            first, second = cli.scaled_milestones(epochs, fractions)
            assert 1 <= first < second < epochs, (epochs, fractions)
    assert cli.scaled_milestones(300, (0.5, 0.75)) == [150, 225]   # the paper's, unchanged
    assert cli.scaled_milestones(100, (0.3, 0.6)) == [30, 60]


def test_the_gradient_gap_by_hand():
    """L_dk's gradient on s_i is T (q_i - mean_j p_j), L_de's T (q_i - softmax(Ebar_i / T)), with
    q, p the softened student and teacher distributions (M = 3: j over the other two)."""
    generator = torch.Generator().manual_seed(3)
    s, t = (2.0 * torch.randn(3, 4, 5, generator=generator) for _ in range(2))
    temperature, batch = 3.0, 4
    q, p = (s / temperature).softmax(-1), (t / temperature).softmax(-1)
    others = [[1, 2], [0, 2], [0, 1]]
    g_dk = torch.stack([temperature * (q[i] - p[o].mean(0)) for i, o in enumerate(others)]) / batch
    g_de = torch.stack([temperature * (q[i] - (t[o].mean(0) / temperature).softmax(-1))
                        for i, o in enumerate(others)]) / batch
    gap = components.gradient_gap(s, t, temperature)
    by_hand = ((g_de - g_dk).norm() / g_dk.norm()).item()
    assert gap["relative_gap"] == pytest.approx(by_hand, rel=1e-4)
    cosine = (g_de * g_dk).sum() / (g_de.norm() * g_dk.norm())
    assert gap["cosine"] == pytest.approx(cosine.item(), rel=1e-5)
    # Peers that agree leave no gap: the mean of equal probabilities is their softmax.
    same = t[:1].expand(3, -1, -1)
    assert components.gradient_gap(s, same)["relative_gap"] == pytest.approx(0.0, abs=1e-6)


def test_the_authors_code_taken_together():
    figures = components.authors_code()
    assert figures["rampup_zero_in_float32_epochs_1_80"]
    assert figures["cutoff_from_epoch_81_for_beta_at_least"] == pytest.approx(math.log(100) / 81)
    assert figures["de_weight_epoch_0"] == pytest.approx(0.1 * math.exp(-5))
    # Their objectives at beta 0.1 to 1.0 agree at every epoch; 0.05's w(81) = 0.017 survives the
    # cut-off and weighs L_dk by 1 - w there.
    assert figures["betas_with_identical_objectives"] == [0.1, 0.2, 0.5, 1.0]
    assert figures["ema_decay_at_step_0"] == 0.0
    # Their PCL: r = 1 at epoch 1 and from 81 (219 epochs), e^-5 at 0 and 2;
    # their DKEL: 0.1 from 81.
    assert figures["pcl_reproduction_summed_rampup"] == pytest.approx(220 + 2 * math.exp(-5),
                                                                      rel=1e-6)
    assert figures["dkel_summed_rampup"] == pytest.approx(21.9 + 0.1 * math.exp(-5), rel=1e-6)


def test_the_ema_lag_by_hand():
    lag = components.ema_lag()
    assert lag["time_constant_steps"] == pytest.approx(1000)
    assert [round(100 * x) for x in lag["start_left_after_epoch"]] == [68, 46, 31, 21, 14]
    assert components.large_w_epochs() == [0, 1, 2, 3, 4]


def test_a_run_directory_without_metrics_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        components.main(["--run", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--run" in err and "metrics.csv" in err


# ------------------------------------------------------------------ docs/components.md and the tool
PAGE = open(os.path.join(ROOT, "docs", "components.md"), encoding="utf-8").read()
EVIDENCE = open(os.path.join(ROOT, "docs", "evidence.md"), encoding="utf-8").read()
RUNS = [os.path.join(ROOT, "docs", "evidence_runs", name)
        for name in ("evidence", "evidence_rampup_de", "evidence_eq12", "evidence_lrpp")]
RELATIVE = 0.02  # the page's tolerance for a figure another CPU recomputes in fp32
POINTS = 0.4     # an accuracy on 512 test images: within 2 images
NUM = r"(\d+(?:\.\d+)?)"       # a figure on the page (not the full stop after it)
SCI = r"(\d+(?:\.\d+)?e-\d+)"  # a figure in scientific notation


def near(shown: str, value: float, relative: float = RELATIVE) -> bool:
    """`value` is the page's figure `shown` within `relative`, or within its rounding."""
    mantissa = shown.split("e")[0]
    digits = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(shown.split("e")[1]) if "e" in shown else 0
    rounding = 0.5 * 10.0 ** (exponent - digits)
    return abs(value - float(shown)) <= max(relative * abs(value), rounding)


def figures_in(pattern: str, text: str = PAGE) -> tuple[str, ...]:
    match = re.search(pattern, " ".join(text.split()))
    assert match, pattern
    return match.groups()


@pytest.fixture(scope="module")
def synthetic_start():
    """Item 1's synthetic run (the page's first command) up to its first measurement."""
    torch.manual_seed(0)
    dataset = components.data.synthetic_data(1024, 512, 0)
    record, = components.dkel_run(dataset, ["--dataset", "synthetic", "--arch", "resnet8",
                                            "--epochs", "30", "--ema-decay", "0.99"], [0])
    return record


def test_the_pages_gradient_gaps_are_the_tools(synthetic_start):
    rows = {row[0]: row[1:] for row in table_after(PAGE, "| where | gap | cosine |")}
    for scale, gap in components.random_logit_gaps().items():
        shown_gap, shown_cosine = rows[f"independent random logits, scale {float(scale):g}"]
        assert near(shown_gap, gap["relative_gap"])
        assert near(f"{1 - float(shown_cosine):.{len(shown_cosine) - 2}f}", 1 - gap["cosine"], 0.1)
    shown_gap, shown_cosine = rows["synthetic, resnet8, after the initialisation (epoch 0)"]
    assert near(shown_gap, synthetic_start["relative_gap"])
    assert near(f"{1 - float(shown_cosine):.{len(shown_cosine) - 2}f}",
                1 - synthetic_start["cosine"], relative=0.1)


def test_the_pages_early_teacher_is_the_tools(synthetic_start):
    teacher, student = figures_in(rf"after epochs 0, 1, 2 and 5 is {NUM}, .*? peer's {NUM},")
    assert abs(float(teacher) - synthetic_start["teacher_ensemble"]) <= POINTS
    assert abs(float(student) - synthetic_start["mean_student_peer"]) <= POINTS
    left = figures_in(r"still (\d+) / (\d+) / (\d+) / (\d+) / (\d+)% those")
    assert [int(x) for x in left] == [round(100 * x)
                                      for x in components.ema_lag()["start_left_after_epoch"]]
    table = PAGE[PAGE.index("| runs | method | runs |"):]
    assert table[:table.index("\n\n")] == components.early_teacher_table(RUNS)


def test_evidence_pages_first_epochs_are_the_tools():
    table = EVIDENCE[EVIDENCE.index("| runs | method | seeds |"):]
    assert table[:table.index("\n\n")] == components.early_epochs_table(RUNS)


def test_the_pages_initialisation_is_the_tools():
    init = components.initialisation("resnet8")
    moved, drop, larger, kl_k, kl_ts = figures_in(
        rf"On resnet8, .*? teacher by {SCI} of its norm and lowers its cross-entropy by "
        rf"{NUM} nats; the student's first step is (\d+) times larger, and KL\(T_k1 ‖ T_k0\) = "
        rf"{SCI} against KL\(T ‖ S\) = {NUM}")
    assert near(moved, init["teacher_moved"], 0.05)
    assert near(drop, init["teacher_ce_drop_nats"], 0.05)
    assert near(larger, init["student_over_teacher"], 0.05)
    assert near(kl_k, init["kl_teacher_k1_k0"], 0.1)
    assert near(kl_ts, init["kl_teacher_student_after_one_step"], 0.05)
    one, ten, reach, dk = figures_in(rf"decays as α\^n, {NUM} after one CIFAR epoch and {NUM} "
                                     rf"after 10 .*? sums to {NUM} over 300 epochs, against (\d+)")
    assert near(one, init["offset_left_after_1_epoch"], 0)
    assert near(ten, init["offset_left_after_10_epochs"], 0)
    assert near(reach, init["offset_reach_summed_dk_weight"], 0)
    assert near(dk, init["dk_summed_weight"], 0)


def test_the_pages_authors_code_is_the_tools():
    authors = components.authors_code()
    spread = figures_in(rf"spread by {NUM}, {NUM}, {NUM} and {NUM} points")
    assert [float(x) for x in spread] == authors["table4_spread_of_those_rows"]
    cutoff, = figures_in(rf"from epoch 81 at every β ≥ {NUM}")
    assert near(cutoff, authors["cutoff_from_epoch_81_for_beta_at_least"], 0)
    de, = figures_in(rf"acts only in epoch 0, at weight 0\.1·e⁻⁵ = {SCI}")
    assert near(de, authors["de_weight_epoch_0"], 0)
    pcl, dkel = figures_in(rf"r\(ep\) sums to (\d+) over 300 epochs against {NUM}")
    assert near(pcl, authors["pcl_reproduction_summed_rampup"], 0)
    assert near(dkel, authors["dkel_summed_rampup"], 0)
