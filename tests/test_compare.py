"""compare.py: every experiment's table and figure from tiny runs (or from run directories
written by hand), missing runs listed, the paper's numbers, --list / --cell. How infra/sweep.py
trains the grid (--gpus, runs made otherwise, stops) is tests/test_sweep.py's."""
import json
import os
import shutil
import signal

import pytest

import compare
from conftest import TINY_TRAINING, finished_by_hand
from infra import paired, sweep

pytestmark = pytest.mark.usefixtures("small_data")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_paper_numbers_transcribed_from_spec():
    paper = compare.paper_numbers()
    assert paper["cifar10", "resnet32", "dkel", ""] == (94.56, 0.06)
    assert paper["cifar100", "wrn20_8", "okddip", ""] == (78.83, 0.06)
    assert paper["cifar100", "densenet40_12", "baseline", ""] == (71.03, 0.15)
    assert paper["tinyimagenet", "resnet34", "okddip", ""] == (56.82, 0.03)
    assert paper["tinyimagenet", "resnet18", "kd", ""] == (53.25, 0.07)
    assert paper["tinyimagenet", "resnet34", "kd", ""] == (53.70, 0.06)
    assert paper["cifar100", "resnet32", "dk", ""] == (74.67, None)
    assert paper["cifar10", "vgg16", "dkel", "beta0.5"] == (94.89, 0.10)      # Table 4, row 4
    assert paper["cifar100", "resnet32", "dkel", "k5"] == (74.96, None)      # Fig. 6's text
    assert paper["cifar10", "resnet32", "pcl_de", ""] == (94.35, None)     # Table 3's +L_de
    # Table 1: 2 x 5 x 8; Table 2: 2 x 7; Table 3's +L_dk and +L_de: 4; Table 4's row 4: 4;
    # Fig. 6: 4.
    assert len(paper) == 80 + 14 + 4 + 4 + 4


def test_paper_results_csv_reads_like_the_papers_tables():
    tables = compare.paper_tables()
    assert {name: len(rows) for name, rows in tables.items()} == {
        "table1": 10, "table2": 2, "table3": 2, "table4": 4, "fig6": 2}
    cells = {(name, row["dataset"], row["network"]): row
             for name, rows in tables.items() for row in rows}
    assert list(cells["table1", "cifar10", "vgg16"])[3:] == [  # the paper's column order
        "dml", "cl", "one", "okddip", "kdcl", "pcl", "baseline", "dkel"]
    assert list(cells["table2", "tinyimagenet", "resnet18"])[3:] == [  # Table 2's row order
        "baseline", "kd", "dml", "okddip", "kdcl", "pcl", "dkel"]
    # Typed by hand from the paper's Tables 1-4 and Fig. 6's text.
    assert cells["table1", "cifar100", "resnet32"]["dkel"] == "74.83±0.12"
    assert cells["table1", "cifar10", "wrn20_8"]["baseline"] == "94.68±0.01"
    assert cells["table1", "cifar10", "densenet40_12"]["okddip"] == "92.64±0.22"
    assert cells["table1", "cifar100", "resnet110"]["cl"] == "78.83±0.58"
    assert cells["table2", "tinyimagenet", "resnet34"]["kd"] == "53.70±0.06"
    assert cells["table2", "tinyimagenet", "resnet18"]["pcl"] == "64.23±0.08"
    assert cells["table3", "cifar100", "resnet32"]["dk"] == "74.67"
    assert cells["table3", "cifar10", "resnet32"]["de"] == "94.35"
    assert cells["table4", "cifar100", "densenet40_12"]["row1"] == "73.36"
    assert cells["table4", "cifar10", "vgg16"]["row2"] == "94.25"
    assert cells["fig6", "cifar10", "resnet32"]["k10"] == "94.63"
    assert cells["fig6", "cifar100", "resnet32"]["k10"] == ""  # the text quotes no number
    assert compare.paper_cell("74.83±0.12") == (74.83, 0.12)
    assert compare.paper_cell("74.67") == (74.67, None)


def test_paper_tables_agree_where_they_repeat_a_run():
    """Table 3's PCL and both-terms rows, Table 4's row 4 (beta 0.5) and Fig. 6's k = 1 are the runs
    of Table 1's PCL and DKEL columns, printed without their std."""
    tables = compare.paper_tables()
    table1 = {(row["dataset"], row["network"]): row for row in tables["table1"]}

    def table1_mean(row, method):
        return table1[row["dataset"], row["network"]][method].split("±")[0]

    for row in tables["table3"]:
        assert (row["pcl"], row["dkel"]) == (table1_mean(row, "pcl"), table1_mean(row, "dkel"))
    for row in tables["table4"]:
        assert row["row4"] == table1_mean(row, "dkel")
    for row in tables["fig6"]:
        assert row["k1"] == table1_mean(row, "dkel")


