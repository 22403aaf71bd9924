"""Inference engines of a trained SNN (method.md sections 1, 4, 6 and 9).

* ``proxy``: the activation-view network that training uses (``Network.trace``).
* ``event``: explicit spike times, layer by layer, with the closed form of section 4

      t_j = (2 + S_j) / (1 + W_j) - 1,   S_j = sum_{i spiked} w_ji t_i,  W_j = sum_{i spiked} w_ji

  (with the clamps of :func:`dta_ttfs.functional.dta_spike_time`). It decides like the
  proxy and its logits equal the proxy's up to float32 rounding (which can only matter for
  a neuron sitting exactly on the boundary of a firing regime).
* ``stepwise``: the time-stepped simulation of section 9 (``n = 1/dt`` steps per window,
  spike times on the grid, dynamic threshold ``theta(t) = 2 - t``), as a neuromorphic chip
  would run it. It keeps no time axis: memory does not grow with ``n``.

All engines report the same statistics (:class:`EngineOutput`): spike times of every neuron
layer, synaptic operations (SOPs: every input spike of a DTA layer or of the readout times
the synapses it reaches) and the decision latency in windows.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from dta_ttfs.errors import UserError
from dta_ttfs.functional import dta_spike_time, to_spike_times
from dta_ttfs.layers import DTAConv, DTALinear, EncodingConv, Flatten, Readout, SpikePool
from dta_ttfs.models import Network, network_from_checkpoint

ENGINES = ("proxy", "event", "stepwise")
PJ_PER_SOP = 0.9  # 45 nm accumulate (section 9)
PJ_PER_MAC = 4.6  # 45 nm multiply-accumulate
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1: the latest time that still counts as a spike


def check_engine(engine: str) -> str:
    """Return ``engine`` if it is one of :data:`ENGINES`, else raise :class:`UserError`."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}: use one of {', '.join(repr(e) for e in ENGINES)}")
    return engine


def check_dt(dt: float) -> int:
    """Number of steps per window ``n = 1/dt``; ``dt`` must be ``1/n`` for a whole ``n >= 1``."""
    hint = "use 1/n for a whole number n, e.g. 1/64 = 0.015625"
    if isinstance(dt, bool) or not isinstance(dt, numbers.Real):
        raise UserError(f"dt must be a number, got {dt!r}; {hint}")
    dt = float(dt)
    if not math.isfinite(dt) or dt <= 0 or dt > 1:
        raise UserError(f"dt must be in (0, 1], got {dt!r}; {hint}")
    steps = 1.0 / dt
    n = round(steps)
    if abs(steps - n) > 1e-9 * n:
        raise UserError(f"dt = {dt!r} gives 1/dt = {steps:.6g}, not a whole number of steps per window; {hint}")
    return n


@dataclass
class EngineOutput:
    """What an engine returns for a batch of ``B`` inputs (``L`` neuron layers, ``K`` classes)."""

    logits: Tensor  # (B, K) float32 potential readout V(u=0) = W_out . a
    spike_times: list[Tensor]  # L x (B, ...) relative spike times in [0, 1), inf = silent
    sops: Tensor  # (B,) int64 synaptic operations
    latency: Tensor  # (B,) decision time in windows (potential readout: L)
    first_spike: Tensor | None = None  # (B,) int64 class of the earliest output spike (stepwise)
    first_spike_latency: Tensor | None = None  # (B,) windows: L + u of that spike, L + 1 if none

    @property
    def predictions(self) -> Tensor:
        return self.logits.argmax(1)  # (B,)

    @property
    def spikes_per_layer(self) -> Tensor:
        return torch.stack([(t < 1).flatten(1).sum(1) for t in self.spike_times], 1)  # (B, L) int64


# --------------------------------------------------------------------------- shared helpers
def _inside_window(t: Tensor) -> Tensor:
    """Keep a finite spike time below 1 (a computed spike stays a spike under float32 rounding)."""
    return torch.where(torch.isfinite(t), t.clamp(max=_BELOW_ONE), t)


