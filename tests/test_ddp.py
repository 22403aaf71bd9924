"""Multi-process training with Lightning's DDP on CPU (two ranks), both stages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dta_ttfs.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


def last_scalar(log_dir: Path, tag: str) -> float:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag)[-1].value


def common(data_dir: Path) -> list[str]:
    # 50 validation samples: 25 per rank, so no rank pads its shard with repeated samples
    return [
        "--data.data_dir", str(data_dir), "--data.download", "false", "--data.val_size", "50",
        "--data.batch_size", "16", "--data.num_workers", "0", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "4", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_process_ddp_fit_matches_single_process_evaluation(tiny_mnist, tmp_path, monkeypatch):
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    for stage in ("ann", "snn"):
        cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "-c", str(ROOT / f"configs/mnist/{stage}.yaml")]
        cmd += common(tiny_mnist) + ddp
        if stage == "snn":
            cmd += ["--model.ann_checkpoint", str(tmp_path / "checkpoints/mnist_cnn_ann/last.ckpt")]
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out[-4000:]
        # Lightning announces every rank it starts
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in out and "GLOBAL_RANK: 1, MEMBER: 2/2" in out, out[-4000:]

    monkeypatch.chdir(tmp_path)
    log_dir = tmp_path / "logs/mnist_cnn_snn/version_0"
    single = cli_main(
        ["validate", "-c", str(ROOT / "configs/mnist/snn.yaml"), *common(tiny_mnist),
         "--ckpt_path", str(tmp_path / "checkpoints/mnist_cnn_snn/last.ckpt")]
    )  # fmt: skip
    metrics = single.trainer.callback_metrics
    assert single.trainer.world_size == 1
    for tag in ("val/acc", "val/spikes_per_neuron"):
        assert abs(last_scalar(log_dir, tag) - metrics[tag].item()) <= 1e-6, tag
    assert 0 < metrics["val/spikes_per_neuron"] < 1
