"""Layers of the TTFS network on top of :mod:`dta_ttfs.functional` (method.md section 6).

Every weighted layer is a plain ``nn.Conv2d``/``nn.Linear`` without bias, so ANN and SNN
share parameter names and shapes. A weighted layer exposes ``synaptic(x)`` (its linear map,
run in float32 even under autocast) and ``fanout(shape)`` (how many synapses each input
neuron reaches), which the inference engines use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dta_ttfs.functional import DEFAULT_CAP, dta, relu1, spike_mask


class _Synaptic:
    """Mixin for weighted layers: float32 linear map and synapse fan-out counts."""

    def synaptic(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward_linear(x.float(), self.weight.float())

    def fanout(self, in_shape: tuple[int, ...]) -> Tensor:
        """Synapses reached by one spike of each input neuron, shape ``in_shape`` (no batch)."""
        ones = torch.ones((1, *in_shape), device=self.weight.device)
        with torch.no_grad():
            reached = self._transpose_ones(ones, in_shape)
        return reached[0]


class _Conv(_Synaptic, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=False)

    def _forward_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding)

    def out_shape(self, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        _, h, w = in_shape
        k, p = self.kernel_size[0], self.padding[0]
        return (self.out_channels, h + 2 * p - k + 1, w + 2 * p - k + 1)

    def _transpose_ones(self, ones: Tensor, in_shape) -> Tensor:
        # every output position that exists, seen through an all-ones kernel: (1, C_in, H, W)
        out = torch.ones((1, *self.out_shape(in_shape)), device=ones.device)
        kernel = torch.ones_like(self.weight, dtype=torch.float32)
        return F.conv_transpose2d(out, kernel, None, self.stride, self.padding)

    def macs(self, in_shape: tuple[int, int, int]) -> int:
        """Multiply-accumulates of the dense convolution as computed, padding included."""
        c, h, w = self.out_shape(in_shape)
        return c * h * w * self.in_channels * self.kernel_size[0] * self.kernel_size[1]


class _Linear(_Synaptic, nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def _forward_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def out_shape(self, in_shape: tuple[int]) -> tuple[int]:
        return (self.out_features,)

    def _transpose_ones(self, ones: Tensor, in_shape) -> Tensor:
        return ones * self.out_features

    def macs(self, in_shape: tuple[int]) -> int:
        return self.in_features * self.out_features


# --------------------------------------------------------------------------- ANN blocks
class ReLU1Conv(_Conv):
    """ANN conv block: ``a = clamp(conv(x), 0, 1)``."""

    spiking = True

    def forward(self, x: Tensor) -> Tensor:
        return relu1(self._forward_linear(x, self.weight))


class ReLU1Linear(_Linear):
    """ANN linear block: ``a = clamp(W x, 0, 1)``."""

    spiking = True

    def forward(self, x: Tensor) -> Tensor:
        return relu1(self._forward_linear(x, self.weight))


# --------------------------------------------------------------------------- SNN blocks
class EncodingConv(_Conv):
    """First conv: analog pixels in, ``a = clamp(conv(x), 0, 1)`` out (spike time ``1 - a``)."""

    spiking = True

    def forward(self, x: Tensor) -> Tensor:
        return relu1(self.synaptic(x))


class _DTA:
    """DTA neuron on a weighted layer: ``a = dta(I = w.a_in, W = w.1[a_in > 0])``."""

    spiking = True
    cap: float | None = DEFAULT_CAP

    def forward(self, a: Tensor) -> Tensor:
        mask = spike_mask(a.detach())  # 1.0 iff a > 0 (the one predicate), no gradient
        drive = self.synaptic(a)  # I
        weight_sum = self.synaptic(mask)  # W
        return dta(drive, weight_sum, self.cap)


class DTAConv(_DTA, _Conv):
    """Hidden spiking conv layer (DTA neuron)."""

    def __init__(self, *args, cap: float | None = DEFAULT_CAP, **kwargs):
        super().__init__(*args, **kwargs)
        self.cap = cap


class DTALinear(_DTA, _Linear):
    """Hidden spiking linear layer (DTA neuron)."""

    def __init__(self, *args, cap: float | None = DEFAULT_CAP, **kwargs):
        super().__init__(*args, **kwargs)
        self.cap = cap


class Readout(_Linear):
    """Non-spiking readout: logits = ``V(u=0) = I = w . a`` (the membrane potential at the
    start of the output window), identical in the ANN and the SNN."""

    spiking = False

    def forward(self, a: Tensor) -> Tensor:
        return self.synaptic(a)


class SpikePool(nn.MaxPool2d):
    """Max-pooling of activations = min-pooling of spike times: the earliest spike passes."""

    spiking = False

    def __init__(self, kernel_size: int = 2):
        super().__init__(kernel_size)

    def out_shape(self, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = in_shape
        return (c, h // self.kernel_size, w // self.kernel_size)


class Flatten(nn.Flatten):
    spiking = False

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int]:
        n = 1
        for d in in_shape:
            n *= d
        return (n,)
