"""Spike analytics: per-layer statistics, TensorBoard pictures, the checkpoint report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from dta_ttfs.cli import cli_main
from dta_ttfs.metrics import SpikeStats
from dta_ttfs.report import main as report_main
from dta_ttfs.stages import SNNStage

ROOT = Path(__file__).resolve().parents[1]


def flags(data_dir) -> list[str]:
    return [
        "--data.data_dir", str(data_dir), "--data.download", "false", "--data.val_size", "50",
        "--data.batch_size", "32", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def test_logged_layer_statistics_equal_a_direct_count():
    torch.manual_seed(0)
    model = SNNStage()
    x, y = torch.rand(12, 1, 28, 28) * 0.6, torch.randint(0, 10, (12,))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, DataLoader(TensorDataset(x, y), batch_size=5))  # 3 batches: 5 + 5 + 2
    logged = trainer.callback_metrics
    with torch.no_grad():
        _, acts = model.net.trace(x)
    names = [name for name, _ in model.net.neuron_layers()]
    total_spikes = total_neurons = 0
    for name, a in zip(names, acts):
        fired = a > 0
        total_spikes += int(fired.sum())
        total_neurons += a.numel()
        assert logged[f"val/fire_rate/{name}"].item() == pytest.approx(fired.float().mean().item(), abs=1e-6)
        mean_time = (1 - a[fired]).double().mean().item()
        assert logged[f"val/spike_time/{name}"].item() == pytest.approx(mean_time, abs=1e-5)
    assert logged["val/spikes_per_neuron"].item() == pytest.approx(total_spikes / total_neurons, abs=1e-6)
    assert 0 < total_spikes < total_neurons  # some neurons fire, some do not: the count checks something


def test_histogram_counts_are_integer_bins():
    stats = SpikeStats(2, bins=4)
    stats.update([torch.tensor([[0.0, 0.3, 0.99, float("inf")]]), torch.tensor([[0.5, 0.5, float("inf"), 1.0]])])
    out = stats.compute()
    assert out["hist"].tolist() == [[1, 1, 0, 1], [0, 0, 2, 0]]
    assert out["fire_rate"].tolist() == [0.75, 0.5]


def test_fit_writes_histograms_and_images_to_tensorboard(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "-c", str(ROOT / "configs/mnist/snn.yaml"), *flags(tiny_mnist),
                    "--model.ann_checkpoint", "null", "--model.pictures_every_n_epochs", "2"])  # fmt: skip
    acc = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    names = [name for name, _ in cli.model.net.neuron_layers()]
    assert {f"val/spike_times/{n}" for n in names} <= set(tags["histograms"])
    assert {"val/spike_time_maps", "val/fire_rate_by_depth"} <= set(tags["images"])
    # every 2nd validation epoch of 2: pictures once, at the first epoch
    assert len(acc.Images("val/spike_time_maps")) == 1
    image = acc.Images("val/spike_time_maps")[0]
    assert image.width > 200 and image.height > 100
    hist = acc.Histograms(f"val/spike_times/{names[0]}")[0].histogram_value
    assert hist.num > 0 and 0 <= hist.min <= hist.max <= 1


def test_pictures_can_be_turned_off(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "-c", str(ROOT / "configs/mnist/snn.yaml"), *flags(tiny_mnist),
                    "--model.ann_checkpoint", "null", "--model.pictures_every_n_epochs", "0"])  # fmt: skip
    acc = EventAccumulator(cli.trainer.logger.log_dir)
    acc.Reload()
    assert not acc.Tags()["images"] and not acc.Tags()["histograms"]
    assert acc.Tags()["scalars"]


def test_report_matches_an_independent_evaluation(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "-c", str(ROOT / "configs/mnist/snn.yaml"), *flags(tiny_mnist), "--model.ann_checkpoint", "null",
              "--model.pictures_every_n_epochs", "0"])  # fmt: skip
    ckpt = tmp_path / "checkpoints/mnist_cnn_snn/last.ckpt"
    code = report_main([str(ckpt), "--out", str(tmp_path / "report"), "--data-dir", str(tiny_mnist), "--no-download"])
    assert code == 0
    tested = cli_main(["test", "-c", str(ROOT / "configs/mnist/snn.yaml"), *flags(tiny_mnist),
                       "--ckpt_path", str(ckpt), "--model.engine", "event"])  # fmt: skip
    acc = tested.trainer.callback_metrics["test/acc"].item()
    text = (tmp_path / "report/report.md").read_text()
    assert f"| proxy | {100 * acc:.2f} %" in text and f"| event | {100 * acc:.2f} % | 100.00 %" in text
    assert "| stepwise (dt = 1/64) |" in text
    for png in ("fire_rate.png", "spike_time_histograms.png", "raster.png", "spike_time_maps.png"):
        with Image.open(tmp_path / "report" / png) as image:
            image.load()
            assert image.width >= 300 and image.height >= 200, png
    assert os.path.getsize(tmp_path / "report/results.json") > 0


def test_report_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert report_main([str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint")
    assert not (tmp_path / "r").exists()
