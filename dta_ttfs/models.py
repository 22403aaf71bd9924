"""The one architecture table, and the builder that turns a spec into an ANN or an SNN.

A spec is a dict of plain values (so it can live in YAML and in checkpoint
hyper-parameters)::

    {"convs": [16, "M", 32, "M"], "linears": [128], "padding": 0, "kernel_size": 3}

``convs`` lists conv widths with ``"M"`` for a 2x2 pooling, ``linears`` the hidden linear
widths; the readout to ``num_classes`` is always added. ANN and SNN built from one spec
have identical parameter names and shapes (``blocks.<i>.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from dta_ttfs.errors import UserError
from dta_ttfs.functional import DEFAULT_CAP
from dta_ttfs.layers import (
    DTAConv,
    DTALinear,
    EncodingConv,
    Flatten,
    Readout,
    ReLU1Conv,
    ReLU1Linear,
    SpikePool,
)

ArchLike = Union[str, dict]

_VGG_HEAD = [4096, 4096]
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "cnn": {"convs": [16, "M", 32, "M"], "linears": [128], "padding": 0},
    "vgg11": {
        "convs": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
        "linears": _VGG_HEAD,
        "padding": 1,
    },
    "vgg16": {
        "convs": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
        "linears": _VGG_HEAD,
        "padding": 1,
    },
}
KINDS = ("ann", "snn")


@dataclass(frozen=True)
class ArchSpec:
    convs: tuple[int | str, ...]
    linears: tuple[int, ...]
    padding: int = 1
    kernel_size: int = 3
    name: str = "custom"

    @classmethod
    def parse(cls, arch: ArchLike) -> "ArchSpec":
        """Validate a name from :data:`ARCHITECTURES` or a custom spec dict."""
        if isinstance(arch, str):
            if arch not in ARCHITECTURES:
                raise UserError(
                    f"unknown architecture {arch!r}: use one of {sorted(ARCHITECTURES)} "
                    "or a custom spec {'convs': [16, 'M', 32, 'M'], 'linears': [128]}"
                )
            return cls.parse({**ARCHITECTURES[arch], "name": arch})
        if not isinstance(arch, dict):
            raise UserError(f"architecture must be a name or a dict spec, got {type(arch).__name__}")
        unknown = set(arch) - {"convs", "linears", "padding", "kernel_size", "name"}
        if unknown:
            raise UserError(
                f"malformed architecture spec: unknown keys {sorted(unknown)}; "
                "allowed: convs, linears, padding, kernel_size, name"
            )
        convs, linears = arch.get("convs"), arch.get("linears", [])
        if not isinstance(convs, (list, tuple)) or not convs:
            raise UserError(
                "malformed architecture spec: 'convs' must be a non-empty list of conv widths "
                "and 'M' (pooling), for example [16, 'M', 32, 'M']"
            )
        for c in convs:
            if not (c == "M" or (isinstance(c, int) and not isinstance(c, bool) and c > 0)):
                raise UserError(f"malformed architecture spec: conv entry {c!r} is neither a positive int nor 'M'")
        if not isinstance(convs[0], int):
            raise UserError("malformed architecture spec: 'convs' must start with a conv width (the encoding layer)")
        if not isinstance(linears, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in linears
        ):
            raise UserError(f"malformed architecture spec: 'linears' must be a list of positive ints, got {linears!r}")
        padding, kernel = arch.get("padding", 1), arch.get("kernel_size", 3)
        if not (isinstance(padding, int) and padding >= 0 and isinstance(kernel, int) and kernel >= 1):
            raise UserError("malformed architecture spec: 'padding' must be an int >= 0 and 'kernel_size' an int >= 1")
        return cls(tuple(convs), tuple(linears), padding, kernel, str(arch.get("name", "custom")))


class Network(nn.Module):
    """A chain of blocks (weighted layers, pools, a flatten, the readout).

    ``forward`` returns logits; :meth:`trace` also returns the activation of every neuron
    layer (encoding and hidden layers), which the statistics use without a second pass.
    """

    def __init__(self, blocks: list[nn.Module], kind: str, spec: ArchSpec, input_shape: tuple[int, int, int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.kind = kind
        self.spec = spec
        self.input_shape = input_shape

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def trace(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and the list of activations of the neuron layers (readout excluded)."""
        acts = []
        for block in self.blocks:
            x = block(x)
            if block.spiking:
                acts.append(x)  # (B, C, H, W) or (B, F), a in [0, 1]
        return x, acts

    def neuron_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, block)`` of every neuron layer, in order (the names used in logs)."""
        return [(layer_name(i, b), b) for i, b in enumerate(self.blocks) if b.spiking]

    def shapes(self) -> list[tuple[int, ...]]:
        """Per-sample input shape of every block (and the output shape at the end)."""
        shapes = [self.input_shape]
        for block in self.blocks:
            shapes.append(block.out_shape(shapes[-1]))
        return shapes


def layer_name(index: int, block: nn.Module) -> str:
    kind = "conv" if isinstance(block, nn.Conv2d) else "fc"
    return f"{kind}{index}"


def build_network(
    arch: ArchLike = "cnn",
    kind: str = "snn",
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    cap: float | None = DEFAULT_CAP,
) -> Network:
    """Build the ANN (ReLU1) or the SNN (encoding, DTA layers, readout) of ``arch``.

    Weights are Kaiming-normal (fan_in, relu), no bias. Raises ``ValueError`` for an
    unknown name, a malformed spec, or an image that the pools shrink to nothing.
    """
    if kind not in KINDS:
        raise UserError(f"unknown network kind {kind!r}: use 'ann' or 'snn'")
    spec = ArchSpec.parse(arch)
    blocks: list[nn.Module] = []
    channels, size = in_channels, image_size
    for entry in spec.convs:
        if entry == "M":
            blocks.append(SpikePool(2))
            size //= 2
        else:
            if kind == "ann":
                block = ReLU1Conv(channels, entry, spec.kernel_size, spec.padding)
            elif not blocks:
                block = EncodingConv(channels, entry, spec.kernel_size, spec.padding)
            else:
                block = DTAConv(channels, entry, spec.kernel_size, spec.padding, cap=cap)
            blocks.append(block)
            channels, size = entry, size + 2 * spec.padding - spec.kernel_size + 1
        if size < 1:
            raise UserError(
                f"architecture {spec.name!r} shrinks a {image_size}x{image_size} image to nothing "
                f"(at {entry!r}); use a larger image_size or fewer 'M'/unpadded convs"
            )
    blocks.append(Flatten())
    features = channels * size * size
    for width in spec.linears:
        blocks.append(ReLU1Linear(features, width) if kind == "ann" else DTALinear(features, width, cap=cap))
        features = width
    blocks.append(Readout(features, num_classes))
    for block in blocks:
        if hasattr(block, "weight"):
            nn.init.kaiming_normal_(block.weight, mode="fan_in", nonlinearity="relu")
    return Network(blocks, kind, spec, (in_channels, image_size, image_size))


@torch.no_grad()
def count_neurons(model: Network, x: Tensor) -> dict[str, int]:
    """Neurons per forward pass, counted from real activations of one sample of ``x``."""
    logits, acts = model.trace(x[:1])
    spiking = sum(a[0].numel() for a in acts)
    readout = logits[0].numel()
    return {"spiking": spiking, "readout": readout, "total": spiking + readout}


NETWORK_HPARAMS = ("arch", "in_channels", "image_size", "num_classes", "cap")


def network_from_checkpoint(path: str, kind: str = "snn") -> Network:
    """Rebuild a network from a dta-ttfs Lightning checkpoint (loaded with ``weights_only=True``).

    The architecture comes from the checkpoint's hyper-parameters (``arch``, ``in_channels``,
    ``image_size``, ``num_classes``, ``cap``) and the weights from its ``net.*`` entries.
    """
    from dta_ttfs.serialization import network_state, safe_load

    ckpt = safe_load(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "arch" not in hp:
        raise UserError(f"{path!r} is not a dta-ttfs Lightning checkpoint (no 'hyper_parameters' with 'arch')")
    net = build_network(kind=kind, **{k: hp[k] for k in NETWORK_HPARAMS if k in hp})
    net.load_state_dict(network_state(ckpt), strict=True)
    return net
