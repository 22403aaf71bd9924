"""The DataModule on tiny on-disk datasets (conftest) and, when present, the real MNIST."""

from __future__ import annotations

import os
import shutil
import urllib.error

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision
from conftest import TINY_CIFAR_PER_BATCH, TINY_CIFAR_TEST, TINY_MNIST_TEST, TINY_MNIST_TRAIN
from PIL import Image
from torch.utils.data import SequentialSampler
from torchvision import transforms as T

from dta_ttfs.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    DATASETS,
    Cutout,
    EpochSampler,
    TTFSDataModule,
    cifar_train_transform,
)
from dta_ttfs.errors import UserError


def mnist_dm(root, **kwargs) -> TTFSDataModule:
    kwargs = {"dataset": "mnist", "download": False, "val_size": 50, "batch_size": 64, "num_workers": 0} | kwargs
    return TTFSDataModule(data_dir=str(root), **kwargs)


def copy_of(root, tmp_path):
    return shutil.copytree(root, tmp_path / "data")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "name, classes, channels, size",
    [("mnist", 10, 1, 28), ("fashion_mnist", 10, 1, 28), ("cifar10", 10, 3, 32), ("cifar100", 100, 3, 32)],
)
def test_dataset_shapes_are_known_right_after_init(name, classes, channels, size, tmp_path):
    dm = TTFSDataModule(dataset=name, data_dir=str(tmp_path / "nothing-here"))  # nothing is read or downloaded
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (classes, channels, size)
    assert dm.hparams.dataset == name and set(DATASETS) == {"mnist", "fashion_mnist", "cifar10", "cifar100"}


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UserError, match="svhn.*mnist, fashion_mnist, cifar10, cifar100"):
        TTFSDataModule(dataset="svhn")


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("val_size", -1), ("cutout", -2), ("num_workers", -1)])
def test_bad_numbers_are_user_errors(key, value):
    with pytest.raises(UserError, match=key):
        TTFSDataModule(**{key: value})


def test_data_dir_defaults_to_env_then_data(monkeypatch, tmp_path):
    monkeypatch.setenv("DTA_TTFS_DATA", str(tmp_path))
    assert TTFSDataModule().data_dir == str(tmp_path)
    monkeypatch.delenv("DTA_TTFS_DATA")
    assert TTFSDataModule().data_dir == os.path.abspath("data")
    assert TTFSDataModule(eval_batch_size=None, batch_size=7).eval_batch_size == 7


# --------------------------------------------------------------------------- splits and loaders


def test_validation_is_a_seeded_hold_out_of_the_train_split(tiny_mnist):
    dm = mnist_dm(tiny_mnist)
    dm.setup("fit")
    train, val = set(dm.train_set.indices), set(dm.val_set.indices)
    assert len(val) == 50 and len(train) == TINY_MNIST_TRAIN - 50
    assert train.isdisjoint(val) and train | val == set(range(TINY_MNIST_TRAIN))
    assert dm.train_set.base.train and dm.val_set.base is dm.train_set.base  # both from the train split

    again = mnist_dm(tiny_mnist)
    again.setup("fit")
    assert again.val_set.indices == dm.val_set.indices
    other = mnist_dm(tiny_mnist, seed=1)
    other.setup("fit")
    assert other.val_set.indices != dm.val_set.indices


def test_val_size_must_leave_training_samples(tiny_mnist):
    with pytest.raises(UserError, match="val_size=5000.*has 300"):
        mnist_dm(tiny_mnist, val_size=5000).setup("fit")


def test_test_loader_reads_the_whole_test_split_in_order(tiny_mnist):
    dm = mnist_dm(tiny_mnist, eval_batch_size=32)  # 100 = 3 * 32 + 4
    loader = dm.test_dataloader()
    assert not dm.test_set.base.train and isinstance(loader.sampler, SequentialSampler) and not loader.drop_last
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([y for _, y in batches]), dm.test_set.base.targets)
    assert len(dm.test_set) == TINY_MNIST_TEST


