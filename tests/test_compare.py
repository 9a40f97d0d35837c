"""compare.py: the Table 1 layout from tiny runs, missing runs listed, the paper's numbers."""
import json
import os

import pytest

import compare

pytestmark = pytest.mark.usefixtures("small_data")


def test_paper_numbers_transcribed_from_spec():
    paper = compare.paper_numbers()
    assert paper["cifar10", "resnet32", "dkel"] == (94.56, 0.06)
    assert paper["cifar100", "wrn20_8", "okddip"] == (78.83, 0.06)
    assert paper["cifar100", "densenet40_12", "baseline"] == (71.03, 0.15)
    assert paper["tinyimagenet", "resnet34", "okddip"] == (56.82, 0.03)
    assert paper["cifar100", "resnet32", "dk"] == (74.67, None)
    assert len(paper) == 2 * 5 * 8 + 2 * 6 + 2


def test_table_from_tiny_runs_and_a_missing_run(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "pcl", "dkel", "--seeds", "0", "1",
            "--epochs", "1", "--runs-dir", str(tmp_path), "--", "--batch-size", "64", "--device", "cpu"]
    assert compare.main(argv) == 0
    finals = []
    for seed in (0, 1):
        with open(tmp_path / f"synthetic_resnet8_dkel_seed{seed}" / "summary.json") as f:
            finals.append(json.load(f)["headline_final_deployed_mean"])
    mean = (finals[0] + finals[1]) / 2
    std = abs(finals[0] - finals[1]) / 2 ** 0.5  # sample std of two values
    table = (tmp_path / "compare_synthetic.md").read_text()
    assert "| resnet8 | " in table and f"{mean:.2f}±{std:.2f} (n=2)" in table
    assert (tmp_path / "compare_synthetic.png").stat().st_size > 1000
    # Read-only: a run that does not exist is listed, not skipped, and the exit code says so.
    assert compare.main(argv[:6] + ["--seeds", "0", "7", "--read-only", "--runs-dir", str(tmp_path)]) == 1
    table = (tmp_path / "compare_synthetic.md").read_text()
    assert f"{os.path.join(str(tmp_path), 'synthetic_resnet8_pcl_seed7')}: missing" in table
    assert "(n=1)" in table


def test_failed_run_is_listed(tmp_path):
    argv = ["--dataset", "synthetic", "--archs", "resnet8", "--methods", "dkel", "--seeds", "0",
            "--epochs", "1", "--runs-dir", str(tmp_path), "--", "--beta", "-1"]
    assert compare.main(argv) == 1
    assert "failed (exit code 2)" in (tmp_path / "compare_synthetic.md").read_text()
