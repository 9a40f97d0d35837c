"""The machinery a run needs beyond the paper. A reader of the paper can skip this folder: the
paper's modules at the root import nothing from it; only train.py and compare.py, which wire the
paper to it, do.

- rundir.py: the run directory (config.json, metrics.csv, checkpoints, the lock), the exit codes
  and the stop signals, and a finished run's deployed model read back as offline KD's teacher;
- report.py: the epoch line, curves.png, summary.json, the summary table and the headline figure;
- deploy.py: deployable.pt2, the deployed model as a torch.export program that needs torch alone;
- distributed.py: train.py under torchrun (docs/distributed.md);
- sweep.py: the grid of train.py runs behind one of compare.py's experiments;
- paired.py: compare.py's seed-by-seed test of each method against the baseline.
"""
