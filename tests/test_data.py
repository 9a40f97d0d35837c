"""Tests of data.py: the file formats through the real loading code, the augmentation against
torchvision's RandomCrop(padding=4) + RandomHorizontalFlip, normalisation, determinism and the
one-line errors. CPU only; the network is blocked in every test that could reach it."""
import hashlib
import os
import pickle
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

import data
from tools import evidence_split

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # docs/spec.md Sec. 3
CIFAR100_STATS = ((0.5071, 0.4866, 0.4409), (0.2675, 0.2565, 0.2761))


@pytest.fixture
def offline(monkeypatch):
    """Every URL open fails, as on a machine without network."""
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def random_images(count, seed, height=32, width=32):
    """Images with values in 1..255, so a 0 can only be padding."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8)


def image_data(images, labels, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)):
    return data.ImageData("test", images, labels, images, labels, mean, std, int(labels.max()) + 1)


# ---------------------------------------------------------------- augmentation

def torchvision_candidates(images, padding=4):
    """Every output RandomCrop(H, padding) + RandomHorizontalFlip can give for each image of
    a batch (B, 3, H, W): keys (i, j, flip) and crops (2 (2p+1)^2, B, 3, H, W)."""
    height, width = images.shape[-2:]
    padded = TF.pad(images, padding, fill=0)
    keys, crops = [], []
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            crop = TF.crop(padded, i, j, height, width)
            keys += [(i, j, False), (i, j, True)]
            crops += [crop, TF.hflip(crop)]
    return keys, torch.stack(crops)


def matches(crops, views):
    """(candidates, B) bool: which candidate crop equals each view (B, 3, H, W)."""
    return (crops == views).flatten(2).all(2)


def test_candidates_cover_torchvision_random_crop():
    image = random_images(1, 0)
    transform = torchvision.transforms.Compose([torchvision.transforms.RandomCrop(32, padding=4),
                                                torchvision.transforms.RandomHorizontalFlip()])
    _, crops = torchvision_candidates(image)
    torch.manual_seed(0)
    for _ in range(30):
        assert matches(crops, transform(image)).sum() == 1


def test_augment_is_random_crop_with_zero_padding_and_flip():
    images = random_images(100, 1)
    views = data.augment_views(images, 4, torch.Generator().manual_seed(0), padding=4)
    assert views.shape == (4, 100, 3, 32, 32) and views.dtype == torch.uint8
    keys, crops = torchvision_candidates(images)
    drawn = []
    for view in views:
        found = matches(crops, view)  # (162, B)
        assert (found.sum(0) == 1).all(), "each view is exactly one crop (+ flip) of the padded image"
        drawn += [keys[k] for k in found.int().argmax(0).tolist()]
    rows, cols, flips = (np.array(k) for k in zip(*drawn))
    # 400 draws: each offset 0..8 has probability 1/9 (mean 44), each flip 1/2 (mean 200).
    assert all(15 <= (rows == k).sum() <= 75 and 15 <= (cols == k).sum() <= 75 for k in range(9))
    assert 160 <= flips.sum() <= 240


def test_single_view_augment_and_non_square_images():
    images = random_images(20, 2, height=12, width=20)
    out = data.augment(images, torch.Generator().manual_seed(1), padding=2)
    assert out.shape == images.shape
    _, crops = torchvision_candidates(images, padding=2)
    assert (matches(crops, out).sum(0) == 1).all()


def test_views_differ_from_each_other():
    views = data.augment_views(random_images(128, 3), 3, torch.Generator().manual_seed(0))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        same = (views[a] == views[b]).flatten(1).all(1).float().mean()
        assert same < 0.05  # equal only when both draws agree: probability 1/162


# ---------------------------------------------------------------- batches

def test_train_batches_pad_with_zero_before_normalising():
    images = torch.full((40, 3, 32, 32), 255, dtype=torch.uint8)
    dataset = image_data(images, torch.zeros(40, dtype=torch.long))
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    views, _ = next(data.train_batches(dataset, 32, 2, torch.Generator().manual_seed(0)))
    inside, padding = (1 - mean) / std, (0 - mean) / std  # pixel 255 and pixel 0, normalised
    is_inside = torch.isclose(views, inside.expand_as(views), atol=1e-5)
    is_padding = torch.isclose(views, padding.expand_as(views), atol=1e-5)
    assert (is_inside | is_padding).all()
    assert is_padding.any() and is_inside[..., 4:28, 4:28].all()  # centre never reaches padding


def test_train_batches_shuffle_drop_last_and_keep_labels_aligned():
    count = 70
    ids = torch.arange(count, dtype=torch.uint8)
    images = ids.view(count, 1, 1, 1).expand(count, 3, 32, 32).contiguous()  # image k is all k
    labels = torch.randint(0, 5, (count,), generator=torch.Generator().manual_seed(0))
    dataset = image_data(images, labels)
    mean, std = torch.tensor(dataset.mean).view(3, 1, 1), torch.tensor(dataset.std).view(3, 1, 1)
    batches = list(data.train_batches(dataset, 16, 3, torch.Generator().manual_seed(0)))
    assert len(batches) == data.num_train_batches(dataset, 16) == 4  # 70 // 16, last 6 dropped
    seen = []
    for views, batch_labels in batches:
        assert views.shape == (3, 16, 3, 32, 32) and views.dtype == torch.float32
        pixels = ((views[..., 16, 16] * std[:, 0, 0] + mean[:, 0, 0]) * 255).round().long()
        assert (pixels == pixels[:1, :, :1]).all()  # every view of a sample is the same image
        seen += pixels[0, :, 0].tolist()
        assert torch.equal(batch_labels, labels[pixels[0, :, 0]])
    assert len(set(seen)) == 64 and seen != sorted(seen)  # shuffled, no repeats


def test_train_batches_are_deterministic_given_the_generator():
    dataset = image_data(random_images(64, 4), torch.arange(64) % 3)

    def epoch(seed):
        return list(data.train_batches(dataset, 16, 2, torch.Generator().manual_seed(seed)))

    first, again, other = epoch(7), epoch(7), epoch(8)
    for (v1, l1), (v2, l2) in zip(first, again):
        assert torch.equal(v1, v2) and torch.equal(l1, l2)
    assert not all(torch.equal(l1, l2) for (_, l1), (_, l2) in zip(first, other))


def test_test_batches_are_in_order_normalised_only_and_keep_the_last_batch():
    images, labels = random_images(70, 5), torch.arange(70) % 4
    dataset = image_data(images, labels)
    reference = torchvision.transforms.Normalize(dataset.mean, dataset.std)(images.float() / 255)
    batches = list(data.test_batches(dataset, 32))
    assert [len(y) for _, y in batches] == [32, 32, 6]
    assert torch.allclose(torch.cat([x for x, _ in batches]), reference, atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in batches]), labels)


# ---------------------------------------------------------------- CIFAR

def write_cifar(root, folder, files, meta_name, meta, label_key, classes):
    """Tiny CIFAR files in torchvision's exact pickle layout; returns (images, labels) per file."""
    os.makedirs(os.path.join(root, folder))
    written = {}
    for index, name in enumerate(files):
        images = random_images(5, 10 + index).numpy()  # (5, 3, 32, 32)
        labels = [(7 * index + k) % classes for k in range(5)]
        entry = {"batch_label": name, label_key: labels, "data": images.reshape(5, 3072),
                 "filenames": [f"{name}_{k}.png" for k in range(5)]}
        if label_key == "fine_labels":
            entry["coarse_labels"] = [y // 5 for y in labels]
        with open(os.path.join(root, folder, name), "wb") as file:
            pickle.dump(entry, file, protocol=2)
        written[name] = (images, labels)
    with open(os.path.join(root, folder, meta_name), "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return written


def md5(path):
    with open(path, "rb") as file:
        return hashlib.md5(file.read()).hexdigest()


CIFAR_LAYOUTS = {
    "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", "labels", 10, CIFAR10_STATS,
                {"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": 5,
                 "num_vis": 3072}),
    "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python", "fine_labels", 100,
                 CIFAR100_STATS, {"fine_label_names": [f"f{k}" for k in range(100)],
                                  "coarse_label_names": [f"c{k}" for k in range(20)]}),
}


