"""Shared fixtures: tiny datasets written in torchvision's real on-disk formats.

The real loading code (torchvision's MNIST/CIFAR classes behind ``TTFSDataModule``) runs on
them. ``write_idx`` and ``pattern_images`` are plain functions other tests can import
(``from conftest import write_idx``).

The tiny MNIST task is learnable: class ``c`` is a bright 6x6 blob whose top-left corner is
at row ``2 + 12 * (c // 5)``, column ``1 + 5 * (c % 5)`` (a 2 x 5 grid), jittered by up to 1 px,
on a dim noisy background (pixels 0-40; blob 180-255).
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# The tests are many tiny workloads on a 2-core machine: one intra-op thread per process (this
# one and the CLI subprocesses, which inherit the variable) avoids OpenMP oversubscription, which
# made small ops up to 10x slower whenever two processes ran at once. DDP sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_MNIST_TRAIN = 300
TINY_MNIST_TEST = 100
TINY_CIFAR_PER_BATCH = 4  # images in each of data_batch_1..5 (CIFAR-10 train: 20)
TINY_CIFAR_TEST = 10
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path: str | os.PathLike, array) -> Path:
    """Write a uint8 array (1-D labels or 3-D images) as an uncompressed IDX file (big-endian dims)."""
    array = np.ascontiguousarray(np.asarray(array, dtype=np.uint8))
    if array.ndim not in (1, 3):
        raise ValueError(f"IDX files here hold 1-D labels or 3-D images, got shape {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())  # magic 2051 (images) / 2049 (labels)
    return path


def pattern_images(labels: np.ndarray, size: int = 28, channels: int = 0, seed: int = 0) -> np.ndarray:
    """Class-patterned uint8 images: a bright 6x6 blob at a class-specific place (see module doc).

    ``channels=0`` gives (N, size, size); ``channels=3`` gives (N, size, size, 3) with the blob
    in a class-specific colour.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    shape = (n, size, size) if channels == 0 else (n, size, size, channels)
    images = rng.integers(0, 41, size=shape, dtype=np.uint8)
    for i, c in enumerate(labels):
        top = 2 + 12 * (c // 5) + rng.integers(-1, 2)
        left = 1 + 5 * (c % 5) + rng.integers(-1, 2)
        top, left = max(top, 0), max(left, 0)
        blob = rng.integers(180, 256, size=(6, 6) + images.shape[3:], dtype=np.uint8)
        if channels:
            blob = (blob * np.array([(c + 1) % 2, (c // 2 + 1) % 2, 1])[None, None]).astype(np.uint8)
        images[i, top : top + 6, left : left + 6] = blob
    return images


def _balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    labels = np.arange(n) % num_classes
    return np.random.default_rng(seed).permutation(labels).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """Root folder with ``MNIST/raw`` and ``FashionMNIST/raw`` (the same four IDX files).

    300 train / 100 test images of the blob task (30 / 10 per class, shuffled). Session
    scoped: do not modify it; copy it (``shutil.copytree``) to corrupt a file.
    """
    root = tmp_path_factory.mktemp("tiny_mnist")
    raw = root / "MNIST" / "raw"
    for split, n, seed in (("train", TINY_MNIST_TRAIN, 1), ("t10k", TINY_MNIST_TEST, 2)):
        labels = _balanced_labels(n, 10, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", pattern_images(labels, seed=seed))
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    shutil.copytree(raw, root / "FashionMNIST" / "raw")
    return root


def _write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_entry(n: int, num_classes: int, seed: int, label_key: str) -> dict:
    labels = _balanced_labels(n, num_classes, seed).astype(int)
    images = pattern_images(labels % 10, size=32, channels=3, seed=seed)  # (N, 32, 32, 3)
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # CIFAR rows: all R, then G, then B
    return {"data": np.ascontiguousarray(data), label_key: labels.tolist(), "filenames": [f"{i}.png" for i in range(n)]}


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """Root folder with ``cifar-10-batches-py`` and ``cifar-100-python`` in torchvision's pickle layout.

    CIFAR-10: data_batch_1..5 of 4 images each (20 train), test_batch of 10, batches.meta.
    CIFAR-100: train (20), test (10) with ``fine_labels``/``coarse_labels``, meta. The MD5s
    differ from torchvision's: use the ``cifar_no_md5`` fixture to read them.
    """
    root = tmp_path_factory.mktemp("tiny_cifar")
    c10 = root / "cifar-10-batches-py"
    for b in range(1, 6):
        _write_pickle(c10 / f"data_batch_{b}", _cifar_entry(TINY_CIFAR_PER_BATCH, 10, 10 + b, "labels"))
    _write_pickle(c10 / "test_batch", _cifar_entry(TINY_CIFAR_TEST, 10, 20, "labels"))
    _write_pickle(c10 / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    c100 = root / "cifar-100-python"
    for name, n, seed in (("train", 5 * TINY_CIFAR_PER_BATCH, 30), ("test", TINY_CIFAR_TEST, 31)):
        entry = _cifar_entry(n, 100, seed, "fine_labels")
        entry["coarse_labels"] = [c // 5 for c in entry["fine_labels"]]
        _write_pickle(c100 / name, entry)
    _write_pickle(
        c100 / "meta",
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]},
    )
    return root


@pytest.fixture
def cifar_no_md5(monkeypatch) -> None:
    """Let torchvision's CIFAR classes (and the DataModule's check) accept the tiny files.

    ``torchvision.datasets.cifar.check_integrity`` becomes "the file exists": missing files
    are still missing, only the MD5 comparison is skipped.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def real_data_dir() -> Path:
    """The real data folder from env ``DTA_TTFS_DATA`` (holding ``MNIST/raw``); read-only.

    Missing: fail under CI (``CI=true``), skip elsewhere.
    """
    value = os.environ.get("DTA_TTFS_DATA", "")
    if value and all((Path(value) / "MNIST" / "raw" / f).is_file() for f in MNIST_FILES):
        return Path(value)
    message = f"DTA_TTFS_DATA={value!r}: real data missing (expected MNIST/raw/{{{','.join(MNIST_FILES)}}})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