def _min_pool(pool: SpikePool, t: Tensor) -> Tensor:
    """Min-pooling of spike times or step indices: the earliest spike passes (inf/n = silent)."""
    if t.is_floating_point():
        return -pool(-t)
    return (-pool(-t.double())).long()  # step indices are exact in float64 on every device


def _fanout(layer, in_shape: tuple[int, ...]) -> Tensor:
    return layer.fanout(in_shape).round().long()  # (*in) synapses reached per input neuron


def _sops(fired: Tensor, fanout: Tensor) -> Tensor:
    """Synaptic operations of one layer: each input spike times the synapses it reaches."""
    return (fired * fanout).flatten(1).sum(1)  # (B,) int64


def count_sops(model: Network, spike_times: list[Tensor]) -> Tensor:
    """SOPs per sample ``(B,)`` from the spike times of every neuron layer (e.g. of the proxy).

    Pools between layers pass the earliest spike, so the count is on the pooled spikes.
    """
    shapes = model.shapes()
    layer_times = iter(spike_times)
    t, sops = None, None
    for block, in_shape in zip(model.blocks, shapes, strict=False):
        if isinstance(block, (DTAConv, DTALinear, Readout)):
            count = _sops(t < 1, _fanout(block, in_shape))
            sops = count if sops is None else sops + count
        if isinstance(block, SpikePool):
            t = _min_pool(block, t)
        elif isinstance(block, Flatten):
            t = block(t)
        elif block.spiking:
            t = next(layer_times)  # (B, ...) this layer's output times
    return sops


