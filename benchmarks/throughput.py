"""Training-step and inference throughput (images/s) of the ANN and of the SNN proxy.

For one architecture and batch size, the ANN (ReLU1) and the SNN (encoding + DTA layers +
readout, the proxy network of method.md section 5) are timed on the same random batch:

* ``train``: forward, cross-entropy, backward and one Adam step;
* ``infer``: forward under ``torch.inference_mode``.

Runs are interleaved (ANN and SNN alternate, in alternating order) and each figure is the
median of ``--repeats`` runs after warm-up. The line ``ratio`` gives the SNN/ANN time of one
training step. If :mod:`dta_ttfs.engines` is importable, the inference engines
(``event``, ``stepwise``) are timed too.

    python benchmarks/throughput.py --arch cnn --quick
    python benchmarks/throughput.py --arch vgg11 --batch 32 --out benchmarks/results/throughput_vgg11.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import dta_ttfs.layers as _layers  # noqa: E402
from dta_ttfs.models import build_network  # noqa: E402

INPUTS = {"cnn": (1, 28), "vgg11": (3, 32), "vgg16": (3, 32)}


def hardware(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpu": _cpu_model(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) since ``t0``; CPU time is less sensitive to
    other processes competing for the cores (with one thread it is close to the work done)."""
    return time.perf_counter() - t0[0], time.process_time() - t0[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_functional(path: str):
    """Import another version of ``dta_ttfs/functional.py`` (e.g. ``git show HEAD:...``) as a module."""
    spec = importlib.util.spec_from_file_location("baseline_functional", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def patched_layers(functional_module):
    """Make :mod:`dta_ttfs.layers` use ``dta``/``relu1``/``spike_mask`` of another functional module
    (one without ``spike_mask`` gets the original ``spiked(a).to(torch.float32)``)."""
    if functional_module is None:
        yield
        return
    replace = {
        "dta": functional_module.dta,
        "relu1": functional_module.relu1,
        "spike_mask": getattr(functional_module, "spike_mask", None)
        or (lambda a: functional_module.spiked(a).to(torch.float32)),
    }
    saved = {n: getattr(_layers, n) for n in replace if hasattr(_layers, n)}
    try:
        for n, v in replace.items():
            setattr(_layers, n, v)
        yield
    finally:
        for n in replace:
            if n in saved:
                setattr(_layers, n, saved[n])
            else:
                delattr(_layers, n)


class Runner:
    """One model with its optimiser; ``train()`` and ``infer()`` return seconds."""

    def __init__(self, arch: str, kind: str, batch: int, device: torch.device, seed: int = 0, functional=None):
        channels, size = INPUTS[arch]
        torch.manual_seed(seed)
        self.model = build_network(arch, kind, in_channels=channels, image_size=size).to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.rand(batch, channels, size, size, generator=gen).to(device)
        self.y = (torch.arange(batch) % 10).to(device)
        self.device = device
        self.functional = functional  # None: the installed dta_ttfs.functional

    def train(self) -> float:
        with patched_layers(self.functional):
            _sync(self.device)
            t0 = _now()
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
            _sync(self.device)
            return _since(t0)

    def infer(self) -> float:
        with patched_layers(self.functional):
            _sync(self.device)
            t0 = _now()
            with torch.inference_mode():
                self.model(self.x)
            _sync(self.device)
            return _since(t0)


# ---------------------------------------------------------------------------------------------
# HOOK: inference engines. dta_ttfs.engines.run(model, x, engine, dt) runs the trained SNN as
# explicit spike times ("event") or as the time-stepped simulation ("stepwise"). When the
# module is importable, its rows are added to the report; add further engines to ENGINE_ROWS.
# ---------------------------------------------------------------------------------------------
ENGINE_ROWS = ("event", "stepwise")

try:
    from dta_ttfs import engines as _engines
except ImportError:  # engines not written yet: the report simply has no engine rows
    _engines = None


def engine_timer(runner: Runner, engine: str, dt: float):
    def run() -> float:
        _sync(runner.device)
        t0 = _now()
        with torch.inference_mode():
            _engines.run(runner.model, runner.x, engine, dt)
        _sync(runner.device)
        return _since(t0)

    return run


def interleaved(timers: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time every callable ``repeats`` times, alternating their order each round."""
    names = list(timers)
    for _ in range(warmup):
        for name in names:
            timers[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(timers[name]())
    return times


def summarise(times: list[tuple[float, float]], batch: int) -> dict:
    wall = [w for w, _ in times]
    cpu = [c for _, c in times]
    med = statistics.median(wall)
    return {
        "median_ms": round(med * 1e3, 3),
        "min_ms": round(min(wall) * 1e3, 3),
        "images_per_s": round(batch / med, 1),
        "cpu_median_ms": round(statistics.median(cpu) * 1e3, 3),
        "runs": len(times),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description="Training-step and inference throughput of the ANN vs the SNN proxy (and engines).",
        epilog=__doc__.split("\n\n")[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", choices=sorted(INPUTS), default="cnn")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128; 32 for vgg on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 15; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="few repeats, smaller default batch (a smoke run)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--dt", type=float, default=1 / 64, help="time step of the stepwise engine (1/n)")
    p.add_argument("--no-engines", action="store_true", help="skip the engine rows even if engines exist")
    p.add_argument(
        "--baseline-functional",
        metavar="FILE",
        default=None,
        help="also time the SNN with dta/relu1 of this other functional.py (rows snn_base_*), interleaved; "
        "e.g. git show HEAD:dta_ttfs/functional.py > /tmp/f.py",
    )
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    vgg = args.arch.startswith("vgg")
    batch = args.batch or (128 if device.type == "cuda" or not vgg else 32)
    if args.quick and args.batch is None and vgg and device.type == "cpu":
        batch = 16
    repeats = args.repeats or (5 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    runners = {kind: Runner(args.arch, kind, batch, device) for kind in ("ann", "snn")}
    if args.baseline_functional:
        base = load_functional(args.baseline_functional)
        runners["ann_base"] = Runner(args.arch, "ann", batch, device, functional=base)
        runners["snn_base"] = Runner(args.arch, "snn", batch, device, functional=base)
    train = interleaved({k: r.train for k, r in runners.items()}, repeats, warmup)
    infer = interleaved({k: r.infer for k, r in runners.items()}, repeats, warmup)
    rows = {f"{k}_train": summarise(train[k], batch) for k in runners}
    rows.update({f"{k}_infer": summarise(infer[k], batch) for k in runners})

    engine_note = "dta_ttfs.engines not importable"
    if _engines is not None and not args.no_engines:
        engine_note = f"dta_ttfs.engines.run(model, x, engine, dt={args.dt})"
        timers = {}
        for engine in ENGINE_ROWS:
            timer = engine_timer(runners["snn"], engine, args.dt)
            try:
                timer()  # check that it runs at all
            except Exception as err:  # noqa: BLE001 - report, do not crash the benchmark
                rows[f"snn_{engine}"] = {"error": f"{type(err).__name__}: {err}"}
                continue
            timers[engine] = timer
        eng_repeats = max(3, repeats // 3) if args.quick else repeats
        for engine, times in interleaved(timers, eng_repeats, 0).items():
            rows[f"snn_{engine}"] = summarise(times, batch)

    ratio_train = rows["snn_train"]["median_ms"] / rows["ann_train"]["median_ms"]
    ratio_infer = rows["snn_infer"]["median_ms"] / rows["ann_infer"]["median_ms"]
    ratio_train_min = rows["snn_train"]["min_ms"] / rows["ann_train"]["min_ms"]
    ratio_train_cpu = rows["snn_train"]["cpu_median_ms"] / rows["ann_train"]["cpu_median_ms"]
    extra = {}
    if "snn_base_train" in rows:
        med = {k: v["median_ms"] for k, v in rows.items() if "median_ms" in v}
        cpu = {k: v["cpu_median_ms"] for k, v in rows.items() if "cpu_median_ms" in v}
        extra = {
            "baseline_functional": args.baseline_functional,
            "ratio_train_base_snn_over_base_ann": round(med["snn_base_train"] / med["ann_base_train"], 3),
            "ratio_train_base_snn_over_base_ann_cpu": round(cpu["snn_base_train"] / cpu["ann_base_train"], 3),
            "speedup_train_snn_vs_base": round(med["snn_base_train"] / med["snn_train"], 3),
            "speedup_train_snn_vs_base_cpu": round(cpu["snn_base_train"] / cpu["snn_train"], 3),
            "speedup_infer_snn_vs_base": round(med["snn_base_infer"] / med["snn_infer"], 3),
            "speedup_train_ann_vs_base": round(med["ann_base_train"] / med["ann_train"], 3),
            "speedup_infer_ann_vs_base": round(med["ann_base_infer"] / med["ann_infer"], 3),
        }

    report = {
        "benchmark": "throughput: ANN vs SNN proxy (train step = fwd + CE + bwd + Adam step)",
        "arch": args.arch,
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "hardware": hardware(device),
        "engines": engine_note,
        "rows": rows,
        "ratio_train_snn_over_ann": round(ratio_train, 3),
        "ratio_infer_snn_over_ann": round(ratio_infer, 3),
        "ratio_train_snn_over_ann_of_min_times": round(ratio_train_min, 3),
        "ratio_train_snn_over_ann_of_cpu_times": round(ratio_train_cpu, 3),
        **extra,
    }
    print(
        f"{args.arch} batch {batch} on {report['hardware'].get('gpu', report['hardware']['cpu'])} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads), median of {repeats}:"
    )
    for name, row in rows.items():
        if "error" in row:
            print(f"  {name:14s} error: {row['error']}")
        else:
            print(
                f"  {name:14s} median {row['median_ms']:9.2f} ms  {row['images_per_s']:9.1f} images/s"
                f"   (min {row['min_ms']:9.2f} ms, CPU {row['cpu_median_ms']:9.2f} ms)"
            )
    print(
        f"ratio SNN/ANN training step: {ratio_train:.3f} of medians, {ratio_train_min:.3f} of minima, "
        f"{ratio_train_cpu:.3f} of CPU times"
        f"  (inference: {ratio_infer:.3f})"
    )
    if extra:
        e = extra
        print(
            f"baseline functional ({args.baseline_functional}): ratio {e['ratio_train_base_snn_over_base_ann']:.3f} "
            f"(CPU times {e['ratio_train_base_snn_over_base_ann_cpu']:.3f}); current vs baseline: SNN train "
            f"{e['speedup_train_snn_vs_base']:.3f}x (CPU {e['speedup_train_snn_vs_base_cpu']:.3f}x), "
            f"SNN infer {e['speedup_infer_snn_vs_base']:.3f}x, ANN train {e['speedup_train_ann_vs_base']:.3f}x, "
            f"ANN infer {e['speedup_infer_ann_vs_base']:.3f}x"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
