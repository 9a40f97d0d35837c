"""Commands built on train.py, each run from the repository root as `python -m tools.<name>`. A
reader of the paper can skip this folder: nothing at the root imports it.

- evidence_split.py: the small, disjoint CIFAR-10 split of docs/evidence.md, as an ImageFolder tree;
- bench_data.py: images/s of the M-view augmentation against torchvision's per-sample recipe;
- bench_train.py: images/s of the full DKEL step against a straightforward training loop;
- bench_stall.py: the start-of-training stall of the multi-peer student, seed by seed;
- bench_cuda.py: the first minutes on a GPU: checks and times train.py's CUDA path
  (docs/performance.md).
"""
