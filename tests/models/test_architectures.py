"""Shape, init-identity, gradient and argument tests for the model architectures.

Tensors and widths are kept tiny: the whole file must run in seconds on 2 CPU cores.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.compact_sr import CompactSR
from models.flow_interp import FlowInterp, backward_warp, symmetric_search
from models.restorer_net import RestorerNet, grow

SIZES = [(37, 21), (64, 48), (1, 1), (16, 9)]
CUDA = torch.cuda.is_available()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Give every zero-initialised parameter small random values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                nn.init.normal_(p, std=0.05)


def check_grads(model: nn.Module, out: torch.Tensor) -> None:
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no grad for {name}"  # DDP needs every param used
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# ----------------------------------------------------------------- RestorerNet


@pytest.mark.parametrize("in_frames", [1, 3])
@pytest.mark.parametrize("hw", SIZES)
def test_restorer_shape_and_identity(in_frames, hw):
    torch.manual_seed(0)
    net = RestorerNet(in_frames=in_frames, features=8, blocks=2)
    assert net.in_frames == in_frames
    x = torch.rand(2, in_frames, 3, *hw)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, *hw) and y.dtype == torch.float32
    assert torch.equal(y, x[:, in_frames // 2])  # fresh net == centre frame exactly


def test_restorer_default_identity():
    x = torch.rand(1, 3, 3, 37, 21)
    with torch.no_grad():
        assert torch.equal(RestorerNet(in_frames=3)(x), x[:, 1])


@pytest.mark.parametrize("in_frames", [1, 3])
def test_restorer_perturbed_and_grads(in_frames):
    net = RestorerNet(in_frames=in_frames, features=8, blocks=2)
    perturb(net)
    x = torch.rand(2, in_frames, 3, 37, 21)
    y = net(x)
    assert y.shape == (2, 3, 37, 21)
    assert torch.isfinite(y).all()
    assert not torch.allclose(y, x[:, in_frames // 2])
    check_grads(net, y)


@pytest.mark.parametrize("kwargs", [{"in_frames": 2}, {"in_frames": 0}, {"in_frames": -1},
                                    {"features": 0}, {"blocks": 0}])
def test_restorer_bad_args(kwargs):
    with pytest.raises(ValueError):
        RestorerNet(**kwargs)


def test_grown_restorer_computes_what_the_smaller_one_did():
    """`grow` turns a one-frame RestorerNet into a five-frame one that starts as the same function of the
    centre frame (how `reelmend train --init` starts a windowed stage from single-frame weights), and a
    deeper one that starts close to it."""
    torch.manual_seed(0)
    one = RestorerNet(in_frames=1, features=8, blocks=2)
    with torch.no_grad():
        for p in one.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    five = RestorerNet(in_frames=5, features=8, blocks=2)
    five.load_state_dict(grow(one.state_dict(), 5, 2))
    x = torch.rand(2, 5, 3, 19, 24)
    assert torch.allclose(five(x), one(x[:, 2:3]), atol=1e-5)
    assert not torch.allclose(five(x), x[:, 2])  # not trivially the identity
    state = five.state_dict()
    assert grow(state, 5, 2) is state  # already that wide and deep: nothing to do

    deep = RestorerNet(in_frames=5, features=8, blocks=4)
    deep.load_state_dict(grow(one.state_dict(), 5, 4))
    change = (deep(x) - five(x)).abs().mean() / (five(x) - x[:, 2]).abs().mean()
    assert 0 < change < 0.5  # near the shallow net's correction (the LeakyReLUs rescale negatives only)

    with pytest.raises(ValueError, match="cannot grow"):
        grow(five.state_dict(), 3, 2)
    with pytest.raises(ValueError, match="cannot grow"):
        grow(one.state_dict(), 4, 2)
    with pytest.raises(ValueError, match="cannot grow"):
        grow(deep.state_dict(), 5, 2)


def test_restorer_bad_input():
    with pytest.raises(ValueError):
        RestorerNet(in_frames=3, features=4, blocks=1)(torch.rand(1, 1, 3, 8, 8))


# ------------------------------------------------------------------- CompactSR


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("hw", [(37, 21), (16, 9), (1, 1)])
def test_compact_sr_shape_and_identity(scale, hw):
    net = CompactSR(scale=scale, features=8, convs=2)
    assert net.scale == scale
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, hw[0] * scale, hw[1] * scale)
    ref = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    assert torch.equal(y, ref)  # fresh net == bilinear upscale exactly


def test_compact_sr_perturbed_and_grads():
    net = CompactSR(scale=2, features=8, convs=2)
    perturb(net)
    x = torch.rand(2, 3, 37, 21)
    y = net(x)
    assert y.shape == (2, 3, 74, 42) and torch.isfinite(y).all()
    assert not torch.allclose(y, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    check_grads(net, y)


@pytest.mark.parametrize("kwargs", [{"scale": 1}, {"scale": 5}, {"scale": 2.0}, {"scale": True},
                                    {"features": 0}, {"convs": -1}])
def test_compact_sr_bad_args(kwargs):
    with pytest.raises(ValueError):
        CompactSR(**kwargs)


# ----------------------------------------------------------------- backward_warp


def test_backward_warp_zero_flow_is_identity():
    img = torch.rand(2, 3, 37, 21)
    out = backward_warp(img, torch.zeros(2, 2, 37, 21))
    assert torch.allclose(out, img, atol=1e-5)


def test_backward_warp_integer_shift():
    img = torch.rand(2, 3, 12, 9)
    flow = torch.zeros(2, 2, 12, 9)
    flow[:, 0] = 1.0  # sample one pixel to the right: out[..., x] = img[..., x + 1]
    out = backward_warp(img, flow)
    assert torch.allclose(out[..., :-1], img[..., 1:], atol=1e-5)
    assert torch.allclose(out[..., -1], img[..., -1], atol=1e-5)  # border clamp
    flow = torch.zeros(2, 2, 12, 9)
    flow[:, 1] = -1.0  # one pixel up: out[..., y, :] = img[..., y - 1, :]
    out = backward_warp(img, flow)
    assert torch.allclose(out[..., 1:, :], img[..., :-1, :], atol=1e-5)


# ------------------------------------------------------------------ FlowInterp


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("hw", SIZES)
def test_flow_interp_shape_and_average(levels, hw):
    net = FlowInterp(features=8, levels=levels)
    f0, f1 = torch.rand(2, 3, *hw), torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = net(f0, f1)
        same = net(f0, f0)
    assert y.shape == (2, 3, *hw) and y.dtype == torch.float32
    assert torch.allclose(y, (f0 + f1) / 2, atol=1e-5)  # fresh net == average
    assert torch.allclose(same, f0, atol=1e-5)


def test_flow_interp_default_average():
    f0, f1 = torch.rand(1, 3, 37, 21), torch.rand(1, 3, 37, 21)
    with torch.no_grad():
        assert torch.allclose(FlowInterp()(f0, f1), (f0 + f1) / 2, atol=1e-5)


def test_flow_interp_perturbed_and_grads():
    net = FlowInterp(features=8, levels=2)
    perturb(net)
    f0, f1 = torch.rand(2, 3, 37, 21), torch.rand(2, 3, 37, 21)
    y = net(f0, f1)
    assert y.shape == (2, 3, 37, 21) and torch.isfinite(y).all()
    assert not torch.allclose(y, (f0 + f1) / 2)
    check_grads(net, y)


def _panned_pair(motion: tuple[int, int], hw: tuple[int, int] = (96, 128)):
    """Three crops of one textured scene (smooth noise at several scales, with footage's contrast: a standard
    deviation of 0.25) whose window pans by `motion` pixels (x, y) from frame 0 to frame 1; the middle crop is
    the true frame at t = 0.5."""
    torch.manual_seed(0)
    size = (hw[0] + 64, hw[1] + 64)
    scene = sum(F.interpolate(torch.rand(1, 3, size[0] // k, size[1] // k), size=size, mode="bilinear")
                for k in (16, 8, 4))
    scene = (0.5 + 0.25 * (scene - scene.mean()) / scene.std()).clamp(0, 1)
    mx, my = motion

    def crop(t: float) -> torch.Tensor:
        x, y = 32 + round(mx * t), 32 + round(my * t)
        return scene[..., y:y + hw[0], x:x + hw[1]]
    return crop(0.0), crop(0.5), crop(1.0)


@pytest.mark.parametrize("motion", [(6, -4), (24, 10), (-13, 7), (0, 0)])
def test_symmetric_search_finds_the_pan(motion):
    f0, mid, f1 = _panned_pair(motion)
    flow = symmetric_search(f0, f1, radius=4)
    inner = flow[..., 24:-24, 24:-24]  # away from the borders, where the crops do not overlap
    # The window moves by +motion, so the content moves by -motion: the middle frame at p is frame 0 at
    # p + motion / 2 and frame 1 at p - motion / 2.
    half = torch.tensor([motion[0] / 2, motion[1] / 2]).view(1, 2, 1, 1)
    assert torch.equal(inner[:, 2:], -inner[:, :2])  # symmetric about the midpoint
    # Coarse to fine is greedy: where the coarsest level cannot tell its two nearest integers apart (a half-
    # motion of -0.5 there), a few blocks settle a pixel or two off; most must be exact.
    exact = ((inner[:, :2] - half).abs().amax(1) <= 0.25).float().mean()
    assert exact >= 0.85, f"{exact:.0%} of the pixels found the pan"


def test_flow_interp_with_search_starts_motion_compensated():
    """A fresh net with the block-matching prior outputs the pair warped to the midpoint, not their average:
    on a pan of (10, -6) pixels it is far closer to the true middle frame."""
    f0, mid, f1 = _panned_pair((10, -6))
    with torch.no_grad():
        out = FlowInterp(features=8, search=4)(f0, f1)
        same = FlowInterp(features=8, search=4)(f0, f0)
    err = lambda x: float(((x - mid)[..., 16:-16, 16:-16] ** 2).mean())  # noqa: E731
    assert err(out) < err((f0 + f1) / 2) / 20
    assert torch.allclose(same, f0, atol=1e-5)  # no motion: the frame itself


@pytest.mark.parametrize("kwargs", [{"features": 0}, {"levels": 0}, {"search": -1}, {"search": 1.5}])
def test_flow_interp_bad_args(kwargs):
    with pytest.raises(ValueError):
        FlowInterp(**kwargs)


def test_flow_interp_bad_input():
    with pytest.raises(ValueError):
        FlowInterp(features=4, levels=1)(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


# ------------------------------------------------------------ shared properties


def test_default_param_counts():
    assert n_params(RestorerNet()) < 300_000
    assert n_params(CompactSR()) < 400_000
    assert n_params(CompactSR(scale=4)) < 400_000
    assert n_params(FlowInterp()) < 500_000


def _small_models():
    return [
        (RestorerNet(in_frames=3, features=8, blocks=2), lambda x: (torch.stack([x, x, x], 1),), (3, 37, 21)),
        (CompactSR(scale=3, features=8, convs=2), lambda x: (x,), (3, 111, 63)),
        (FlowInterp(features=8, levels=3), lambda x: (x, x.flip(-1)), (3, 37, 21)),
    ]


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not CUDA, reason="no CUDA")),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="no CUDA")),
])
def test_autocast(device, dtype):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 37, 21, device=device)
    for net, make_inputs, out_chw in _small_models():
        perturb(net)
        net = net.to(device)
        with torch.autocast(device_type=device, dtype=dtype):
            y = net(*make_inputs(x))
        assert y.shape == (2, *out_chw) and y.is_floating_point()
        assert torch.isfinite(y).all()
        y.float().mean().backward()
        assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("net", [CompactSR(2), RestorerNet(), FlowInterp()], ids=lambda n: type(n).__name__)
def test_fresh_networks_keep_their_signal_through_depth(net):
    """He init: the features reaching the zero-initialised output conv are not vanishingly small, so that
    conv gets a gradient from the first step (PyTorch's default init left CompactSR's at ~1e-3 of the input's
    scale, and training stalled at the bilinear base)."""
    torch.manual_seed(0)
    last = net.conv_last if hasattr(net, "conv_last") else net.refine.conv_last
    seen = {}

    def keep_input(module, inp, out):
        seen["x"] = inp[0]

    last.register_forward_hook(keep_input)
    x = torch.rand(1, 2, 3, 64, 64) if isinstance(net, FlowInterp) else torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        net(x[:, 0], x[:, 1]) if isinstance(net, FlowInterp) else net(x if isinstance(net, CompactSR) else x[:, None])
    assert seen["x"].std() > 0.3 * x.std()  # default init: 0.06 for CompactSR