def test_table_from_tiny_runs_and_a_missing_run(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "dkel",
            "--seeds", "0", "1", "--epochs", "1", "--runs-dir", str(tmp_path), *TINY_TRAINING]
    assert compare.main(argv) == 0
    finals = []
    for seed in (0, 1):
        with open(tmp_path / f"synthetic_resnet8_dkel_seed{seed}" / "summary.json") as f:
            finals.append(json.load(f)["headline_final_deployed_mean"])
    mean = (finals[0] + finals[1]) / 2
    std = abs(finals[0] - finals[1]) / 2 ** 0.5  # sample std of two values
    table = (tmp_path / "table1_synthetic.md").read_text()
    assert "| synthetic resnet8 | " in table and f"{mean:.2f}±{std:.2f} (n=2)" in table
    assert (tmp_path / "table1_synthetic.png").read_bytes()[:8] == PNG_SIGNATURE
    # Read-only: a run that does not exist is listed, not skipped, and the exit code says so.
    read_only = argv[:6] + ["--seeds", "0", "7", "--epochs", "1", "--read-only",
                            "--runs-dir", str(tmp_path)]
    assert compare.main([*read_only, *TINY_TRAINING]) == 1
    table = (tmp_path / "table1_synthetic.md").read_text()
    assert f"{os.path.join(str(tmp_path), 'synthetic_resnet8_baseline_seed7')}: missing" in table
    assert "(n=1)" in table


def test_a_failed_run_is_listed_with_train_pys_reason(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "dkel", "--seeds", "0",
            "--epochs", "1", "--runs-dir", str(tmp_path), "--", "--batch-size", "1000"]
    assert compare.main(argv) == 1
    reason = ("failed (exit code 2): error: --batch-size 1000 is larger than the training set of "
              "synthetic (256 images, fewer than one batch); choose a smaller size")
    table = (tmp_path / "table1_synthetic.md").read_text()
    assert f"synthetic_resnet8_dkel_seed0: {reason}" in table
    assert f"synthetic_resnet8_dkel_seed0 {reason}" in capsys.readouterr().out  # as it ends


def test_arguments_that_some_methods_refuse_are_refused_before_any_run(tmp_path, monkeypatch,
                                                                        capsys):
    trained = []
    monkeypatch.setattr(sweep.train, "main", trained.append)
    grid = ["--dataset", "synthetic", "--archs", "resnet8", "--seeds", "0", "--runs-dir",
            str(tmp_path)]
    argv = [*grid, "--methods", "baseline", "dml", "pcl", "dkel", "--", "--ensemble-lr-per-peer"]
    for mode in ([], ["--read-only"], ["--list"], ["--cell", "2"], ["--gpus", "0"]):
        assert compare.main([*argv[:-2], *mode, *argv[-2:]]) == 2, mode
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "for --methods baseline dml (--ensemble-lr-per-peer is for --method pcl" in err
    assert compare.main([*grid, "--methods", "dkel", "--", "--beta", "-1"]) == 2
    assert "for --methods dkel (--beta must be >= 0, got -1.0)" in capsys.readouterr().err
    assert trained == [] and os.listdir(tmp_path) == []


def test_table2_trains_kd_from_its_baseline_run(tmp_path):
    argv = ["--experiment", "table2", "--archs", "resnet8", "--methods", "baseline", "kd",
            "--seeds", "0", "--epochs", "1", "--runs-dir", str(tmp_path), *TINY_TRAINING]
    # tinyimagenet by name; the fixture loads the tiny synthetic set
    assert compare.main(argv) == 0
    kd_dir = tmp_path / "tinyimagenet_resnet8_kd_teacher-resnet8_seed0"
    with open(kd_dir / "config.json") as f:
        assert json.load(f)["teacher_run"] == str(tmp_path / "tinyimagenet_resnet8_baseline_seed0")
    finals = []
    for name in ("tinyimagenet_resnet8_baseline_seed0", kd_dir.name):
        with open(tmp_path / name / "summary.json") as f:
            finals.append(json.load(f)["headline_final_deployed_mean"])
    table = (tmp_path / "table2_tinyimagenet.md").read_text()
    assert "| network | Baseline | KD |" in table
    assert f"| tinyimagenet resnet8 | {finals[0]:.2f} (n=1) | {finals[1]:.2f} (n=1) |" in table
    assert "baseline run of the same network, same seed" in table
    assert (tmp_path / "table2_tinyimagenet.png").read_bytes()[:8] == PNG_SIGNATURE


