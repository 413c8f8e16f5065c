"""The training step functions of every stage, without Ray: frame semantics of what the generator is trained
on, and that the fidelity and GAN steps learn (a few steps on one fixed batch lower the pixel loss)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS

from jobs.train_config import TrainSpec
from jobs.train_loop import (build_generator, fidelity_step, gan_step, generate, generator_optimizer, targets,
                             temporal_stacks)
from models.chain import STAGES
from models.degrade import make_pair
from models.recipes import RECIPES
from models.temporal_disc import TemporalDiscriminator
from models.unet_disc import UNetDiscriminatorSN
from pipeline.ffmpeg import codec_roundtrip

STAGE_NAMES = ["denoise", "deblock", "descratch", "sr2x", "sr4x", "interp2x"]


def tiny_spec(stage: str) -> TrainSpec:
    info = STAGES[stage]
    return TrainSpec(stage=stage, data="unused", out="unused", arch_args=TINY_ARGS[info.arch.__name__],
                     patch=32, batch=2, d_features=8, lr=1e-3, gan_lr=1e-3)


def batch(spec: TrainSpec, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Degraded pairs made by the stage's recipe from a moving synthetic clip (a shifted gradient pattern)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:spec.patch, 0:spec.patch]
    base = np.stack([127 + 100 * np.sin(xx / 4 + yy / (5 + c)) for c in range(3)], axis=-1).astype(np.uint8)
    lqs, hqs = [], []
    for b in range(spec.batch):
        clip = np.stack([np.roll(base, 2 * f + 5 * b, axis=1) for f in range(spec.clip_frames)])
        lq, hq = make_pair(clip, RECIPES[spec.stage], rng, roundtrip=codec_roundtrip)
        lqs.append(lq)
        hqs.append(hq)
    to = lambda x: torch.from_numpy(np.stack(x)).permute(0, 1, 4, 2, 3).float() / 255  # noqa: E731
    return to(lqs), to(hqs)


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_generator_output_matches_its_targets_frame_for_frame(stage):
    spec = tiny_spec(stage)
    info = STAGES[stage]
    torch.manual_seed(0)
    g = build_generator(spec)
    lq, hq = batch(spec)
    assert lq.shape[1] == hq.shape[1] == spec.clip_frames
    out, real = generate(g, info, lq), targets(info, hq)
    assert out.shape == real.shape
    expected_frames = 1 if info.is_interp else 3
    assert out.shape[:3] == (spec.batch, expected_frames, 3) and out.shape[-1] == spec.patch
    real_stack, fake_stack = temporal_stacks(info, lq, hq, out)
    assert real_stack.shape == fake_stack.shape and real_stack.shape[1] == 3
    if info.is_interp:  # the stacks differ only in the made frame
        assert torch.equal(real_stack[:, 0::2], fake_stack[:, 0::2])
        assert torch.equal(real_stack[:, 1], hq[:, 1])
    if info.radius:  # denoise, descratch: the outputs are the frames that have a full window
        assert torch.equal(real, hq[:, info.radius:info.radius + 3])


@pytest.mark.parametrize("stage", ["denoise", "descratch", "sr2x", "interp2x"])
def test_fidelity_and_gan_steps_learn(stage):
    torch.manual_seed(0)
    spec = tiny_spec(stage)
    info = STAGES[stage]
    g = build_generator(spec)
    with torch.no_grad():  # start away from the zero-initialised identity, so there is something to learn
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d, dt = UNetDiscriminatorSN(features=8), TemporalDiscriminator(frames=3, features=8)
    lq, hq = batch(spec)
    opt_g = generator_optimizer(g, spec, gan=False)
    first = fidelity_step(g, opt_g, lq, hq, spec, info)["loss_pixel"]
    for _ in range(15):
        last = fidelity_step(g, opt_g, lq, hq, spec, info)["loss_pixel"]
    assert last < first

    opt_g = generator_optimizer(g, spec, gan=True)
    opt_d = torch.optim.Adam([*d.parameters(), *dt.parameters()], lr=1e-3)
    d_before = [p.detach().clone() for p in d.parameters()]
    metrics = gan_step(g, d, dt, opt_g, opt_d, lq, hq, spec, info)
    assert set(metrics) == {"loss_pixel", "loss_feature", "loss_adv", "loss_temporal_adv", "loss_temporal",
                            "loss_d"}
    assert all(np.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(d_before, d.parameters()))  # D stepped
    assert all(p.requires_grad for p in d.parameters())  # unfrozen after the generator step


def test_discriminator_warmup_steps_leave_the_generator_alone():
    torch.manual_seed(0)
    spec = tiny_spec("denoise")
    info = STAGES["denoise"]
    g = build_generator(spec)
    d, dt = UNetDiscriminatorSN(features=8), TemporalDiscriminator(frames=3, features=8)
    lq, hq = batch(spec)
    opt_g = generator_optimizer(g, spec, gan=True)
    opt_d = torch.optim.Adam([*d.parameters(), *dt.parameters()], lr=1e-3)
    g_before = [p.detach().clone() for p in g.parameters()]
    d_before = [p.detach().clone() for p in d.parameters()]
    metrics = gan_step(g, d, dt, opt_g, opt_d, lq, hq, spec, info, train_g=False)
    assert set(metrics) == {"loss_d"} and np.isfinite(metrics["loss_d"])
    assert all(torch.equal(a, b) for a, b in zip(g_before, g.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, d.parameters()))


def test_warmup_must_leave_generator_steps():
    with pytest.raises(ValueError, match="d-warmup"):
        TrainSpec(stage="denoise", data="d", out="o", steps=10, gan_steps=20, d_warmup=20)
    assert TrainSpec(stage="denoise", data="d", out="o", steps=10, gan_steps=20, d_warmup=19).d_warmup == 19


def test_fidelity_lr_anneals_from_its_peak_to_a_hundredth():
    spec = TrainSpec(stage="denoise", data="d", out="o", steps=100, gan_steps=0, lr=1e-3)
    lrs = [spec.fidelity_lr(step) for step in range(101)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-5)
    assert lrs[50] == pytest.approx((1e-3 + 1e-5) / 2)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    constant = spec.model_copy(update={"lr_schedule": "constant"})
    assert {constant.fidelity_lr(step) for step in (0, 50, 99)} == {1e-3}


def test_interpolation_patches_favour_motion():
    """A clip that moves only in its left half: interp2x cuts its (unpanned) patches from the moving part (its
    flow gets a gradient there), other stages cut patches uniformly."""
    from jobs.train_data import motion, patch_origin

    rng = np.random.default_rng(0)
    picks = {}
    for stage in ("interp2x", "deblock"):
        spec = TrainSpec(stage=stage, data="d", out="o", patch=32)
        clip = np.full((spec.clip_frames, 64, 128, 3), 128, np.uint8)
        clip[:, :, :64] = rng.integers(0, 256, (spec.clip_frames, 64, 64, 3), dtype=np.uint8)  # new every frame
        origins = [patch_origin(clip, 32, spec, np.random.default_rng(i)) for i in range(40)]
        picks[stage] = np.mean([motion(clip[:, y:y + 32, x:x + 32]) > 0 for y, x in origins])
    assert picks["interp2x"] > 0.9 > picks["deblock"] > 0.3


def _pan_step(frames: np.ndarray) -> tuple[int, int] | None:
    """The constant whole-pixel step each frame moves from the previous one, (0, 0) when still; None if none."""
    from jobs.train_data import PAN_MAX_SPEED

    s = frames.shape[1]
    for vy in range(-PAN_MAX_SPEED, PAN_MAX_SPEED + 1):
        for vx in range(-PAN_MAX_SPEED, PAN_MAX_SPEED + 1):
            if all(np.array_equal(frames[k + 1][max(0, -vy):s - max(0, vy), max(0, -vx):s - max(0, vx)],
                                  frames[k][max(0, vy):s + min(0, vy), max(0, vx):s + min(0, vx)])
                   for k in range(len(frames) - 1)):
                return vy, vx
    return None


def test_windowed_stages_train_on_camera_pans_too():
    """About half the patches of a windowed stage (denoise, deblock) pan: each frame is the previous one moved by
    the same whole-pixel step, so a static scene becomes one the net must align; single-frame stages never pan."""
    from jobs.train_data import sample_pair

    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 256, (1, 96, 96, 3), dtype=np.uint8), 11, axis=0)  # one frame, 11 times
    for stage, lo, hi in (("denoise", 0.3, 0.7), ("deblock", 0.3, 0.7), ("sr2x", 0, 0)):
        spec = TrainSpec(stage=stage, data="d", out="o", patch=32)
        steps = []
        for i in range(60):
            _, hq = sample_pair(still[:spec.clip_frames], spec, RECIPES["interp2x"], np.random.default_rng(i),
                                augment=False)
            steps.append(_pan_step(hq))
            assert steps[-1] is not None, "every frame must be the previous one moved by one constant step"
        panned = np.mean([v != (0, 0) for v in steps])
        assert lo <= panned <= hi, (stage, panned)


def test_pool_variants_of_windowed_stages_pan_before_the_damage():
    """With --pool-variants the damage is made up front, so the pan must be too: a windowed stage's variant is a
    window of its pool clip, panning about half the time, and it is that window which is degraded."""
    from jobs.train_data import pool_window

    still = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 192, 192, 3), dtype=np.uint8), 7, axis=0)
    windows = [pool_window(still, 96, np.random.default_rng(i)) for i in range(60)]
    assert {w.shape for w in windows} == {(7, 144, 144, 3)}  # halfway between patch and clip: room to cut patches
    steps = [_pan_step(w) for w in windows]
    assert None not in steps
    assert 0.3 <= np.mean([v != (0, 0) for v in steps]) <= 0.7


def test_pool_variant_patches_stay_aligned_with_their_targets():
    """A patch of a degraded pool clip and of its clean original cover the same pixels through every flip,
    rotation and time reversal (here the 'degradation' is a 2x2 block average, which commutes with them)."""
    from jobs.train_data import cut_pair

    hq = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)

    def block_mean(x):
        t, h, w, c = x.shape
        return (x.reshape(t, h // 2, 2, w // 2, 2, c).astype(np.uint16).sum((2, 4)) // 4).astype(np.uint8)

    lq = block_mean(hq)
    spec = TrainSpec(stage="sr2x", data="d", out="o", patch=32, pool_variants=1)
    seen = set()
    for seed in range(12):
        lq_patch, hq_patch = cut_pair(lq, hq, spec, 2, np.random.default_rng(seed))
        assert lq_patch.shape == (3, 16, 16, 3) and hq_patch.shape == (3, 32, 32, 3)
        assert np.array_equal(block_mean(hq_patch), lq_patch)
        seen.add(lq_patch.tobytes())
    assert len(seen) == 12  # a different patch or orientation each time


def test_training_checkpoints_round_trip_and_refuse_pickles_and_tampering(tmp_path):
    import pickle

    from jobs import train_checkpoint

    spec = tiny_spec("denoise")
    g = build_generator(spec)
    opt = generator_optimizer(g, spec, gan=False)
    for param in g.parameters():
        param.grad = torch.full_like(param, 0.1)
    opt.step()  # the optimiser now holds moment tensors, which the checkpoint must carry
    train_checkpoint.save(tmp_path / "ok", 7, {"g": g}, {"opt_g": opt}, {"history": []})
    state = train_checkpoint.load(tmp_path / "ok")
    assert state.step == 7 and all(torch.equal(state.module("g")[k], v) for k, v in g.state_dict().items())
    restored = generator_optimizer(build_generator(spec), spec, gan=False)
    restored.load_state_dict(state.optimizer("opt_g"))  # the moments come back exactly
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    blob = bytearray((tmp_path / "ok" / train_checkpoint.TENSORS).read_bytes())
    blob[-4] ^= 0xFF  # one flipped byte in a weight: still a valid file, no longer the one written
    (tmp_path / "ok" / train_checkpoint.TENSORS).write_bytes(bytes(blob))
    with pytest.raises(train_checkpoint.CheckpointError, match="does not match the sha256"):
        train_checkpoint.load(tmp_path / "ok")

    train_checkpoint.save(tmp_path / "pickled", 7, {"g": g}, {}, {})
    (tmp_path / "pickled" / train_checkpoint.TENSORS).write_bytes(pickle.dumps({"g.weight": torch.zeros(3)}))
    meta = tmp_path / "pickled" / train_checkpoint.META
    meta.write_text(meta.read_text().replace('"sha256"', '"was_sha256"'))  # even with its digest removed
    with pytest.raises(train_checkpoint.CheckpointError, match="not a valid safetensors"):
        train_checkpoint.load(tmp_path / "pickled")


def test_sharpen_target_moves_only_the_pixel_losss_target():
    """--sharpen-target: the GAN phase's pixel loss is measured against the unsharp-masked clean frame."""
    from models.losses import charbonnier, unsharp

    info = STAGES["denoise"]
    lq, hq = batch(tiny_spec("denoise"))
    measured = {}
    for amount in (0.0, 1.0):
        torch.manual_seed(0)
        spec = tiny_spec("denoise").model_copy(update={"loss": tiny_spec("denoise").loss.model_copy(
            update={"sharpen_target": amount})})
        g = build_generator(spec)
        d, dt = UNetDiscriminatorSN(features=8), TemporalDiscriminator(frames=3, features=8)
        with torch.no_grad():
            out = generate(g, info, lq)
        opt_d = torch.optim.Adam([*d.parameters(), *dt.parameters()], lr=1e-3)
        metrics = gan_step(g, d, dt, generator_optimizer(g, spec, gan=True), opt_d, lq, hq, spec, info)
        expected = charbonnier(out, unsharp(targets(info, hq), amount)).item()
        assert metrics["loss_pixel"] == pytest.approx(expected, rel=1e-5)
        measured[amount] = metrics["loss_pixel"]
    # The fresh generator is the identity on its (noisy) input: the sharpened target is farther from it.
    assert measured[1.0] > measured[0.0]
    with pytest.raises(ValueError):
        TrainSpec(stage="denoise", data="x", out="y", loss={"sharpen_target": -0.5})