def tiny_cifar_on_disk(name, root, monkeypatch):
    """Tiny CIFAR files under root, accepted by torchvision's integrity check (their own md5s);
    returns (train files, test files, (images, labels) per file)."""
    dataset_class, folder, label_key, classes, _, meta = CIFAR_LAYOUTS[name]
    train_files = [n for n, _ in dataset_class.train_list]
    test_files = [n for n, _ in dataset_class.test_list]
    written = write_cifar(root, folder, train_files + test_files, dataset_class.meta["filename"],
                          meta, label_key, classes)

    def listing(files):
        return [[n, md5(root / folder / n)] for n in files]
    monkeypatch.setattr(dataset_class, "train_list", listing(train_files))
    monkeypatch.setattr(dataset_class, "test_list", listing(test_files))
    meta_md5 = md5(root / folder / dataset_class.meta["filename"])
    monkeypatch.setattr(dataset_class, "meta", {**dataset_class.meta, "md5": meta_md5})
    return train_files, test_files, written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_torchvision_layout(name, tmp_path, monkeypatch, offline):
    _, _, _, classes, stats, _ = CIFAR_LAYOUTS[name]
    train_files, test_files, written = tiny_cifar_on_disk(name, tmp_path, monkeypatch)
    loaded = data.load_data(name, str(tmp_path), "cpu")
    for files, images, labels in ((train_files, loaded.train_images, loaded.train_labels),
                                  (test_files, loaded.test_images, loaded.test_labels)):
        assert torch.equal(images, torch.from_numpy(np.concatenate([written[n][0] for n in files])))
        assert labels.tolist() == sum((written[n][1] for n in files), [])
    assert loaded.num_classes == classes and (loaded.mean, loaded.std) == stats
    assert loaded.train_labels.dtype == torch.int64 and loaded.image_shape == (3, 32, 32)


