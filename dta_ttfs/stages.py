"""The two training stages as LightningModules on one small base.

* :class:`ANNStage` - stage 1, the ReLU1 network.
* :class:`SNNStage` - stage 2, the TTFS SNN trained through its proxy graph, started from
  the stage-1 weights (``ann_checkpoint``); ``validate``/``test``/``predict`` can run the
  exact event engine or the time-stepped simulator instead (``engine``, ``dt``).

Optimizer and scheduler are injected (LightningCLI callables); the settings live in YAML.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from dta_ttfs import engines
from dta_ttfs.errors import UserError
from dta_ttfs.functional import DEFAULT_CAP, to_spike_times
from dta_ttfs.metrics import SpikeStats
from dta_ttfs.models import ArchLike, ArchSpec, build_network
from dta_ttfs.serialization import network_state, safe_load


class SplitDict(torch.nn.ModuleDict):
    """A ModuleDict keyed by split name (``train`` would clash with ``Module.train``)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        super().__init__({f"{k}_": v for k, v in modules.items()})

    def __getitem__(self, split: str) -> torch.nn.Module:
        return super().__getitem__(f"{split}_")


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3)


class TTFSStage(pl.LightningModule):
    """Shared training/evaluation loop of both stages (one ``model_step`` for all splits)."""

    kind = "ann"

    def __init__(
        self,
        arch: ArchLike = "cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        **net_kwargs: Any,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = build_network(arch, self.kind, in_channels, image_size, num_classes, **net_kwargs)
        self.arch_name = ArchSpec.parse(arch).name
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler

        def accuracy(split: str) -> MetricCollection:
            acc = {"acc": MulticlassAccuracy(num_classes, average="micro")}
            if num_classes > 10:
                acc["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            return MetricCollection(acc, prefix=f"{split}/")

        self.acc = SplitDict({s: accuracy(s) for s in ("train", "val", "test")})
        self.loss = SplitDict({s: MeanMetric() for s in ("train", "val", "test")})

    # ------------------------------------------------------------------ steps
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, K) logits

    def evaluate(self, x: Tensor, y: Tensor, split: str) -> Tensor:
        """Logits for one batch; subclasses add statistics."""
        return self.net(x)

    def model_step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch  # (B, C, H, W) images, (B,) labels
        logits = self.evaluate(x, y, split)  # (B, K)
        loss = F.cross_entropy(logits, y)
        if split == "train" and not torch.isfinite(loss):
            raise UserError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, step {self.global_step}; "
                "lower the learning rate or check the data (the last good checkpoint is kept as it was)"
            )
        self.loss[split](loss.detach())
        self.acc[split](logits.detach(), y)
        on_step = split == "train"
        self.log(f"{split}/loss", self.loss[split], on_step=False, on_epoch=True, prog_bar=split != "test")
        self.log_dict(self.acc[split], on_step=False, on_epoch=True, prog_bar=True)
        if on_step:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, logger=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self.model_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.model_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.model_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        logits = self.net(x)
        return {"prediction": logits.argmax(1)}

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        logger = self.logger
        if logger is not None and getattr(logger, "version", None) is not None:
            checkpoint["dta_ttfs"] = {"log_name": str(logger.name), "log_version": logger.version}


