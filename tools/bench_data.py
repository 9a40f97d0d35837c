"""Benchmark of the M-view augmentation (docs/spec.md Sec. 3): augmented images per second.

Compares, on the same synthetic CIFAR-shaped data in one run, our loader (the whole set as a
uint8 tensor on the device, one vectorised gather per batch; data.train_batches) with the
reference recipe of the authors' code: torchvision transforms RandomCrop(32, padding=4),
RandomHorizontalFlip, ToTensor and Normalize applied per sample, M times, to PIL images in a
DataLoader with worker processes. Prints both rates and their ratio (target: >= 10x).
On a CPU that other processes share, torch's intra-op threads stall at every parallel op
(each waits for a descheduled sibling) while the reference's worker processes do not: compare
with --threads 1 there, or run on an idle machine.

    python -m tools.bench_data [--device cpu|cuda] [--views 3] [--batch-size 128] [--seconds 10]
                               [--workers 2] [--threads N]
"""
import sys

if not __package__:  # `python tools/bench_data.py`: the root's modules are not on sys.path
    sys.stderr.write("error: run it from the repository root: python -m tools.bench_data ...\n")
    sys.exit(2)

import argparse
import time

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import data


class ReferenceViews(Dataset):
    """The per-sample recipe: M independently transformed copies of one PIL image."""

    def __init__(self, dataset: data.ImageData, num_views: int):
        images = dataset.train_images.cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
        self.images = [Image.fromarray(image) for image in images]
        self.labels = dataset.train_labels.cpu().tolist()
        self.num_views = num_views
        self.transform = T.Compose([T.RandomCrop(images.shape[1], padding=4), T.RandomHorizontalFlip(),
                                    T.ToTensor(), T.Normalize(dataset.mean, dataset.std)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        views = [self.transform(self.images[index]) for _ in range(self.num_views)]
        return torch.stack(views), self.labels[index]  # (M, 3, H, W), label


def reference_loader(dataset: data.ImageData, num_views: int, batch_size: int, workers: int,
                     device: torch.device) -> DataLoader:
    """The reference recipe's loader: `ReferenceViews` in a shuffled DataLoader (drop_last) with
    `workers` worker processes, batches in pinned memory on CUDA (shared with bench_train.py and
    bench_cuda.py)."""
    return DataLoader(ReferenceViews(dataset, num_views), batch_size=batch_size, shuffle=True,
                      drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=device.type == "cuda")


def images_per_second(epochs, seconds: float, device: torch.device) -> float:
    """Augmented images (views) per second over `seconds`, after one warm-up batch."""
    count, start = 0, None
    while True:
        for views, _ in epochs():
            views = views.to(device, non_blocking=True)
            if start is None:  # warm-up: worker start-up, first allocations
                start = now(device)
                continue
            count += views.numel() // views.shape[-3:].numel()
            if time.perf_counter() - start > seconds:
                return count / (now(device) - start)


def now(device: torch.device) -> float:
    """A timestamp after every queued kernel of `device` has finished (shared with bench_train.py)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main():
    parser = argparse.ArgumentParser(prog="python -m tools.bench_data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where our loader keeps the data and augments (default: cuda if present)")
    parser.add_argument("--views", type=int, default=3, help="views per image M (paper: m = 3, Sec. 4.2)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (paper: 128, Sec. 4.2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per loader (default 10)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers of the reference (default 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of our loader (default: torch's, one per core); 1 is faster "
                             "when other processes share the cores")
    args = parser.parse_args()
    if min(args.views, args.batch_size, args.threads) < 1 or args.seconds <= 0 or args.workers < 0:
        parser.error("--views, --batch-size and --threads must be >= 1, --seconds > 0, --workers >= 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device name; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine; use --device cpu")

    torch.set_num_threads(args.threads)
    dataset = data.load_data("synthetic", "unused", device)
    generator = torch.Generator(device=device).manual_seed(0)
    ours = images_per_second(lambda: data.train_batches(dataset, args.batch_size, args.views, generator),
                             args.seconds, device)
    loader = reference_loader(dataset, args.views, args.batch_size, args.workers, device)
    reference = images_per_second(lambda: loader, args.seconds, device)

    height, width = dataset.image_shape[1:]
    print(f"device {device} ({torch.get_num_threads()} threads), {args.views} views, "
          f"batch {args.batch_size}, {height}x{width} images")
    print(f"ours (uint8 on the device, vectorised):  {ours:12,.0f} augmented images/s")
    print(f"reference (torchvision, {args.workers} workers):     {reference:12,.0f} augmented images/s")
    print(f"ratio: {ours / reference:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