def test_evidence_split_takes_the_start_of_each_training_batch(tmp_path, monkeypatch, offline):
    # Tiny batches of 5 images, 4 taken from each: train = batches 1-4's first four (every class
    # among them), test = batch 5's first four, as ImageFolder trees that the imagefolder loader
    # reads back pixel for pixel.
    train_files, _, written = tiny_cifar_on_disk("cifar10", tmp_path / "cifar", monkeypatch)
    counts = evidence_split.write_split(str(tmp_path / "cifar"), str(tmp_path / "split"),
                                        per_batch=4, batch_size=5)
    assert counts == (16, 4)
    loaded = data.load_data("imagefolder", str(tmp_path / "split"), "cpu")
    expected = {}
    for part, files in (("train", train_files[:4]), ("test", train_files[4:])):
        images = np.concatenate([written[n][0][:4] for n in files])
        labels = sum((written[n][1][:4] for n in files), [])
        expected[part] = sorted((label, image.tobytes()) for image, label in zip(images, labels))
    for part, images, labels in (("train", loaded.train_images, loaded.train_labels),
                                 ("test", loaded.test_images, loaded.test_labels)):
        found = sorted((label, image.numpy().tobytes())
                       for image, label in zip(images, labels.tolist()))
        assert found == expected[part]
    assert loaded.classes == tuple(f"c{k}" for k in range(10))  # the metadata's class names


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_offline_error_is_one_clear_line(name, tmp_path, offline):
    dataset_class = CIFAR_LAYOUTS[name][0]
    with pytest.raises(data.DataError) as error:
        data.load_data(name, str(tmp_path), "cpu")
    message = str(error.value)
    assert "\n" not in message and dataset_class.url in message
    assert os.path.join(str(tmp_path), dataset_class.filename) in message  # where to put it
    assert os.path.join(str(tmp_path), dataset_class.base_folder) + " is missing" in message