class ANNStage(TTFSStage):
    """Stage 1: ReLU1 network (no bias, no batch-norm), cross-entropy on its logits."""

    kind = "ann"

    def __init__(
        self,
        arch: ArchLike = "cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ):
        super().__init__(arch, num_classes, in_channels, image_size, optimizer, lr_scheduler)


class SNNStage(TTFSStage):
    """Stage 2: the TTFS SNN, trained through the proxy graph (event-driven backpropagation).

    ``ann_checkpoint`` is loaded on a fresh ``fit`` only (never on resume or evaluation).
    ``engine``/``dt`` select how ``validate``/``test``/``predict`` run the network;
    training and the validation inside ``fit`` always use the proxy.
    """

    kind = "snn"

    def __init__(
        self,
        arch: ArchLike = "cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        ann_checkpoint: str | None = None,
        cap: float | None = DEFAULT_CAP,
        engine: str = "proxy",
        dt: float = 1 / 64,
        pictures_every_n_epochs: int = 1,
    ):
        engines.check_engine(engine)
        if pictures_every_n_epochs < 0:
            raise UserError(f"pictures_every_n_epochs must be >= 0 (0 = off), got {pictures_every_n_epochs}")
        engines.check_dt(dt)
        super().__init__(arch, num_classes, in_channels, image_size, optimizer, lr_scheduler, cap=cap)
        self.ann_checkpoint = ann_checkpoint
        self.engine = engine
        self.dt = dt
        self._ann_loaded = False
        self.pictures_every_n_epochs = pictures_every_n_epochs
        self._val_epochs = 0
        self._picture_sample: list[Tensor] | None = None  # spike times of the first validation sample
        layers = len(self.net.neuron_layers())
        self.spikes = SplitDict({s: SpikeStats(layers) for s in ("train", "val", "test")})
        self.deploy = SplitDict(
            {
                s: MetricCollection(
                    {
                        "agreement": MulticlassAccuracy(num_classes, average="micro"),
                        "sops": MeanMetric(),
                        "latency": MeanMetric(),
                        "energy_uj": MeanMetric(),
                    },
                    prefix=f"{s}/",
                )
                for s in ("val", "test")
            }
        )
        self.first_spike_acc = SplitDict({s: MulticlassAccuracy(num_classes, average="micro") for s in ("val", "test")})

    # ------------------------------------------------------------------ hand-off
    def load_ann_checkpoint(self, path: str | None = None) -> None:
        """Copy stage-1 weights into the SNN (same names and shapes, ``strict=True``).

        Accepts a dta-ttfs Lightning checkpoint of the ANN stage, or a plain state_dict
        whose tensors come in layer order under other names (matched by order and shape).
        """
        path = path or self.ann_checkpoint
        if path is None:
            raise UserError("no ANN checkpoint given: set --model.ann_checkpoint PATH")
        obj = safe_load(path, "ANN checkpoint")
        own = self.net.state_dict()
        if isinstance(obj, dict) and "state_dict" in obj:
            state = network_state(obj)
            problems = [f"{k}: missing" for k in own if k not in state]
            problems += [f"{k}: unexpected" for k in state if k not in own]
            problems += [
                f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items()
                if k in state and state[k].shape != v.shape
            ]
            if problems:
                raise UserError(
                    f"ANN checkpoint {path!r} does not match this SNN ({self.arch_name}, "
                    f"{self.hparams.num_classes} classes): "
                    + "; ".join(problems)
                    + "; use the same arch/dataset as the ANN stage"
                )
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            given, wanted = list(obj.items()), list(own.items())
            problems = [
                f"#{i} {gk} {tuple(gv.shape)} vs {wk} {tuple(wv.shape)}"
                for i, ((gk, gv), (wk, wv)) in enumerate(zip(given, wanted))
                if gv.shape != wv.shape
            ]
            if len(given) != len(wanted) or problems:
                raise UserError(
                    f"state_dict {path!r} does not match this SNN by layer order: {len(given)} tensors vs "
                    f"{len(wanted)} weights"
                    + (f"; shape mismatches: {'; '.join(problems)}" if problems else "")
                    + "; use weights of the same architecture"
                )
            state = {wk: gv for (_, gv), (wk, _) in zip(given, wanted)}
        else:
            raise UserError(
                f"{path!r} is neither a Lightning checkpoint nor a dict of tensors; "
                "give the ANN stage's .ckpt or a plain state_dict"
            )
        self.net.load_state_dict(state, strict=True)
        self._ann_loaded = True

    def on_fit_start(self) -> None:
        if self.ann_checkpoint and self.trainer.ckpt_path is None and not self._ann_loaded:
            self.load_ann_checkpoint()

    # ------------------------------------------------------------------ evaluation
    def active_engine(self) -> str:
        """The proxy while fitting, else the configured engine."""
        return "proxy" if self.trainer.state.fn == TrainerFn.FITTING else self.engine

    def evaluate(self, x: Tensor, y: Tensor, split: str) -> Tensor:
        engine = "proxy" if split == "train" else self.active_engine()
        if engine == "proxy":
            logits, acts = self.net.trace(x)
            spike_times = [to_spike_times(a.detach()) for a in acts]  # per layer (B, ...), inf = silent
        else:
            out = engines.run(self.net, x, engine, self.dt)
            proxy_logits = self.net(x)  # (B, K)
            self._log_deployment(split, out, proxy_logits, y)
            logits, spike_times = out.logits, out.spike_times
        self.spikes[split].update(spike_times)
        if split == "val" and self._picture_sample is None:
            self._picture_sample = [t[0].detach().cpu() for t in spike_times]  # the loader is not shuffled
        return logits

    def _log_deployment(self, split: str, out: engines.EngineOutput, proxy_logits: Tensor, y: Tensor) -> None:
        stats = self.deploy[split]
        stats["agreement"](out.predictions, proxy_logits.argmax(1))
        stats["sops"](out.sops.double())
        stats["latency"](out.latency.double())
        stats["energy_uj"](engines.energy_uj(self.net, out).double())
        self.log_dict(stats, on_step=False, on_epoch=True)
        if out.first_spike is not None:
            self.first_spike_acc[split](out.first_spike, y)
            self.log(f"{split}/acc_first_spike", self.first_spike_acc[split], on_step=False, on_epoch=True)

    def _log_spike_stats(self, split: str) -> dict[str, Tensor]:
        stats = self.spikes[split].compute()
        self.log(f"{split}/spikes_per_neuron", stats["spikes_per_neuron"].float(), sync_dist=False)
        for (name, _), rate, time in zip(self.net.neuron_layers(), stats["fire_rate"], stats["spike_time"]):
            self.log(f"{split}/fire_rate/{name}", rate.float())
            if torch.isfinite(time):
                self.log(f"{split}/spike_time/{name}", time.float())
        if split != "train" and self.active_engine() != "proxy":
            ratio = self.deploy[split]["energy_uj"].compute() / engines.ann_energy_uj(self.net)
            self.log(f"{split}/energy_ratio", ratio.float())
        self.spikes[split].reset()
        return stats

    def on_train_epoch_end(self) -> None:
        self._log_spike_stats("train")

    def on_validation_epoch_start(self) -> None:
        self._picture_sample = None

    def on_validation_epoch_end(self) -> None:
        stats = self._log_spike_stats("val")
        if self.trainer.sanity_checking:
            return
        self._val_epochs += 1
        n = self.pictures_every_n_epochs
        if n and (self._val_epochs - 1) % n == 0 and self.trainer.is_global_zero:
            self._log_pictures(stats)

    def _log_pictures(self, stats: dict[str, Tensor]) -> None:
        """Spike-time histograms, one sample's spike-time maps and fire rate by depth, to TensorBoard."""
        writer = getattr(self.logger, "experiment", None)
        if not hasattr(writer, "add_histogram_raw"):
            return
        from dta_ttfs import figures

        step = self.global_step
        names = [name for name, _ in self.net.neuron_layers()]
        bins = stats["hist"].shape[1]
        limits = [(i + 1) / bins for i in range(bins)]
        centers = torch.tensor([(i + 0.5) / bins for i in range(bins)], dtype=torch.float64)
        for name, counts in zip(names, stats["hist"].cpu()):
            total = int(counts.sum())
            if total == 0:
                continue
            nonzero = torch.nonzero(counts).flatten()
            writer.add_histogram_raw(
                f"val/spike_times/{name}",
                min=float(nonzero[0]) / bins,
                max=float(nonzero[-1] + 1) / bins,
                num=total,
                sum=float((counts.double() * centers).sum()),
                sum_squares=float((counts.double() * centers**2).sum()),
                bucket_limits=limits,
                bucket_counts=counts.tolist(),
                global_step=step,
            )
        rates = stats["fire_rate"].cpu().tolist()
        writer.add_figure("val/fire_rate_by_depth", figures.fire_rate_by_depth(names, rates), step)
        if self._picture_sample is not None:
            fig = figures.spike_time_maps(self._picture_sample, names, "first validation sample")
            writer.add_figure("val/spike_time_maps", fig, step)

    def on_test_epoch_end(self) -> None:
        self._log_spike_stats("test")

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        out = engines.run(self.net, x, self.engine, self.dt)
        row = {
            "prediction": out.predictions,
            "spikes": out.spikes_per_layer.sum(1),
            "sops": out.sops,
            "latency": out.latency,
            "energy_uj": engines.energy_uj(self.net, out),
        }
        if out.first_spike is not None:
            row["prediction_first_spike"] = out.first_spike
        return row
