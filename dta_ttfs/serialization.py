"""Safe loading of checkpoints and state dicts (always ``weights_only=True``)."""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch

from dta_ttfs.errors import UserError


def safe_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    A missing, truncated or non-torch file, and a pickle that would run code (refused by
    ``weights_only=True``), each raise :class:`UserError`; nothing is executed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        detail = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        detail = detail[0][:160] if detail else type(exc).__name__
        if "Unsupported global" in message:
            raise UserError(
                f"refusing to load {what} {path!r}: it holds more than plain weights and could run code "
                f"({detail}); re-save it as a state_dict of tensors"
            ) from None
        raise UserError(
            f"{what} {path!r} is not a readable torch file ({detail}); point to a complete .ckpt/.pt file"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{what} {path!r} is not a readable torch file (truncated or another format: {first[:160]}); "
            "point to a complete .ckpt/.pt file"
        ) from None


def network_state(checkpoint: dict, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The network's weights of a Lightning checkpoint (keys without ``prefix``)."""
    state = checkpoint.get("state_dict", {})
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