def test_cifar_corrupt_files_are_reported(tmp_path, offline):
    dataset_class, folder, label_key, classes, _, meta = CIFAR_LAYOUTS["cifar10"]
    files = [n for n, _ in dataset_class.train_list + dataset_class.test_list]
    write_cifar(tmp_path, folder, files, "batches.meta", meta, label_key, classes)
    with pytest.raises(data.DataError, match="corrupt"):
        data.load_data("cifar10", str(tmp_path), "cpu")


# ---------------------------------------------------------------- TinyImageNet

WNIDS = ["n09", "n02", "n05"]  # wnids.txt is not sorted; labels follow the sorted order
COLOURS = {"n09": (230, 20, 20), "n02": (20, 230, 20), "n05": (20, 20, 230)}  # R, G, B


def write_tinyimagenet(root):
    """A tiny tiny-imagenet-200: 3 classes, colour encodes the class, JPEG like the original."""
    def save(path, wnid):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (64, 64), COLOURS[wnid]).save(path, "JPEG")

    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for wnid in WNIDS:
        for k in range(4):
            save(str(root / "train" / wnid / "images" / f"{wnid}_{k}.JPEG"), wnid)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val_classes = ["n05", "n02", "n05", "n09", "n02", "n09", "n09"]
    lines = []
    for k, wnid in enumerate(val_classes):
        save(str(root / "val" / "images" / f"val_{k}.JPEG"), wnid)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def colour_labels(images):
    """The label each image's colour encodes: sorted wnid index of its dominant channel."""
    wnid_of_channel = {max(range(3), key=c.__getitem__): w for w, c in COLOURS.items()}
    channel = images.float().mean((-1, -2)).argmax(-1)
    return torch.tensor([sorted(WNIDS).index(wnid_of_channel[c]) for c in channel.flatten().tolist()])


def test_tinyimagenet_labels_follow_val_annotations(tmp_path, monkeypatch):
    write_tinyimagenet(tmp_path / "tiny-imagenet-200")
    loaded = data.load_data("tinyimagenet", str(tmp_path), "cpu")
    assert loaded.train_images.shape == (12, 3, 64, 64) and loaded.test_images.shape == (7, 3, 64, 64)
    assert loaded.num_classes == 3 and loaded.mean == (0.4802, 0.4481, 0.3975)
    assert torch.equal(loaded.train_labels, colour_labels(loaded.train_images))
    assert torch.equal(loaded.test_labels, colour_labels(loaded.test_images))
    assert len(set(loaded.test_labels.tolist())) == 3  # not the single class of ImageFolder(val/)
    for views, labels in data.train_batches(loaded, 4, 2, torch.Generator().manual_seed(0)):
        centre = views[..., 24:40, 24:40]  # (M, B, 3, 16, 16), never padding
        assert torch.equal(colour_labels(centre), labels.repeat(2))
    # The uint8 cache is written once; the folder itself is also accepted as --data-dir.
    assert (tmp_path / "tiny-imagenet-200" / "cache_uint8.pt").is_file()
    monkeypatch.setattr(data, "_decode", lambda paths: pytest.fail("cache not used"))
    again = data.load_data("tinyimagenet", str(tmp_path / "tiny-imagenet-200"), "cpu")
    assert torch.equal(again.test_images, loaded.test_images)
    assert torch.equal(again.test_labels, loaded.test_labels)


def test_tinyimagenet_zip_is_extracted_and_missing_data_is_reported(tmp_path):
    with pytest.raises(data.DataError, match="tiny-imagenet-200.zip") as error:
        data.load_data("tinyimagenet", str(tmp_path), "cpu")
    assert data.TINYIMAGENET_URL in str(error.value) and "\n" not in str(error.value)
    write_tinyimagenet(tmp_path / "build" / "tiny-imagenet-200")
    shutil.make_archive(str(tmp_path / "tiny-imagenet-200"), "zip", tmp_path / "build")
    loaded = data.load_data("tinyimagenet", str(tmp_path), "cpu")
    assert torch.equal(loaded.test_labels, colour_labels(loaded.test_images))


