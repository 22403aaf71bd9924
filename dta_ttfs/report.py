"""A report for an SNN checkpoint: ``python -m dta_ttfs.report C_snn --out DIR``.

Evaluates the test split with each engine and writes ``DIR/report.md`` (accuracy per
engine, agreement with the proxy, spikes per neuron, SOPs, energy against the ANN,
latency) and PNG figures (fire rate by depth, spike-time histograms, a raster and the
spike-time maps of one test sample). The data options default as in the CLI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dta_ttfs import engines, figures
from dta_ttfs.data import TTFSDataModule
from dta_ttfs.errors import UserError
from dta_ttfs.metrics import SpikeStats
from dta_ttfs.models import network_from_checkpoint
from dta_ttfs.serialization import safe_load


@torch.no_grad()
def evaluate(net, loader, engine: str, dt: float, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Accuracy and deployment statistics of one engine over ``loader`` (labels required)."""
    stats = SpikeStats(len(net.neuron_layers()))
    totals = {"samples": 0, "correct": 0, "agree": 0, "sops": 0, "latency": 0.0, "energy_uj": 0.0, "first": 0}
    label = f"{engine}" + (f" dt=1/{round(1 / dt)}" if engine == "stepwise" else "")
    for x, y in tqdm(loader, desc=label, disable=not progress, leave=False):
        if limit is not None and totals["samples"] >= limit:
            break
        if limit is not None:
            x, y = x[: limit - totals["samples"]], y[: limit - totals["samples"]]
        out = engines.run(net, x, engine, dt)
        proxy = out.predictions if engine == "proxy" else net(x).argmax(1)
        stats.update(out.spike_times)
        totals["samples"] += len(y)
        totals["correct"] += int((out.predictions == y).sum())
        totals["agree"] += int((out.predictions == proxy).sum())
        totals["sops"] += int(out.sops.sum())
        totals["latency"] += float(out.latency.sum())
        totals["energy_uj"] += float(engines.energy_uj(net, out).sum())
        if out.first_spike is not None:
            totals["first"] += int((out.first_spike == y).sum())
    n = max(totals["samples"], 1)
    spikes = stats.compute()
    result = {
        "engine": engine,
        "dt": dt if engine == "stepwise" else None,
        "samples": totals["samples"],
        "acc": totals["correct"] / n,
        "agreement": totals["agree"] / n,
        "spikes_per_neuron": float(spikes["spikes_per_neuron"]),
        "fire_rate": [float(r) for r in spikes["fire_rate"]],
        "spike_time": [float(t) for t in spikes["spike_time"]],
        "hist": spikes["hist"].tolist(),
        "sops": totals["sops"] / n,
        "latency": totals["latency"] / n,
        "energy_uj": totals["energy_uj"] / n,
        "energy_ratio": totals["energy_uj"] / n / engines.ann_energy_uj(net),
    }
    if engine == "stepwise":
        result["acc_first_spike"] = totals["first"] / n
    return result


