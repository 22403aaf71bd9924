"""Reliability: exact resume, interruption, crash-safe saving, bad input, safe loading."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dta_ttfs.cli import cli_main
from dta_ttfs.engines import simulate
from dta_ttfs.errors import UserError
from dta_ttfs.models import build_network, network_from_checkpoint
from dta_ttfs.report import main as report_main
from dta_ttfs.stages import SNNStage

ROOT = Path(__file__).resolve().parents[1]
CIFAR_SIZES = ["--data.val_size", "4", "--data.batch_size", "4"]  # the tiny CIFAR has 20 training images
SMALL_ARCH = '{"convs": [8, "M", 16, "M"], "linears": [32], "padding": 1}'


def cfg(name: str) -> str:
    return str(ROOT / "configs" / name)


def flags(data_dir, epochs=1, batches=3, **extra) -> list[str]:
    out = [
        "--data.data_dir", str(data_dir), "--data.download", "false", "--data.val_size", "50",
        "--data.batch_size", "16", "--data.num_workers", "0", "--trainer.max_epochs", str(epochs),
        "--trainer.limit_train_batches", str(batches), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.deterministic", "true",
    ]  # fmt: skip
    for key, value in extra.items():
        out += [f"--{key}", str(value)]
    return out


def tree_hashes(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def run_cli(args, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    return exit_info.value.code, error_lines(capsys)


# ------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("stage", ["ann", "snn"])
def test_resume_at_epoch_boundary_is_exact(stage, tiny_cifar, cifar_no_md5, tmp_path, monkeypatch):
    """CIFAR augmentation (AutoAugment, Cutout) draws from torch's RNG: resume must restore it."""
    config = cfg(f"cifar10/vgg11_{stage}.yaml")
    common = ["--model.arch", SMALL_ARCH, "--data.augment", "true", *CIFAR_SIZES]

    def fit(folder: str, epochs: int, ckpt: str | None = None):
        (tmp_path / folder).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / folder)
        args = ["fit", "-c", config, *flags(tiny_cifar, epochs=epochs, batches=2), *common]
        if stage == "snn":
            args += ["--model.ann_checkpoint", "null"]
        if ckpt:
            args += ["--ckpt_path", ckpt]
        return cli_main(args)

    straight = fit("straight", 2)
    fit("split", 1)
    last = tmp_path / "split/checkpoints" / f"cifar10_custom_{stage}" / "last.ckpt"
    one_epoch = torch.load(last, weights_only=True)["state_dict"]
    resumed = fit("split", 2, str(last))
    assert (resumed.trainer.current_epoch, resumed.trainer.global_step) == (2, 4)
    assert (straight.trainer.current_epoch, straight.trainer.global_step) == (2, 4)
    a, b = straight.model.net.state_dict(), resumed.model.net.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(not torch.equal(one_epoch[f"net.{k}"], a[k]) for k in a)  # the second epoch did change weights


def test_rng_state_is_what_makes_resume_exact(tiny_cifar, cifar_no_md5, tmp_path, monkeypatch):
    """Control: without the RNG states the resumed augmentation differs and so do the weights."""
    from dta_ttfs import callbacks

    monkeypatch.setattr(callbacks.ResumeRNGState, "_restore", lambda self: None)
    config = cfg("cifar10/vgg11_ann.yaml")
    runs = {}
    for folder, epochs, resume in (("straight", 2, False), ("split", 1, False), ("split", 2, True)):
        (tmp_path / folder).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / folder)
        args = ["fit", "-c", config, *flags(tiny_cifar, epochs=epochs, batches=2), "--model.arch", SMALL_ARCH]
        args += CIFAR_SIZES
        if resume:
            args += ["--ckpt_path", str(tmp_path / "split/checkpoints/cifar10_custom_ann/last.ckpt")]
        runs[(folder, epochs)] = cli_main(args)
    a = runs[("straight", 2)].model.net.state_dict()
    b = runs[("split", 2)].model.net.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-6


