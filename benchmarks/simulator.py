"""Benchmark of the time-stepped simulator against the exact event engine (method.md section 9).

For a checkpoint (``--checkpoint``) or Kaiming-random weights of ``--arch`` networks, and each
``dt`` of ``--dts``, it measures on ``--samples`` inputs: agreement of the stepwise predictions
with the event engine, mean and max |logit difference|, time per sample, and peak memory
above the process's idle baseline. Every run happens in a fresh subprocess of this script,
because the peak resident memory (``ru_maxrss``) can only grow during a process's life.

Inputs are uniform random images in [0, 1], or MNIST test images when ``--data-dir`` is given
and the network takes 1x28x28 images. Writes JSON (``--out``) and a PNG beside it.

    python benchmarks/simulator.py --quick
    python benchmarks/simulator.py --checkpoint checkpoints/snn.ckpt --data-dir /path/with/MNIST
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

from dta_ttfs import engines
from dta_ttfs.errors import UserError
from dta_ttfs.models import build_network, network_from_checkpoint

RANDOM_INPUT_SHAPES = {"cnn": (1, 28), "vgg11": (3, 32), "vgg16": (3, 32)}  # (channels, size)
DEFAULT_DTS = ("1/8", "1/16", "1/32", "1/64", "1/128", "1/256")
QUICK_DTS = ("1/8", "1/16", "1/32")


def parse_dt(text: str) -> float:
    """``"1/64"`` or ``"0.015625"`` -> 0.015625 (validated by :func:`engines.check_dt`)."""
    try:
        dt = float(Fraction(text))
        engines.check_dt(dt)
    except (ValueError, ZeroDivisionError) as exc:  # UserError is a ValueError
        message = str(exc) if isinstance(exc, UserError) else f"dt {text!r} is not a number; write it as 1/64"
        raise argparse.ArgumentTypeError(message) from None
    return dt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--checkpoint", help="dta-ttfs SNN checkpoint (else random weights of --arch)")
    parser.add_argument(
        "--arch",
        nargs="+",
        default=["cnn", "vgg11"],
        choices=sorted(RANDOM_INPUT_SHAPES),
        help="architectures with random weights (ignored with --checkpoint)",
    )
    parser.add_argument(
        "--dts", nargs="+", type=parse_dt, default=None, help="time steps, e.g. 1/8 1/64 (default 1/8 .. 1/256)"
    )
    parser.add_argument("--samples", type=int, default=64, help="number of inputs (default 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per engine call (default 32)")
    parser.add_argument("--data-dir", help="folder holding MNIST/raw: MNIST test images for 1x28x28 networks")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and random images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: steadier timings)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per run; the fastest counts (default 1)")
    parser.add_argument("--out", default="benchmarks/results/simulator.json", help="JSON path; the PNG goes beside it")
    parser.add_argument("--quick", action="store_true", help="small run: 8 samples, dt in 1/8, 1/16, 1/32")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measured run (JSON job)
    return parser


# --------------------------------------------------------------------------- one run (subprocess)
def load_model(job: dict) -> torch.nn.Module:
    if job.get("checkpoint"):
        return network_from_checkpoint(job["checkpoint"], kind="snn")
    channels, size = RANDOM_INPUT_SHAPES[job["arch"]]
    torch.manual_seed(job["seed"])
    return build_network(job["arch"], "snn", channels, size, 10)


def load_inputs(job: dict, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """``(images, labels or None, description)`` for the network's input shape."""
    if job.get("data_dir") and tuple(input_shape) == (1, 28, 28):
        from torchvision.datasets import MNIST

        test = MNIST(job["data_dir"], train=False, download=False)
        images = test.data[: job["samples"]].float()[:, None] / 255  # (N, 1, 28, 28) in [0, 1]
        return images, test.targets[: job["samples"]], "MNIST test"
    generator = torch.Generator().manual_seed(job["seed"] + 1)
    return torch.rand(job["samples"], *input_shape, generator=generator), None, "uniform [0, 1]"


def check_mnist(root: str) -> None:
    from torchvision.datasets import MNIST

    try:
        MNIST(root, train=False, download=False)
    except RuntimeError:
        raise UserError(f"no MNIST test set under {root!r}: --data-dir must hold MNIST/raw/t10k-*-ubyte") from None


def resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def compact(output: engines.EngineOutput) -> dict:
    """The per-sample numbers the benchmark keeps (not the spike times: memory would pile up)."""
    return {
        "logits": output.logits,
        "first_spike": output.first_spike,
        "sops": output.sops,
        "spikes": output.spikes_per_layer.sum(1),  # (B,) spikes of all neuron layers
    }


