"""Data sets and the M-view augmentation of DKEL (paper Sec. 4.2; docs/spec.md Sec. 3).

Every peer i of the student sees its own independently augmented view x_i of each training
image: a random crop with 4 pixels of zero padding, a random horizontal flip, then per-channel
normalisation. Test images are only normalised, and the same image goes to every peer.

The authors' code augments per sample with PIL in DataLoader workers, which starves a GPU. Here
a data set is one uint8 tensor (N, 3, H, W) on the device (pinned host memory if it does not fit)
and a batch of M views is one vectorised gather there (`augment_views`).

Data sets: `cifar10`, `cifar100` (torchvision, downloaded into --data-dir), `tinyimagenet` (the
tiny-imagenet-200 folder, decoded once into a cached uint8 array), `imagefolder` (train/<class>/*,
test/<class>/* or val/<class>/*, one image size) and `synthetic` (a learnable CIFAR-shaped set
from a seed, for smoke runs and tests only).
"""
import hashlib
import math
import os
import pickle
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset, pil_loader
from torchvision.datasets.utils import check_integrity
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

DATASETS = ("cifar10", "cifar100", "tinyimagenet", "imagefolder", "synthetic")

# docs/spec.md Sec. 3: per-channel (mean, std) in [0, 1] units. imagefolder and synthetic compute
# theirs from their training images.
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2675, 0.2565, 0.2761)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class DataError(Exception):
    """One-line, user-facing message (train.py prints it and exits with code 2)."""


@dataclass
class ImageData:
    """A whole data set as uint8 tensors, plus what is needed to normalise it."""
    name: str
    train_images: torch.Tensor  # (N, 3, H, W) uint8, on the device (or pinned host memory)
    train_labels: torch.Tensor  # (N,) int64, on the device
    test_images: torch.Tensor  # (N_test, 3, H, W) uint8
    test_labels: torch.Tensor  # (N_test,) int64
    mean: tuple[float, float, float]  # in [0, 1] units
    std: tuple[float, float, float]
    num_classes: int
    # The compute device; it differs from train_images.device only in the pinned fallback.
    device: torch.device | None = None
    # (N_val, 3, H, W) uint8 held out of training (--val-size)
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None  # (N_val,) int64
    # The name of each class, by label (the exported deployed model records them: infra/deploy.py).
    classes: tuple[str, ...] = ()

    def __post_init__(self):
        if self.device is None:
            self.device = self.train_images.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


# ---------------------------------------------------------------- augmentation (hot path)