# ------------------------------------------------------------------ interruption
def _default_signals() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps it ignored; a user's
    # Ctrl-C reaches a foreground process whose SIGINT is not ignored, which is what we test.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli_process(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_signals,
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_epoch_leaves_a_resumable_checkpoint(sig, tiny_mnist, tmp_path):
    args = ["fit", "-c", cfg("mnist/ann.yaml"), *flags(tiny_mnist, epochs=1000, batches=1.0),
            "--data.batch_size", "1", "--trainer.limit_val_batches", "1"]  # fmt: skip
    proc = _cli_process(args, tmp_path)
    try:
        ckpt_dir = tmp_path / "checkpoints/mnist_cnn_ann"
        deadline = time.time() + 300
        while not (ckpt_dir / "last.ckpt").exists() and time.time() < deadline:  # first epoch done
            time.sleep(0.2)
        assert (ckpt_dir / "last.ckpt").exists(), "the first epoch did not finish within 300 s"
        time.sleep(1.0)  # well inside the next epoch (250 steps of batch 1)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a 1000-epoch run behind
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    saved = sorted(ckpt_dir.glob("interrupted-epoch*-step*.ckpt"))
    assert len(saved) == 1, out
    state = torch.load(saved[0], weights_only=True)
    epoch, step = state["epoch"], state["global_step"]
    assert step % 250 != 0  # mid-epoch
    resume = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", "-c", cfg("mnist/ann.yaml"),
         *flags(tiny_mnist, epochs=epoch + 1, batches=1.0), "--data.batch_size", "1",
         "--trainer.limit_val_batches", "1", "--ckpt_path", str(saved[0])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "resuming mid-epoch" in resume.stderr + resume.stdout
    final = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert final["global_step"] == (epoch + 1) * 250  # the interrupted epoch was finished, the count went on


# ------------------------------------------------------------------ crash while saving
CRASH_CHILD = r"""
import sys, torch
from dta_ttfs.callbacks import AtomicCheckpointIO
path, mode = sys.argv[1], sys.argv[2]
io = AtomicCheckpointIO()
i = 0
print("ready", flush=True)
while True:
    state = {"state_dict": {"w": torch.full((8_000_000,), float(i))}, "i": i}
    if mode == "atomic":
        io.save_checkpoint(state, path)
    else:  # control: write straight into place
        torch.save(state, path)
    i += 1
"""


def _kill_while_saving(tmp_path: Path, mode: str, kills: int = 4) -> list[bool]:
    path = tmp_path / mode / "last.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(8_000_000)}, "i": -1}, path)
    results = []
    for k in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), mode], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.7 + 0.23 * k)  # inside the save loop, at a different phase each time
        proc.kill()  # SIGKILL: no cleanup, no handlers
        proc.wait()
        try:
            torch.load(path, weights_only=True)
            results.append(True)
        except Exception:
            results.append(False)
            torch.save({"state_dict": {"w": torch.zeros(8_000_000)}, "i": -1}, path)
    return results


@pytest.mark.slow
def test_kill_9_while_saving_never_truncates_last_ckpt(tmp_path):
    assert all(_kill_while_saving(tmp_path, "atomic"))
    assert not all(_kill_while_saving(tmp_path, "naive", kills=6))  # the check does catch a plain write


# ------------------------------------------------------------------ bad input
@pytest.fixture
def trained(tiny_mnist, tmp_path, monkeypatch):
    """A working folder with an ANN and an SNN checkpoint of ``cnn`` on the tiny MNIST."""
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "-c", cfg("mnist/ann.yaml"), *flags(tiny_mnist)])
    ann = tmp_path / "checkpoints/mnist_cnn_ann/last.ckpt"
    cli_main(["fit", "-c", cfg("mnist/snn.yaml"), *flags(tiny_mnist), "--model.ann_checkpoint", str(ann)])
    return {"dir": tmp_path, "ann": ann, "snn": tmp_path / "checkpoints/mnist_cnn_snn/last.ckpt", "data": tiny_mnist}


