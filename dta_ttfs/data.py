"""Data: the LightningDataModule, the transform presets (torchvision AutoAugment, Cutout).

Datasets are torchvision's own classes read from ``data_dir`` (MNIST/FashionMNIST raw IDX
files, CIFAR python pickles). Validation is a seeded hold-out of the *train* split; the
official test split is only used by the test (and default predict) loader. The training
order is a function of ``(seed, epoch)`` only (:class:`EpochSampler`), so a resumed run sees
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from urllib.error import URLError

import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import cifar as tv_cifar

from dta_ttfs.errors import UserError

DATA_ENV = "DTA_TTFS_DATA"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR100_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the code needs to know about a dataset, and where torchvision keeps it."""

    torchvision_class: str  # name in torchvision.datasets (looked up at use, so tests can patch it)
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] | None = None  # None: no normalisation (pixels in [0, 1])
    std: tuple[float, ...] | None = None

    @property
    def cls(self) -> type:
        return getattr(torchvision.datasets, self.torchvision_class)

    @property
    def is_cifar(self) -> bool:
        return self.mean is not None

    def files(self) -> list[str]:
        """The files torchvision reads, relative to ``data_dir``."""
        cls = self.cls
        if self.is_cifar:
            names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
            return [f"{cls.base_folder}/{name}" for name in names]
        return [f"{cls.__name__}/raw/{os.path.splitext(url)[0]}" for url, _ in cls.resources]

    def md5s(self) -> dict[str, str | None]:
        """Expected MD5 per file (CIFAR only; torchvision does not check the raw MNIST files)."""
        cls = self.cls
        if not self.is_cifar:
            return {}
        pairs = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
        return {f"{cls.base_folder}/{name}": md5 for name, md5 in pairs}


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("MNIST", 10, 1, 28),
    "fashion_mnist": DatasetInfo("FashionMNIST", 10, 1, 28),
    "cifar10": DatasetInfo("CIFAR10", 10, 3, 32, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": DatasetInfo("CIFAR100", 100, 3, 32, CIFAR100_MEAN, CIFAR100_STD),
}


# --------------------------------------------------------------------------- transforms