# ---------------------------------------------------------------- ImageFolder and synthetic

def test_imagefolder_labels_grey_images_and_statistics(tmp_path):
    def save(split, name, k, mode, colour):
        os.makedirs(tmp_path / split / name, exist_ok=True)
        Image.new(mode, (12, 8), colour).save(tmp_path / split / name / f"{k}.png")

    save("train", "cat", 0, "RGB", (10, 20, 30))
    save("train", "cat", 1, "RGB", (30, 40, 50))
    save("train", "dog", 0, "L", 200)  # grey scale becomes 3 equal channels
    save("val", "dog", 0, "RGB", (1, 2, 3))
    loaded = data.load_data("imagefolder", str(tmp_path), "cpu")
    assert loaded.train_labels.tolist() == [0, 0, 1] and loaded.test_labels.tolist() == [1]
    assert loaded.train_images.shape == (3, 3, 8, 12) and loaded.num_classes == 2
    assert loaded.train_images[2].unique().tolist() == [200]
    pixels = np.array([[10, 20, 30], [30, 40, 50], [200, 200, 200]]) / 255  # one colour per image
    assert np.allclose(loaded.mean, pixels.mean(0)) and np.allclose(loaded.std, pixels.std(0))
    cache = tmp_path / "imagefolder_cache_uint8.pt"
    assert cache.is_file()
    cache.write_bytes(b"not a cache")  # an unreadable cache is rebuilt, not an error
    assert torch.equal(data.load_data("imagefolder", str(tmp_path), "cpu").train_images,
                       loaded.train_images)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(data.DataError, match="train"):
        data.load_data("imagefolder", str(tmp_path), "cpu")
    for split, size in (("train", (8, 8)), ("train", (9, 8)), ("test", (8, 8))):
        os.makedirs(tmp_path / split / "a", exist_ok=True)
        Image.new("RGB", size).save(tmp_path / split / "a" / f"{size[0]}.png")
    with pytest.raises(data.DataError, match="one size"):
        data.load_data("imagefolder", str(tmp_path), "cpu")
    os.remove(tmp_path / "train" / "a" / "9.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "test" / "a" / "8.png")  # test differs from train
    with pytest.raises(data.DataError, match="one size"):
        data.load_data("imagefolder", str(tmp_path), "cpu")


def test_synthetic_set_is_seeded_balanced_and_not_one_pixel_separable():
    loaded = data.load_data("synthetic", "unused", "cpu", seed=3)
    assert loaded.train_images.shape == (5000, 3, 32, 32) and loaded.test_images.shape == (1000, 3, 32, 32)
    assert loaded.num_classes == 10 and loaded.train_labels.bincount().min() > 400
    images, labels = data.make_synthetic(100, seed=3)
    assert torch.equal(images, data.make_synthetic(100, seed=3)[0])
    assert torch.equal(labels, data.make_synthetic(100, seed=3)[1])
    assert not torch.equal(images, data.make_synthetic(100, seed=4)[0])
    pixels = loaded.train_images.numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255
    assert np.allclose(loaded.mean, pixels.mean(1)) and np.allclose(loaded.std, pixels.std(1))
    # Nearest class mean on the centre pixel: far from the 100 % a small CNN reaches.
    centre = loaded.train_images[:, :, 16, 16].float()
    means = torch.stack([centre[loaded.train_labels == c].mean(0) for c in range(10)])
    nearest = torch.cdist(centre, means).argmin(1)
    assert (nearest == loaded.train_labels).float().mean() < 0.5


def test_unknown_data_set_is_a_data_error():
    with pytest.raises(data.DataError, match="choose one of"):
        data.load_data("mnist", "unused", "cpu")