def _bad_files(folder: Path, ann: Path) -> dict[str, Path]:
    text = folder / "notes.txt"
    text.write_text("not a checkpoint\n")
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(ann.read_bytes()[: ann.stat().st_size // 2])
    return {"missing": folder / "nowhere.ckpt", "text": text, "truncated": truncated}


def test_bad_input_is_one_line_and_keeps_checkpoints(trained, capsys, tmp_path):
    data, ann, snn = trained["data"], trained["ann"], trained["snn"]
    bad = _bad_files(tmp_path, ann)
    other = SNNStage(num_classes=5)  # a checkpoint of another number of classes
    torch.save({"state_dict": {f"net.{k}": v for k, v in other.net.state_dict().items()}}, tmp_path / "five.ckpt")
    fit_snn = ["fit", "-c", cfg("mnist/snn.yaml"), *flags(data)]
    cases = {
        "unknown dataset": (["fit", "-c", cfg("mnist/ann.yaml"), *flags(data), "--data.dataset", "svhn"], "svhn"),
        "unknown arch": (["fit", "-c", cfg("mnist/ann.yaml"), *flags(data), "--model.arch", "resnet"], "resnet"),
        "malformed spec": (
            ["fit", "-c", cfg("mnist/ann.yaml"), *flags(data), "--model.arch", '{"convs": [16, "X"]}'], "'X'"),
        "dt zero": ([*fit_snn, "--model.dt", "0"], "dt"),
        "dt above one": ([*fit_snn, "--model.dt", "1.5"], "dt"),
        "dt not dividing": ([*fit_snn, "--model.dt", "0.3"], "dt"),
        "unknown engine": ([*fit_snn, "--model.engine", "gpu"], "gpu"),
        "ann missing": ([*fit_snn, "--model.ann_checkpoint", str(bad["missing"])], "does not exist"),
        "ann not a checkpoint": ([*fit_snn, "--model.ann_checkpoint", str(bad["text"])], "not a readable"),
        "ann truncated": ([*fit_snn, "--model.ann_checkpoint", str(bad["truncated"])], "truncated"),
        "ann other arch": ([*fit_snn, "--model.ann_checkpoint", str(ann), "--model.arch", SMALL_ARCH], "vs model"),
        "ann other classes": ([*fit_snn, "--model.ann_checkpoint", str(tmp_path / "five.ckpt")], "(5, 128)"),
        "ckpt_path truncated": (["test", "-c", cfg("mnist/snn.yaml"), *flags(data), "--ckpt_path",
                                 str(bad["truncated"])], "truncated"),
        "nan loss": (["fit", "-c", cfg("mnist/ann.yaml"), *flags(data), "--model.optimizer.lr", "1e37"],
                     "epoch 0, step"),
    }  # fmt: skip
    before = tree_hashes(trained["dir"] / "checkpoints")
    for name, (args, expected) in cases.items():
        code, lines = run_cli(args, capsys)
        assert code == 2, name
        assert len(lines) == 1 and expected in lines[0], (name, lines)
        assert tree_hashes(trained["dir"] / "checkpoints") == before, name
    assert torch.load(snn, weights_only=True)["state_dict"]


def test_predict_on_wrong_images_is_refused(trained, capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (32, 32)).save(folder / "big.png")
    code, lines = run_cli(
        ["predict", "-c", cfg("mnist/snn.yaml"), *flags(trained["data"]), "--data.predict_dir", str(folder),
         "--ckpt_path", str(trained["snn"])], capsys)  # fmt: skip
    assert code == 2 and len(lines) == 1 and "big.png" in lines[0]


# ------------------------------------------------------------------ safe loading
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickles_are_refused_everywhere(trained, capsys, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"arch": "cnn"}, "x": _Payload(marker)}, evil)
    data = trained["data"]
    for args in (
        ["test", "-c", cfg("mnist/snn.yaml"), *flags(data), "--ckpt_path", str(evil)],
        ["fit", "-c", cfg("mnist/snn.yaml"), *flags(data), "--model.ann_checkpoint", str(evil)],
    ):
        code, lines = run_cli(args, capsys)
        assert code == 2 and len(lines) == 1 and "refusing to load" in lines[0]
    with pytest.raises(UserError, match="refusing"):
        simulate(str(evil), torch.rand(1, 1, 28, 28), engine="event")
    with pytest.raises(UserError, match="refusing"):
        network_from_checkpoint(str(evil))
    assert report_main([str(evil), "--out", str(tmp_path / "report"), "--no-download"]) == 2
    assert "refusing to load" in capsys.readouterr().err
    with pytest.raises(UserError, match="refusing"):
        SNNStage(ann_checkpoint=str(evil)).load_ann_checkpoint()
    assert not marker.exists()
    # and a genuine checkpoint still loads through the same entry points
    net = network_from_checkpoint(str(trained["snn"]))
    assert isinstance(net, type(build_network("cnn")))