def augment_views(images: torch.Tensor, num_views: int, generator: torch.Generator,
                  padding: int = 4, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """M independent views of each image: random crop of the zero-padded image + random flip.

    Same semantics as torchvision's RandomCrop(H, padding) + RandomHorizontalFlip() applied
    per view and per sample, done as one gather over the batch on uint8.
    `part` = (rank, N): `images` are rows [rank * b, (rank + 1) * b) of a batch of N * b images,
    whose random numbers are all drawn, as one process draws them, and that slice kept."""
    batch, channels, height, width = images.shape
    rank, world = part  # (0, 1): one process
    side = 2 * padding + 1  # crop offsets per axis: 0 .. 2p
    # The zero-padded images and their mirror images: (2, B, 3, H+2p, W+2p).
    padded = images.new_zeros(2, batch, channels, height + 2 * padding, width + 2 * padding)
    padded[0, :, :, padding:padding + height, padding:padding + width] = images
    padded[1, :, :, padding:padding + height, padding:padding + width] = images.flip(-1)
    # Every H×W window as a strided view, no copy, channels last: (2, B, 2p+1, 2p+1, H, W, 3).
    windows = padded.unfold(3, height, 1).unfold(4, width, 1).permute(0, 1, 3, 4, 5, 6, 2)
    # Every random number of the whole batch, and this part's columns of them.
    shape, device = (num_views, batch * world), images.device
    rows = slice(rank * batch, (rank + 1) * batch)
    offset_y = torch.randint(0, side, shape, generator=generator, device=device)[:, rows]  # (M, B)
    offset_x = torch.randint(0, side, shape, generator=generator, device=device)[:, rows]  # (M, B)
    flip = torch.randint(0, 2, shape, generator=generator, device=device)[:, rows]  # (M, B)
    sample = torch.arange(batch, device=device).expand(num_views, batch)  # (M, B)
    # A crop at offset x of the mirrored padded image is the mirror of the crop at 2p - x;
    # both offsets are uniform on 0 .. 2p, so this is crop-then-flip with a uniform offset.
    # Gathered channels last (M, B, H, W, 3) and returned as (M, B, 3, H, W) with NHWC strides,
    # so that the M*B images reach a channels_last network without a layout copy.
    return windows[flip, sample, offset_y, offset_x].permute(0, 1, 4, 2, 3)  # (M, B, 3, H, W)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """One augmented view of each image: (B, 3, H, W) uint8 -> (B, 3, H, W) uint8."""
    return augment_views(images, 1, generator, padding)[0]


def normaliser(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale), each (3, 1, 1), with (x / 255 - mean) / std = shift + x * scale."""
    mean = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    return (-mean / std).float().to(device), (1 / (255 * std)).float().to(device)


def normalise(images: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std per channel, in one pass."""
    return torch.addcmul(shift, images, scale)


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a batch from pinned host memory to the device (no-op when already there)."""
    if images.device == device:
        return images
    return images.pin_memory().to(device, non_blocking=True)


def num_train_batches(data: ImageData, batch_size: int) -> int:
    """Batches per training epoch (drop_last). NOTE(paper): the authors' loader keeps the last
    partial batch (391 steps per CIFAR epoch at batch 128); this project drops it (390)."""
    return len(data.train_labels) // batch_size


def train_batches(data: ImageData, batch_size: int, num_views: int, generator: torch.Generator,
                  part: tuple[int, int] = (0, 1), padding: int = 4
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled epoch, drop_last: (views (M, B, 3, H, W) float32, labels (B,) int64).

    All randomness (shuffle, crops, flips) comes from `generator`, which must live on
    `data.device`, so the same generator state gives the same epoch.
    `part` = (rank, N) of a torchrun run (infra/distributed.py): every global batch of
    `batch_size` is drawn as one process draws it and only its rows [rank * B/N, (rank + 1) * B/N)
    are made, so the N ranks' slices together are exactly the one-process batch (N must divide
    `batch_size`).
    """
    shift, scale = normaliser(data.mean, data.std, data.device)
    order = torch.randperm(len(data.train_labels), generator=generator, device=data.device)
    image_order = order.to(data.train_images.device)  # pinned fallback: gather on the host
    rows = batch_size // part[1]  # this rank's slice of every batch
    for start in range(part[0] * rows, num_train_batches(data, batch_size) * batch_size,
                       batch_size):
        images = data.train_images.index_select(0, image_order[start:start + rows])
        images = _to_device(images, data.device)  # (B/N, 3, H, W) uint8
        # (M, B/N, 3, H, W) uint8
        views = augment_views(images, num_views, generator, padding, part)
        labels = data.train_labels.index_select(0, order[start:start + rows])  # (B/N,)
        yield normalise(views, shift, scale), labels


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """All randomness of an epoch's data from (seed, epoch) alone: resumption is exact."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch + 1)


def repeated_batches(data: ImageData, batch_size: int, num_views: int, seed: int):
    """The teacher initialisation's batches (Sec. 3.3): epoch "-1" of `seed`, repeated."""
    while True:
        yield from train_batches(data, batch_size, num_views,
                                 epoch_generator(seed, -1, data.device))


def test_batches(data: ImageData, batch_size: int, split: str = "test"
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test (or "val") split in order, last batch kept: (images (B, 3, H, W) float32,
    labels (B,))."""
    shift, scale = normaliser(data.mean, data.std, data.device)
    all_images, all_labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
    for start in range(0, len(all_labels), batch_size):
        images = _to_device(all_images[start:start + batch_size], data.device)
        images = images.contiguous(memory_format=torch.channels_last)  # NHWC, as the networks
        yield normalise(images, shift, scale), all_labels[start:start + batch_size]


def hold_out_validation(data: ImageData, val_size: int, seed: int) -> ImageData:
    """Move `val_size` training images, stratified by class and fixed by `seed`, into a validation
    split (--val-size): class c gets val_size * N_c / N, rounded by largest remainder."""
    labels = data.train_labels.cpu()
    counts = torch.bincount(labels, minlength=data.num_classes).double()      # (C,)
    quotas = counts * val_size / len(labels)                                  # (C,)
    shares = quotas.floor().long()
    shares[torch.argsort(quotas - shares, descending=True)[:val_size - int(shares.sum())]] += 1
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    rank = torch.empty_like(order)  # position of each image among its class in the shuffled order
    for c in range(data.num_classes):
        members = order[labels[order] == c]
        rank[members] = torch.arange(len(members))
    is_val = rank < shares[labels]                                            # (N,)
    split = {}
    for prefix, rows in (("train", (~is_val).nonzero().squeeze(1)),
                         ("val", is_val.nonzero().squeeze(1))):
        split[f"{prefix}_images"] = data.train_images.index_select(
            0, rows.to(data.train_images.device))
        split[f"{prefix}_labels"] = data.train_labels.index_select(
            0, rows.to(data.train_labels.device))
    return replace(data, **split)


# ---------------------------------------------------------------- loading

def check_batch_size(data: ImageData, batch_size: int, val_size: int = 0) -> None:
    """Refuse a batch larger than the training set less the validation split (no batch at all)."""
    available = len(data.train_labels) - val_size
    held = f" less --val-size {val_size}" if val_size else ""
    if available < batch_size:
        raise DataError(f"--batch-size {batch_size} is larger than the training set of "
                        f"{data.name}{held} ({available} images, fewer than one batch); "
                        f"choose a smaller size")


def load_data(name: str, data_dir: str, device: torch.device | str, seed: int = 0) -> ImageData:
    """Load a data set onto `device`; raise DataError with one line when that fails."""
    loaders = {"cifar10": _load_cifar, "cifar100": _load_cifar, "tinyimagenet": _load_tinyimagenet,
               "imagefolder": _load_imagefolder, "synthetic": _load_synthetic}
    if name not in loaders:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    data = loaders[name](name, os.path.expanduser(data_dir), seed)
    return _place(data, torch.device(device))


def _place(data: ImageData, device: torch.device) -> ImageData:
    """Move the images to the device, or pin them on the host when they would not fit."""
    size = data.train_images.nbytes + data.test_images.nbytes
    fits = device.type != "cuda" or size < 0.5 * torch.cuda.mem_get_info(device)[0]
    move = (lambda t: t.to(device)) if fits else (lambda t: t.pin_memory())
    train_labels = data.train_labels.to(device)
    return replace(data, train_images=move(data.train_images), test_images=move(data.test_images),
                   train_labels=train_labels, test_labels=data.test_labels.to(device),
                   device=train_labels.device)  # with its index: "cuda" -> "cuda:0"


def _load_cifar(name: str, data_dir: str, seed: int) -> ImageData:
    """CIFAR-10/100 through torchvision (downloaded and md5-checked on first use)."""
    dataset_class = (torchvision.datasets.CIFAR10 if name == "cifar10"
                     else torchvision.datasets.CIFAR100)
    created = outermost_missing(data_dir)
    try:
        # A download's folder (an existing read-only one is fine).
        os.makedirs(data_dir, exist_ok=True)
    except OSError as error:
        raise DataError(f"--data-dir {data_dir}: cannot create it ({error.strerror})") from None
    try:
        train, test = (dataset_class(root=data_dir, train=flag, download=True)
                       for flag in (True, False))
    except (OSError, RuntimeError, EOFError, tarfile.TarError, pickle.UnpicklingError) as error:
        remove_empty_folders(data_dir, created)  # a refused --data-dir leaves nothing behind
        raise DataError(_cifar_error(dataset_class, data_dir, error)) from error
    mean, std = NORMALISATION[name]

    def images(split):  # (N, 32, 32, 3) numpy -> (N, 3, 32, 32)
        return torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()

    return ImageData(name, images(train), torch.tensor(train.targets), images(test),
                     torch.tensor(test.targets), mean, std, len(train.classes),
                     classes=tuple(train.classes))


def outermost_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet; None when `path` exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def remove_empty_folders(path: str, created: str | None) -> None:
    """Remove `path` and its parents up to `created` (outermost_missing before they were made),
    each only while it is empty: a refusal leaves behind no folder it made for nothing."""
    path = os.path.abspath(path)
    while created is not None:
        try:
            os.rmdir(path)
        except OSError:  # not empty (a partial download stays for the next run), or gone
            return
        if path == created:
            return
        path = os.path.dirname(path)


def _cifar_error(dataset_class, data_dir: str, error: Exception) -> str:
    """What is missing, where to get it and where to put it, in one line."""
    folder = os.path.join(data_dir, dataset_class.base_folder)
    archive = os.path.join(data_dir, dataset_class.filename)
    files = [n for n, _ in dataset_class.train_list + dataset_class.test_list]
    missing = [n for n in files + [dataset_class.meta["filename"]]
               if not os.path.isfile(os.path.join(folder, n))]
    if not os.path.isdir(folder):
        what = f"{folder} is missing"
    elif missing:
        what = f"{folder} lacks {', '.join(missing)}"
    else:
        what = f"the files in {folder} are corrupt (md5 mismatch)"
    if os.path.isfile(archive) and not check_integrity(archive, dataset_class.tgz_md5):
        what += f" and the archive {archive} is incomplete or corrupt (delete it)"
    reason = " ".join(str(error).split())
    return (f"{dataset_class.__name__}: {what}, and downloading it failed ({reason}). Download "
            f"{dataset_class.url} and put the archive at {archive}; it is checked and extracted "
            f"on the next run.")


def _load_tinyimagenet(name: str, data_dir: str, seed: int) -> ImageData:
    """tiny-imagenet-200: 200 classes, 100,000 train and 10,000 val images of 64×64."""
    root = _tinyimagenet_root(data_dir)
    with open(os.path.join(root, "wnids.txt")) as file:
        wnids = sorted(line.strip() for line in file if line.strip())
    class_index = {wnid: i for i, wnid in enumerate(wnids)}  # sorted, as ImageFolder on train/
    train = []
    for wnid in wnids:
        folder = os.path.join(root, "train", wnid, "images")
        if not os.path.isdir(folder):
            raise DataError(f"tinyimagenet: {folder} is missing; re-extract {TINYIMAGENET_URL}")
        train += [(os.path.join(folder, f), class_index[wnid]) for f in sorted(os.listdir(folder))
                  if f.lower().endswith((".jpeg", ".jpg", ".png"))]
    # val/images is one flat folder (an ImageFolder on val/ would label it all class 0):
    # the labels come from val_annotations.txt, "<file>\t<wnid>\t<box>" per line.
    annotations = os.path.join(root, "val", "val_annotations.txt")
    try:
        with open(annotations) as file:
            rows = [line.split("\t")[:2] for line in file if line.strip()]
        test = [(os.path.join(root, "val", "images", f), class_index[wnid]) for f, wnid in rows]
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"tinyimagenet: cannot read the labels in {annotations} ({error}); "
                        f"re-extract {TINYIMAGENET_URL}") from error
    arrays = _decode_cached(os.path.join(root, "cache_uint8.pt"), train, test)
    mean, std = NORMALISATION[name]
    return ImageData(name, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                     arrays["test_labels"], mean, std, len(wnids), classes=tuple(wnids))


def _tinyimagenet_root(data_dir: str) -> str:
    """The tiny-imagenet-200 folder: data_dir itself or its child; extracts the zip if present."""
    root = os.path.join(data_dir, "tiny-imagenet-200")
    for candidate in (root, data_dir):
        if os.path.isfile(os.path.join(candidate, "wnids.txt")):
            return candidate
    archive = os.path.join(data_dir, "tiny-imagenet-200.zip")
    if not os.path.isfile(archive):
        raise DataError(f"tinyimagenet: {root}/wnids.txt is missing. Download {TINYIMAGENET_URL} "
                        f"and put it at {archive} (it is extracted on the next run), or point "
                        f"--data-dir at the folder that holds tiny-imagenet-200/.")
    try:  # extract next to the target, then rename: an interrupted run leaves no half folder
        with (tempfile.TemporaryDirectory(dir=data_dir) as scratch,
              zipfile.ZipFile(archive) as zip_file):
            zip_file.extractall(scratch)
            os.replace(os.path.join(scratch, "tiny-imagenet-200"), root)
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"tinyimagenet: cannot extract {archive} ({error}); download "
                        f"{TINYIMAGENET_URL} again and put it there.") from error
    return root


def _load_imagefolder(name: str, data_dir: str, seed: int) -> ImageData:
    """Any data set in ImageFolder layout: train/<class>/* and test/<class>/* (or val/)."""
    train_dir = os.path.join(data_dir, "train")
    test_dir = next((os.path.join(data_dir, s) for s in ("test", "val")
                     if os.path.isdir(os.path.join(data_dir, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise DataError(f"imagefolder: expected {train_dir}/<class>/* and "
                        f"{data_dir}/test/<class>/* (or val/<class>/*); point --data-dir at the "
                        f"folder that holds them.")
    try:
        classes, class_index = find_classes(train_dir)
        unknown = set(find_classes(test_dir)[0]) - set(classes)
        train = make_dataset(train_dir, class_index, extensions=IMG_EXTENSIONS)
        test = make_dataset(test_dir, class_index, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as error:
        raise DataError(f"imagefolder: {' '.join(str(error).split())}") from error
    if unknown:
        raise DataError(f"imagefolder: {test_dir} has classes not in {train_dir}: "
                        f"{sorted(unknown)}")
    arrays = _decode_cached(os.path.join(data_dir, "imagefolder_cache_uint8.pt"), train, test)
    return ImageData(name, arrays["train_images"], arrays["train_labels"],
                     arrays["test_images"], arrays["test_labels"], tuple(arrays["mean"]),
                     tuple(arrays["std"]), len(classes), classes=tuple(classes))


def _decode_cached(cache: str, train: list, test: list) -> dict:
    """Decode (path, label) lists once into uint8 tensors, cached at `cache` with the
    training images' per-channel mean and std.

    The cache is reused while the list of files and labels is unchanged; delete it to force a
    new decode after editing images in place.
    """
    for split, files in (("training", train), ("test", test)):
        if not files:
            raise DataError(f"no images of the {split} split found under {os.path.dirname(cache)}")
    folder = os.path.dirname(cache)
    listing = [f"{os.path.relpath(p, folder)}\t{y}" for p, y in train] + ["--"]
    listing += [f"{os.path.relpath(p, folder)}\t{y}" for p, y in test]
    signature = hashlib.sha256("\n".join(listing).encode()).hexdigest()
    try:
        arrays = torch.load(cache, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # absent or unreadable
        arrays = {"signature": None}
    if arrays["signature"] != signature:
        train_images, test_images = _decode([p for p, _ in train]), _decode([p for p, _ in test])
        if train_images.shape[1:] != test_images.shape[1:]:
            raise DataError(f"test images are {tuple(test_images.shape[1:])} but training images "
                            f"{tuple(train_images.shape[1:])}: resize the images to one size")
        mean, std = _channel_stats(train_images)
        arrays = {"signature": signature, "train_images": train_images,
                  "train_labels": torch.tensor([y for _, y in train]), "test_images": test_images,
                  "test_labels": torch.tensor([y for _, y in test]), "mean": mean, "std": std}
        torch.save(arrays, cache + ".tmp")
        os.replace(cache + ".tmp", cache)  # atomic: a crash never leaves a half-written cache
    return arrays


def _decode(paths: list[str]) -> torch.Tensor:
    """Decode image files (once, not in the hot path) into one (N, 3, H, W) uint8 tensor."""
    images = None
    for i, path in enumerate(tqdm(paths, desc="decoding images", unit="img", leave=False)):
        try:
            image = pil_to_tensor(pil_loader(path))  # (3, H, W) uint8, grey scale made RGB
        except OSError as error:
            raise DataError(f"cannot decode {path} ({error}); remove or replace it") from error
        if images is None:
            images = torch.empty((len(paths), *image.shape), dtype=torch.uint8)
        if image.shape != images.shape[1:]:
            raise DataError(f"{path} is {tuple(image.shape)} but {paths[0]} is "
                            f"{tuple(images.shape[1:])}: resize the images to one size")
        images[i] = image
    return images


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (population) of uint8 images, in [0, 1] units."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):  # bounded memory for large sets
        pixels = chunk.double()
        total += pixels.sum((0, 2, 3))
        squares += pixels.square().sum((0, 2, 3))
    count = images.numel() / 3
    mean = total / count
    std = (squares / count - mean.square()).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _load_synthetic(name: str, data_dir: str, seed: int) -> ImageData:
    """A CIFAR-shaped toy set for smoke runs and tests only (not a benchmark of anything)."""
    return synthetic_data(5000, 1000, seed)


def synthetic_data(train_size: int, test_size: int, seed: int,
                   device: torch.device | str = "cpu") -> ImageData:
    """The synthetic set (`make_synthetic`) with `train_size` training and `test_size` test images,
    on `device`; `--dataset synthetic` is (5000, 1000), and (50000, 10000) has CIFAR's sizes."""
    images, labels = make_synthetic(train_size + test_size, seed)
    mean, std = _channel_stats(images[:train_size])
    data = ImageData("synthetic", images[:train_size], labels[:train_size], images[train_size:],
                     labels[train_size:], mean, std, 10, classes=SYNTHETIC_CLASSES)
    return _place(data, torch.device(device))


# make_synthetic's class c: pattern c % 5 in palette c // 5 (foreground on background).
SYNTHETIC_CLASSES = tuple(f"{pattern}, {palette}" for palette in ("orange on navy", "teal on plum")
                          for pattern in ("vertical stripes", "horizontal stripes", "checkerboard",
                                          "rings", "blob"))


def make_synthetic(count: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images (count, 3, size, size) uint8 of 10 classes and their labels, from `seed`.

    Class c = pattern (c % 5) painted in palette (c // 5). The patterns (vertical stripes,
    horizontal stripes, checkerboard, rings, blob) survive crops and horizontal flips; their
    frequency, phase and centre, the colours and the pixel noise are random per image, so one
    pixel tells the palette at best and the class needs the spatial pattern.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(count, *shape, generator=generator)

    labels = torch.randperm(count, generator=generator) % 10  # balanced classes
    frequency = uniform(1 / 10, 1 / 5, 1, 1) * 2 * math.pi  # radians per pixel
    phase = uniform(0, 2 * math.pi, 1, 1)
    centre_y, centre_x = uniform(8, size - 8, 1, 1), uniform(8, size - 8, 1, 1)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")  # (H, W)
    radius = ((ys - centre_y).square() + (xs - centre_x).square()).sqrt()  # (count, H, W)
    patterns = torch.stack([
        torch.sin(frequency * xs + phase),
        torch.sin(frequency * ys + phase),
        torch.sin(frequency * (xs - centre_x)) * torch.sin(frequency * (ys - centre_y)) * 2,
        torch.cos(frequency * radius + phase),
        torch.exp(-radius.square() * frequency.square() / 8) * 2 - 1,
    ]).clamp(-1, 1) * 0.5 + 0.5  # (5, count, H, W) in [0, 1]
    shade = patterns[labels % 5, torch.arange(count)].unsqueeze(1)  # (count, 1, H, W)
    palettes = torch.tensor([[[0.9, 0.6, 0.2], [0.1, 0.2, 0.5]],  # (2 palettes, fg/bg, RGB)
                             [[0.3, 0.9, 0.8], [0.5, 0.1, 0.3]]])
    colours = palettes[labels // 5] + uniform(-0.15, 0.15, 2, 3)  # (count, 2, 3)
    foreground, background = (colours[:, k, :, None, None] for k in (0, 1))  # (count, 3, 1, 1)
    pixels = background + (foreground - background) * shade  # (count, 3, H, W)
    pixels = pixels + 0.08 * torch.randn(pixels.shape, generator=generator)
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8), labels
