"""The degradation model: clean clips -> (low-quality, clean) training pairs.

Each function damages a (T, H, W, 3) uint8 clip the way one real-world process does and returns a new uint8
clip; each is pure and deterministic given its parameters and the `numpy.random.Generator` it is handed (never
global random state), so a seed reproduces a training pair exactly. `make_pair` applies a `Recipe`
(models/recipes.py) to a clip.

Video-codec damage needs FFmpeg, which lives in `pipeline`; `models` never imports `pipeline`, so the codec
roundtrip is passed in (`pipeline.ffmpeg.codec_roundtrip`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.recipes import Recipe

# (clip, codec, quality) -> clip: the signature of pipeline.ffmpeg.codec_roundtrip.
Roundtrip = Callable[..., np.ndarray]

# BT.601 luma weights (what OpenCV's RGB2GRAY, and so Real-ESRGAN's gray noise, use).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
RESIZE_METHODS = ("area", "bilinear", "bicubic")


def _check_clip(clip: np.ndarray, what: str) -> None:
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
        raise ValueError(f"{what}: expected a (T, H, W, 3) uint8 clip, got shape {clip.shape} {clip.dtype}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# -- blur ---------------------------------------------------------------------------------------------------

def anisotropic_gaussian_kernel(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """A normalised 2-D Gaussian with standard deviations `sigma_x`, `sigma_y` (pixels) along axes rotated by
    `theta` radians: covariance R diag(sx^2, sy^2) R^T, as BasicSR's `bivariate_Gaussian` (Real-ESRGAN).
    Its radius is 3 sigma, so it keeps > 99% of the mass along its longer axis."""
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"blur sigmas must be positive, got {sigma_x}, {sigma_y}")
    radius = max(1, math.ceil(3 * max(sigma_x, sigma_y)))
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    inv_cov = np.linalg.inv(rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T)
    ys, xs = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    xy = np.stack([xs, ys], axis=-1).astype(np.float64)
    kernel = np.exp(-0.5 * np.einsum("...i,ij,...j->...", xy, inv_cov, xy))
    return (kernel / kernel.sum()).astype(np.float32)


def _filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every frame and channel of a float32 (T, H, W, C) array with an odd-sized 2-D kernel, borders
    reflected without repeating the edge pixel (numpy's and torch's "reflect", OpenCV's BORDER_REFLECT_101,
    which Real-ESRGAN's filter2D uses; numpy also reflects again where the kernel is wider than the frame).
    A sum of shifted frames in a fixed order: exactly reproducible on any machine and thread count, and
    fast enough for training patches (a 19x19 kernel on 3x128x128 takes ~15 ms)."""
    ry, rx = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(x, ((0, 0), (ry, ry), (rx, rx), (0, 0)), mode="reflect")
    h, w = x.shape[1:3]
    out = np.zeros_like(x)
    for dy, dx in np.ndindex(*kernel.shape):
        out += kernel[dy, dx] * padded[:, dy:dy + h, dx:dx + w]
    return out


