"""Accumulating spike statistics (torchmetrics), exact under multi-process training.

Counts are integers summed across processes; nothing is accumulated on the model.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class SpikeStats(Metric):
    """Per-layer spike counts and spike-time sums over the neuron layers.

    ``update(spike_times)`` takes one tensor per neuron layer, ``(B, ...)`` relative spike
    times with ``+inf`` for silent neurons (the readout is not a neuron layer here).
    ``compute()`` returns ``spikes_per_neuron`` (all spikes over all spiking neurons),
    ``fire_rate`` (L,), ``spike_time`` (L,) (mean time of the spikes; NaN if none) and
    ``hist`` (L, bins), spike counts per time bin of [0, 1).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, num_layers: int, bins: int = 20, **kwargs):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.bins = bins
        self.add_state("hist", torch.zeros(num_layers, bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("spikes", torch.zeros(num_layers, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("neurons", torch.zeros(num_layers, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("time_sum", torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, spike_times: list[Tensor]) -> None:
        if len(spike_times) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of spike times, got {len(spike_times)}")
        fired = [t < 1 for t in spike_times]  # the one predicate: spiked iff t < 1 (a > 0)
        spikes = torch.stack([f.sum() for f in fired])  # (L,)
        times = torch.stack([torch.where(f, t, 0.0).sum(dtype=torch.float64) for f, t in zip(fired, spike_times)])
        neurons = torch.tensor([t.numel() for t in spike_times], device=self.neurons.device)
        hist = torch.stack(
            [
                torch.bincount((t[f] * self.bins).long().clamp(0, self.bins - 1), minlength=self.bins)
                for f, t in zip(fired, spike_times)
            ]
        )  # (L, bins) spike counts per time bin of [0, 1)
        # out of place: states may have been created under inference mode
        self.spikes = self.spikes + spikes
        self.neurons = self.neurons + neurons
        self.time_sum = self.time_sum + times
        self.hist = self.hist + hist

    def compute(self) -> dict[str, Tensor]:
        spikes = self.spikes.double()
        return {
            "spikes_per_neuron": spikes.sum() / self.neurons.sum().clamp(min=1),
            "fire_rate": spikes / self.neurons.clamp(min=1),
            "spike_time": self.time_sum / spikes,  # NaN for a layer without spikes
            "hist": self.hist,
        }