def test_d_region_undamaged_judges_only_where_the_damage_left_the_frame_alone():
    """--d-region undamaged: where the degraded frames differ from the clean ones everywhere, the per-frame
    discriminator has no pixel to judge (no adversarial loss either way); with "all" it has every pixel."""
    info = STAGES["descratch"]
    base = tiny_spec("descratch")
    _, hq = batch(base)
    lq = 1 - hq  # damage everywhere
    measured = {}
    for region in ("all", "undamaged"):
        spec = base.model_copy(update={"loss": base.loss.model_copy(
            update={"d_region": region, "w_temporal_adversarial": 0.0})})
        torch.manual_seed(0)
        g = build_generator(spec)
        d, dt = UNetDiscriminatorSN(features=8), TemporalDiscriminator(frames=3, features=8)
        opt_d = torch.optim.Adam(d.parameters(), lr=1e-3)
        measured[region] = gan_step(g, d, dt, generator_optimizer(g, spec, gan=True), opt_d, lq, hq, spec, info)
    assert measured["undamaged"]["loss_adv"] == 0.0 and measured["undamaged"]["loss_d"] == 0.0
    assert measured["all"]["loss_adv"] != 0.0 and measured["all"]["loss_d"] > 0.0
    for stage in ("sr2x", "interp2x"):  # output frames that do not align with the input's have no such mask
        with pytest.raises(ValueError, match="d-region"):
            TrainSpec(stage=stage, data="x", out="y", loss={"d_region": "undamaged"})