def test_mnist_pixels_are_floats_in_0_1(tiny_mnist):
    x, y = next(iter(mnist_dm(tiny_mnist).train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.7


def test_tiny_mnist_task_is_learnable(tiny_mnist):
    dm = mnist_dm(tiny_mnist, val_size=1)
    dm.setup("fit")
    dm.setup("test")
    base_train, base_test = dm.train_set.base, dm.test_set.base
    means = torch.stack([base_train.data[base_train.targets == c].float().mean(0) for c in range(10)])
    dist = torch.cdist(base_test.data.float().flatten(1), means.flatten(1))
    assert (dist.argmin(1) == base_test.targets).float().mean() > 0.95  # nearest class mean


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and len(sampler) == 50 and first != list(range(50))
    assert list(sampler) == first == list(EpochSampler(50, seed=3))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    other = EpochSampler(50, seed=3)
    other.set_epoch(1)
    assert list(other) == second
    assert list(EpochSampler(50, seed=4)) != first


def test_train_loader_shuffles_with_the_epoch_sampler(tiny_mnist):
    dm = mnist_dm(tiny_mnist, batch_size=250)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSampler) and not loader.drop_last
    ((_, y0),) = list(loader)
    in_order = dm.train_set.base.targets[dm.train_set.indices]
    assert not torch.equal(y0, in_order) and torch.equal(y0.sort().values, in_order.sort().values)
    assert torch.equal(next(iter(loader))[1], y0)
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], y0)


