"""Matplotlib figures of spiking activity, shared by TensorBoard logging and the report.

Every function takes plain tensors (spike times relative to their window, ``+inf`` for
silence) and returns a ``matplotlib.figure.Figure``; nothing is drawn on screen.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402


def _tile(times: Tensor) -> np.ndarray:
    """One sample's spike times as a 2-D image: conv channels tiled in a grid, a linear layer
    folded into a near-square block. NaN pads the grid (no neuron there)."""
    t = times.float().numpy()
    if t.ndim == 1:
        width = math.ceil(math.sqrt(t.size))
        out = np.full(width * math.ceil(t.size / width), np.nan)
        out[: t.size] = t
        return out.reshape(-1, width)
    c, h, w = t.shape
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for i in range(c):
        r, q = divmod(i, cols)
        out[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = t[i]
    return out


def spike_time_maps(spike_times: list[Tensor], names: list[str], title: str = "") -> Figure:
    """Heat map per layer of one sample's spike times; silent neurons in black."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(over="black", bad="white")
    for ax, times, name in zip(axes[0], spike_times, names):
        image = _tile(times)
        shown = np.where(np.isinf(image), 2.0, image)  # silent -> above the colour range -> black
        im = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        fired = np.isfinite(image).sum()
        ax.set_title(f"{name}: {fired}/{times.numel()} fired", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="spike time in window (black = silent)")
    if title:
        fig.suptitle(title)
    return fig


def fire_rate_by_depth(names: list[str], rates: list[float], title: str = "") -> Figure:
    """Fraction of neurons that fire, per layer, in order of depth."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(len(names)), rates, marker="o")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of neurons that fire")
    ax.grid(alpha=0.3)
    ax.set_title(title or "fire rate by depth")
    fig.tight_layout()
    return fig


def spike_time_histograms(names: list[str], counts: Tensor, title: str = "") -> Figure:
    """Histogram of spike times per layer from integer bin counts ``(L, bins)`` over [0, 1)."""
    layers, bins = counts.shape
    fig, axes = plt.subplots(1, layers, figsize=(3 * layers, 2.8), squeeze=False, sharey=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, row, name in zip(axes[0], counts.double().numpy(), names):
        ax.bar(edges[:-1], row, width=1 / bins, align="edge")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("spike time")
    axes[0][0].set_ylabel("spikes")
    fig.suptitle(title or "spike-time histograms")
    fig.tight_layout()
    return fig


def raster(spike_times: list[Tensor], names: list[str], title: str = "") -> Figure:
    """Raster of one sample: absolute time (layer l fires in window [l, l+1)) vs neuron index."""
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for layer, (times, name) in enumerate(zip(spike_times, names)):
        flat = times.flatten().float().numpy()
        idx = np.nonzero(np.isfinite(flat))[0]
        ax.scatter(layer + flat[idx], offset + idx, s=1, label=f"{name} ({idx.size} spikes)")
        offset += flat.size
    ax.set_xlabel("time (windows)")
    ax.set_ylabel("neuron index")
    ax.legend(fontsize=8, markerscale=6, loc="upper left")
    ax.set_title(title or "spike raster of one sample")
    fig.tight_layout()
    return fig
