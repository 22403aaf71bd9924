"""Tests of the inference engines (method.md sections 4, 6 and 9)."""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pattern_images

from dta_ttfs import engines
from dta_ttfs.errors import UserError
from dta_ttfs.functional import dta_spike_time
from dta_ttfs.layers import DTAConv, DTALinear, Readout
from dta_ttfs.models import build_network

TESTS_DIR = Path(__file__).resolve().parent


def _images(shape, batch, seed=0):
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _random_net(arch="cnn", in_channels=1, image_size=28, seed=0):
    torch.manual_seed(seed)
    return build_network(arch, "snn", in_channels, image_size, 10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The stepwise loop runs many small tensor ops; on a busy shared CPU two torch threads wait
    for each other at every op (40x slower seen here). One thread here, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_cnn():
    """A Kaiming-random ``cnn`` SNN, 64 uniform images and its event-engine output (read-only)."""
    model = _random_net("cnn")
    x = _images((1, 28, 28), 64)
    return model, x, engines.run(model, x, "event")


# --------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("engine", engines.ENGINES)
def test_check_engine_accepts_known(engine):
    assert engines.check_engine(engine) == engine


def test_unknown_engine_refused():
    with pytest.raises(UserError, match="unknown engine 'exact'.*'proxy', 'event', 'stepwise'"):
        engines.check_engine("exact")
    model = _random_net("cnn")
    with pytest.raises(UserError, match="unknown engine"):
        engines.run(model, _images((1, 28, 28), 1), engine="timestep")


@pytest.mark.parametrize("dt, n", [(1 / 64, 64), (1, 1), (0.5, 2), (0.015625, 64), (1 / 3, 3), (1 / 1024, 1024)])
def test_check_dt_accepts_whole_steps(dt, n):
    assert engines.check_dt(dt) == n


@pytest.mark.parametrize("dt", [0, 0.0, -0.1, 1.5, 0.3, 1 / 3.0001, 0.015, float("nan"), float("inf"), "1/64", True])
def test_check_dt_refuses(dt):
    with pytest.raises(UserError, match=r"dt.*1/64 = 0\.015625") as info:
        engines.check_dt(dt)
    assert "\n" not in str(info.value)


def test_run_refuses_ann_and_wrong_shape():
    with pytest.raises(UserError, match="kind='snn'"):
        engines.run(build_network("cnn", "ann"), _images((1, 28, 28), 1))
    with pytest.raises(UserError, match=r"expected \(B, 1, 28, 28\)"):
        engines.run(_random_net("cnn"), _images((3, 32, 32), 1))
    with pytest.raises(UserError, match="float tensor"):
        engines.run(_random_net("cnn"), torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(UserError, match="dt"):
        engines.run(_random_net("cnn"), _images((1, 28, 28), 1), "stepwise", dt=0.3)


# --------------------------------------------------------------------------- event == proxy
def _assert_event_equals_proxy(model, x):
    proxy, event = engines.run(model, x, "proxy"), engines.run(model, x, "event")
    assert torch.equal(event.predictions, proxy.predictions)
    assert (event.logits - proxy.logits).abs().max() < 1e-4
    spikes = event.spikes_per_layer  # (B, L)
    assert torch.equal(spikes, proxy.spikes_per_layer)
    assert torch.equal(event.sops, proxy.sops)
    assert (spikes[:, 1:].sum(0) > 0).all(), "every hidden layer must spike, or the test checks nothing"
    for t_event, t_proxy in zip(event.spike_times, proxy.spike_times, strict=True):
        fired = t_event < 1
        assert torch.equal(fired, t_proxy < 1)
        assert (t_event[fired] - t_proxy[fired]).abs().max() < 1e-4
        assert (t_event[fired] >= 0).all() and torch.isinf(t_event[~fired]).all()
    assert torch.equal(event.latency, torch.full((x.shape[0],), float(len(event.spike_times))))
    assert event.first_spike is None and event.first_spike_latency is None


def test_event_equals_proxy_cnn(random_cnn):
    model, x, _ = random_cnn
    _assert_event_equals_proxy(model, x)


def test_event_equals_proxy_vgg11():
    model = _random_net("vgg11", 3, 32, seed=1)
    _assert_event_equals_proxy(model, _images((3, 32, 32), 4, seed=1))


def test_event_keeps_tiny_activation_as_spike():
    """a = 1e-9 > 0 is a spike: its time must stay below 1 (1 - 1e-9 rounds to 1 in float32)."""
    model = build_network({"convs": [1], "linears": [], "padding": 0, "kernel_size": 1}, "snn", 1, 1, 1)
    with torch.no_grad():
        model.blocks[0].weight.fill_(1.0)
        model.blocks[-1].weight.fill_(2.0)
    x = torch.full((1, 1, 1, 1), 1e-9)
    for engine in ("proxy", "event"):
        out = engines.run(model, x, engine)
        assert out.spikes_per_layer.tolist() == [[1]] and out.sops.tolist() == [1]


# --------------------------------------------------------------------------- stepwise, one layer
def _linear(weights) -> DTALinear:
    weights = torch.tensor(weights, dtype=torch.float32)
    layer = DTALinear(weights.shape[1], weights.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weights)
    return layer


def test_step_layer_hand_example():
    """Inputs at k = (2, 4) of n = 8 (t = 0.25, 0.5), each reaching the 3 neurons.

    neuron 0, w = (0.5, 0.25): V(1 + u) = 0.5 (0.75 + u) + 0.25 (0.5 + u) = 0.5 + 0.75 u against
      theta = 1 - u. Grid u = j/8: j = 2 gives 0.6875 < 0.75, j = 3 gives 0.78125 >= 0.625, so it
      fires at output step 3 (closed form u* = 2/7 = 0.286, rounded up). V(1) = 0.5, V(2) = 1.25.
    neuron 1, w = (-0.5, 0.25): V(1 + u) = -0.25 - 0.25 u < 1 - u for u < 1: silent (step 8).
    neuron 2, w = (2, 0): V(1) = 1.5 >= theta(1) = 1: fires at step 0.
    """
    layer = _linear([[0.5, 0.25], [-0.5, 0.25], [2.0, 0.0]])
    out = engines.step_layer(layer, torch.tensor([[2, 4]]), n=8)
    assert out.out_steps.tolist() == [[3, 8, 0]]
    assert out.start_potential.tolist() == [[0.5, -0.25, 1.5]]
    assert out.end_potential.tolist() == [[1.25, -0.5, 3.5]]
    assert out.fire_potential[0, [0, 2]].tolist() == [0.78125, 1.5] and out.fire_potential[0, 1] == -math.inf
    assert out.emissions.tolist() == [[1, 0, 1]]
    assert out.sops.tolist() == [6]  # 2 input spikes x 3 synapses


def test_step_layer_at_most_one_spike():
    """Neuron 0 (w = 2, input at k = 0): V(1 + u) = 2 (1 + u) stays above theta = 1 - u for the
    whole firing window, yet the loop emits one spike. Neuron 1 (w = 0.1): 0.1 (1 + u) >= 1 - u
    from u = 9/11 on, first grid step 14 of 16, then stays above: one spike. Neuron 2 (w = -1): none."""
    layer = _linear([[2.0], [0.1], [-1.0]])
    out = engines.step_layer(layer, torch.tensor([[0]]), n=16)
    assert out.out_steps.tolist() == [[0, 14, 16]]
    assert out.emissions.tolist() == [[1, 1, 0]]


def test_step_layer_matches_closed_form_on_grid(random_cnn):
    """With inputs on the grid, a DTA layer fires at the first grid time at or after the closed form."""
    model, x, _ = random_cnn
    n = 32
    steps = engines._min_pool(model.blocks[1], engines._encode_steps(model.blocks[0](x[:16]), n))
    layer = model.blocks[2]
    t = torch.where(steps < n, steps.double() / n, torch.full_like(steps, 1, dtype=torch.float64))
    mask = t < 1  # (B, C, H, W) grid inputs that spike
    weight = layer.weight.double()
    closed = dta_spike_time(
        torch.nn.functional.conv2d(torch.where(mask, t, 0.0), weight), torch.nn.functional.conv2d(mask.double(), weight)
    )
    expected = torch.where(closed < 1, torch.ceil(closed * n - 1e-9), torch.full_like(closed, n)).long()
    out = engines.step_layer(layer, steps, n)
    assert torch.equal(out.out_steps, expected)
    assert 0.2 < (out.out_steps < n).float().mean() < 0.9
    assert torch.equal(out.emissions, (out.out_steps < n).long())  # every spike emitted exactly once


def test_encoding_rounds_up_to_grid():
    a = torch.tensor([[1.0, 0.75, 0.7, 0.2, 1e-9, 0.0]])
    # t = 1 - a = 0, 0.25, 0.3, 0.8, ~1, silent; n = 4: k = ceil(4 t) = 0, 1, 2, 4 (past the window: silent), 4, 4
    assert engines._encode_steps(a, 4).tolist() == [[0, 1, 2, 4, 4, 4]]


def test_first_spike_decoding_ties_and_fallback():
    n, silent = 8, -math.inf
    readout = engines.LayerSteps(
        out_steps=torch.tensor([[3, 3, 5], [8, 8, 8]]),
        start_potential=torch.zeros(2, 3),
        fire_potential=torch.tensor([[0.7, 0.9, 0.5], [silent, silent, silent]]),
        end_potential=torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.4, 0.2]]),
        emissions=torch.zeros(2, 3, dtype=torch.long),
        sops=torch.zeros(2, dtype=torch.long),
    )
    winner, latency = engines._first_spike(readout, n, num_layers=3)
    assert winner.tolist() == [1, 1]  # tie at step 3 -> larger potential; none -> largest final potential
    assert latency.tolist() == [3 + 3 / 8, 4.0]


