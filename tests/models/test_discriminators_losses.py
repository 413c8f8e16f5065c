"""Tests for the discriminators (UNetDiscriminatorSN, TemporalDiscriminator), the
RRDBNet generator and the training losses.

Tensors and widths are kept tiny: the whole file must run in seconds on 2 CPU cores.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from models.losses import (
    charbonnier,
    d_loss,
    detail_view,
    feature_matching,
    g_loss,
    hinge_d,
    hinge_g,
    l1,
    relativistic_d,
    relativistic_g,
    temporal_consistency,
    undamaged,
    unsharp,
)
from models.rrdb_sr import RRDBNet
from models.temporal_disc import TemporalDiscriminator
from models.unet_disc import UNetDiscriminatorSN

CUDA = torch.cuda.is_available()


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Give every zero-initialised parameter small random values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                nn.init.normal_(p, std=0.05)


def sn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]


def top_singular_value(module: nn.Module) -> float:
    # Spectral norm normalises the weight reshaped to (out_channels, -1).
    return torch.linalg.matrix_norm(module.weight.detach().flatten(1), ord=2).item()


def check_two_pass_backward(disc: nn.Module, real: torch.Tensor, fake_src: torch.Tensor) -> None:
    """The GAN pattern: D(real), D(fake) in train mode, then one backward of the sum."""
    disc.train()
    fake = fake_src.clone().requires_grad_(True)
    real_logits, real_feats = disc(real)
    fake_logits, fake_feats = disc(fake)
    loss = d_loss("hinge", real_logits, fake_logits) + feature_matching(real_feats, fake_feats)
    loss.backward()  # would raise if the second forward modified tensors saved by the first
    grads = [p.grad for p in disc.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert fake.grad is not None and fake.grad.abs().sum() > 0


# --------------------------------------------------------- UNetDiscriminatorSN


@pytest.mark.parametrize("hw", [(37, 45), (8, 8), (1, 1), (16, 9)])
@pytest.mark.parametrize("skip", [True, False])
def test_unet_disc_shapes(hw, skip):
    torch.manual_seed(0)
    disc = UNetDiscriminatorSN(in_ch=3, features=4, skip=skip)
    x = torch.rand(2, 3, *hw)
    logits, feats = disc(x)
    assert logits.shape == (2, 1, *hw) and torch.isfinite(logits).all()
    assert isinstance(feats, list) and len(feats) == 7
    assert all(isinstance(f, torch.Tensor) and f.shape[0] == 2 for f in feats)
    # Down path F, 2F, 4F, 8F, up path 4F, 2F, F.
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32, 16, 8, 4]


def test_unet_disc_logits_are_per_pixel():
    # Changing one corner pixel must not change the logit in the opposite corner of
    # a large image the same way as nearby ones: the map is spatial, not global.
    torch.manual_seed(0)
    disc = UNetDiscriminatorSN(in_ch=3, features=4).eval()
    x = torch.rand(1, 3, 37, 45)
    y = x.clone()
    y[..., :4, :4] = 1 - y[..., :4, :4]
    with torch.no_grad():
        a, _ = disc(x)
        b, _ = disc(y)
    delta = (a - b).abs()[0, 0]
    assert delta[:4, :4].mean() > 10 * delta[-4:, -4:].mean()


def test_unet_disc_in_ch():
    disc = UNetDiscriminatorSN(in_ch=1, features=4)
    logits, _ = disc(torch.rand(2, 1, 21, 13))
    assert logits.shape == (2, 1, 21, 13)
    with pytest.raises(ValueError):
        disc(torch.rand(2, 3, 21, 13))


def test_unet_disc_spectral_norm_bounds_singular_values():
    torch.manual_seed(0)
    disc = UNetDiscriminatorSN(in_ch=3, features=4).train()
    convs = sn_modules(disc)
    assert len(convs) == 8  # every conv but conv0 and the output conv, as Real-ESRGAN
    # Blow the raw weights up: SN must still hand the layer a weight with sigma ~ 1.
    with torch.no_grad():
        for m in convs:
            m.parametrizations.weight.original.mul_(10)
    for _ in range(5):
        disc(torch.rand(2, 3, 24, 24))
    for m in convs:
        assert top_singular_value(m) == pytest.approx(1.0, abs=0.05)
    # The unconstrained output conv is not normalised.
    assert not parametrize.is_parametrized(disc.conv9)


def test_unet_disc_two_forwards_then_backward():
    torch.manual_seed(0)
    disc = UNetDiscriminatorSN(in_ch=3, features=4)
    check_two_pass_backward(disc, torch.rand(2, 3, 19, 23), torch.rand(2, 3, 19, 23))


@pytest.mark.parametrize("kwargs", [{"in_ch": 0}, {"in_ch": 3.0}, {"features": 0}, {"features": True},
                                    {"skip": 1}])
def test_unet_disc_bad_args(kwargs):
    with pytest.raises(ValueError):
        UNetDiscriminatorSN(**kwargs)


# ------------------------------------------------------- TemporalDiscriminator


@pytest.mark.parametrize("frames,hw", [(3, (37, 45)), (2, (16, 16)), (5, (16, 23))])
def test_temporal_disc_shapes(frames, hw):
    torch.manual_seed(0)
    disc = TemporalDiscriminator(frames=frames, in_ch=3, features=4)
    logits, feats = disc(torch.rand(2, frames, 3, *hw))
    assert logits.shape == (2, 1, hw[0] // 8, hw[1] // 8) and torch.isfinite(logits).all()
    assert isinstance(feats, list) and len(feats) > 0
    assert all(isinstance(f, torch.Tensor) and f.shape[0] == 2 for f in feats)
    assert feats[-1].shape[2] == 1  # time collapsed before the output conv


def test_temporal_disc_sees_flicker_and_order():
    torch.manual_seed(0)
    disc = TemporalDiscriminator(frames=3, in_ch=3, features=4).eval()  # eval: no power-iteration drift
    a, b = torch.rand(1, 3, 24, 24), torch.rand(1, 3, 24, 24)

    def score(*frames):
        with torch.no_grad():
            return disc(torch.stack(frames, dim=1))[0]

    static = score(a, a, a)
    assert torch.equal(static, score(a, a, a))  # deterministic in eval mode
    # One middle frame brighter: only its temporal context differs.
    assert not torch.allclose(static, score(a, (a + 0.2).clamp(0, 1), a), atol=1e-6)
    # Same set of frames, different order: a per-frame D pooled over time could not
    # tell these apart; the temporal D must.
    assert not torch.allclose(score(a, b, a), score(a, a, b), atol=1e-6)


def test_temporal_disc_spectral_norm_bounds_singular_values():
    torch.manual_seed(0)
    disc = TemporalDiscriminator(frames=3, in_ch=3, features=4).train()
    convs = sn_modules(disc)
    assert len(convs) == 4
    with torch.no_grad():
        for m in convs:
            m.parametrizations.weight.original.mul_(10)
    for _ in range(5):
        disc(torch.rand(2, 3, 3, 16, 16))
    for m in convs:
        assert top_singular_value(m) == pytest.approx(1.0, abs=0.05)


def test_temporal_disc_two_forwards_then_backward():
    torch.manual_seed(0)
    disc = TemporalDiscriminator(frames=3, in_ch=3, features=4)
    check_two_pass_backward(disc, torch.rand(2, 3, 3, 17, 19), torch.rand(2, 3, 3, 17, 19))


@pytest.mark.parametrize("shape", [(1, 2, 3, 16, 16), (1, 4, 3, 16, 16), (1, 3, 1, 16, 16),
                                   (1, 3, 3, 15, 16), (1, 3, 3, 16, 8), (3, 3, 16, 16)])
def test_temporal_disc_bad_input(shape):
    disc = TemporalDiscriminator(frames=3, in_ch=3, features=4)
    with pytest.raises(ValueError):
        disc(torch.rand(*shape))


@pytest.mark.parametrize("kwargs", [{"frames": 1}, {"frames": True}, {"frames": 3.0}, {"in_ch": 0},
                                    {"features": 0}])
def test_temporal_disc_bad_args(kwargs):
    with pytest.raises(ValueError):
        TemporalDiscriminator(**kwargs)


# --------------------------------------------------------------------- RRDBNet


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("hw", [(37, 21), (9, 16), (1, 1)])
def test_rrdb_shape_and_identity(scale, hw):
    torch.manual_seed(0)
    net = RRDBNet(scale=scale, features=8, blocks=1, growth=4)
    assert net.scale == scale
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, hw[0] * scale, hw[1] * scale) and y.dtype == torch.float32
    ref = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    assert torch.allclose(y, ref, rtol=0, atol=1e-6)  # fresh net == bilinear upscale


def test_rrdb_perturbed_and_grads():
    net = RRDBNet(scale=2, features=8, blocks=2, growth=4)
    perturb(net)
    x = torch.rand(2, 3, 13, 11)
    y = net(x)
    assert y.shape == (2, 3, 26, 22) and torch.isfinite(y).all()
    assert not torch.allclose(y, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name  # DDP needs every param used


def test_rrdb_default_size():
    # ESRGAN's published x4 RRDBNet (23 blocks, 64 features, growth 32) has 16.7M parameters.
    n = sum(p.numel() for p in RRDBNet().parameters())
    assert 16_600_000 < n < 16_800_000


def test_rrdb_bad_input():
    with pytest.raises(ValueError):
        RRDBNet(scale=2, features=4, blocks=1, growth=2)(torch.rand(1, 1, 8, 8))


@pytest.mark.parametrize("kwargs", [{"scale": 3}, {"scale": 1}, {"scale": 2.0}, {"scale": True},
                                    {"features": 0}, {"blocks": 0}, {"growth": 0}])
def test_rrdb_bad_args(kwargs):
    with pytest.raises(ValueError):
        RRDBNet(**kwargs)


# ----------------------------------------------------------------------- losses


def test_charbonnier_limits():
    target = torch.rand(2, 3, 8, 8)
    assert charbonnier(target, target).item() == pytest.approx(1e-3, rel=1e-4)  # eps at zero error
    assert charbonnier(target, target, eps=1e-2).item() == pytest.approx(1e-2, rel=1e-4)
    pred = target + torch.where(torch.rand_like(target) > 0.5, 5.0, -5.0)
    assert charbonnier(pred, target).item() == pytest.approx(l1(pred, target).item(), rel=1e-4)
    assert l1(pred, target).item() == pytest.approx(5.0, rel=1e-5)


def test_charbonnier_bad_args():
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError):
        charbonnier(x, x, eps=0.0)
    with pytest.raises(ValueError):
        charbonnier(x, torch.rand(1, 3, 4, 5))


def test_feature_matching_detaches_real():
    real = [torch.rand(2, 4, 8, 8, requires_grad=True), torch.rand(2, 8, 4, 4, requires_grad=True)]
    fake = [torch.rand(2, 4, 8, 8, requires_grad=True), torch.rand(2, 8, 4, 4, requires_grad=True)]
    loss = feature_matching(real, fake)
    expected = (F.l1_loss(fake[0], real[0]) + F.l1_loss(fake[1], real[1])) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(r.grad is None or not r.grad.any() for r in real)
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fake)
    assert feature_matching([f.detach() for f in fake], fake).item() == 0.0


def test_feature_matching_bad_input():
    a = torch.rand(1, 2, 4, 4)
    with pytest.raises(ValueError):
        feature_matching([], [])
    with pytest.raises(ValueError):
        feature_matching([a], [a, a])
    with pytest.raises(ValueError):
        feature_matching([a], [torch.rand(1, 2, 4, 5)])


def test_hinge():
    real = 1 + torch.rand(4, 1, 5, 5)  # >= 1
    fake = -1 - torch.rand(4, 1, 5, 5)  # <= -1
    assert hinge_d(real, fake).item() == 0.0
    assert hinge_d(torch.ones(3), -torch.ones(3)).item() == 0.0
    # Inside the margin D is still pushed.
    assert hinge_d(torch.full((3,), 0.5), -torch.ones(3)).item() == pytest.approx(0.5)
    assert hinge_d(torch.ones(3), torch.zeros(3)).item() == pytest.approx(1.0)
    assert hinge_g(fake).item() == pytest.approx(-fake.mean().item())


def test_relativistic_losses_follow_separation():
    base = torch.randn(4, 1, 6, 6)
    d_losses, g_losses = [], []
    for gap in [0.0, 1.0, 2.0, 4.0]:
        real, fake = base + gap, base - gap
        d_losses.append(relativistic_d(real, fake).item())
        g_losses.append(relativistic_g(real, fake).item())
    # The better D separates real (higher) from fake (lower), the lower its loss and
    # the higher G's: G's loss is lowest when its fakes look more real than the reals.
    assert d_losses == sorted(d_losses, reverse=True) and d_losses[-1] < d_losses[0]
    assert g_losses == sorted(g_losses) and g_losses[-1] > g_losses[0]
    # Relativistic: only the difference between real and fake logits matters.
    real, fake = torch.randn(8), torch.randn(8)
    assert relativistic_d(real + 3, fake + 3).item() == pytest.approx(relativistic_d(real, fake).item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["hinge", "relativistic"])
def test_weighted_adversarial_losses_count_only_the_weighted_pixels(kind):
    torch.manual_seed(0)
    real, fake = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6, requires_grad=True)
    ones = torch.ones(2, 1, 6, 6)
    # All-ones weights: the plain means.
    assert d_loss(kind, real, fake, ones).item() == pytest.approx(d_loss(kind, real, fake).item(), rel=1e-6)
    assert g_loss(kind, real, fake, ones).item() == pytest.approx(g_loss(kind, real, fake).item(), rel=1e-6)
    # Half the pixels weighted out: what lies there changes nothing and gets no gradient.
    weight = ones.clone()
    weight[..., :3] = 0
    before_d, before_g = d_loss(kind, real, fake, weight).item(), g_loss(kind, real, fake, weight)
    before_g.backward()
    assert fake.grad[..., :3].abs().sum() == 0 and fake.grad[..., 3:].abs().sum() > 0
    moved_real, moved_fake = real.clone(), fake.detach().clone()
    moved_real[..., :3] += 5
    moved_fake[..., :3] -= 5
    assert d_loss(kind, moved_real, moved_fake, weight).item() == pytest.approx(before_d, rel=1e-6)
    assert g_loss(kind, moved_real, moved_fake, weight).item() == pytest.approx(before_g.item(), rel=1e-6)
    # It equals the plain loss on the weighted pixels alone.
    keep = (slice(None), slice(None), slice(None), slice(3, None))
    assert d_loss(kind, real, fake, weight).item() == pytest.approx(
        d_loss(kind, real[keep], fake.detach()[keep]).item(), rel=1e-5)
    # No pixel weighted in: no loss (not NaN).
    assert d_loss(kind, real, fake, torch.zeros_like(ones)).item() == 0.0


def test_undamaged_leaves_out_local_damage_and_its_margin_not_grain():
    torch.manual_seed(0)
    clean = torch.rand(1, 3, 32, 32) * 0.5 + 0.25
    degraded = clean + 0.02 * torch.randn_like(clean)  # grain of ~5 levels of 255: not damage
    degraded[:, :, 10:13, 20:22] = 1.0  # a bright speck of dust
    mask = undamaged(degraded, clean, margin=4)
    assert mask.shape == (1, 1, 32, 32)
    assert mask[0, 0, 6:17, 16:26].sum() == 0  # the speck and 4 pixels around it
    assert mask[0, 0, 6:17, 16:26].numel() + mask.sum() == 32 * 32  # everything else is kept
    assert undamaged(degraded, clean, margin=0).sum() == 32 * 32 - 6
    assert undamaged(clean, clean).sum() == 32 * 32
    with pytest.raises(ValueError):
        undamaged(clean, clean[..., :16])


def test_relativistic_g_gives_no_grad_to_real():
    real = torch.randn(2, 1, 4, 4, requires_grad=True)
    fake = torch.randn(2, 1, 4, 4, requires_grad=True)
    relativistic_g(real, fake).backward()
    assert real.grad is None
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_adversarial_dispatch():
    real, fake = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.equal(d_loss("hinge", real, fake), hinge_d(real, fake))
    assert torch.equal(d_loss("relativistic", real, fake), relativistic_d(real, fake))
    assert torch.equal(g_loss("hinge", None, fake), hinge_g(fake))  # hinge ignores real
    assert torch.equal(g_loss("hinge", real, fake), hinge_g(fake))
    assert torch.equal(g_loss("relativistic", real, fake), relativistic_g(real, fake))
    for bad in ["wgan", "Hinge", ""]:
        with pytest.raises(ValueError):
            d_loss(bad, real, fake)
        with pytest.raises(ValueError):
            g_loss(bad, real, fake)
    with pytest.raises(ValueError):
        g_loss("relativistic", None, fake)


def test_temporal_consistency():
    target = torch.rand(2, 4, 3, 8, 8)
    offset = torch.tensor([0.1, -0.2]).view(2, 1, 1, 1, 1)  # constant brightness per clip
    assert temporal_consistency(target + offset, target).item() == pytest.approx(0.0, abs=1e-6)
    flicker = target.clone()
    flicker[:, 1] += 0.1  # one frame brighter: the changes into and out of it are off by 0.1
    loss = temporal_consistency(flicker, target)
    # Frame pairs (0,1) and (1,2) are off by 0.1 everywhere, pair (2,3) not at all.
    assert loss.item() == pytest.approx(0.1 * 2 / 3, rel=1e-4)
    assert l1(target + offset, target).item() > 0  # the pixel loss does see the offset


def test_temporal_consistency_bad_input():
    with pytest.raises(ValueError):
        temporal_consistency(torch.rand(2, 1, 3, 8, 8), torch.rand(2, 1, 3, 8, 8))
    with pytest.raises(ValueError):
        temporal_consistency(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError):
        temporal_consistency(torch.rand(2, 2, 3, 8, 8), torch.rand(2, 3, 3, 8, 8))


def test_detail_view_keeps_only_fine_detail_amplified():
    flat = torch.full((2, 3, 16, 16), 0.4)
    assert detail_view(flat).abs().max().item() < 1e-6  # no detail in a flat frame
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (0.01 * xx + 0.02 * yy).expand(1, 3, 16, 16)
    # A Gaussian blur leaves a linear ramp unchanged away from the (replicate-padded) border.
    assert detail_view(ramp)[..., 4:-4, 4:-4].abs().max().item() < 1e-5
    checker = ((xx + yy) % 2).expand(1, 3, 16, 16) * 0.01  # the finest detail there is, 2.55 levels of 255
    view = detail_view(checker, gain=16.0)
    # The blur takes a checkerboard to nearly its mean, so the +-0.005 around it comes out times the gain.
    assert view[..., 4:-4, 4:-4].abs().mean().item() == pytest.approx(16 * 0.005, rel=0.05)
    assert torch.allclose(detail_view(checker, gain=32.0), 2 * view)
    clips = torch.rand(2, 3, 3, 12, 10)  # (B, T, C, H, W): every frame and channel on its own
    # (to float32 rounding: the convolution's summation order depends on the batch size)
    assert torch.allclose(detail_view(clips)[1, 2, 0], detail_view(clips[1, 2, 0:1].unsqueeze(0))[0, 0], atol=1e-5)
    with pytest.raises(ValueError):
        detail_view(torch.rand(8, 8))
    with pytest.raises(ValueError):
        detail_view(flat, sigma=0)


def test_unsharp_sharpens_detail_and_leaves_flat_frames_alone():
    flat = torch.full((2, 3, 16, 16), 0.4)
    assert torch.allclose(unsharp(flat, 1.0), flat, atol=1e-6)
    frames = torch.rand(2, 3, 3, 24, 24) * 0.5 + 0.25  # (B, T, C, H, W): detail everywhere, room to sharpen
    assert unsharp(frames, 0.0) is frames
    sharp = unsharp(frames, 0.5)
    assert sharp.shape == frames.shape
    energy = lambda x: (x[..., 1:, :] - x[..., :-1, :]).square().mean() + (x[..., 1:] - x[..., :-1]).square().mean()
    assert energy(sharp) > 1.2 * energy(frames)
    # The detail added is amount times the fine band the detail view shows (before clamping).
    assert torch.allclose(sharp - frames, 0.5 * detail_view(frames, gain=1.0), atol=1e-6)
    edge = torch.zeros(1, 3, 8, 8)
    edge[..., 4:] = 1.0
    assert unsharp(edge, 2.0).min() >= 0 and unsharp(edge, 2.0).max() <= 1  # overshoot clamped
    with pytest.raises(ValueError):
        unsharp(frames, -0.1)


# --------------------------------------------------------------------- autocast


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not CUDA, reason="no CUDA")),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="no CUDA")),
])
def test_autocast_gan_step(device, dtype):
    # One mixed-precision G + D step through all three nets, as the trainer runs it.
    torch.manual_seed(0)
    gen = RRDBNet(scale=2, features=8, blocks=1, growth=4).to(device)
    perturb(gen)
    disc = UNetDiscriminatorSN(in_ch=3, features=4).to(device)
    tdisc = TemporalDiscriminator(frames=3, in_ch=3, features=4).to(device)
    lr = torch.rand(3, 3, 9, 11, device=device)  # 3 frames of one clip
    hr = torch.rand(3, 3, 18, 22, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        sr = gen(lr)
        real_logits, real_feats = disc(hr)
        fake_logits, fake_feats = disc(sr)
        t_real, _ = tdisc(hr.unsqueeze(0))
        t_fake, _ = tdisc(sr.unsqueeze(0))
        loss = (charbonnier(sr.float(), hr) + g_loss("relativistic", real_logits.float(), fake_logits.float())
                + feature_matching(real_feats, fake_feats) + g_loss("hinge", None, t_fake.float())
                + d_loss("hinge", t_real.float(), t_fake.float())
                + temporal_consistency(sr.unsqueeze(0).float(), hr.unsqueeze(0)))
    assert torch.isfinite(loss)
    loss.backward()
    for net in (gen, disc, tdisc):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
