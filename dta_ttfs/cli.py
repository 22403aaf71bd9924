"""LightningCLI for both stages: configs, checkpoint hand-off, resume, clear errors.

Defaults: TensorBoard logs under ``logs/<dataset>_<arch>_<stage>/version_N``, checkpoints in
``checkpoints/<dataset>_<arch>_<stage>/`` (``last.ckpt`` and the best by ``val/acc``), a
learning-rate monitor and a progress bar. Values given on the command line (flags and
``-c`` files) win over the hyper-parameters stored in a ``--ckpt_path`` checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dta_ttfs.callbacks import (
    AtomicCheckpointIO,
    InterruptCheckpoint,
    PredictionCSV,
    ResumeRNGState,
    StageCheckpoint,
)
from dta_ttfs.data import TTFSDataModule
from dta_ttfs.errors import UserError
from dta_ttfs.models import ArchSpec
from dta_ttfs.serialization import safe_load
from dta_ttfs.stages import SNNStage, TTFSStage

CHECKPOINT_ROOT = "checkpoints"
LOG_ROOT = "logs"


class KeepingSaveConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the run folder; a resumed run writes ``config.N.yaml`` beside it."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir
        if log_dir is not None and trainer.is_global_zero:
            name, n = self.config_filename, 1
            stem = Path(self.config_filename).stem
            while os.path.exists(os.path.join(log_dir, name)):
                name, n = f"{stem}.{n}.yaml", n + 1
            self.config_filename = name
        self.config_filename = trainer.strategy.broadcast(self.config_filename)
        super().setup(trainer, pl_module, stage)


def run_name(dataset: str, arch: Any, class_path: str) -> str:
    stage = "snn" if class_path.endswith("SNNStage") else "ann"
    return f"{dataset}_{ArchSpec.parse(arch).name}_{stage}"


class TTFSCLI(LightningCLI):
    def __init__(self, args=None, **kwargs: Any):
        self._raw_args = list(sys.argv[1:] if args is None else args)
        self._ckpt = None
        super().__init__(
            model_class=TTFSStage,
            subclass_mode_model=True,
            datamodule_class=TTFSDataModule,
            save_config_callback=KeepingSaveConfigCallback,
            trainer_defaults={
                "logger": {
                    "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": LOG_ROOT, "name": None},
                },
            },
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser) -> None:
        for key in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.set_defaults(weights_only=True)  # --ckpt_path is only ever read with weights_only=True
        return parser

    # -------------------------------------------------------------- --ckpt_path
    def _parse_ckpt_path(self) -> None:
        """Merge a checkpoint's hyper-parameters under what the command line gives.

        Order of precedence: defaults < checkpoint < config files and flags. The file is
        loaded with ``weights_only=True``; a bad file is a one-line error.
        """
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path:
            return
        if ckpt_path in ("last", "best", "hpc", "registry"):
            return
        self._ckpt = safe_load(ckpt_path, "checkpoint (--ckpt_path)")
        if not isinstance(self._ckpt, dict) or "state_dict" not in self._ckpt:
            raise UserError(f"--ckpt_path {ckpt_path!r} is not a Lightning checkpoint (no 'state_dict')")
        hparams = dict(self._ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        saved_class = hparams.pop("_class_path", None)
        model = self.config[sub].model
        if saved_class and model.class_path != saved_class:
            raise UserError(
                f"--ckpt_path {ckpt_path!r} holds a {saved_class.rsplit('.', 1)[-1]} but the config selects "
                f"{model.class_path.rsplit('.', 1)[-1]}; use the config of the same stage"
            )
        explicit = self.parser.parse_args(self._raw_args, defaults=False)
        given = explicit[sub].get("model") if sub in explicit else None
        given_args = given.get("init_args") if isinstance(given, Namespace) else None
        given_keys = set(given_args.keys()) if isinstance(given_args, Namespace) else set()
        for key, value in hparams.items():
            if key in model.init_args and key not in given_keys:
                model.init_args[key] = value

    # -------------------------------------------------------------- naming and resume
    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        name = run_name(cfg.data.dataset, cfg.model.init_args.arch, cfg.model.class_path)
        ckpt_dir = os.path.join(CHECKPOINT_ROOT, name)
        self.trainer_defaults["callbacks"] = [
            StageCheckpoint(dirpath=ckpt_dir),
            InterruptCheckpoint(dirpath=ckpt_dir),
            ResumeRNGState(),
            PredictionCSV(),
            LearningRateMonitor(logging_interval="epoch"),
        ]
        logger = cfg.trainer.get("logger")
        if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
            if logger.init_args.get("name") is None:
                logger.init_args.name = name
            resume = (self._ckpt or {}).get("dta_ttfs") if sub == "fit" else None
            if resume and logger.init_args.get("version") is None:
                logger.init_args.version = resume.get("log_version")

    def instantiate_trainer(self, **kwargs: Any):
        """Use :class:`AtomicCheckpointIO` unless the config names another checkpoint writer."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    def before_fit(self) -> None:
        """SNN hand-off on a fresh fit: load the ANN weights, then validate them once as an SNN."""
        model = self.model
        if self.config.fit.get("ckpt_path") or not isinstance(model, SNNStage) or not model.ann_checkpoint:
            return
        model.load_ann_checkpoint()
        self.trainer.validate(model, datamodule=self.datamodule)


def _find_user_error(exc: BaseException | None) -> UserError | None:
    """The UserError behind ``exc`` (jsonargparse wraps errors raised while instantiating)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def cli_main(args: list[str] | None = None) -> TTFSCLI | None:
    """Run the CLI; bad input ends with one ``error:`` line and exit status 2."""
    try:
        return TTFSCLI(args=args)
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None  # stopped by SIGTERM: a checkpoint was saved
    except ValueError as exc:
        user_error = _find_user_error(exc)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