# --------------------------------------------------------------------------- stepwise, whole network
def test_stepwise_output_on_grid(random_cnn):
    model, x, event = random_cnn
    n = 16
    out = engines.run(model, x[:8], "stepwise", dt=1 / n)
    num_layers = len(out.spike_times)
    for t in out.spike_times:
        on_grid = t[t < 1] * n
        assert torch.equal(on_grid, on_grid.round()) and torch.isinf(t[~(t < 1)]).all()
    rounded_up = torch.ceil(event.spike_times[0][:8].double() * n) / n  # encoding: analog times, rounded up
    assert torch.equal(out.spike_times[0], torch.where(rounded_up < 1, rounded_up, math.inf).float())
    assert out.first_spike.dtype == torch.long and out.first_spike.shape == (8,)
    assert ((out.first_spike_latency >= num_layers) & (out.first_spike_latency <= num_layers + 1)).all()
    assert torch.equal(out.latency, torch.full((8,), float(num_layers)))
    assert out.sops.dtype == torch.int64 and (out.sops > 0).all()


def test_stepwise_converges_to_event_random_cnn(random_cnn):
    model, x, event = random_cnn
    error = {}
    for n in (16, 256):
        out = engines.run(model, x, "stepwise", dt=1 / n)
        error[n] = (out.logits - event.logits).abs().mean().item()
    assert error[256] < error[16]
    fine = engines.run(model, x, "stepwise", dt=1 / 1024)
    assert (fine.predictions == event.predictions).float().mean() >= 0.95


