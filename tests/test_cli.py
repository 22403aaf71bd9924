"""The Lightning product end to end: configs, fit, hand-off, test, resume, errors."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dta_ttfs.cli import TTFSCLI, cli_main
from dta_ttfs.errors import UserError
from dta_ttfs.stages import ANNStage, SNNStage

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    "cifar10/vgg11_ann.yaml",
    "cifar10/vgg11_snn.yaml",
    "cifar10/vgg16_ann.yaml",
    "cifar10/vgg16_snn.yaml",
    "cifar100/vgg16_ann.yaml",
    "cifar100/vgg16_snn.yaml",
    "fashion_mnist/ann.yaml",
    "fashion_mnist/snn.yaml",
    "mnist/ann.yaml",
    "mnist/snn.yaml",
]
TRAIN_BATCHES = 4


def cfg(name: str) -> str:
    return str(ROOT / "configs" / name)


def tiny_flags(data_dir: Path, epochs: int = 1) -> list[str]:
    return [
        "--data.data_dir", str(data_dir),
        "--data.download", "false",
        "--data.val_size", "50",
        "--data.batch_size", "32",
        "--trainer.max_epochs", str(epochs),
        "--trainer.limit_train_batches", str(TRAIN_BATCHES),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def error_lines(capsys) -> list[str]:
    """The ``error:`` lines of stderr; also checks that no traceback was printed."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def pipeline(tiny_mnist, tmp_path_factory):
    """ANN fit, then SNN fit from its checkpoint, in a fresh working folder."""
    work = tmp_path_factory.mktemp("work")
    old = os.getcwd()
    os.chdir(work)
    try:
        ann = cli_main(["fit", "-c", cfg("mnist/ann.yaml"), *tiny_flags(tiny_mnist)])
        ann_ckpt = work / "checkpoints/mnist_cnn_ann/last.ckpt"
        snn = cli_main(
            ["fit", "-c", cfg("mnist/snn.yaml"), *tiny_flags(tiny_mnist), "--model.ann_checkpoint", str(ann_ckpt)]
        )
        yield {"work": work, "ann": ann, "snn": snn, "ann_ckpt": ann_ckpt, "data": tiny_mnist}
    finally:
        os.chdir(old)


@pytest.fixture
def in_work(pipeline):
    old = os.getcwd()
    os.chdir(pipeline["work"])
    yield pipeline
    os.chdir(old)


def test_exactly_the_ten_configs():
    found = sorted(str(Path(p).relative_to(ROOT / "configs")) for p in glob.glob(str(ROOT / "configs/**/*.yaml")))
    assert found == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_instantiates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = TTFSCLI(args=["-c", cfg(name), "--data.download", "false"], run=False)
    expected = SNNStage if name.endswith("snn.yaml") else ANNStage
    assert type(cli.model) is expected
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    assert cli.model.net.blocks[-1].out_features == (100 if "cifar100" in name else 10)
    if "cifar" in name:
        assert cli.datamodule.hparams.batch_size == 256 and cli.trainer.max_epochs in (200, 300)


@pytest.mark.parametrize("name", ["mnist/snn.yaml", "cifar10/vgg16_ann.yaml"])
def test_print_config_round_trips(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "-c", cfg(name), "--print_config"])
    assert exit_info.value.code in (0, None)
    first = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(first)
    with pytest.raises(SystemExit):
        cli_main(["fit", "-c", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == first
    assert "class_path: dta_ttfs.stages" in first


def test_fit_writes_checkpoints_and_curves(pipeline):
    work, snn = pipeline["work"], pipeline["snn"]
    assert pipeline["ann_ckpt"].is_file()
    assert (work / "checkpoints/mnist_cnn_snn/last.ckpt").is_file()
    for path in glob.glob(str(work / "checkpoints/**/*.ckpt"), recursive=True):
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        assert "state_dict" in ckpt and all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())
    log_dir = snn.trainer.logger.log_dir
    assert Path(log_dir).parent.name == "mnist_cnn_snn"
    # the SNN validated the handed-over weights before the first training step (step 0)
    steps = [s for s, _ in scalars(log_dir, "val/acc")]
    assert len(steps) == 2 and steps[0] == 0 and steps[-1] == TRAIN_BATCHES - 1  # Lightning logs at step - 1
    for tag in ("train/loss", "train/acc", "val/loss", "val/spikes_per_neuron", "train/spikes_per_neuron"):
        assert scalars(log_dir, tag), tag


def test_handoff_copies_the_ann_weights(pipeline):
    ann_state = torch.load(pipeline["ann_ckpt"], weights_only=True)["state_dict"]
    snn = SNNStage(ann_checkpoint=str(pipeline["ann_ckpt"]))
    snn.load_ann_checkpoint()
    for key, value in snn.net.state_dict().items():
        assert torch.equal(value, ann_state[f"net.{key}"])


def test_handoff_from_plain_state_dict_by_order(pipeline, tmp_path):
    ann_state = torch.load(pipeline["ann_ckpt"], weights_only=True)["state_dict"]
    renamed = {f"features.{i}.weight": v for i, v in enumerate(ann_state.values())}
    torch.save(renamed, tmp_path / "authors.pth")
    snn = SNNStage(ann_checkpoint=str(tmp_path / "authors.pth"))
    snn.load_ann_checkpoint()
    assert all(torch.equal(a, b) for a, b in zip(snn.net.state_dict().values(), ann_state.values()))
    bad = dict(renamed)
    bad["features.0.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="features.0.weight"):
        SNNStage(ann_checkpoint=str(tmp_path / "bad.pth")).load_ann_checkpoint()
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="dict of tensors"):
        SNNStage(ann_checkpoint=str(tmp_path / "list.pth")).load_ann_checkpoint()


def test_handoff_architecture_mismatch_lists_names_and_shapes(in_work, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", "-c", cfg("mnist/snn.yaml"), *tiny_flags(in_work["data"]),
             "--model.ann_checkpoint", str(in_work["ann_ckpt"]),
             "--model.arch", '{"convs": [8, "M", 32, "M"], "linears": [64], "padding": 0}']
        )  # fmt: skip
    assert exit_info.value.code == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: ANN checkpoint")
    assert "blocks.0.weight: checkpoint (16, 1, 3, 3) vs model (8, 1, 3, 3)" in err[0]


