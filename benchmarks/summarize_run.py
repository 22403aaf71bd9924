"""Summarize one end-to-end run (ANN fit, SNN fit, tests) from its logs and checkpoints.

    python benchmarks/summarize_run.py RUN_DIR --dataset mnist --out docs/results/mnist

RUN_DIR is the working folder of the run (it holds ``logs/`` and ``checkpoints/``). Writes
``summary.json`` (test accuracy per engine, agreement, spikes per neuron, SOPs, energy,
latency, the ANN weights' accuracy as an SNN before fine-tuning, timings if present) and
``curves.png`` (validation accuracy and spikes per neuron per epoch, both stages).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from dta_ttfs.data import TTFSDataModule  # noqa: E402
from dta_ttfs.report import evaluate  # noqa: E402
from dta_ttfs.serialization import safe_load  # noqa: E402
from dta_ttfs.stages import SNNStage  # noqa: E402


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--arch", default="cnn", help="the architecture's name in the run's folder names")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    name = f"{args.dataset}_{args.arch}"
    logs = {stage: sorted((args.run_dir / "logs" / f"{name}_{stage}").glob("version_*")) for stage in ("ann", "snn")}
    fit = {stage: scalars(dirs[0]) for stage, dirs in logs.items()}  # version_0: the fit
    tests = {}
    for stage, dirs in logs.items():
        for d in dirs[1:]:
            s = scalars(d)
            if "test/acc" not in s:
                continue
            engine = "proxy" if stage == "snn" and "test/agreement" not in s else None
            if engine is None and stage == "snn":
                engine = "stepwise" if "test/acc_first_spike" in s else "event"
            key = f"{stage}_{engine}" if engine else stage
            tests[key] = {tag.split("/", 1)[1]: v[-1][1] for tag, v in s.items() if tag.startswith("test/")}

    # the ANN weights as an SNN, before fine-tuning, on the test split (proxy = event decisions)
    ann_ckpt = args.run_dir / f"checkpoints/{name}_ann/last.ckpt"
    arch = safe_load(ann_ckpt)["hyper_parameters"]["arch"]  # a name or a custom spec
    snn = SNNStage(arch=arch, ann_checkpoint=str(ann_ckpt))
    snn.load_ann_checkpoint()
    dm = TTFSDataModule(dataset=args.dataset, data_dir=args.data_dir, download=False, eval_batch_size=500)
    dm.setup("test")
    before = evaluate(snn.net.eval(), dm.test_dataloader(), "proxy", 1 / 64, progress=False)

    timings = {}
    for name in ("timings.json", "timings_snn.json"):  # timings_snn.json: a later SNN-only rerun
        if (args.run_dir / name).exists():
            timings.update(json.loads((args.run_dir / name).read_text()))
    summary = {
        "dataset": args.dataset,
        "arch": args.arch,
        "ann_test_acc": tests.get("ann", {}).get("acc"),
        "ann_weights_as_snn_test_acc": before["acc"],
        "ann_weights_as_snn_val_acc_step0": fit["snn"]["val/acc"][0][1],
        "snn_test": {k[4:]: v for k, v in tests.items() if k.startswith("snn_")},
        "best_val_acc": {stage: max(v for _, v in fit[stage]["val/acc"]) for stage in fit},
        "epochs": {stage: len(fit[stage].get("epoch", [])) and int(max(v for _, v in fit[stage]["epoch"])) + 1
                   for stage in fit},
        "timings_s": timings or None,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for stage, style in (("ann", "o-"), ("snn", "s-")):
        acc = fit[stage]["val/acc"]
        axes[0].plot(range(len(acc)) if stage == "ann" else range(-1, len(acc) - 1), [100 * v for _, v in acc],
                     style, ms=3, label=f"{stage.upper()} stage")  # fmt: skip
    axes[0].set_xlabel("epoch (SNN: -1 = ANN weights before fine-tuning)")
    axes[0].set_ylabel("validation accuracy (%)")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    spn = fit["snn"]["val/spikes_per_neuron"]
    axes[1].plot(range(-1, len(spn) - 1), [v for _, v in spn], "s-", ms=3, color="C1")
    axes[1].set_xlabel("SNN epoch (-1 = before fine-tuning)")
    axes[1].set_ylabel("spikes per neuron (validation)")
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"{args.dataset}, {args.arch}")
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=110)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