# Each experiment read back from one run directory written by hand (nothing is trained), with the
# train.py flags it was made with: its header, the hand-written run in its cell, a row with the
# paper's numbers, and the number of missing runs.
READ_BACK = {
    "table3": ("cifar100_resnet32_dk_seed0",
               ["--dataset", "cifar100", "--arch", "resnet32", "--method", "dk"],
               "| network | PCL | PCL+L_dk | PCL+L_de | DKEL |",
               "| cifar100 resnet32 | — (74.14±0.05) | 61.50 (n=1) (74.67) | — (74.64) | "
               "— (74.83±0.12) |",
               "| cifar10 resnet32 | — (94.33±0.06) | — (94.54) | — (94.35) | — (94.56±0.06) |",
               7),
    "table4": ("cifar100_densenet40_12_dkel_beta0.2_seed0",
               ["--dataset", "cifar100", "--arch", "densenet40_12", "--beta", "0.2"],
               "| setting | vgg16 cifar10 | vgg16 cifar100 | densenet40_12 cifar10 | densenet40_12 "
               "cifar100 |",
               "| β = 0.2 | — | — | — | 61.50 (n=1) |",
               "| β = 0.5 | — (94.89±0.10) | — (77.20±0.12) | — (94.23±0.08) | "
               "— (72.78±0.18) |", 19),
    "fig6": ("cifar10_densenet40_12_dkel_k20_seed0",
             ["--dataset", "cifar10", "--arch", "densenet40_12", "--init-iters", "20"],
             "| setting | resnet32 cifar10 | resnet32 cifar100 | densenet40_12 cifar10 | "
             "densenet40_12 cifar100 |",
             "| k = 20 | — | — | 61.50 (n=1) | — |",
             "| k = 1 | — (94.56) | — (74.83) | — | — |", 19),
    "fig7": ("cifar10_resnet32_dkel_decaycos_seed0",
             ["--dataset", "cifar10", "--arch", "resnet32", "--decay", "cos"],
             "| setting | resnet32 cifar10 | resnet32 cifar100 |",
             "| decay = cos | 61.50 (n=1) | — |",
             "| decay = linear | — | — |", 5),
}


@pytest.mark.parametrize("experiment", list(READ_BACK))
def test_each_experiment_reads_its_runs_back(tmp_path, experiment):
    name, train_argv, header, ours, papers, missing = READ_BACK[experiment]
    finished_by_hand(tmp_path, name, 61.5, 62.25, train_argv)
    if experiment == "fig7":
        (tmp_path / name / "metrics.csv").write_text("epoch,acc_deployed_mean\n1,40.0\n2,61.5\n")
    argv = ["--experiment", experiment, "--seeds", "0", "--runs-dir", str(tmp_path), "--read-only"]
    assert compare.main(argv) == 1
    table = (tmp_path / f"{experiment}_cifar10_cifar100.md").read_text()
    assert header in table and ours in table and papers in table
    assert ours.replace("61.50", "62.25") in table              # the best-epoch table
    assert table.count(": missing") == missing
    assert f"{name}: missing" not in table
    assert (tmp_path / f"{experiment}_cifar10_cifar100.png").read_bytes()[:8] == PNG_SIGNATURE


def test_table3_is_whole_and_table4_says_what_the_paper_has_that_we_do_not(tmp_path, capsys):
    """Table 3's four rows are trained, +L_de as pcl_de; its note names the deployed-trunk change."""
    assert compare.main(["--experiment", "table3", "--runs-dir", str(tmp_path), "--list"]) == 0
    listed = capsys.readouterr().out
    assert listed.count("--method pcl_de") == 6  # 2 data sets x 3 seeds
    assert compare.main(["--experiment", "table3", "--runs-dir", str(tmp_path), "--read-only"]) == 1
    table3 = (tmp_path / "table3_cifar10_cifar100.md").read_text()
    assert "not trained" not in table3 and "own trunk" in table3
    assert compare.main(["--experiment", "table4", "--runs-dir", str(tmp_path), "--read-only"]) == 1
    table = (tmp_path / "table4_cifar10_cifar100.md").read_text()
    printed = ["94.62 76.87 93.95 73.36", "94.25 76.73 93.97 73.21", "94.59 76.74 93.85 72.82",
               "94.89 77.20 94.23 72.78", "94.79 76.76 93.64 72.75"]     # paper.txt, Table 4
    for i, row in enumerate(printed, 1):
        assert f"| {i} | " + " | ".join(row.split()) + " |" in table
    # The betas the authors' run_cifar10.sh trains VGG-16 with: 0.05, 0.1, 0.2, 1.0 and 0.5.
    betas = [flags for _, _, flags in compare.EXPERIMENTS["table4"].settings]
    assert betas == [("--beta", v) for v in ("0.05", "0.1", "0.2", "0.5", "1.0")]
    assert "| β = 1.0 | — | — | — | — |" in table and "read as β = 0.05, 0.1, 0.2, 0.5, 1.0" in table