def _train_blob_cnn(steps: int = 120, batch: int = 32, seed: int = 0):
    """A ``cnn`` SNN trained (proxy form, Adam) on the learnable blob images of conftest."""
    torch.manual_seed(seed)
    model = build_network("cnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        labels = rng.integers(0, 10, batch)
        x = torch.from_numpy(pattern_images(labels, seed=seed + step)).float()[:, None] / 255  # (B, 1, 28, 28)
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_stepwise_agrees_with_event_on_trained_cnn():
    model = _train_blob_cnn()
    labels = np.random.default_rng(99).integers(0, 10, 256)
    x = torch.from_numpy(pattern_images(labels, seed=12345)).float()[:, None] / 255
    event = engines.run(model, x, "event")
    assert (event.predictions.numpy() == labels).mean() > 0.9, "training failed; the check below would be vacuous"
    agree = engines.run(model, x, "stepwise", dt=1 / 64).predictions == event.predictions
    assert agree.float().mean() >= 0.98
    error = {
        n: (engines.run(model, x[:64], "stepwise", dt=1 / n).logits - event.logits[:64]).abs().mean() for n in (16, 256)
    }
    assert error[256] < error[16]


# --------------------------------------------------------------------------- SOPs
def _brute_force_sops(model, spike_times) -> list[int]:
    """SOPs with plain Python loops: each input spike of a DTA layer or the readout, times the
    output neurons whose receptive field (borders respected) contains it."""
    counts = []
    for b in range(spike_times[0].shape[0]):
        total, layer_times, t = 0, iter(spike_times), None
        for block in model.blocks:
            if isinstance(block, DTAConv):
                k, p = block.kernel_size[0], block.padding[0]
                channels, height, width = t.shape
                out_h, out_w = height + 2 * p - k + 1, width + 2 * p - k + 1
                for c, y, x in np.ndindex(channels, height, width):
                    if t[c, y, x] < 1:
                        for oy, ox in np.ndindex(out_h, out_w):
                            if 0 <= y - oy + p < k and 0 <= x - ox + p < k:
                                total += block.out_channels
            elif isinstance(block, (DTALinear, Readout)):
                total += int((t < 1).sum()) * block.out_features
            name = type(block).__name__
            if name == "SpikePool":  # the earliest spike of each 2x2 window
                c, h, w = t.shape
                pooled = torch.empty(c, h // 2, w // 2)
                for ch, i, j in np.ndindex(*pooled.shape):
                    pooled[ch, i, j] = t[ch, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].min()
                t = pooled
            elif name == "Flatten":
                t = t.flatten()
            elif block.spiking:
                t = next(layer_times)[b]  # this sample's output times of the layer
        counts.append(total)
    return counts


@pytest.mark.parametrize("engine", ["proxy", "event", "stepwise"])
def test_sops_equal_brute_force(engine):
    arch = {"convs": [3, "M", 4], "linears": [5], "padding": 1}  # padded conv after a pool
    model = _random_net(arch, in_channels=2, image_size=8, seed=3)
    out = engines.run(model, _images((2, 8, 8), 3, seed=3), engine, dt=1 / 8)
    spikes = out.spikes_per_layer
    assert (spikes > 0).all() and (spikes[:, 0] < 3 * 8 * 8).all(), "needs partial spiking to test anything"
    assert out.sops.tolist() == _brute_force_sops(model, out.spike_times)


def test_count_sops_matches_run(random_cnn):
    model, _, event = random_cnn
    assert torch.equal(engines.count_sops(model, event.spike_times), event.sops)


# --------------------------------------------------------------------------- energy and loading
def test_macs_and_energy(random_cnn):
    model, _, event = random_cnn
    encoding = 16 * 26 * 26 * 9
    assert engines.encoding_macs(model) == encoding
    assert engines.ann_macs(model) == encoding + 32 * 11 * 11 * 16 * 9 + 800 * 128 + 128 * 10
    expected = (encoding * 4.6 + event.sops.double() * 0.9) * 1e-6
    assert torch.allclose(engines.energy_uj(model, event), expected)
    assert engines.ann_energy_uj(model) == pytest.approx(engines.ann_macs(model) * 4.6e-6)
    vgg = _random_net("vgg11", 3, 32)
    assert engines.encoding_macs(vgg) == 64 * 32 * 32 * 3 * 9  # padding included


def test_simulate_from_checkpoint(tmp_path, random_cnn):
    model, x, event = random_cnn
    path = tmp_path / "snn.ckpt"
    hparams = {"arch": "cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state}, path)
    out = engines.simulate(str(path), x[:4], "event")
    assert torch.equal(out.logits, event.logits[:4])
    with pytest.raises(UserError, match="does not exist"):
        engines.simulate(str(tmp_path / "missing.ckpt"), x[:1])


# --------------------------------------------------------------------------- memory
@torch.no_grad()
def _time_axis_stepwise(model, x: torch.Tensor, n: int) -> torch.Tensor:
    """Control engine: section 9 vectorised over a (T, B, ...) time axis. Returns logits."""
    steps = None
    for block in model.blocks:
        name = type(block).__name__
        if name == "EncodingConv":
            steps = engines._encode_steps(block(x), n)
        elif name == "SpikePool":
            steps = engines._min_pool(block, steps)
        elif name == "Flatten":
            steps = block(steps)
        else:
            grid = torch.arange(n).view(n, *([1] * steps.dim()))
            onehot = (steps[None] == grid).float()  # (T, B, *in) arrivals per step
            increments = block.synaptic(onehot.flatten(0, 1)).unflatten(0, (n, steps.shape[0]))  # (T, B, *out)
            current = increments.cumsum(0)  # (T, B, *out) current after the arrivals of step s
            start = current.double().sum(0)  # (B, *out) Q at s = n
            if isinstance(block, Readout):
                return (start / n).float()
            j = torch.arange(n, dtype=torch.float64).view(n, *([1] * start.dim()))
            charge = start[None] + j * current[-1].double()[None]  # (T, B, *out) Q at s = n + j
            fires = charge >= (n - j)  # theta = 2 - s dt, in units of dt
            steps = torch.where(fires.any(0), fires.double().argmax(0), n).long()


def _memory_growth(engine: str, n: int) -> int:
    """Bytes of peak resident memory above the idle baseline for one run; call in a fresh process.

    ``ru_maxrss`` is the peak RSS of the whole process lifetime and tracemalloc does not see
    torch's allocations, so each measurement needs its own process: warm up (lazy kernels,
    thread pools) on one image at n = 2, take the current RSS as the baseline, run once,
    and report ``maxrss - baseline``.
    """
    torch.set_num_threads(1)
    model = _random_net("cnn")
    x = _images((1, 28, 28), 128)  # a working set of tens of MiB, well above allocator noise

    def simulate(inputs, steps):
        if engine == "time_axis":
            return _time_axis_stepwise(model, inputs, steps)
        return engines.run(model, inputs, "stepwise", 1 / steps).logits

    with torch.no_grad():
        simulate(x[:1], 2)
        with open("/proc/self/statm") as f:
            baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        simulate(x, n)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_stepwise_memory_does_not_grow_with_steps(random_cnn):
    model, x, _ = random_cnn
    # the control is the same simulation: check it, so that the memory check below is fair
    control = _time_axis_stepwise(model, x[:8], 16)
    assert torch.allclose(control, engines.run(model, x[:8], "stepwise", 1 / 16).logits, atol=1e-5)
    code = "import sys; sys.path.insert(0, {!r}); import test_engines as t; print(t._memory_growth({!r}, {}))"
    jobs = {
        (engine, n): subprocess.Popen(
            [sys.executable, "-c", code.format(str(TESTS_DIR), engine, n)], stdout=subprocess.PIPE, text=True
        )
        for engine in ("stepwise", "time_axis")
        for n in (16, 256)
    }
    growth = {}
    for key, job in jobs.items():
        stdout, _ = job.communicate(timeout=300)
        assert job.returncode == 0, key
        growth[key] = int(stdout.split()[-1])
    assert growth["stepwise", 256] < 1.5 * growth["stepwise", 16], growth
    assert growth["time_axis", 256] >= 1.5 * growth["time_axis", 16], growth  # the check sees a time axis
    assert growth["stepwise", 256] < growth["time_axis", 256], growth
