"""Pure spike-time maths of the DTA-TTFS neuron (method.md sections 1-5).

Conventions used everywhere in the package:

* activation ``a`` in [0, 1]; a neuron has spiked exactly when ``a > 0``;
* relative spike time ``t = 1 - a`` in [0, 1); a silent neuron has ``t = +inf``;
* ``I = sum_i w_ji a_i`` (drive) and ``W = sum_{i spiked} w_ji`` (weight sum of the causal set).

Nothing here holds state or modifies its inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CAP = 11.0


def spiked(a: Tensor) -> Tensor:
    """The one firing predicate of the project: a neuron spiked iff its activation is > 0."""
    return a > 0


def to_spike_times(a: Tensor) -> Tensor:
    """Activation -> relative spike time: ``t = 1 - a`` if ``a > 0`` else ``+inf``."""
    return torch.where(spiked(a), 1.0 - a, torch.full_like(a, float("inf")))


def to_activations(t: Tensor) -> Tensor:
    """Relative spike time -> activation: ``a = 1 - t`` if ``t < 1`` else 0 (``+inf`` = silent)."""
    return torch.where(t < 1.0, 1.0 - t, torch.zeros_like(t))


class _ReLU1(torch.autograd.Function):
    """``a = clamp(z, 0, 1)`` with gradient only where ``0 < z < 1`` (strictly)."""

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        ctx.save_for_backward((z > 0) & (z < 1))
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


def relu1(z: Tensor) -> Tensor:
    """ReLU1 / encoding activation: ``a = clamp(z, 0, 1)``, d a / d z = 1[0 < z < 1].

    It is the ANN activation of stage 1 and the encoding layer of the SNN (direct coding:
    analog pixels in, spike time ``t = 1 - a`` out).
    """
    return _ReLU1.apply(z)


def dta_regions(drive: Tensor, weight_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean masks ``(fires_at_start, active)`` of the three regimes of section 4.

    fires at start: ``I >= 1``; active (fires mid-window): ``-W < I < 1``; else silent.
    """
    at_start = drive >= 1.0
    active = (drive < 1.0) & (drive > -weight_sum)
    return at_start, active


def dta_forward(drive: Tensor, weight_sum: Tensor) -> Tensor:
    """Closed-form DTA activation (section 4), out of place.

    With the rectified-linear PSP and the threshold ``theta(u) = 1 - u`` on the firing
    window ``u in [0, 1)``, ``V(u) = W u + I`` first reaches ``theta`` at
    ``u* = (1 - I) / (1 + W)``, hence

        a = 1                      if I >= 1
        a = (W + I) / (1 + W)      if -W < I < 1
        a = 0                      if I <= -W   (silent)
    """
    at_start, active = dta_regions(drive, weight_sum)
    denom = torch.where(active, 1.0 + weight_sum, torch.ones_like(weight_sum))
    mid = (weight_sum + drive) / denom
    zero = torch.zeros_like(drive)
    return torch.where(at_start, torch.ones_like(drive), torch.where(active, mid, zero))


def dta_backward(
    grad: Tensor, drive: Tensor, weight_sum: Tensor, cap: float | None = DEFAULT_CAP
) -> tuple[Tensor, Tensor]:
    """Local gradients of :func:`dta_forward` (section 5), zero outside the active region.

        da/dI = 1 / (1 + W)            da/dW = (1 - I) / (1 + W)^2

    Each is clipped to ``[-cap, cap]`` (``cap=None`` disables the clip), because ``1/(1+W)``
    explodes as ``W -> -1``. Returns ``(grad_I, grad_W)``.
    """
    _, active = dta_regions(drive, weight_sum)
    inv = torch.where(active, 1.0 / torch.where(active, 1.0 + weight_sum, torch.ones_like(weight_sum)), 0.0)
    d_drive = inv
    d_wsum = (1.0 - drive) * inv * inv
    if cap is not None:
        d_drive = d_drive.clamp(-cap, cap)
        d_wsum = d_wsum.clamp(-cap, cap)
    return grad * d_drive, grad * d_wsum


class DTAFunction(torch.autograd.Function):
    """Autograd wrapper: forward :func:`dta_forward`, backward :func:`dta_backward`."""

    @staticmethod
    def forward(ctx, drive: Tensor, weight_sum: Tensor, cap: float | None) -> Tensor:
        ctx.save_for_backward(drive, weight_sum)
        ctx.cap = cap
        return dta_forward(drive, weight_sum)

    @staticmethod
    def backward(ctx, grad: Tensor):
        drive, weight_sum = ctx.saved_tensors
        grad_drive, grad_wsum = dta_backward(grad, drive, weight_sum, ctx.cap)
        return grad_drive, grad_wsum, None


def dta(drive: Tensor, weight_sum: Tensor, cap: float | None = DEFAULT_CAP) -> Tensor:
    """DTA activation with event-driven gradients; see :func:`dta_forward`/:func:`dta_backward`."""
    return DTAFunction.apply(drive, weight_sum, cap)


def dta_spike_time(time_sum: Tensor, weight_sum: Tensor) -> Tensor:
    """Spike-time form of section 4, for the event engine.

    With ``S = sum_{i spiked} w_ji t_i`` (``time_sum``) and ``W`` the weight sum, the
    drive is ``I = W - S``; the output time relative to the next window is

        t = 0                          if I >= 1
        t = (2 + S) / (1 + W) - 1      if -W < I < 1
        t = +inf                       if I <= -W

    The regimes are decided by :func:`dta_regions`, the same test as the proxy.
    """
    drive = weight_sum - time_sum
    at_start, active = dta_regions(drive, weight_sum)
    denom = torch.where(active, 1.0 + weight_sum, torch.ones_like(weight_sum))
    mid = (2.0 + time_sum) / denom - 1.0
    inf = torch.full_like(time_sum, float("inf"))
    return torch.where(at_start, torch.zeros_like(time_sum), torch.where(active, mid, inf))
