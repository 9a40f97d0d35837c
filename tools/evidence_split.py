"""The small, disjoint CIFAR-10 split of docs/evidence.md, written as an ImageFolder tree for
`train.py --dataset imagefolder`: from the official training set, the first 1,017 images of
training batches 1-4 (4,068) to train on and the first 1,017 images of batch 5 to test on. The
official test set is not used; nothing of the test split is ever trained on.

    python -m tools.evidence_split --data-dir DIR OUT_DIR  # DIR: where cifar-10-batches-py is

OUT_DIR/train/<class>/<index>.png and OUT_DIR/test/<class>/<index>.png, <index> counting the
images of the split in order (00000, 00001, ...), the classes named as in CIFAR-10's metadata.
"""
import sys

if not __package__:  # `python tools/evidence_split.py`: the root's modules are not on sys.path
    sys.stderr.write("error: run it from the repository root: python -m tools.evidence_split ...\n")
    sys.exit(2)

import argparse
import os

import torch
from PIL import Image

import data

BATCH_SIZE = 10_000     # images per official training batch (data_batch_1 ... data_batch_5)
PER_BATCH = 1017        # the split takes this many from the start of each batch
TRAIN_BATCHES = 4       # batches 1-4 train, batch 5 tests


def split_indices(per_batch: int = PER_BATCH, batch_size: int = BATCH_SIZE):
    """Indices into the official training set, in order: (train, test)."""
    starts = [b * batch_size for b in range(TRAIN_BATCHES + 1)]
    train = [i for start in starts[:TRAIN_BATCHES] for i in range(start, start + per_batch)]
    test = list(range(starts[-1], starts[-1] + per_batch))
    return train, test


def write_tree(images: torch.Tensor, labels: torch.Tensor, classes, root: str) -> None:
    """(N, 3, H, W) uint8 images as root/<class>/<index>.png."""
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        pixels = image.permute(1, 2, 0).contiguous().numpy()  # (H, W, 3)
        Image.fromarray(pixels).save(os.path.join(root, classes[label], f"{index:05d}.png"))


def write_split(data_dir: str, out_dir: str, per_batch: int = PER_BATCH,
                batch_size: int = BATCH_SIZE) -> tuple[int, int]:
    """Read CIFAR-10's training set from data_dir (downloading it there if absent) and write the
    split under out_dir; returns the (train, test) image counts."""
    cifar = data.load_data("cifar10", data_dir, "cpu")
    needed = (TRAIN_BATCHES + 1) * batch_size
    if len(cifar.train_labels) < needed:
        raise data.DataError(f"CIFAR-10's training set under {data_dir} has "
                             f"{len(cifar.train_labels)} images, not {needed}")
    for name, indices in zip(("train", "test"), split_indices(per_batch, batch_size)):
        chosen = torch.tensor(indices)
        write_tree(cifar.train_images[chosen], cifar.train_labels[chosen], cifar.classes,
                   os.path.join(out_dir, name))
    return TRAIN_BATCHES * per_batch, per_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.evidence_split",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where train/ and test/ are written")
    parser.add_argument("--data-dir", default="data",
                        help="where CIFAR-10's cifar-10-batches-py is, or is downloaded to")
    args = parser.parse_args(argv)
    try:
        train_count, test_count = write_split(args.data_dir, args.out_dir)
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {train_count} train and {test_count} test images under {args.out_dir}; train "
          f"on them with: python train.py --dataset imagefolder --data-dir {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
