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


def spike_mask(a: Tensor) -> Tensor:
    """:func:`spiked` as a float tensor (1.0 / 0.0, dtype of ``a``), for ``W = w . 1[a > 0]``.

    Computed as ``ceil(clamp(a, 0, 1))``, which is 1 exactly when ``a > 0``: the same predicate,
    without a branchy boolean pass and a cast (about 4x faster on CPU).
    """
    return a.clamp(0.0, 1.0).ceil_()


def to_spike_times(a: Tensor) -> Tensor:
    """Activation -> relative spike time: ``t = 1 - a`` if ``a > 0`` else ``+inf``.

    ``1 - a`` is kept below 1 (the largest float under 1), so a tiny ``a > 0`` stays a spike
    under rounding: the predicate "spiked iff a > 0 iff t < 1" holds in floating point.
    """
    below_one = torch.nextafter(
        torch.ones((), dtype=a.dtype, device=a.device), torch.zeros((), dtype=a.dtype, device=a.device)
    )
    return torch.where(spiked(a), (1.0 - a).clamp(max=below_one), torch.full_like(a, float("inf")))


def to_activations(t: Tensor) -> Tensor:
    """Relative spike time -> activation: ``a = 1 - t`` if ``t < 1`` else 0 (``+inf`` = silent)."""
    return torch.where(t < 1.0, 1.0 - t, torch.zeros_like(t))


class _ReLU1(torch.autograd.Function):
    """``a = clamp(z, 0, 1)`` with gradient only where ``0 < z < 1`` (strictly).

    The backward mask is recovered from the saved output: ``0 < z < 1`` exactly when
    ``a = clamp(z, 0, 1)`` is not a whole number, i.e. ``ceil(frac(a)) = 1``.
    """

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        a = z.clamp(0.0, 1.0)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(a)
        return a

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        inside = a.frac().ceil_()  # 1.0 where 0 < a < 1 (a = 0 or 1 has no fractional part)
        return inside.mul_(grad)


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


def _dta_fused(
    drive: Tensor, weight_sum: Tensor, cap: float | None, need_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`dta_forward` and, if ``need_grad``, the clipped local derivatives of
    :func:`dta_backward`, with the same values (tested bit for bit), in branch-free arithmetic.

    Boolean masks and ``torch.where`` on data-dependent masks are slow on CPU (mispredicted
    branches, about 25x an addition), so the regions are 0/1 floats computed exactly:

    * ``floor(clamp(I, 0, 1))`` is 1 iff ``I >= 1`` (fires at the window start);
    * ``ceil(clamp(W + I, 0, 1))`` is 1 iff ``W + I > 0``, i.e. ``I > -W`` (a float sum has the
      sign of the exact sum), so ``active = 1[W + I > 0] * (1 - 1[I >= 1])``;
    * ``1 + W`` is clamped below to the smallest normal number: that changes no positive value
      (the smallest positive ``1 + W`` is ``eps / 2``), and where ``1 + W <= 0`` (then ``I < 1``
      implies ``W + I < 0``) the clamped ratio ``(W + I) / tiny`` is negative, so ``a = 0``;
    * ``a = max(clamp((W + I) / (1 + W), 0, 1), 1[I >= 1])``: inside the active region the ratio
      is already in ``[0, 1]``, for ``I >= 1`` and ``1 + W > 0`` it is ``>= 1``, and for
      ``I <= -W`` it is ``<= 0``.

    Returns ``(a, da/dI, da/dW)``; the derivatives are ``None`` when ``need_grad`` is false.
    Only fresh temporaries are modified in place, never the inputs.
    """
    tiny = torch.finfo(drive.dtype).tiny
    num = weight_sum + drive  # W + I
    den = (weight_sum + 1.0).clamp_min_(tiny)  # 1 + W where positive
    at_start = drive.clamp(0.0, 1.0).floor_()  # 1[I >= 1]
    a = (num / den).clamp_(0.0, 1.0)
    torch.maximum(a, at_start, out=a).add_(0.0)  # + 0.0 turns -0.0 into 0.0
    if not need_grad:
        return a, None, None
    active = num.clamp_(0.0, 1.0).ceil_().mul_(at_start.neg_().add_(1.0))  # 1[-W < I < 1]
    d_drive = active.div_(den)  # 1 / (1 + W) in the active region, else 0
    d_wsum = (1.0 - drive).mul(d_drive).mul_(d_drive)  # (1 - I) / (1 + W)^2 (out of place: broadcasting)
    if cap is not None:
        d_drive.clamp_(-cap, cap)
        d_wsum.clamp_(-cap, cap)
    return a, d_drive, d_wsum


class DTAFunction(torch.autograd.Function):
    """Autograd wrapper: forward :func:`dta_forward`, backward :func:`dta_backward`.

    The local derivatives are computed in the forward pass from the intermediates it already
    has (and only when a gradient is needed), so the backward pass is two multiplications.
    """

    @staticmethod
    def forward(ctx, drive: Tensor, weight_sum: Tensor, cap: float | None) -> Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        a, d_drive, d_wsum = _dta_fused(drive, weight_sum, cap, need_grad)
        if need_grad:
            ctx.save_for_backward(d_drive, d_wsum)
        return a

    @staticmethod
    def backward(ctx, grad: Tensor):
        d_drive, d_wsum = ctx.saved_tensors
        grad_drive = grad * d_drive if ctx.needs_input_grad[0] else None
        grad_wsum = grad * d_wsum if ctx.needs_input_grad[1] else None
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
