"""Tests of the layers and the architecture builder (method.md sections 5-8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dta_ttfs.errors import UserError
from dta_ttfs.functional import dta
from dta_ttfs.layers import (
    DTAConv,
    DTALinear,
    EncodingConv,
    Flatten,
    Readout,
    ReLU1Conv,
    ReLU1Linear,
    SpikePool,
)
from dta_ttfs.models import ARCHITECTURES, ArchSpec, build_network, count_neurons

ARCHS = [("cnn", 1, 28), ("vgg11", 3, 32), ("vgg16", 3, 32)]
CUSTOM = {"convs": [4, "M", 6], "linears": [7], "padding": 1}


def _images(shape, batch=4, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *shape, generator=gen) * scale


def _net(arch, kind, channels, size, seed=0, **kw):
    torch.manual_seed(seed)
    return build_network(arch, kind, in_channels=channels, image_size=size, **kw)


# --------------------------------------------------------------------------- gradients reach everything
@pytest.mark.parametrize("kind", ["ann", "snn"])
@pytest.mark.parametrize("arch,channels,size", ARCHS)
def test_every_parameter_gets_a_gradient(arch, channels, size, kind):
    # Kaiming init keeps about half of the neurons of every layer firing on uniform images
    # (checked for seeds 0-2, vgg16 included), so a fixed seed is enough.
    net = _net(arch, kind, channels, size)
    x = _images((channels, size, size), batch=8)
    y = torch.arange(8) % 10
    logits, acts = net.trace(x)
    for a in acts:  # no layer is silent (a silent layer would cut the gradient)
        assert 0.05 < (a > 0).float().mean() < 0.95
    F.cross_entropy(logits, y).backward()
    params = dict(net.named_parameters())
    assert len(params) == sum(isinstance(c, str) is False for c in net.spec.convs) + len(net.spec.linears) + 1
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert (p.grad != 0).any(), f"{name} of {arch}/{kind} got an all-zero gradient"
        # and not just a handful of entries: a good share of the output units of every layer
        # learn (about 45-55 % of the hidden linear units, 75-100 % of the conv filters here)
        per_unit = p.grad.flatten(1).abs().sum(1)
        assert (per_unit > 0).float().mean() > 0.3, name


def test_dta_layer_weight_gradient_flows_through_both_drive_and_weight_sum():
    """The weight gradient of a DTA layer is that of a = (W + I)/(1 + W) with I = w.a and
    W = w.1[a > 0] (mask detached): compare with plain autograd on that formula, cap off."""
    torch.manual_seed(0)
    layer = DTALinear(12, 9, cap=None).double()
    with torch.no_grad():
        layer.weight.mul_(0.5)
    a = torch.rand(16, 12, dtype=torch.float64)
    a[a < 0.3] = 0
    layer(a).sum().backward()
    got = layer.weight.grad.clone()

    w = layer.weight.detach().clone().requires_grad_()
    drive, wsum = a @ w.T, (a > 0).double() @ w.T
    active = (drive < 1) & (drive > -wsum)
    assert active.float().mean() > 0.2
    out = torch.where(active, (wsum + drive) / (1 + wsum), (drive >= 1).double())
    out.sum().backward()
    torch.testing.assert_close(got, w.grad)
    # the W path matters: without it the gradient differs
    w2 = layer.weight.detach().clone().requires_grad_()
    d2, ws2 = a @ w2.T, wsum.detach()
    out2 = torch.where(active, (ws2 + d2) / (1 + ws2), (d2 >= 1).double())
    out2.sum().backward()
    assert not torch.allclose(got, w2.grad)


def test_dta_conv_equals_functional():
    torch.manual_seed(1)
    layer = DTAConv(3, 5, 3, padding=1)
    a = torch.rand(2, 3, 6, 6)
    a[a < 0.4] = 0
    drive = F.conv2d(a, layer.weight, padding=1)
    wsum = F.conv2d((a > 0).float(), layer.weight, padding=1)
    torch.testing.assert_close(layer(a), dta(drive, wsum))


# --------------------------------------------------------------------------- ANN -> SNN
@pytest.mark.parametrize("arch,channels,size", ARCHS)
def test_ann_weights_load_into_snn(arch, channels, size):
    ann = _net(arch, "ann", channels, size, seed=1)
    snn = _net(arch, "snn", channels, size, seed=2)
    ann_sd, snn_sd = ann.state_dict(), snn.state_dict()
    assert list(ann_sd) == list(snn_sd)
    assert [v.shape for v in ann_sd.values()] == [v.shape for v in snn_sd.values()]
    assert all(k.startswith("blocks.") and k.endswith(".weight") for k in ann_sd)
    snn.load_state_dict(ann_sd, strict=True)
    for k, v in snn.state_dict().items():
        assert torch.equal(v, ann_sd[k])
    # the encoding layer is the ANN's first layer: same activations
    x = _images((channels, size, size), batch=2)
    torch.testing.assert_close(snn.blocks[0](x), ann.blocks[0](x))


def test_block_types():
    ann = _net("cnn", "ann", 1, 28)
    snn = _net("cnn", "snn", 1, 28)
    assert [type(b) for b in ann.blocks] == [ReLU1Conv, SpikePool, ReLU1Conv, SpikePool, Flatten, ReLU1Linear, Readout]
    assert [type(b) for b in snn.blocks] == [EncodingConv, SpikePool, DTAConv, SpikePool, Flatten, DTALinear, Readout]
    assert [n for n, _ in snn.neuron_layers()] == ["conv0", "conv2", "fc5"]
    assert all(b.bias is None for b in snn.blocks if hasattr(b, "weight"))


@pytest.mark.parametrize("kind", ["ann", "snn"])
def test_kaiming_normal_fan_in_init(kind):
    net = _net("vgg11", kind, 3, 32)
    for name, p in net.named_parameters():
        fan_in = p[0].numel()
        want = (2.0 / fan_in) ** 0.5  # Kaiming normal, fan_in, relu gain sqrt(2)
        assert abs(p.std().item() / want - 1) < 0.1, name
        assert abs(p.mean().item()) < 0.2 * want, name


# --------------------------------------------------------------------------- neuron counts
def test_count_neurons_vgg16_cifar():
    net = _net("vgg16", "snn", 3, 32)
    # conv 276,480 = 2*64*32*32 + 2*128*16*16 + 3*256*8*8 + 3*512*4*4 + 3*512*2*2; + 4096 + 4096
    assert 2 * 64 * 1024 + 2 * 128 * 256 + 3 * 256 * 64 + 3 * 512 * 16 + 3 * 512 * 4 == 276_480
    assert count_neurons(net, _images((3, 32, 32), batch=2)) == {"spiking": 284_672, "readout": 10, "total": 284_682}


@pytest.mark.parametrize("kind", ["ann", "snn"])
def test_count_neurons_cnn_mnist(kind):
    net = _net("cnn", kind, 1, 28)
    # 16*26*26 = 10,816 + 32*11*11 = 3,872 + 128 spiking; 10 readout
    assert count_neurons(net, _images((1, 28, 28))) == {"spiking": 14_816, "readout": 10, "total": 14_826}


@pytest.mark.parametrize("kind", ["ann", "snn"])
def test_count_neurons_custom_spec(kind):
    net = build_network(CUSTOM, kind, in_channels=1, image_size=8, num_classes=3)
    # conv 4 (3x3, pad 1) on 8x8: 4*8*8 = 256; pool -> 4x4 (no neurons); conv 6 on 4x4: 6*4*4 = 96;
    # linear 7; readout 3.  spiking = 256 + 96 + 7 = 359, total = 362
    assert count_neurons(net, _images((1, 8, 8))) == {"spiking": 359, "readout": 3, "total": 362}
    assert net.shapes() == [(1, 8, 8), (4, 8, 8), (4, 4, 4), (6, 4, 4), (96,), (7,), (3,)]


@pytest.mark.parametrize("arch,channels,size", ARCHS)
def test_shapes_match_forward(arch, channels, size):
    net = _net(arch, "snn", channels, size)
    x = _images((channels, size, size), batch=1)
    shapes = net.shapes()
    assert shapes[0] == (channels, size, size)
    for block, want in zip(net.blocks, shapes[1:]):
        x = block(x)
        assert tuple(x.shape[1:]) == tuple(want), block
    assert shapes[-1] == (10,)


# --------------------------------------------------------------------------- errors and head width
@pytest.mark.parametrize(
    "arch,match",
    [
        ("vgg19", r"unknown architecture 'vgg19'.*cnn"),
        (5, r"name or a dict"),
        ({"convs": []}, r"'convs' must be a non-empty list"),
        ({"linears": [10]}, r"'convs' must be a non-empty list"),
        ({"convs": ["M", 8]}, r"start with a conv width"),
        ({"convs": [8, -3]}, r"conv entry -3"),
        ({"convs": [8, "X"]}, r"conv entry 'X'"),
        ({"convs": [8, 2.5]}, r"conv entry 2.5"),
        ({"convs": [8], "linears": [0]}, r"'linears' must be a list of positive ints"),
        ({"convs": [8], "linears": 16}, r"'linears' must be a list of positive ints"),
        ({"convs": [8], "padding": -1}, r"'padding' must be an int >= 0"),
        ({"convs": [8], "kernel_size": 0}, r"'kernel_size' an int >= 1"),
        ({"convs": [8], "widths": [1]}, r"unknown keys \['widths'\]"),
    ],
)
def test_malformed_specs_raise_user_error(arch, match):
    with pytest.raises(UserError, match=match):
        build_network(arch, "snn")
    with pytest.raises(UserError, match=match):
        ArchSpec.parse(arch)


def test_unknown_kind_raises_user_error():
    with pytest.raises(UserError, match=r"unknown network kind 'cnn'.*'ann' or 'snn'"):
        build_network("cnn", "cnn")


@pytest.mark.parametrize(
    "arch,channels,size",
    [("vgg16", 3, 16), ("vgg11", 3, 16), ("cnn", 1, 8), ({"convs": [4], "padding": 0, "kernel_size": 5}, 1, 4)],
)
def test_too_small_image_raises_user_error(arch, channels, size):
    with pytest.raises(UserError, match=rf"shrinks a {size}x{size} image to nothing.*larger image_size"):
        build_network(arch, "snn", in_channels=channels, image_size=size)


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)


@pytest.mark.parametrize(
    "arch,channels,size,features",
    [("vgg11", 3, 64, 2048), ("vgg11", 3, 32, 512), ("vgg16", 3, 32, 512), ("cnn", 1, 28, 800), ("vgg11", 1, 96, 4608)],
)
def test_head_width_follows_image_size(arch, channels, size, features):
    for kind in ("ann", "snn"):
        net = build_network(arch, kind, in_channels=channels, image_size=size)
        first_linear = next(b for b in net.blocks if isinstance(b, torch.nn.Linear))
        assert first_linear.in_features == features
    assert ARCHITECTURES["vgg11"]["linears"] == [4096, 4096]


# --------------------------------------------------------------------------- no mutation of inputs
def _assert_forward_backward_keeps_input(module, x):
    before = x.clone()
    xin = x.clone().requires_grad_(x.is_floating_point())
    out = module(xin)
    assert torch.equal(xin.detach(), before), f"{type(module).__name__} modified its input in forward"
    grad = torch.randn_like(out)
    grad_before = grad.clone()
    out.backward(grad)
    assert torch.equal(xin.detach(), before), f"{type(module).__name__} modified its input in backward"
    assert torch.equal(grad, grad_before)


def test_layers_do_not_mutate_inputs():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 8, 8)
    a = torch.rand(2, 3, 8, 8)
    a[a < 0.3] = 0
    flat = a.flatten(1)
    cases = [
        (EncodingConv(3, 4, 3, 1), img),
        (ReLU1Conv(3, 4, 3, 1), img),
        (DTAConv(3, 4, 3, 1), a),
        (SpikePool(2), a),
        (Flatten(), a),
        (DTALinear(192, 5), flat),
        (ReLU1Linear(192, 5), flat),
        (Readout(192, 5), flat),
    ]
    for module, x in cases:
        _assert_forward_backward_keeps_input(module, x)


@pytest.mark.parametrize("kind", ["ann", "snn"])
@pytest.mark.parametrize("arch,channels,size", [("cnn", 1, 28), ("vgg11", 3, 32)])
def test_networks_do_not_mutate_inputs(arch, channels, size, kind):
    net = _net(arch, kind, channels, size)
    x = torch.randn(2, channels, size, size)
    _assert_forward_backward_keeps_input(net, x)
    before = x.clone()
    net.trace(x)
    assert torch.equal(x, before)


# --------------------------------------------------------------------------- mixed precision
def test_dta_layers_compute_in_float32_under_autocast():
    torch.manual_seed(0)
    conv, lin = DTAConv(3, 8, 3, padding=1), DTALinear(48, 6)
    a = torch.rand(4, 3, 8, 8)
    a[a < 0.3] = 0
    af = torch.rand(4, 48)
    af[af < 0.3] = 0
    for layer, x in ((conv, a), (lin, af)):
        ref = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
            got_bf16_in = layer(x.bfloat16())
        assert got.dtype == torch.float32 and got_bf16_in.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        torch.testing.assert_close(got_bf16_in, layer(x.bfloat16().float()), rtol=0, atol=0)


def test_snn_logits_float32_under_autocast():
    net = _net("cnn", "snn", 1, 28)
    x = _images((1, 28, 28))
    ref = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, acts = net.trace(x)
    assert logits.dtype == torch.float32 and all(a.dtype == torch.float32 for a in acts)
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
