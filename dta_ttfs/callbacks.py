"""Callbacks and the checkpoint writer that make long runs safe to stop and resume.

* :class:`StageCheckpoint` - ``last.ckpt`` and the best epoch by ``val/acc``.
* :class:`AtomicCheckpointIO` - writes a checkpoint to a temporary file in the same folder,
  then moves it into place, so a crash never leaves a truncated ``last.ckpt``.
* :class:`InterruptCheckpoint` - on SIGTERM or Ctrl-C (only those) saves a checkpoint that
  ``fit --ckpt_path`` continues from.
* :class:`PredictionCSV` - ``predict`` writes a CSV row per sample in the run's log folder.
* :class:`ResumeRNGState` - carries the torch, numpy and python RNG states in checkpoints
  so that resuming at an epoch boundary repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import csv
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dta_ttfs.serialization import safe_load


class StageCheckpoint(ModelCheckpoint):
    """``last.ckpt`` plus the best epoch by ``val/acc`` (chosen on validation, never on test)."""

    def __init__(self, dirpath: str, **kwargs: Any):
        kwargs = {
            "monitor": "val/acc",
            "mode": "max",
            "save_last": True,
            "filename": "epoch{epoch:03d}-val_acc{val/acc:.4f}",
            "auto_insert_metric_name": False,
            **kwargs,
        }
        super().__init__(dirpath=dirpath, **kwargs)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Crash-safe writes (temporary file + ``os.replace``) and ``weights_only=True`` reads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return safe_load(path, "checkpoint (--ckpt_path)")


class InterruptCheckpoint(Callback):
    """Save ``interrupted-epochE-stepS.ckpt`` when fit is stopped by SIGTERM or Ctrl-C.

    Any other exception (a NaN loss, bad input) writes nothing, so no good checkpoint is
    ever replaced by the state of a failed run.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or not trainer.training:
            return
        path = os.path.join(self.dirpath, f"interrupted-epoch{trainer.current_epoch}-step{trainer.global_step}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # the full state, optimizer included
        rank_zero_info(f"interrupted: saved {path}; continue with: fit ... --ckpt_path {path}")


class ResumeRNGState(Callback):
    """Keep the RNG states (torch, CUDA, numpy, python) in the checkpoint and restore them.

    The states are put back at the start of the resumed epoch, not at load time, so the
    sanity check and loader start-up of the resumed process do not shift them. Only plain
    tensors, ints, floats and strings are stored (``weights_only=True`` safe).
    """

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fit_loop.restarted_mid_epoch:
            rank_zero_warn(
                f"resuming mid-epoch at epoch {trainer.current_epoch}, step {trainer.global_step}: the step count "
                "continues, but this epoch's sample order is not restored (resume from an epoch-end checkpoint for "
                "an exact repeat)"
            )
            self._restore()  # on_train_epoch_start is not called for a mid-epoch restart


class PredictionCSV(BasePredictionWriter):
    """``predict`` writes one row per sample to ``predictions.csv`` in the run's log folder.

    Columns: the sample's name (file name, or ``test/<index>``), then whatever the module's
    ``predict_step`` returns per sample (the predicted class and the engine's statistics).
    Under several processes each rank writes ``predictions.rank<r>.csv``.
    """

    def __init__(self):
        super().__init__(write_interval="batch")
        self.path: Path | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = Path(trainer.log_dir or ".")
        folder.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.path = folder / f"predictions{suffix}.csv"
        self._header_written = False

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if not isinstance(prediction, dict):
            return
        names = getattr(trainer.datamodule, "predict_names", None)
        columns = list(prediction)
        rows = zip(*[prediction[c].tolist() for c in columns])
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if not self._header_written:
                writer.writerow(["sample", *columns])
                self._header_written = True
            for index, row in zip(batch_indices, rows):
                writer.writerow([names[index] if names else index, *row])

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(f"predictions written to {self.path}")