def test_test_and_resume_do_not_need_the_ann_file(in_work):
    work = in_work["work"]
    moved = work / "ann_moved.ckpt"
    shutil.move(in_work["ann_ckpt"], moved)
    try:
        snn_last = str(work / "checkpoints/mnist_cnn_snn/last.ckpt")
        tested = cli_main(["test", "-c", cfg("mnist/snn.yaml"), *tiny_flags(in_work["data"]), "--ckpt_path", snn_last])
        assert 0.0 <= tested.trainer.callback_metrics["test/acc"] <= 1.0
        assert "test/spikes_per_neuron" in tested.trainer.callback_metrics
        first_log_dir = in_work["snn"].trainer.logger.log_dir
        resumed = cli_main(
            ["fit", "-c", cfg("mnist/snn.yaml"), *tiny_flags(in_work["data"], epochs=2), "--ckpt_path", snn_last]
        )
        assert resumed.trainer.current_epoch == 2
        assert resumed.trainer.global_step == 2 * TRAIN_BATCHES
        assert resumed.trainer.logger.log_dir == first_log_dir  # the same TensorBoard run continues
        assert [s for s, _ in scalars(first_log_dir, "val/acc")][-1] == 2 * TRAIN_BATCHES - 1
    finally:
        shutil.move(moved, in_work["ann_ckpt"])


def test_command_line_wins_over_checkpoint_hparams(in_work):
    snn_last = str(in_work["work"] / "checkpoints/mnist_cnn_snn/last.ckpt")
    saved = torch.load(snn_last, weights_only=True)["hyper_parameters"]
    assert saved["engine"] == "proxy" and saved["dt"] == 0.015625
    cli = cli_main(
        ["test", "-c", cfg("mnist/snn.yaml"), *tiny_flags(in_work["data"]), "--ckpt_path", snn_last,
         "--model.engine", "stepwise", "--model.dt", "0.03125"]
    )  # fmt: skip
    assert cli.model.engine == "stepwise" and cli.model.dt == 0.03125
    metrics = cli.trainer.callback_metrics
    # only a non-proxy engine logs agreement and first-spike accuracy: the stepwise engine ran
    assert "test/agreement" in metrics and "test/acc_first_spike" in metrics
    assert metrics["test/latency"] == pytest.approx(3.0)  # potential readout after L = 3 windows


def test_missing_data_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "-c", cfg("mnist/ann.yaml"), *tiny_flags(tmp_path / "empty")])
    assert exit_info.value.code == 2
    err = error_lines(capsys)
    assert len(err) == 1, err
    assert "mnist" in err[0] and str(tmp_path / "empty") in err[0] and "--data.data_dir" in err[0]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_mnist_ann_config_on_real_mnist(real_data_dir, tmp_path, monkeypatch):
    """The MNIST ANN recipe reaches >= 95 % validation accuracy within one epoch of real MNIST."""
    monkeypatch.chdir(tmp_path)
    cli = cli_main(
        ["fit", "-c", cfg("mnist/ann.yaml"), "--data.data_dir", str(real_data_dir), "--data.download", "false",
         "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    assert cli.trainer.callback_metrics["val/acc"] >= 0.95


def test_logged_val_acc_equals_an_independent_validation(in_work):
    """The accuracy logged during fit is the validation set's alone (no training samples mixed in)."""
    fit_log = in_work["ann"].trainer.logger.log_dir
    logged = scalars(fit_log, "val/acc")[-1][1]
    ann_last = str(in_work["ann_ckpt"])
    again = cli_main(["validate", "-c", cfg("mnist/ann.yaml"), *tiny_flags(in_work["data"]), "--ckpt_path", ann_last])
    assert abs(again.trainer.callback_metrics["val/acc"].item() - logged) <= 1e-6
    assert again.model.acc["train"]["train/acc"] is not again.model.acc["val"]["val/acc"]


def test_predict_writes_one_csv_row_per_sample(in_work, tmp_path):
    import csv

    from PIL import Image

    from dta_ttfs.engines import simulate

    snn_last = str(in_work["work"] / "checkpoints/mnist_cnn_snn/last.ckpt")
    folder = tmp_path / "digits"
    folder.mkdir()
    images = torch.rand(5, 28, 28)
    for i, img in enumerate(images):
        Image.fromarray((img * 255).round().byte().numpy(), mode="L").save(folder / f"digit{i}.png")
    cli = cli_main(
        ["predict", "-c", cfg("mnist/snn.yaml"), *tiny_flags(in_work["data"]), "--ckpt_path", snn_last,
         "--model.engine", "stepwise", "--data.predict_dir", str(folder)]
    )  # fmt: skip
    path = Path(cli.trainer.log_dir) / "predictions.csv"
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["sample"] for r in rows] == [f"digit{i}.png" for i in range(5)]
    x = ((images * 255).round() / 255).unsqueeze(1)  # what the PNG files hold
    expected = simulate(snn_last, x, engine="stepwise", dt=1 / 64)
    assert [int(r["prediction"]) for r in rows] == expected.predictions.tolist()
    assert [int(r["sops"]) for r in rows] == expected.sops.tolist()
    assert {"spikes", "latency", "energy_uj", "prediction_first_spike"} <= set(rows[0])