class _Recorder(pl.LightningModule):
    """Records the targets Lightning feeds it, per epoch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch[1].tolist())
        return (self.w * batch[0].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit_orders(root) -> dict[int, list[int]]:
    model = _Recorder()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=mnist_dm(root, batch_size=150, val_size=0))  # val_size=0: no validation
    return model.seen


def test_lightning_sets_the_sampler_epoch(tiny_mnist):
    first = _fit_orders(tiny_mnist)
    assert sorted(first[0]) == sorted(first[1]) and len(first[0]) == TINY_MNIST_TRAIN
    assert first[0] != first[1]  # a new order each epoch
    assert _fit_orders(tiny_mnist) == first  # ... that repeats run to run


# --------------------------------------------------------------------------- CIFAR and transforms


def test_cifar_pipeline_and_shapes(tiny_cifar, cifar_no_md5):
    dm = TTFSDataModule("cifar10", data_dir=str(tiny_cifar), download=False, val_size=5, batch_size=8, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 5 * TINY_CIFAR_PER_BATCH - 5 and len(dm.val_set) == 5
    steps = dm.train_transform.transforms
    kinds = [T.RandomCrop, T.RandomHorizontalFlip, T.AutoAugment, T.ToTensor, Cutout, T.Normalize]
    assert [type(t) for t in steps] == kinds
    assert steps[0].padding == 4 and steps[0].fill == 128 and steps[4].size == 16
    assert isinstance(steps[2], torchvision.transforms.AutoAugment)
    assert steps[2].policy == torchvision.transforms.AutoAugmentPolicy.CIFAR10
    assert tuple(steps[5].mean) == CIFAR10_MEAN and tuple(steps[5].std) == CIFAR10_STD
    assert dm.val_set.transform is dm.eval_transform  # validation is not augmented
    assert [type(t) for t in dm.eval_transform.transforms] == [T.ToTensor, T.Normalize]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64

    dm100 = TTFSDataModule("cifar100", data_dir=str(tiny_cifar), download=False, val_size=5, num_workers=0)
    dm100.setup("test")
    assert len(dm100.test_set) == TINY_CIFAR_TEST and dm100.num_classes == 100
    assert tuple(dm100.eval_transform.transforms[1].mean) == CIFAR100_MEAN
    assert dm100.test_set[0][0].shape == (3, 32, 32)


def test_augment_and_cutout_switches():
    plain = TTFSDataModule("cifar10", augment=False)
    assert plain.train_transform is plain.eval_transform
    no_cut = cifar_train_transform(mean=CIFAR10_MEAN, std=CIFAR10_STD, cutout=0)
    assert not any(isinstance(t, Cutout) for t in no_cut.transforms)


def test_cutout_zeroes_one_clipped_square_reproducibly():
    img = torch.rand(3, 40, 48) + 1.0  # no zeros of its own
    before = img.clone()
    for seed in range(20):
        torch.manual_seed(seed)
        cy, cx = int(torch.randint(40, (1,))), int(torch.randint(48, (1,)))
        torch.manual_seed(seed)
        out = Cutout(16)(img)
        expected = torch.zeros(40, 48, dtype=torch.bool)
        expected[max(cy - 8, 0) : cy + 8, max(cx - 8, 0) : cx + 8] = True
        assert torch.equal(out == 0, expected.expand(3, -1, -1))
        if 8 <= cy <= 32 and 8 <= cx <= 40:
            assert int(expected.sum()) == 16 * 16
        torch.manual_seed(seed)
        assert torch.equal(Cutout(16)(img), out)
    assert torch.equal(img, before)  # out of place
    assert Cutout(0)(img) is img


# --------------------------------------------------------------------------- missing and broken data


@pytest.mark.parametrize(
    "name, expected", [("mnist", "MNIST/raw/train-images-idx3-ubyte"), ("cifar10", "cifar-10-batches-py/data_batch_1")]
)
def test_missing_data_without_download(name, expected, tmp_path):
    dm = TTFSDataModule(name, data_dir=str(tmp_path / "empty"), download=False)
    dm.prepare_data()  # nothing to do
    with pytest.raises(UserError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert name in message and str(tmp_path / "empty") in message and expected in message
    assert "--data.data_dir" in message and "DTA_TTFS_DATA" in message and "--data.download true" in message
    assert "\n" not in message


@pytest.mark.parametrize("name, cls", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("cifar10", "CIFAR10")])
def test_download_while_offline_is_one_user_error(name, cls, tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(getattr(torchvision.datasets, cls), "download", offline)
    dm = TTFSDataModule(name, data_dir=str(tmp_path), download=True)
    with pytest.raises(UserError, match="download failed.*name resolution") as err:
        dm.prepare_data()
    assert err.value.__suppress_context__ and err.value.__cause__ is None
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_download_is_skipped_when_the_files_are_there(tiny_mnist, monkeypatch):
    def no_network(self):
        raise AssertionError("download() called although every file is there")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    dm = mnist_dm(tiny_mnist, download=True)
    dm.prepare_data()
    dm.setup("test")


@pytest.mark.parametrize("filename", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"])
def test_truncated_idx_file_is_named(filename, tiny_mnist, tmp_path):
    root = copy_of(tiny_mnist, tmp_path)
    path = root / "MNIST" / "raw" / filename
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"{filename} is corrupt or truncated .*truncated.*delete it") as err:
        mnist_dm(root).setup("fit")
    assert "\n" not in str(err.value)


def test_corrupt_cifar_batch_is_named(tiny_cifar, tmp_path, cifar_no_md5):
    root = copy_of(tiny_cifar, tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="data_batch_3 is corrupt.*delete it"):
        TTFSDataModule("cifar10", data_dir=str(root), download=False, val_size=5).setup("fit")


def test_cifar_md5_is_still_checked(tiny_cifar):
    with pytest.raises(UserError, match="data_batch_1 is corrupt.*MD5"):  # the tiny files are not the real ones
        TTFSDataModule("cifar10", data_dir=str(tiny_cifar), download=False, val_size=5).setup("fit")


# --------------------------------------------------------------------------- predict


def _png(path, size=28, mode="L"):
    Image.fromarray(np.full((size, size) + ((3,) if mode == "RGB" else ()), 200, dtype=np.uint8), mode).save(path)


def test_predict_reads_the_test_split_by_default(tiny_mnist):
    dm = mnist_dm(tiny_mnist, eval_batch_size=40)
    dm.setup("predict")
    assert dm.predict_names[:2] == ["test/0", "test/1"] and len(dm.predict_names) == TINY_MNIST_TEST
    _, y = next(iter(dm.predict_dataloader()))
    assert torch.equal(y, dm.predict_set.base.targets[:40])


def test_predict_dir_reads_sorted_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.png", "a.png", "c.jpg"):
        _png(folder / name)
    (folder / "notes.txt").write_text("not an image")
    dm = TTFSDataModule("mnist", data_dir=str(tmp_path / "no-data"), predict_dir=str(folder), num_workers=0)
    dm.setup("predict")  # needs no dataset files
    assert dm.predict_names == ["a.png", "b.png", "c.jpg"]
    x, y = next(iter(dm.predict_dataloader()))
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [-1, -1, -1]
    assert torch.allclose(x[0], torch.full((1, 28, 28), 200 / 255))


@pytest.mark.parametrize("size, mode, dataset", [(32, "L", "mnist"), (28, "RGB", "mnist"), (32, "L", "cifar10")])
def test_predict_dir_refuses_wrong_size_or_channels(size, mode, dataset, tmp_path):
    _png(tmp_path / "ok.png", 28 if dataset == "mnist" else 32, "L" if dataset == "mnist" else "RGB")
    _png(tmp_path / "bad.png", size, mode)
    dm = TTFSDataModule(dataset, data_dir=str(tmp_path), predict_dir=str(tmp_path))
    expected = "28x28 grey" if dataset == "mnist" else "32x32 RGB"
    with pytest.raises(UserError, match=rf"bad.png is {size}x{size} mode {mode}, the model expects {expected}"):
        dm.setup("predict")


# --------------------------------------------------------------------------- real data (read-only)


def test_real_mnist_test_split(real_data_dir):
    dm = TTFSDataModule("mnist", data_dir=str(real_data_dir), download=False, num_workers=0)
    dm.prepare_data()
    dm.setup("test")
    assert len(dm.test_set) == 10000
    assert int((dm.test_set.base.targets == 0).sum()) == 980
    x, _ = dm.test_set[0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