@torch.no_grad()
def measure(job: dict) -> dict:
    """Run one engine on all inputs; save its outputs to ``job["outputs"]``; return time and memory.

    Memory is the peak RSS of this process minus its RSS just before the timed passes.
    """
    torch.set_num_threads(job["threads"])
    model = load_model(job)
    images, labels, description = load_inputs(job, model.input_shape)
    warm = engines.run(model, images[:1], job["engine"], 1 / 2)  # lazy kernels, thread pools
    neurons = sum(t[0].numel() for t in warm.spike_times)
    baseline = resident_bytes()
    seconds = math.inf
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        rows = [compact(engines.run(model, b, job["engine"], job["dt"])) for b in images.split(job["batch_size"])]
        seconds = min(seconds, time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    saved = {key: None if rows[0][key] is None else torch.cat([r[key] for r in rows]) for key in rows[0]}
    torch.save({**saved, "labels": labels}, job["outputs"])
    return {
        "inputs": description,
        "time_per_sample_ms": 1000 * seconds / len(images),
        "peak_memory_mib": None if baseline is None else (peak - baseline) / 2**20,
        "neurons": neurons,
    }


def run_in_subprocess(job: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"run {job['engine']} dt={job['dt']} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmark
def summarize(outputs: dict, reference: dict, measured: dict) -> dict:
    diff = (outputs["logits"] - reference["logits"]).abs()  # (N, K)
    predictions = outputs["logits"].argmax(1)
    row = {
        **measured,
        "agreement": (predictions == reference["logits"].argmax(1)).double().mean().item(),
        "logit_diff_mean": diff.mean().item(),
        "logit_diff_max": diff.max().item(),
        "sops_mean": outputs["sops"].double().mean().item(),
        "spikes_per_neuron": outputs["spikes"].double().mean().item() / measured["neurons"],
    }
    if outputs["first_spike"] is not None:
        row["first_spike_agreement"] = (outputs["first_spike"] == reference["logits"].argmax(1)).double().mean().item()
    if outputs["labels"] is not None:
        row["accuracy"] = (predictions == outputs["labels"]).double().mean().item()
        if outputs["first_spike"] is not None:
            row["accuracy_first_spike"] = (outputs["first_spike"] == outputs["labels"]).double().mean().item()
    return row


def benchmark_model(name: str, base_job: dict, dts: list[float], workdir: str) -> dict:
    def job(engine: str, dt: float) -> dict:
        path = os.path.join(workdir, f"{name}-{engine}-{dt}.pt")
        return {**base_job, "engine": engine, "dt": dt, "outputs": path}

    event_job = job("event", 1.0)
    event_measured = run_in_subprocess(event_job)
    reference = torch.load(event_job["outputs"], weights_only=True)
    result = {"model": name, "inputs": event_measured["inputs"], "samples": base_job["samples"]}
    result["event"] = summarize(reference, reference, event_measured)
    result["stepwise"] = []
    for dt in dts:
        step_job = job("stepwise", dt)
        measured = run_in_subprocess(step_job)
        row = summarize(torch.load(step_job["outputs"], weights_only=True), reference, measured)
        result["stepwise"].append({"dt": dt, "n": engines.check_dt(dt), **row})
        print(
            f"{name:>18}  dt=1/{engines.check_dt(dt):<4} agreement {row['agreement']:.4f}  "
            f"|dlogit| mean {row['logit_diff_mean']:.4f} max {row['logit_diff_max']:.4f}  "
            f"{row['time_per_sample_ms']:.1f} ms/sample  {row['peak_memory_mib']:.1f} MiB",
            flush=True,
        )
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_agree, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        rows = result["stepwise"]
        dts = [r["dt"] for r in rows]
        ax_agree.plot(dts, [100 * r["agreement"] for r in rows], "o-", label=result["model"])
        line = ax_time.plot(dts, [r["time_per_sample_ms"] for r in rows], "o-", label=f"{result['model']} stepwise")
        ax_time.axhline(result["event"]["time_per_sample_ms"], ls="--", color=line[0].get_color(), label="event")
    for ax in (ax_agree, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("dt (window = 1)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_agree.set_ylabel("agreement with the event engine (%)")
    ax_time.set_yscale("log")
    ax_time.set_ylabel("time per sample (ms)")
    fig.suptitle("time-stepped simulation vs exact spike times")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return None
    if min(args.samples, args.batch_size, args.threads, args.repeats) < 1:
        raise SystemExit("error: --samples, --batch-size, --threads and --repeats must be >= 1")
    samples = min(args.samples, 8) if args.quick else args.samples
    dts = args.dts or [parse_dt(d) for d in (QUICK_DTS if args.quick else DEFAULT_DTS)]
    common = {
        "samples": samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "data_dir": args.data_dir,
        "threads": args.threads,
        "repeats": args.repeats,
    }
    if args.data_dir:
        check_mnist(args.data_dir)
    if args.checkpoint:
        network_from_checkpoint(args.checkpoint)  # fail early, with the one-line error, on a bad file
        models = {Path(args.checkpoint).stem: {**common, "checkpoint": os.path.abspath(args.checkpoint)}}
    else:
        models = {f"{arch} (random)": {**common, "arch": arch} for arch in args.arch}
    with tempfile.TemporaryDirectory() as workdir:
        results = [benchmark_model(name, job, dts, workdir) for name, job in models.items()]
    report = {
        "config": {
            **{k: v for k, v in vars(args).items() if k != "worker"},
            "samples": samples,
            "dts": dts,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),  # other processes skew the timings
        },
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # one line, no traceback, status 2 (as the project's CLI does)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
