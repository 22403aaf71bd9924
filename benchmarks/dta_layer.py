"""Micro-benchmark of one DTA layer: I = w.a and W = w.1[a > 0] in two calls or in one.

Variants, each forward + backward (the weight gradient flows through I and W, the input
gradient through I only):

* ``two``: two synaptic calls, ``I = conv(a)``, ``W = conv(mask)`` (the layer as written);
* ``one``: one batched call on ``cat([a, mask])`` along the batch dimension, then split;
* ``pair_fusedw`` / ``pair_splitw``: one batched forward call, but a hand-written backward that
  computes the input gradient for the ``a`` half only, and the weight gradient in one call on
  the concatenated batch (``fusedw``) or in two calls (``splitw``).

``--baseline-functional FILE`` instead times ``dta()`` alone (the element-wise part) of another
version of ``functional.py`` against the current one.

Layer shapes are those of the DTA layers of ``cnn`` (1x28x28) and ``vgg11`` (3x32x32).
Runs are interleaved (variant order alternates every repeat) and the median is reported.

    python benchmarks/dta_layer.py --out benchmarks/results/dta_layer.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from throughput import _cpu_model  # benchmarks/ is on sys.path when run as a script

from dta_ttfs.functional import dta, spike_mask, spiked
from dta_ttfs.models import build_network


def forward_two(layer, a):
    mask = spike_mask(a.detach())
    return dta(layer.synaptic(a), layer.synaptic(mask), layer.cap)


def forward_one(layer, a):
    mask = spike_mask(a.detach())
    both = layer.synaptic(torch.cat([a, mask], dim=0))
    drive, weight_sum = both.split(a.shape[0], dim=0)
    return dta(drive, weight_sum, layer.cap)


class _PairSynaptic(torch.autograd.Function):
    """(I, W) = (w.a, w.mask) from ONE forward call on cat([a, mask]); the backward computes the
    input gradient for the ``a`` half only, and the weight gradient either in one call on the
    concatenated batch (``fused_wgrad``) or in two calls (I half, W half)."""

    @staticmethod
    def forward(ctx, a, mask, weight, layer, fused_wgrad):
        both = torch.cat([a, mask], dim=0)
        out = layer._forward_linear(both, weight)
        ctx.save_for_backward(both, weight)
        ctx.layer, ctx.fused, ctx.batch = layer, fused_wgrad, a.shape[0]
        drive, weight_sum = out.split(a.shape[0], dim=0)
        return drive, weight_sum

    @staticmethod
    def backward(ctx, g_drive, g_wsum):
        both, weight = ctx.saved_tensors
        layer, b = ctx.layer, ctx.batch
        a, mask = both[:b], both[b:]
        if isinstance(layer, torch.nn.Linear):
            grad_a = g_drive @ weight if ctx.needs_input_grad[0] else None
            if ctx.fused:
                grad_w = torch.cat([g_drive, g_wsum]).t() @ both
            else:
                grad_w = torch.addmm(g_drive.t() @ a, g_wsum.t(), mask)
            return grad_a, None, grad_w, None, None
        conv = torch.ops.aten.convolution_backward
        args = (None, layer.stride, layer.padding, layer.dilation, False, [0], layer.groups)
        if ctx.fused:
            grad_a = conv(g_drive, a, weight, *args, (True, False, False))[0] if ctx.needs_input_grad[0] else None
            grad_w = conv(torch.cat([g_drive, g_wsum]), both, weight, *args, (False, True, False))[1]
        else:
            grad_a, grad_w, _ = conv(g_drive, a, weight, *args, (ctx.needs_input_grad[0], True, False))
            grad_w = grad_w + conv(g_wsum, mask, weight, *args, (False, True, False))[1]
        return grad_a, None, grad_w, None, None


def _pair(fused):
    def forward_pair(layer, a):
        mask = spike_mask(a.detach())
        drive, weight_sum = _PairSynaptic.apply(a, mask, layer.weight, layer, fused)
        return dta(drive, weight_sum, layer.cap)

    return forward_pair


VARIANTS = {"two": forward_two, "one": forward_one, "pair_fusedw": _pair(True), "pair_splitw": _pair(False)}


def dta_layers(arch: str, channels: int, size: int):
    """(name, layer, per-sample input shape) of every DTA layer of the SNN of ``arch``."""
    torch.manual_seed(0)
    net = build_network(arch, "snn", in_channels=channels, image_size=size)
    shapes = net.shapes()
    out = []
    for i, block in enumerate(net.blocks):
        if hasattr(block, "cap") and hasattr(block, "synaptic"):
            out.append((f"{arch}.blocks.{i}", block, shapes[i]))
    return out


def time_variant(fn, layer, a, grad, backward: bool) -> float:
    layer.zero_grad(set_to_none=True)
    a.grad = None
    t0 = time.perf_counter()
    if backward:
        out = fn(layer, a)
        out.backward(grad)
    else:
        with torch.no_grad():
            fn(layer, a)
    return time.perf_counter() - t0


def bench_layer(layer, in_shape, batch, repeats, warmup=2):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(batch, *in_shape, generator=gen)
    a = torch.where(a < 0.5, torch.zeros_like(a), a)  # about half of the inputs silent
    a.requires_grad_()
    with torch.no_grad():
        ref = forward_two(layer, a)
    grad = torch.randn_like(ref)
    grads = {}
    for k, fn in VARIANTS.items():
        layer.zero_grad(set_to_none=True)
        a.grad = None
        out = fn(layer, a)
        assert torch.allclose(out, ref, atol=1e-5), f"variant {k} disagrees"
        out.backward(grad)
        grads[k] = (a.grad.clone(), layer.weight.grad.clone())
    for k, (ga, gw) in grads.items():
        assert torch.allclose(ga, grads["two"][0], rtol=1e-4, atol=1e-4), f"variant {k}: input gradient"
        assert torch.allclose(gw, grads["two"][1], rtol=1e-4, atol=1e-3), f"variant {k}: weight gradient"
    result = {}
    for mode, backward in (("fwd_bwd", True), ("fwd", False)):
        times = {k: [] for k in VARIANTS}
        for _ in range(warmup):
            for fn in VARIANTS.values():
                time_variant(fn, layer, a, grad, backward)
        for r in range(repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for k in order:
                times[k].append(time_variant(VARIANTS[k], layer, a, grad, backward))
        med = {k: statistics.median(v) for k, v in times.items()}
        result[mode] = {
            "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
            "speedup_vs_two": {k: round(med["two"] / v, 3) for k, v in med.items() if k != "two"},
        }
    return result


def load_functional(path: str):
    """Import another version of ``dta_ttfs/functional.py`` (e.g. ``git show HEAD:...``) as a module."""
    spec = importlib.util.spec_from_file_location("baseline_functional", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_functional(baseline, layer, in_shape, batch, repeats, warmup=2):
    """``dta`` alone (the element-wise part), forward + backward, baseline vs current module."""
    import dta_ttfs.functional as current

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(batch, *in_shape, generator=gen)
    a = torch.where(a < 0.5, torch.zeros_like(a), a)
    with torch.no_grad():
        drive = layer.synaptic(a)
        wsum = layer.synaptic(spiked(a).float())
    grad = torch.randn_like(drive)
    mods = {"baseline": baseline, "current": current}

    def run(mod, backward):
        i = drive.clone().requires_grad_(backward)
        w = wsum.clone().requires_grad_(backward)
        t0 = time.perf_counter()
        out = mod.dta(i, w, layer.cap)
        if backward:
            out.backward(grad)
        return time.perf_counter() - t0

    result = {"elements": drive.numel()}
    for mode, backward in (("fwd_bwd", True), ("fwd", False)):
        times = {k: [] for k in mods}
        for _ in range(warmup):
            for m in mods.values():
                run(m, backward)
        for r in range(repeats):
            for k in list(mods) if r % 2 == 0 else list(reversed(mods)):
                times[k].append(run(mods[k], backward))
        med = {k: statistics.median(v) for k, v in times.items()}
        result[mode] = {
            "median_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
            "speedup_current_vs_baseline": round(med["baseline"] / med["current"], 3),
        }
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-cnn", type=int, default=128)
    p.add_argument("--batch-vgg", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/results/dta_layer.json")
    p.add_argument(
        "--baseline-functional",
        default=None,
        metavar="FILE",
        help="also time dta() of this other functional.py against the current one "
        "(e.g. git show HEAD:dta_ttfs/functional.py > /tmp/f.py); skips the one-vs-two comparison",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.baseline_functional:
        return main_functional(args)

    rows = []
    totals = {mode: {k: 0.0 for k in VARIANTS} for mode in ("fwd_bwd", "fwd")}
    for arch, channels, size, batch in (("cnn", 1, 28, args.batch_cnn), ("vgg11", 3, 32, args.batch_vgg)):
        for name, layer, in_shape in dta_layers(arch, channels, size):
            res = bench_layer(layer, in_shape, batch, args.repeats)
            rows.append(
                {"layer": name, "type": type(layer).__name__, "in_shape": list(in_shape), "batch": batch, **res}
            )
            for mode in totals:
                for k in VARIANTS:
                    totals[mode][k] += res[mode]["median_ms"][k]
            fb = res["fwd_bwd"]
            print(
                f"{name:16s} in={tuple(in_shape)!s:14s} B={batch:3d} fwd+bwd ms "
                + " ".join(f"{k}={v:7.2f}" for k, v in fb["median_ms"].items())
                + " | speedup vs two: "
                + " ".join(f"{k}={v:.2f}" for k, v in fb["speedup_vs_two"].items())
                + f" | fwd one={res['fwd']['speedup_vs_two']['one']:.2f}"
            )
    summary = {
        mode: {
            "ms": {k: round(v, 3) for k, v in t.items()},
            "speedup_vs_two": {k: round(t["two"] / v, 3) for k, v in t.items() if k != "two"},
        }
        for mode, t in totals.items()
    }
    print("sum of medians (ms):", json.dumps(summary))
    report = {
        "benchmark": "dta_layer: I and W in one batched synaptic call vs two",
        "hardware": {
            "cpu": _cpu_model(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "layers": rows,
        "sum_of_medians_ms": summary,
    }
    _write_report(args.out, report)


def main_functional(args):
    baseline = load_functional(args.baseline_functional)
    rows, totals = [], {m: {"baseline": 0.0, "current": 0.0} for m in ("fwd_bwd", "fwd")}
    for arch, channels, size, batch in (("cnn", 1, 28, args.batch_cnn), ("vgg11", 3, 32, args.batch_vgg)):
        for name, layer, in_shape in dta_layers(arch, channels, size):
            res = bench_functional(baseline, layer, in_shape, batch, args.repeats)
            rows.append({"layer": name, "batch": batch, **res})
            for m in totals:
                for k in totals[m]:
                    totals[m][k] += res[m]["median_ms"][k]
            fb = res["fwd_bwd"]
            print(
                f"{name:18s} elements={res['elements']:9d} dta fwd+bwd baseline={fb['median_ms']['baseline']:7.2f} ms "
                f"current={fb['median_ms']['current']:7.2f} ms speedup={fb['speedup_current_vs_baseline']:.2f} "
                f"| fwd speedup={res['fwd']['speedup_current_vs_baseline']:.2f}"
            )
    summary = {
        m: {**{k: round(v, 3) for k, v in t.items()}, "speedup": round(t["baseline"] / t["current"], 3)}
        for m, t in totals.items()
    }
    print("sum of medians (ms):", json.dumps(summary))
    report = {
        "benchmark": "dta() element-wise forward/backward: baseline functional.py vs current",
        "baseline": args.baseline_functional,
        "hardware": {"cpu": _cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "repeats": args.repeats,
        "layers": rows,
        "sum_of_medians_ms": summary,
    }
    _write_report(args.out, report)


def _write_report(path: str, report: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