def _check_input(model: Network, x: Tensor) -> None:
    if getattr(model, "kind", None) != "snn":
        raise UserError(
            f"the engines run a spiking network, got kind {getattr(model, 'kind', None)!r}; "
            "build it with kind='snn' (ANN weights load into the SNN of the same architecture)"
        )
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise UserError(f"images must be a float tensor with pixels in [0, 1], got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(model.input_shape):
        expected = ", ".join(map(str, model.input_shape))
        raise UserError(f"input of shape {tuple(x.shape)} does not fit the network: expected (B, {expected})")


# --------------------------------------------------------------------------- proxy and event
def _run_proxy(model: Network, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    logits, acts = model.trace(x)  # (B, K), L x (B, ...) activations
    return logits, [to_spike_times(a) for a in acts]


def _run_event(model: Network, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Exact spike times through the network (section 4), no activations involved."""
    spike_times, t, logits = [], None, None
    for block in model.blocks:
        if isinstance(block, EncodingConv):
            t = to_spike_times(block(x))  # (B, C, H, W) t = 1 - clamp(conv(x), 0, 1), inf = silent
        elif isinstance(block, (DTAConv, DTALinear)):
            mask = t < 1  # (B, ...) spiked inputs
            time_sum = block.synaptic(torch.where(mask, t, torch.zeros_like(t)))  # S
            weight_sum = block.synaptic(mask.float())  # W
            t = _inside_window(dta_spike_time(time_sum, weight_sum))  # (B, ...) inf = silent
        elif isinstance(block, SpikePool):
            t = _min_pool(block, t)
        elif isinstance(block, Flatten):
            t = block(t)
        elif isinstance(block, Readout):
            logits = block.synaptic(torch.where(t < 1, 1.0 - t, torch.zeros_like(t)))  # (B, K) V(u=0)
        else:
            raise TypeError(f"the event engine does not know block {type(block).__name__}")
        if block.spiking:
            spike_times.append(t)
    return logits, spike_times


# --------------------------------------------------------------------------- stepwise
@dataclass
class LayerSteps:
    """One layer simulated step by step (:func:`step_layer`); potentials in units of V."""

    out_steps: Tensor  # (B, ...) int64 output step index in the next window, n = silent
    start_potential: Tensor  # (B, ...) V at the start of the firing window (s = n)
    fire_potential: Tensor  # (B, ...) V compared when the neuron fired, -inf if silent
    end_potential: Tensor  # (B, ...) V at the end of the firing window (t = 2)
    emissions: Tensor  # (B, ...) int64 spikes the loop emitted per neuron (at most 1)
    sops: Tensor  # (B,) int64 input spikes times the synapses they reach


def step_layer(layer, in_steps: Tensor, n: int, fanout: Tensor | None = None) -> LayerSteps:
    """Section 9 for one weighted layer, given its inputs' step indices ``k_i`` (``n`` = silent).

        current = 0; V = 0; fired = False
        for s = 0 .. 2n-1:
            current += sum_{i: k_i = s} w_ji
            if s >= n and not fired and V >= 2 - s dt: fire at output step s - n
            V += current dt

    The potential is kept as ``Q = V / dt`` in float64 (so ``Q += current`` and the test is
    the exact comparison ``Q >= 2n - s``). The layer's linear map runs only at steps where
    an input arrives, and only per-step tensors exist: memory does not depend on ``n``.
    SOPs count the arrivals the loop delivers, times the synapses each one reaches.
    """
    in_shape = tuple(in_steps.shape[1:])
    fanout = _fanout(layer, in_shape) if fanout is None else fanout  # (*in)
    like = dict(size=(in_steps.shape[0], *layer.out_shape(in_shape)), device=in_steps.device)
    current = torch.zeros(**like, dtype=torch.float64)  # (B, *out) sum of the weights arrived so far
    charge = torch.zeros(**like, dtype=torch.float64)  # (B, *out) Q = V / dt
    waiting = torch.ones(**like, dtype=torch.bool)  # (B, *out) not fired yet
    out_steps = torch.full(**like, fill_value=n, dtype=torch.long)  # (B, *out) n = silent
    fire_charge = torch.full(**like, fill_value=-math.inf, dtype=torch.float64)  # (B, *out) Q when fired
    emissions = torch.zeros(**like, dtype=torch.int32)  # (B, *out) spikes emitted
    delivered = torch.zeros_like(in_steps, dtype=torch.uint8)  # (B, *in) times each input arrived
    in_steps = in_steps.int()  # (B, *in) narrower compares; n < 2^31
    arriving = set(torch.unique(in_steps[in_steps < n]).tolist())  # steps with at least one arrival
    start_charge = charge
    for s in range(2 * n):
        if s in arriving:  # only in the input window: k_i <= n - 1
            arrivals = in_steps == s  # (B, *in)
            current = current + layer.synaptic(arrivals.float()).double()
            delivered = delivered + arrivals
        if s >= n:
            if s == n:
                start_charge = charge
            fire = waiting & (charge >= 2 * n - s)  # (B, *out) compare before integrating
            waiting = waiting ^ fire
            out_steps = torch.where(fire, s - n, out_steps)
            fire_charge = torch.where(fire, charge, fire_charge)
            emissions = emissions + fire
        charge = charge + current
    sops = _sops(delivered.long(), fanout)  # (B,)
    return LayerSteps(out_steps, start_charge / n, fire_charge / n, charge / n, emissions.long(), sops)


def _encode_steps(a: Tensor, n: int) -> Tensor:
    """Encoding activations -> step indices ``k = ceil((1 - a) n)``, rounded up, ``n`` = silent."""
    return torch.ceil((1.0 - a.double()) * n).long().clamp(0, n)  # (B, C, H, W), exact in float64


def _step_times(steps: Tensor, n: int) -> Tensor:
    times = (steps.double() / n).float()  # (B, ...) k dt
    return torch.where(steps < n, times, torch.full_like(times, float("inf")))


def _run_stepwise(model: Network, x: Tensor, n: int) -> tuple[LayerSteps, list[Tensor], Tensor]:
    spike_times, sops = [], torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    steps = readout = None
    for block in model.blocks:
        if isinstance(block, EncodingConv):
            steps = _encode_steps(block(x), n)  # (B, C, H, W) step index, n = silent
        elif isinstance(block, (DTAConv, DTALinear)):
            layer = step_layer(block, steps, n)
            steps, sops = layer.out_steps, sops + layer.sops
        elif isinstance(block, SpikePool):
            steps = _min_pool(block, steps)
        elif isinstance(block, Flatten):
            steps = block(steps)
        elif isinstance(block, Readout):
            readout = step_layer(block, steps, n)
            sops = sops + readout.sops
        else:
            raise TypeError(f"the stepwise engine does not know block {type(block).__name__}")
        if block.spiking:
            spike_times.append(_step_times(steps, n))
    return readout, spike_times, sops


def _first_spike(readout: LayerSteps, n: int, num_layers: int) -> tuple[Tensor, Tensor]:
    """Earliest output spike wins (ties: larger potential); none fired: largest final potential."""
    earliest = readout.out_steps.amin(1)  # (B,)
    at_earliest = readout.out_steps == earliest[:, None]  # (B, K)
    tie_break = torch.where(at_earliest, readout.fire_potential, torch.full_like(readout.fire_potential, -math.inf))
    any_fired = earliest < n  # (B,)
    winner = torch.where(any_fired, tie_break.argmax(1), readout.end_potential.argmax(1))
    none_fired = torch.full_like(earliest, num_layers + 1, dtype=torch.float64)
    latency = torch.where(any_fired, num_layers + earliest.double() / n, none_fired)  # (B,) windows
    return winner, latency.float()


# --------------------------------------------------------------------------- public entry points
@torch.no_grad()
def run(model: Network, x: Tensor, engine: str = "event", dt: float = 1 / 64) -> EngineOutput:
    """Run the SNN ``model`` on a batch ``x`` of shape ``(B, C, H, W)`` with one engine.

    ``dt`` (``1/n``) is used, and checked, by the stepwise engine only.
    """
    check_engine(engine)
    _check_input(model, x)
    batch = x.shape[0]
    if engine == "stepwise":
        n = check_dt(dt)
        readout, spike_times, sops = _run_stepwise(model, x, n)
        num_layers = len(spike_times)
        first, first_latency = _first_spike(readout, n, num_layers)
        logits = readout.start_potential.float()  # (B, K) V at the start of the readout window
    else:
        logits, spike_times = _run_proxy(model, x) if engine == "proxy" else _run_event(model, x)
        sops = count_sops(model, spike_times)
        num_layers, first, first_latency = len(spike_times), None, None
    latency = torch.full((batch,), float(num_layers), device=x.device)  # (B,) potential readout
    return EngineOutput(logits.float(), spike_times, sops, latency, first, first_latency)


def encoding_macs(model: Network) -> int:
    """Dense MACs of the encoding layer per sample (padding included): its input is analog."""
    return model.blocks[0].macs(model.shapes()[0])


def ann_macs(model: Network) -> int:
    """Dense MACs of every weighted layer per sample, as the ANN of the same architecture computes them."""
    return sum(b.macs(s) for b, s in zip(model.blocks, model.shapes(), strict=False) if hasattr(b, "macs"))


def energy_uj(model: Network, output: EngineOutput) -> Tensor:
    """Energy per sample ``(B,)`` in microjoules: encoding MACs x 4.6 pJ + SOPs x 0.9 pJ."""
    picojoules = encoding_macs(model) * PJ_PER_MAC + output.sops.double() * PJ_PER_SOP  # (B,)
    return picojoules * 1e-6


def ann_energy_uj(model: Network) -> float:
    """Energy of the ANN of the same architecture per sample in microjoules (all MACs x 4.6 pJ)."""
    return ann_macs(model) * PJ_PER_MAC * 1e-6


def simulate(
    model: Network | str | os.PathLike, images: Tensor, engine: str = "event", dt: float = 1 / 64
) -> EngineOutput:
    """:func:`run` on ``images``, where ``model`` may be the path of a dta-ttfs SNN checkpoint."""
    if isinstance(model, (str, os.PathLike)):
        model = network_from_checkpoint(os.fspath(model), kind="snn")
    device = next(model.parameters()).device
    return run(model, images.to(device), engine, dt)