def test_no_temporal_discriminator_when_its_weight_is_zero():
    """--w-temporal-adversarial 0: the temporal discriminator is neither consulted nor trained."""
    torch.manual_seed(0)
    base = tiny_spec("denoise")
    spec = base.model_copy(update={"loss": base.loss.model_copy(update={"w_temporal_adversarial": 0.0})})
    info = STAGES["denoise"]
    g = build_generator(spec)
    d, dt = UNetDiscriminatorSN(features=8), TemporalDiscriminator(frames=3, features=8)
    lq, hq = batch(spec)
    opt_d = torch.optim.Adam([*d.parameters(), *dt.parameters()], lr=1e-3)
    dt_before = [p.detach().clone() for p in dt.parameters()]
    metrics = gan_step(g, d, dt, generator_optimizer(g, spec, gan=True), opt_d, lq, hq, spec, info)
    assert metrics["loss_temporal_adv"] == 0.0 and np.isfinite(metrics["loss_d"])
    assert all(p.grad is None for p in dt.parameters())
    assert all(torch.equal(a, b) for a, b in zip(dt_before, dt.parameters()))


def test_pixel_loss_choices():
    """--pixel-loss picks the fidelity loss; l2 is the mean squared error PSNR measures."""
    from jobs.train_loop import pixel_loss

    out, target = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    for name, expected in (("l1", 0.5), ("l2", 0.25), ("charbonnier", (0.25 + 1e-6) ** 0.5)):
        spec = TrainSpec(stage="denoise", data="d", out="o", loss={"pixel": name})
        assert pixel_loss(spec, out, target).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        TrainSpec(stage="denoise", data="d", out="o", loss={"pixel": "l3"})


def test_init_continues_its_architecture_unless_told_otherwise():
    """--init DIR trains DIR's network on (its card's arch and args), the stage's window and scale excepted:
    so `reelmend train deblock --init models/weights` continues the shipped nine-conv deblocker."""
    from jobs.train import continue_architecture

    card = {"arch": "RestorerNet", "args": {"in_frames": 1, "blocks": 9}}
    spec = continue_architecture(TrainSpec(stage="deblock", data="d", out="o", init="i"), card)
    assert spec.arch_name == "RestorerNet" and spec.generator_args == {"in_frames": 5, "blocks": 9}
    deeper = TrainSpec(stage="deblock", data="d", out="o", init="i", arch_args={"blocks": 12})
    assert continue_architecture(deeper, card).generator_args == {"in_frames": 5, "blocks": 12}
    rrdb = {"arch": "RRDBNet", "args": {"scale": 2, "features": 24}}
    assert continue_architecture(TrainSpec(stage="sr2x", data="d", out="o", init="i"), rrdb).generator_args == {
        "scale": 2, "features": 24}
    other = TrainSpec(stage="sr2x", data="d", out="o", init="i", arch="CompactSR")
    assert continue_architecture(other, rrdb) == other  # told otherwise: its weights will not load, and say so