def _markdown(ckpt: str, hp: dict, data: dict, results: list[dict], neurons: int, ann_uj: float) -> str:
    arch = hp.get("arch")
    lines = [
        f"# DTA-TTFS report: `{Path(ckpt).name}`",
        "",
        f"- checkpoint: `{ckpt}`",
        f"- architecture: `{json.dumps(arch) if isinstance(arch, dict) else arch}`, {hp.get('num_classes')} classes,"
        f" {neurons:,} spiking neurons per sample",
        f"- data: {data['dataset']} test split, {results[0]['samples']:,} samples",
        f"- ANN of the same shape: {ann_uj:.3f} uJ per sample (4.6 pJ per MAC); SNN: 0.9 pJ per SOP, "
        "4.6 pJ per MAC of the encoding layer",
        f"- written {datetime.date.today().isoformat()} by `python -m dta_ttfs.report`",
        "",
        "| engine | accuracy | agreement with proxy | spikes / neuron | SOPs / sample | energy / sample (uJ) "
        "| energy vs ANN | latency (windows) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        name = r["engine"] + (f" (dt = 1/{round(1 / r['dt'])})" if r["dt"] else "")
        lines.append(
            f"| {name} | {100 * r['acc']:.2f} % | {100 * r['agreement']:.2f} % | {r['spikes_per_neuron']:.4f} "
            f"| {r['sops']:,.0f} | {r['energy_uj']:.3f} | {r['energy_ratio']:.3f} | {r['latency']:.2f} |"
        )
    for r in results:
        if "acc_first_spike" in r:
            lines += ["", f"First-spike decoding (stepwise): {100 * r['acc_first_spike']:.2f} % accuracy."]
    lines += [
        "",
        "Per layer (" + results[0]["engine"] + "):",
        "",
        "| layer | fire rate | mean spike time |",
        "|---|---|---|",
    ]
    for name, rate, time in zip(data["layers"], results[0]["fire_rate"], results[0]["spike_time"]):
        lines.append(f"| {name} | {rate:.4f} | {time:.4f} |")
    lines += [
        "",
        "![fire rate](fire_rate.png)",
        "![spike-time histograms](spike_time_histograms.png)",
        "![raster](raster.png)",
        "![spike-time maps](spike_time_maps.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    checkpoint: str,
    out: str,
    data_dir: str | None = None,
    download: bool = True,
    engines_: tuple[str, ...] = ("proxy", "event", "stepwise"),
    dt: float = 1 / 64,
    batch_size: int = 256,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` and write ``report.md``, ``results.json`` and PNGs into ``out``."""
    for engine in engines_:
        engines.check_engine(engine)
    engines.check_dt(dt)
    ckpt = safe_load(checkpoint)
    net = network_from_checkpoint(checkpoint, kind="snn")
    net.eval()
    hp = dict(ckpt.get("hyper_parameters") or {})
    dm_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    dataset = dm_hp.get("dataset")
    if dataset is None:
        raise UserError(f"{checkpoint!r} does not say which dataset it was trained on (no datamodule hyper-parameters)")
    dm = TTFSDataModule(dataset=dataset, data_dir=data_dir, download=download, eval_batch_size=batch_size)
    dm.prepare_data()
    dm.setup("test")
    loader = dm.test_dataloader()
    results = [evaluate(net, loader, e, dt, limit, progress) for e in engines_]

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in net.neuron_layers()]
    first = results[0]
    x0 = dm.test_set[0][0].unsqueeze(0)
    sample = [t[0] for t in engines.run(net, x0, "event").spike_times]
    plots = {
        "fire_rate.png": figures.fire_rate_by_depth(names, first["fire_rate"], f"fire rate by depth ({dataset} test)"),
        "spike_time_histograms.png": figures.spike_time_histograms(names, torch.tensor(first["hist"])),
        "raster.png": figures.raster(sample, names, "spike raster of test sample 0 (event engine)"),
        "spike_time_maps.png": figures.spike_time_maps(sample, names, "test sample 0 (event engine)"),
    }
    for filename, fig in plots.items():
        fig.savefig(out_dir / filename, dpi=110)
        figures.plt.close(fig)
    neurons = sum(t.numel() for t in sample)
    data = {"dataset": dataset, "layers": names}
    (out_dir / "report.md").write_text(_markdown(checkpoint, hp, data, results, neurons, engines.ann_energy_uj(net)))
    summary = {"checkpoint": os.fspath(checkpoint), "dataset": dataset, "layers": names, "results": results}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dta_ttfs.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an SNN checkpoint (.ckpt) written by `cli.py fit`")
    parser.add_argument("--out", required=True, help="folder for report.md, results.json and the PNGs")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $DTA_TTFS_DATA, else data/)")
    parser.add_argument("--no-download", action="store_true", help="never download the dataset")
    parser.add_argument("--engines", nargs="+", default=["proxy", "event", "stepwise"])
    parser.add_argument("--dt", type=float, default=1 / 64, help="stepwise time step, 1/n (default 1/64)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N test samples")
    args = parser.parse_args(argv)
    try:
        summary = write_report(
            args.checkpoint, args.out, args.data_dir, not args.no_download, tuple(args.engines), args.dt,
            args.batch_size, args.limit,
        )  # fmt: skip
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in summary["results"]:
        print(f"{r['engine']:>8}: acc {100 * r['acc']:.2f} %  agreement {100 * r['agreement']:.2f} %")
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