def test_deployed_curve_reads_the_evaluated_epochs(tmp_path):
    # Evaluated every 2nd epoch.
    rows = "epoch,lr,acc_deployed_mean\n1,0.1,\n2,0.1,50.5\n3,0.01,\n4,0.01,60.0\n"
    (tmp_path / "metrics.csv").write_text(rows)
    assert compare.deployed_curve(str(tmp_path)) == {2: 50.5, 4: 60.0}


def test_list_prints_the_grid_and_cell_trains_one_run(tmp_path, capsys):
    argv = ["--experiment", "fig6", "--dataset", "synthetic", "--archs", "resnet8", "--seeds", "0",
            "--epochs", "1", "--runs-dir", str(tmp_path)]
    assert compare.main([*argv, "--list", *TINY_TRAINING]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    for line, k in zip(lines, (1, 2, 5, 10, 20)):
        assert line.startswith("python train.py --dataset synthetic --arch resnet8 --method dkel "
                               "--seed 0")
        assert f"synthetic_resnet8_dkel_k{k}_seed0 --init-iters {k} --epochs 1" in line
        assert line.endswith("--batch-size 64 --device cpu")
    assert compare.main([*argv, "--cell", "3", *TINY_TRAINING]) == 0
    assert os.listdir(tmp_path) == ["synthetic_resnet8_dkel_k10_seed0"]
    with open(tmp_path / "synthetic_resnet8_dkel_k10_seed0" / "config.json") as f:
        config = json.load(f)
    assert (config["init_iters"], config["epochs"], config["batch_size"]) == (10, 1, 64)
    assert (tmp_path / "synthetic_resnet8_dkel_k10_seed0" / "summary.json").exists()
    capsys.readouterr()
    assert compare.main([*argv, "--cell", "3", *TINY_TRAINING]) == 0
    assert "has finished; nothing to train" in capsys.readouterr().out
    assert compare.main([*argv, "--cell", "5"]) == 2
    assert "outside the grid's runs 0..4" in capsys.readouterr().err


def test_list_puts_a_kd_teacher_run_before_its_student(tmp_path, capsys):
    argv = ["--experiment", "table2", "--dataset", "synthetic", "--archs", "resnet8",
            "--methods", "kd", "--kd-teacher-arch", "resnet20", "--seeds", "0",
            "--runs-dir", str(tmp_path), "--list"]
    assert compare.main(argv) == 0
    teacher_line, student_line = capsys.readouterr().out.splitlines()
    teacher_dir = os.path.join(str(tmp_path), "synthetic_resnet20_baseline_seed0")
    assert f"--arch resnet20 --method baseline --seed 0 --out-dir {teacher_dir}" in teacher_line
    assert student_line.endswith(
        f"synthetic_resnet8_kd_teacher-resnet20_seed0 --teacher-run {teacher_dir}")


def test_list_into_a_closed_pipe_ends_quietly(tmp_path, monkeypatch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `compare.py --list | head`: the reader has gone
    with open(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sweep.sys, "stdout", closed_pipe)
        assert compare.main(["--runs-dir", str(tmp_path), "--list"]) == 128 + signal.SIGPIPE
        closed_pipe.write("at exit, Python flushes stdout once more\n")
        closed_pipe.flush()


@pytest.mark.parametrize("dof,quantile", [(1, 12.706), (2, 4.303), (10, 2.228), (1000, 1.962)])
def test_t_quantile_matches_the_statistical_tables(dof, quantile):
    assert paired.t_quantile(dof) == pytest.approx(quantile, abs=2e-3)


@pytest.mark.parametrize("differences,t,verdict", [
    ([1.0, 2.0, 3.0], 2 / (1 / 3 ** 0.5), "within the seed noise"),      # mean 2, std 1
    ([2.1, 1.9, 2.0], 2 / (0.1 / 3 ** 0.5), "stands out: better"),      # mean 2, std 0.1
    ([-2.1, -1.9, -2.0], -2 / (0.1 / 3 ** 0.5), "stands out: worse"),
    ([0.5], None, "one seed: no test")])
def test_paired_t_and_verdict_by_hand(differences, t, verdict):
    assert paired.paired_t(differences) == (None if t is None else pytest.approx(t))
    assert paired.verdict(differences) == verdict


def seed_run_by_hand(runs_dir, method, seed, final, ensemble, metrics_rows):
    """A finished synthetic resnet8 run with the summary fields and metrics.csv columns of the
    seed-by-seed section: 1,000 test images, 2 training minutes."""
    name = f"synthetic_resnet8_{method}_seed{seed}"
    finished_by_hand(runs_dir, name, final, final, ["--dataset", "synthetic", "--arch", "resnet8",
                                                    "--method", method, "--epochs", "2",
                                                    "--seed", str(seed)])
    summary_path = runs_dir / name / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(final={"acc_student_ensemble": ensemble}, test_images=1000)
    summary_path.write_text(json.dumps(summary))
    lines = ["epoch,rampup,logit_norm,images_per_s,acc_deployed_mean"]
    lines += [",".join(str(v) for v in row) for row in metrics_rows]
    (runs_dir / name / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_seed_by_seed_section_pairs_each_method_with_the_baseline(tmp_path, capsys):
    main, other = tmp_path / "main", tmp_path / "other"
    # (epoch, r(ep), logit norm, images/s, test %): the first row is still ramping up
    rows = [(1, 0.5, 0.001, 100.0, 10.0), (2, 1.0, 2.5, 300.0, 55.0), (3, 1.0, 3.0, 200.0, 57.0)]
    for seed, base in ((0, 60.0), (1, 62.0)):
        seed_run_by_hand(main, "baseline", seed, base, None, rows)
        seed_run_by_hand(main, "dkel", seed, base + 1 + seed, base + 3, rows)
        seed_run_by_hand(other, "dkel", seed, base - 2, None, rows)
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "baseline", "dkel",
            "--seeds", "0", "1", "--epochs", "2", "--runs-dir", str(main), "--read-only",
            "--paired-runs-dir", str(other)]
    assert compare.main(argv) == 0
    table = (main / "table1_synthetic.md").read_text()
    # DKEL: +1 and +2 over the baseline: mean 1.5, std 0.71, t = 1.5 / (0.7071 / sqrt 2) = 3.00
    assert "| DKEL | +1.00 +2.00 | 1.50±0.71 | 3.00 (12.71) | within the seed noise |" in table
    assert "| DKEL (other) | -2.00 -2.00 | -2.00±0.00 | -inf (12.71) | stands out: worse |" in table
    # 100 * sqrt(0.61 * 0.39 / 1000) = 1.542 points at the baseline's mean of 61%
    assert "one accuracy of 61.0% on 1000 test images: 1.54 points (2.18 for the" in table
    # ensemble 63 and 65; images/s: the median epoch, 200; after the ramp-up (rows 2-3) the
    # lowest logit norm is 2.5 and the lowest test accuracy 55%
    assert "| DKEL | 0 1 | 62.50±2.12 | 64.00±1.41 | 200 | 2.500 | 55.0 |" in table
    assert "| Baseline | 0 1 | 61.00±1.41 | — | 200 | 2.500 | 55.0 |" in table
    assert (main / "table1_synthetic_paired.png").read_bytes()[:8] == PNG_SIGNATURE


def test_the_evidence_tables_re_render_from_their_committed_run_records(tmp_path, capsys):
    """docs/evidence.md: its last compare.py command, on the committed run records, writes the
    committed table."""
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    shutil.copytree(os.path.join(docs, "evidence_runs"), tmp_path / "runs")
    text = open(os.path.join(docs, "evidence.md"), encoding="utf-8").read()
    command = [line for line in text.splitlines() if line.startswith("python compare.py")][-1]
    # Its runs directories runs/<name> are the committed docs/evidence_runs/<name>, copied.
    argv = [str(tmp_path / arg) if arg.startswith("runs/") else arg for arg in command.split()[2:]]
    assert argv.count(str(tmp_path / "runs" / "evidence")) == 1 and len(argv) > 20
    assert compare.main(argv) == 0
    written = (tmp_path / "runs" / "evidence" / "table1_imagefolder.md").read_text()
    committed = os.path.join(docs, "evidence_runs", "evidence", "table1_imagefolder.md")
    assert written == open(committed, encoding="utf-8").read()
