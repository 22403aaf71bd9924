"""The reference cnn on real MNIST (from DTA_TTFS_DATA): both stages and the event engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from dta_ttfs.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_real_mnist_pipeline(real_data_dir, tmp_path, monkeypatch):
    """A short budget of both stages reaches >= 97 % SNN validation accuracy, and the exact
    event engine decides like the proxy on every test sample it sees."""
    monkeypatch.chdir(tmp_path)
    common = [
        "--data.data_dir", str(real_data_dir), "--data.download", "false", "--trainer.max_epochs", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.val_size", "2000",
    ]  # fmt: skip
    cli_main(["fit", "-c", str(ROOT / "configs/mnist/ann.yaml"), *common, "--trainer.limit_train_batches", "600"])
    snn = cli_main(
        ["fit", "-c", str(ROOT / "configs/mnist/snn.yaml"), *common, "--trainer.limit_train_batches", "300",
         "--model.ann_checkpoint", str(tmp_path / "checkpoints/mnist_cnn_ann/last.ckpt")]
    )  # fmt: skip
    assert snn.trainer.callback_metrics["val/acc"] >= 0.97
    tested = cli_main(
        ["test", "-c", str(ROOT / "configs/mnist/snn.yaml"), *common, "--trainer.limit_test_batches", "16",
         "--ckpt_path", str(tmp_path / "checkpoints/mnist_cnn_snn/last.ckpt"), "--model.engine", "event"]
    )  # fmt: skip
    metrics = tested.trainer.callback_metrics
    assert metrics["test/agreement"] == 1.0
    assert metrics["test/acc"] >= 0.97