def gaussian_blur(clip: np.ndarray, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Optical softness, defocus and motion-like smear: an anisotropic Gaussian blur, the same kernel on every
    frame (a property of the source). Real-ESRGAN's first- and second-order blur (Wang et al., "Real-ESRGAN",
    ICCVW 2021, sec. 3.1), with reflected borders as there."""
    _check_clip(clip, "gaussian_blur")
    kernel = anisotropic_gaussian_kernel(sigma_x, sigma_y, theta)
    return _to_uint8(_filter2d(clip.astype(np.float32), kernel))


# -- resize -------------------------------------------------------------------------------------------------

def resize(clip: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Resolution loss (and the interpolation filter a transfer used): resize every frame to height x width.
    "bilinear" and "bicubic" are antialiased when downscaling (torch's antialias=True, the PIL-like filters),
    "area" averages the input pixels each output pixel covers (adaptive average pooling)."""
    _check_clip(clip, "resize")
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r} is not one of {RESIZE_METHODS}")
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {width}x{height}")
    x = torch.from_numpy(clip.astype(np.float32)).permute(0, 3, 1, 2)  # a copy: clip may be read-only
    if method == "area":
        y = F.interpolate(x, size=(height, width), mode="area")
    else:
        y = F.interpolate(x, size=(height, width), mode=method, align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def bicubic_downscale(clip: np.ndarray, scale: int) -> np.ndarray:
    """The standard SR input: an antialiased bicubic downscale by `scale` (torch interpolate, bicubic,
    antialias=True, rounded and clipped to uint8). H and W must be multiples of `scale`, so that the low- and
    high-resolution pixel grids align exactly; `crop_to_multiple` first otherwise."""
    _check_clip(clip, "bicubic_downscale")
    h, w = clip.shape[1:3]
    if h % scale or w % scale:
        raise ValueError(f"bicubic_downscale: {w}x{h} is not a multiple of {scale}; crop_to_multiple first")
    return resize(clip, h // scale, w // scale, "bicubic")


def crop_to_multiple(clip: np.ndarray, multiple: int) -> np.ndarray:
    """The top-left part of the clip whose height and width are multiples of `multiple`."""
    h, w = clip.shape[1:3]
    return clip[:, :h - h % multiple, :w - w % multiple]


# -- noise --------------------------------------------------------------------------------------------------

def gaussian_noise(clip: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Sensor read noise and analogue transmission noise: additive white Gaussian noise of standard deviation
    `sigma` (0..255 scale), new on every frame; `gray` adds the same noise to the three channels (luma-only
    noise), as Real-ESRGAN's gray noise (Wang et al., ICCVW 2021, sec. 3.1)."""
    _check_clip(clip, "gaussian_noise")
    t, h, w, _ = clip.shape
    noise = rng.standard_normal((t, h, w, 1 if gray else 3), dtype=np.float32) * np.float32(sigma)
    return _to_uint8(clip + noise)


def poisson_noise(clip: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Photon shot noise: signal-dependent (variance grows with brightness), new on every frame; `scale`
    multiplies it. Follows BasicSR's `generate_poisson_noise` (Real-ESRGAN): counts are Poisson with a mean
    of the intensity times the next power of two above the number of distinct levels in the clip; `gray`
    computes it on luma and adds it to all channels."""
    _check_clip(clip, "poisson_noise")
    img = clip.astype(np.float32) / 255
    if gray:
        img = (img @ LUMA)[..., None]
    levels = 2.0 ** math.ceil(math.log2(max(2, len(np.unique(clip)))))
    noise = rng.poisson(img * levels).astype(np.float32) / np.float32(levels) - img
    return _to_uint8(clip + noise * np.float32(scale * 255))


# -- compression --------------------------------------------------------------------------------------------

def jpeg(clip: np.ndarray, quality: int) -> np.ndarray:
    """Intra-frame block-DCT compression (8x8 blocking, ringing, 4:2:0 chroma): each frame through Pillow's
    libjpeg at `quality` (1..95), in memory, as Real-ESRGAN's JPEG step (there through OpenCV)."""
    _check_clip(clip, "jpeg")
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality {quality} is outside 1..95")
    frames = []
    for frame in clip:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        frames.append(np.asarray(Image.open(buf).convert("RGB")))
    return np.stack(frames)


def video_codec(clip: np.ndarray, codec: str, quality: int, roundtrip: Roundtrip | None) -> np.ndarray:
    """Inter-frame codec damage (blocking, ringing, mosquito noise, smeared motion, flickering detail across
    frames) from a real encoder: `roundtrip` is `pipeline.ffmpeg.codec_roundtrip` ("h264" with CRF
    `quality`, or "mpeg2" with quantiser `quality`), the same settings for the whole clip as in a real file."""
    _check_clip(clip, "video_codec")
    if roundtrip is None:
        raise ValueError("video_codec needs the codec roundtrip: pass roundtrip=pipeline.ffmpeg.codec_roundtrip")
    out = roundtrip(clip, codec, int(quality))
    if out.shape != clip.shape or out.dtype != np.uint8:
        raise ValueError(f"codec roundtrip returned {out.shape} {out.dtype} for a {clip.shape} clip")
    return out


# -- film ---------------------------------------------------------------------------------------------------

def film_grain(clip: np.ndarray, strength: float, size: float, rng: np.random.Generator) -> np.ndarray:
    """Photographic film grain: a new grain pattern on every frame, spatially correlated (white noise blurred
    by a Gaussian of `size` pixels, then normalised to unit variance), monochrome, and luma-dependent.

    The intensity dependence follows the Boolean grain model of Newson, Delon and Galerne ("A Stochastic Film
    Grain Model for Resolution-Independent Rendering", Computer Graphics Forum 2017): grain variance is
    proportional to u(1 - u) at intensity u, so grain is strongest in mid-tones; a floor keeps some in deep
    shadows and highlights, as AV1's film grain scaling functions usually do. `strength` is the grain's
    standard deviation at mid-grey, on the 0..255 scale."""
    _check_clip(clip, "film_grain")
    if size < 0:
        raise ValueError(f"film grain size must be >= 0, got {size}")
    grain = rng.standard_normal((*clip.shape[:3], 1), dtype=np.float32)
    if size > 0:
        grain = _filter2d(grain, anisotropic_gaussian_kernel(size, size, 0.0))
    grain /= grain.std(axis=(1, 2), keepdims=True) + np.float32(1e-6)
    u = (clip.astype(np.float32) @ LUMA) / 255
    amplitude = np.float32(strength) * (0.25 + 0.75 * 2 * np.sqrt(u * (1 - u)))
    return _to_uint8(clip + amplitude[..., None] * grain)


def scratches(clip: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Line scratches: thin, near-vertical bright or dark lines left by particles in the projector or printer
    gate, which persist over consecutive frames at almost the same column (slight drift and gate weave) with
    flickering intensity (Kokaram, "Detection and removal of line scratches in motion picture films", CVPR
    1996; the cross-section here is a Gaussian rather than his damped sinusoid).

    Each scratch draws a fixed number of values, so a larger `count` adds scratches to the same ones."""
    _check_clip(clip, "scratches")
    t, h, w, _ = clip.shape
    out = clip.astype(np.float32)
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    for _ in range(count):
        x0, slope = rng.uniform(0, w), rng.uniform(-0.02, 0.02)  # near vertical: <= 2 px over 100 rows
        drift, weave = rng.uniform(-0.5, 0.5), rng.normal(0, 0.2, t)  # px per frame; per-frame jitter
        width = rng.uniform(0.4, 1.2)
        full, y0, length = rng.random() < 0.6, rng.uniform(0, h / 2), rng.uniform(h / 2, h)
        value = rng.uniform(225, 255) if rng.random() < 0.5 else rng.uniform(0, 40)
        opacity = rng.uniform(0.4, 0.9) * rng.uniform(0.7, 1.0, t)  # flicker from frame to frame
        extent = np.ones_like(rows) if full else ((rows >= y0) & (rows < y0 + length)).astype(np.float32)
        for f in range(t):
            centre = x0 + drift * f + weave[f] + slope * (rows - h / 2)
            alpha = (opacity[f] * extent * np.exp(-0.5 * ((cols - centre) / width) ** 2))[..., None]
            out[f] = out[f] * (1 - alpha) + np.float32(value) * alpha
    return _to_uint8(out)


def _paste_blob(frame: np.ndarray, rng: np.random.Generator, r_low: float, r_high: float,
                values: tuple[tuple[float, float], tuple[float, float]], opacity: tuple[float, float]) -> None:
    """Blend one irregular blob into `frame` (float32, H x W x 3) in place. Its outline is a circle whose
    radius is modulated by random low harmonics (2nd to 4th); its edge is anti-aliased over about a pixel.
    It always draws the same number of values, whatever its size."""
    h, w = frame.shape[:2]
    cy, cx, radius = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(r_low, r_high)
    amps, phases = rng.uniform(0, 0.25, 3), rng.uniform(0, 2 * np.pi, 3)
    dark, bright = values
    value = rng.uniform(*bright) if rng.random() < 0.5 else rng.uniform(*dark)
    alpha_max = rng.uniform(*opacity)
    reach = radius * (1 + amps.sum()) + 1
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = ys + 0.5 - cy, xs + 0.5 - cx
    angle = np.arctan2(dy, dx)
    outline = radius * (1 + sum(a * np.cos(k * angle + p) for k, a, p in zip((2, 3, 4), amps, phases)))
    alpha = (alpha_max * np.clip(outline - np.hypot(dy, dx) + 0.5, 0, 1))[..., None].astype(np.float32)
    region = frame[y0:y1, x0:x1]
    region *= 1 - alpha
    region += np.float32(value) * alpha


def dust(clip: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Dust and dirt: `count` small specks (radius under ~2.5 px) on every frame, each on that frame only,
    dark (dirt on the print blocks light) or bright (dirt on the negative, "sparkle"). Temporally impulsive
    damage, as Kokaram models it ("Motion Picture Restoration", Springer 1998, ch. 6). A larger `count` adds
    specks to the same ones."""
    _check_clip(clip, "dust")
    out = clip.astype(np.float32)
    for _ in range(count):
        for frame in out:
            _paste_blob(frame, rng, 0.6, 2.5, values=((0, 50), (205, 255)), opacity=(0.6, 1.0))
    return _to_uint8(out)


def blotches(clip: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Blotches: `count` larger irregular patches per frame where emulsion is missing or dirt covers it, each
    on that frame only and of near-constant intensity that hides the picture (Kokaram's blotch model, "Motion
    Picture Restoration", Springer 1998, ch. 6). Radii up to a tenth of the frame's shorter side."""
    _check_clip(clip, "blotches")
    out = clip.astype(np.float32)
    r_high = max(4.0, min(clip.shape[1:3]) / 10)
    for _ in range(count):
        for frame in out:
            _paste_blob(frame, rng, 3.0, r_high, values=((0, 70), (180, 255)), opacity=(0.8, 1.0))
    return _to_uint8(out)


def interlace(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Combing: one field (every other line, parity drawn from `rng`) of each frame comes from the next
    frame (or, with the other field order, the previous one; the clip's end frames use the neighbour they
    have), as when fields from different instants are woven together by a bad deinterlace or a broken
    telecine cadence. A whole frame apart rather than a field, which exaggerates motion slightly."""
    _check_clip(clip, "interlace")
    t = clip.shape[0]
    if t < 2:
        raise ValueError("interlace needs at least 2 frames: the other field comes from a neighbouring frame")
    parity, step = int(rng.integers(0, 2)), (1 if rng.random() < 0.5 else -1)
    out = clip.copy()
    for f in range(t):
        other = f + step if 0 <= f + step < t else f - step
        out[f, parity::2] = clip[other, parity::2]
    return out


# -- pairs --------------------------------------------------------------------------------------------------

def make_pair(clip: np.ndarray, recipe: Recipe, rng: np.random.Generator,
              roundtrip: Roundtrip | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A training pair (lq, hq) from a clean clip: hq is the clip, cropped (top-left) to a multiple of
    `recipe.scale`, and lq is hq damaged by one branch of the recipe, drawn from `rng`, with size
    (H // scale, W // scale). Parameters are drawn once per clip (blur, resize, codec quality, noise level,
    scratch positions are properties of a source); per-frame damage (noise, grain, dust, blotches) is drawn
    fresh for each frame inside the ops."""
    _check_clip(clip, "make_pair")
    if roundtrip is None and recipe.uses("video_codec"):
        raise ValueError(f"recipe {recipe.name!r} uses video_codec: pass roundtrip=pipeline.ffmpeg.codec_roundtrip")
    hq = np.ascontiguousarray(crop_to_multiple(clip, recipe.scale))
    target = (hq.shape[1] // recipe.scale, hq.shape[2] // recipe.scale)
    if min(target) < 1:
        raise ValueError(f"make_pair: a {clip.shape[2]}x{clip.shape[1]} clip is smaller than scale {recipe.scale}")
    weights = np.array([b.weight for b in recipe.branches])
    branch = recipe.branches[int(rng.choice(len(weights), p=weights / weights.sum()))]
    lq = hq
    for op in branch.ops:
        if rng.random() >= op.p:
            continue
        params = {name: spec.sample(rng) for name, spec in op.params.items()}
        lq = _apply(op.name, lq, params, rng, target, roundtrip)
    if lq.shape[1:3] != target:
        raise ValueError(f"recipe {recipe.name!r}, branch {branch.name!r} produced {lq.shape[1:3]}, not {target}")
    return lq, hq


def _apply(name: str, clip: np.ndarray, params: dict[str, Any], rng: np.random.Generator,
           target: tuple[int, int], roundtrip: Roundtrip | None) -> np.ndarray:
    """One recipe op on a clip: the op names and parameters of models.recipes.OP_PARAMS."""
    match name:
        case "blur":
            return gaussian_blur(clip, **params)
        case "resize":
            h, w = (max(2, round(d * params["factor"])) for d in clip.shape[1:3])
            return resize(clip, h, w, params["method"])
        case "downscale":
            return resize(clip, *target, params["method"])
        case _ if name in OPS_WITH_RNG:
            return OPS_WITH_RNG[name](clip, **params, rng=rng)
        case "jpeg":
            return jpeg(clip, **params)
        case "video_codec":
            return video_codec(clip, **params, roundtrip=roundtrip)
    raise ValueError(f"unknown degradation op {name!r}")


# The ops whose damage is drawn from the generator (those without one are deterministic given their parameters).
OPS_WITH_RNG = {
    "gaussian_noise": gaussian_noise, "poisson_noise": poisson_noise, "film_grain": film_grain,
    "scratches": scratches, "dust": dust, "blotches": blotches, "interlace": interlace,
}