class Cutout:
    """Zero one ``size`` x ``size`` square of a (C, H, W) tensor, centred at a uniform random pixel.

    The square is clipped at the borders; the centre is drawn with ``torch.randint`` (so
    ``torch.manual_seed`` / ``pl.seed_everything`` make it repeat). Out of place; ``size=0``
    is the identity. (DeVries & Taylor 2017, one hole.)
    """

    def __init__(self, size: int = 16):
        if size < 0:
            raise ValueError(f"Cutout size must be >= 0, got {size}")
        self.size = size

    def __call__(self, img: Tensor) -> Tensor:  # (C, H, W)
        if self.size == 0:
            return img
        h, w = img.shape[-2:]
        cy = int(torch.randint(h, (1,)))
        cx = int(torch.randint(w, (1,)))
        y0, x0 = cy - self.size // 2, cx - self.size // 2
        out = img.clone()
        out[..., max(y0, 0) : y0 + self.size, max(x0, 0) : x0 + self.size] = 0  # y0 + size > 0 always
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def cifar_train_transform(*, mean: tuple[float, ...], std: tuple[float, ...], cutout: int = 16) -> T.Compose:
    """Crop (pad 4, fill 128), flip, AutoAugment (CIFAR-10 policy), ToTensor, Cutout, Normalize."""
    steps = [
        T.RandomCrop(32, padding=4, fill=128),
        T.RandomHorizontalFlip(),
        T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
        T.ToTensor(),
    ]
    if cutout > 0:
        steps.append(Cutout(cutout))
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def cifar_eval_transform(*, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """ToTensor, Normalize."""
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def mnist_transform() -> T.Compose:
    """ToTensor only: pixels in [0, 1], no flips (train and eval)."""
    return T.Compose([T.ToTensor()])


# --------------------------------------------------------------------------- datasets and sampler


class EpochSampler(Sampler[int]):
    """A shuffled order that is a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` before every epoch (``_set_sampler_epoch``); under DDP it
    wraps this sampler in a ``DistributedSamplerWrapper`` that shards it and forwards
    ``set_epoch``.
    """

    def __init__(self, num_samples: int, seed: int = 0, loader_generator: torch.Generator | None = None):
        self.num_samples = num_samples
        self.seed = seed
        self.loader_generator = loader_generator
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; also reseed the loader's generator (worker seeds), so that
        creating the loader's iterator never draws from the global RNG of the process."""
        self.epoch = epoch
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class TransformedSubset(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image (the base yields PIL images)."""

    def __init__(self, base: Dataset, indices: list[int], transform):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, target = self.base[self.indices[i]]
        return self.transform(img), target


class ImageFiles(Dataset):
    """Image files as ``(x, -1)``; every file already checked for size and channels."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            img = img.convert("L") if img.mode == "1" else img.copy()
        return self.transform(img), -1


def default_num_workers() -> int:
    """Loader workers when none are configured: none on a small (<= 2 core) machine.

    Measured on a 2-core box (MNIST, cnn, batch 128): the main process already uses both
    cores for the model, and a worker process only competes with it. Bigger machines get
    workers for the heavier CIFAR augmentation, keeping one core for the main process.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus - 1)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception on one line (URLError: its reason), at most ``limit`` chars."""
    text = " ".join(str(getattr(exc, "reason", None) or exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_idx(path: str, ndim: int) -> str | None:
    """Why a raw IDX (uint8, ``ndim`` dims) file is unreadable, or None if its size fits its header."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        return f"{size} bytes, shorter than its header"
    if header[0] != 0 or header[1] != 0 or header[2] != 0x08 or header[3] != ndim:
        return f"magic number {int.from_bytes(header[:4], 'big')}, expected {0x0800 + ndim}"
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        what = "truncated" if size < expected else "too long"
        return f"{what}: {size} bytes, its header {tuple(dims)} needs {expected}"
    return None


# --------------------------------------------------------------------------- the DataModule


class TTFSDataModule(pl.LightningDataModule):
    """MNIST, Fashion-MNIST, CIFAR-10 or CIFAR-100 with a seeded validation hold-out.

    Args:
        dataset: one of ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``.
        data_dir: root folder of torchvision's layout; None: env ``DTA_TTFS_DATA``, else ``data``.
        download: download missing files in ``prepare_data``.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: loader worker processes (None: :func:`default_num_workers`).
        val_size: samples held out of the train split for validation (0: no validation).
        seed: seed of the validation split and of the training order.
        augment: CIFAR training augmentation (crop, flip, AutoAugment, Cutout); MNIST has none.
        cutout: Cutout hole size in px (0: off).
        predict_dir: predict on the PNG/JPEG files of this folder instead of the test split.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: str | None = None,
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        cutout: int = 16,
        predict_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if dataset not in DATASETS:
            raise UserError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)} (--data.dataset NAME)")
        for key, value, low in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("val_size", val_size, 0),
            ("cutout", cutout, 0),
        ):
            if value is not None and value < low:
                raise UserError(f"data.{key} must be >= {low}, got {value}; fix --data.{key}")
        self.name = dataset
        self.info = DATASETS[dataset]
        self.data_dir = os.path.abspath(os.path.expanduser(data_dir or os.environ.get(DATA_ENV) or "data"))
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.download = download
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.val_size = val_size
        self.seed = seed
        self.predict_dir = predict_dir

        if self.info.is_cifar:
            stats = {"mean": self.info.mean, "std": self.info.std}
            self.eval_transform = cifar_eval_transform(**stats)
            self.train_transform = cifar_train_transform(**stats, cutout=cutout) if augment else self.eval_transform
        else:
            self.eval_transform = self.train_transform = mnist_transform()

        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: Dataset | None = None
        self.predict_names: list[str] = []
        self._splits: dict[bool, Dataset] = {}  # torchvision dataset per split (train=True/False)

    # -- what the model needs (LightningCLI links these at instantiation)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def in_channels(self) -> int:
        return self.info.in_channels

    @property
    def image_size(self) -> int:
        return self.info.image_size

    # -- files

    def _missing_files(self) -> list[str]:
        return [f for f in self.info.files() if not os.path.isfile(os.path.join(self.data_dir, f))]

    def _missing_error(self, reason: str = "") -> UserError:
        files = self.info.files()
        missing = self._missing_files()
        which = "" if len(missing) == len(files) else f" ({len(missing)} missing: {', '.join(missing)})"
        why = f"; download failed ({reason})" if reason else ""
        return UserError(
            f"{self.name} data not found in {self.data_dir}: expected {', '.join(files)}{which}{why}. "
            f"Fix: pass --data.data_dir DIR (or set env {DATA_ENV}=DIR) for a folder that holds these files, "
            "or --data.download true on a machine with internet access"
        )

    def _corrupt_error(self, relpath: str, detail: str) -> UserError:
        path = os.path.join(self.data_dir, relpath)
        return UserError(
            f"{self.name} file {path} is corrupt or truncated ({detail}); delete it and download it again "
            "(--data.download true) or copy it again from a good copy"
        )

    def _validate_files(self) -> None:
        """Raise a UserError for missing files or a file torchvision could not read."""
        if self._missing_files():
            raise self._missing_error()
        if self.info.is_cifar:
            for relpath, md5 in self.info.md5s().items():
                if not tv_cifar.check_integrity(os.path.join(self.data_dir, relpath), md5):
                    raise self._corrupt_error(relpath, "MD5 differs from torchvision's")
        else:
            for relpath in self.info.files():
                problem = _check_idx(os.path.join(self.data_dir, relpath), 3 if "-images-" in relpath else 1)
                if problem:
                    raise self._corrupt_error(relpath, problem)

    def _unpicklable_file(self) -> tuple[str, str] | None:
        for relpath in self.info.files():
            try:
                with open(os.path.join(self.data_dir, relpath), "rb") as f:
                    pickle.load(f, encoding="latin1")
            except Exception as exc:  # noqa: BLE001 - any failure names the file
                return relpath, _one_line(exc)
        return None

    def _predicting_from_folder(self) -> bool:
        trainer = self.trainer
        return bool(self.predict_dir) and trainer is not None and trainer.state.fn == "predict"

    def prepare_data(self) -> None:
        """Download missing files (``download=True``); nothing when they are all there."""
        if not self.download or not self._missing_files() or self._predicting_from_folder():
            return
        try:
            self.info.cls(self.data_dir, train=True, download=True)
        except (URLError, OSError, RuntimeError, ValueError) as exc:
            if self._missing_files():
                raise self._missing_error(_one_line(exc)) from None
            self._validate_files()
            raise UserError(
                f"{self.name} data in {self.data_dir} could not be read after downloading ({_one_line(exc)}); "
                "delete the folder and download again (--data.download true)"
            ) from None

    def _split(self, train: bool) -> Dataset:
        """The torchvision dataset of one split, without transform (images come out as PIL)."""
        if train not in self._splits:
            self._validate_files()
            try:
                self._splits[train] = self.info.cls(self.data_dir, train=train, download=False)
            except Exception as exc:  # noqa: BLE001 - turned into one line that names the file
                bad = self._unpicklable_file() if self.info.is_cifar else None
                if bad:
                    raise self._corrupt_error(*bad) from None
                raise UserError(
                    f"{self.name} data in {self.data_dir} could not be read ({_one_line(exc)}); "
                    "delete the dataset folder and download or copy it again"
                ) from None
        return self._splits[train]

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            base = self._split(train=True)
            n = len(base)
            if self.val_size >= n:
                raise UserError(
                    f"data.val_size={self.val_size} leaves no training samples: the {self.name} train split "
                    f"in {self.data_dir} has {n}; use --data.val_size below {n}"
                )
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
            self.val_set = TransformedSubset(base, sorted(order[: self.val_size]), self.eval_transform)
            self.train_set = TransformedSubset(base, sorted(order[self.val_size :]), self.train_transform)
        if stage in ("test", None) and self.test_set is None:
            base = self._split(train=False)
            self.test_set = TransformedSubset(base, list(range(len(base))), self.eval_transform)
        if stage in ("predict", None) and self.predict_set is None:
            if self.predict_dir:
                paths = self._predict_files()
                self.predict_set = ImageFiles(paths, self.eval_transform)
                self.predict_names = [os.path.basename(p) for p in paths]
            else:
                base = self._split(train=False)
                self.predict_set = TransformedSubset(base, list(range(len(base))), self.eval_transform)
                self.predict_names = [f"test/{i}" for i in range(len(base))]

    def _predict_files(self) -> list[str]:
        folder = os.path.abspath(os.path.expanduser(self.predict_dir))
        if not os.path.isdir(folder):
            raise UserError(f"predict_dir {folder} is not a folder; fix --data.predict_dir")
        paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not paths:
            raise UserError(f"predict_dir {folder} holds no PNG/JPEG files; add images or fix --data.predict_dir")
        size, channels = self.image_size, self.in_channels
        modes = ("L", "1") if channels == 1 else ("RGB",)
        expected = f"{size}x{size} {'grey (mode L)' if channels == 1 else 'RGB'}"
        for path in paths:
            try:
                with Image.open(path) as img:
                    got_size, got_mode = img.size, img.mode
            except (UnidentifiedImageError, OSError) as exc:
                raise UserError(f"cannot read image {path} ({_one_line(exc)}); remove or replace it") from None
            if got_size != (size, size) or got_mode not in modes:
                raise UserError(
                    f"image {path} is {got_size[0]}x{got_size[1]} mode {got_mode}, the model expects {expected}; "
                    "resize/convert it first"
                )
        return paths

    # -- loaders

    def _loader(self, dataset: Dataset, batch_size: int, persistent: bool = True, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=persistent and self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        generator = torch.Generator()
        sampler = EpochSampler(len(self.train_set), self.seed, loader_generator=generator)
        # workers restart each epoch from seeds drawn from `generator`, so a resumed run repeats them
        return self._loader(self.train_set, self.batch_size, sampler=sampler, generator=generator, persistent=False)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_set is None:
            self.setup("predict")
        return self._loader(self.predict_set, self.eval_batch_size, shuffle=False)
