"""Check for the start-of-training stall of the multi-peer student
(docs/training.md#the-start-of-training).

At the paper's settings (lr 0.1, Nesterov momentum 0.9, Sec. 4.2) the Eq. (3) ensemble head can
overshoot in the first steps; its cross-entropy then drives the branches' pooled features to zero
and the peers stay near chance for an epoch or more, on some seeds. This trains the student of
PCL, DK or DKEL as train.py does, with train.py's own pieces (cli.resolve_args,
train.build_method, train.channels_last, train.sgd, Method.initialise,
data.train_batches, train.training_step), for --steps steps from each seed, with
the paper's recipe and with --ensemble-lr-per-peer, and prints each run's peer train accuracy over
its last steps and, per method, how many seeds stalled. Exits 1 when a run with the remedy stays
below 1.5x chance (a stall), 0 otherwise; a stalled paper-recipe run is only reported.

    python -m tools.bench_stall --data-dir DIR [--methods pcl dk dkel]
                                [--seeds 0 1 2 3 4 5 6 7 8 9]
"""
import sys

if not __package__:  # `python tools/bench_stall.py`: the root's modules are not on sys.path
    sys.stderr.write("error: run it from the repository root: python -m tools.bench_stall ...\n")
    sys.exit(2)

import argparse

import torch

import cli
import data
import train
from backbones import ARCHS

STALL_FACTOR = 1.5  # a run whose last steps stay below 1.5x chance accuracy has stalled


def batches(dataset, batch_size: int, num_views: int, seed: int):
    """train.py's training batches, epoch after epoch, from `seed`."""
    epoch = 0
    while True:
        generator = data.epoch_generator(seed, epoch, dataset.device)
        yield from data.train_batches(dataset, batch_size, num_views, generator)
        epoch += 1


def train_accuracies(args, dataset, steps: int) -> list[float]:
    """The peers' mean train accuracy (%) of every step of the student's first `steps` steps, as
    train.py trains it with `args` (the epoch weights of the first epoch throughout)."""
    torch.manual_seed(args.seed)
    method = train.build_method(args, dataset, dataset.device)
    train.channels_last(method)
    optimizer = train.sgd(method.trainable_parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    method.initialise(data.repeated_batches(dataset, args.batch_size, method.num_views, args.seed))
    weights = train.epoch_weights(args, 0)
    take = train.training_step(method, optimizer, args.precision, args.compile, dataset.device)
    method.set_mode(True)
    accuracies = []
    stream = batches(dataset, args.batch_size, method.num_views, args.seed)
    for step in range(steps):
        views, labels = next(stream)
        _, parts = take(views, labels, weights, step)
        accuracies.append(100.0 * parts["correct"].item())
    return accuracies


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_stall",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="an imagefolder tree (train/<class>/...)")
    parser.add_argument("--arch", default="resnet20", help="architecture (default resnet20)")
    parser.add_argument("--methods", nargs="+", default=["dkel"], choices=cli.ONLINE_DISTILLATION,
                        help="the students to check (default dkel)")
    parser.add_argument("--steps", type=int, default=30, help="SGD steps per run (default 30)")
    parser.add_argument("--last", type=int, default=10,
                        help="the train accuracy is the mean over this many last steps (default 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="seeds (default 0-4)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="as train.py --precision")
    options = parser.parse_args()
    if options.arch not in ARCHS:
        parser.error(f"unknown --arch {options.arch!r}; choose one of: {', '.join(ARCHS)}")
    if not 1 <= options.last <= options.steps:
        parser.error(f"--last must lie within 1..--steps ({options.steps}), got {options.last}")
    argv = ["--dataset", "imagefolder", "--data-dir", options.data_dir, "--arch", options.arch,
            "--epochs", "30", "--ema-decay", "0.99", "--precision", options.precision]
    args = cli.resolve_args(argv)
    try:
        dataset = data.load_data(args.dataset, args.data_dir, torch.device(args.device))
    except data.DataError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    chance = 100.0 / dataset.num_classes
    print(f"{args.arch}, 3 peers, lr {args.lr}, {options.steps} steps, {args.precision}; train "
          f"accuracy (%) of the last {options.last} steps (chance {chance:.0f}, stall below "
          f"{STALL_FACTOR * chance:.0f})")
    remedied_stalls = []
    for method in options.methods:
        stalls = {False: 0, True: 0}
        for seed in options.seeds:
            line = [f"{method} seed {seed}:"]
            for remedy in (False, True):
                args.method, args.seed, args.ensemble_lr_per_peer = method, seed, remedy
                accuracies = train_accuracies(args, dataset, options.steps)
                last = sum(accuracies[-options.last:]) / options.last
                stalled = last < STALL_FACTOR * chance
                stalls[remedy] += stalled
                label = "--ensemble-lr-per-peer" if remedy else "paper recipe"
                line.append(f"{label} {last:5.1f}{' STALLED' if stalled else ''}")
                if remedy and stalled:
                    remedied_stalls.append(f"{method} seed {seed}")
            print("  ".join(line), flush=True)
        print(f"{method}: {stalls[False]} of {len(options.seeds)} seeds stalled with the paper's "
              f"recipe, {stalls[True]} with --ensemble-lr-per-peer", flush=True)
    if remedied_stalls:
        print(f"FAIL: with --ensemble-lr-per-peer, {', '.join(remedied_stalls)} stay near chance")
        return 1
    print("OK: no run with --ensemble-lr-per-peer stays near chance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
