"""The restoration chain: stage names -> networks, their frame semantics, and running them over frames.

The pipeline calls `load_chain` and `Chain.run`; what a stage does to frames (scale, temporal factor,
neighbour frames) and the chain grammar live in `models.geometry`, which needs no torch.

Frames too large for one forward pass are cut into overlapping tiles whose outputs are blended with linear ramps
over the overlap (the tiling of Real-ESRGAN's inference script, with feathering instead of hard seams).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.compact_sr import CompactSR
from models.flow_interp import FlowInterp
from models.geometry import GEOMETRY, Geometry, StepRef, chain_geometry, parse_chain
from models.restorer_net import RestorerNet
from models.rrdb_sr import RRDBNet
from models.weights import SHIPPED, WeightsError, load_state


@dataclass(frozen=True)
class StageInfo(Geometry):
    """A stage's geometry (`models.geometry`) and the architectures that back it (None: no model).

    `arch` is the default (what `reelmend train` builds and what ships); `alternatives` are other architectures
    with the same tensor contract that a weights card may name, e.g. the larger RRDBNet for GPU clusters.
    """

    arch: type[nn.Module] | None = None
    default_args: dict[str, Any] = field(default_factory=dict)
    alternatives: tuple[type[nn.Module], ...] = ()

    @property
    def archs(self) -> dict[str, type[nn.Module]]:
        return {a.__name__: a for a in (self.arch, *self.alternatives) if a is not None}


_NETWORKS: dict[str, dict[str, Any]] = {
    "identity": {},
    "denoise": {"arch": RestorerNet, "default_args": {"in_frames": 9}},
    "deblock": {"arch": RestorerNet, "default_args": {"in_frames": 5}},
    "descratch": {"arch": RestorerNet, "default_args": {"in_frames": 3}},
    "sr2x": {"arch": CompactSR, "default_args": {"scale": 2}, "alternatives": (RRDBNet,)},
    "sr4x": {"arch": CompactSR, "default_args": {"scale": 4}, "alternatives": (RRDBNet,)},
    "interp2x": {"arch": FlowInterp, "default_args": {"search": 4}},
}
STAGES: dict[str, StageInfo] = {name: StageInfo(**vars(geo), **_NETWORKS[name]) for name, geo in GEOMETRY.items()}


@dataclass
class Step:
    ref: StepRef
    info: StageInfo
    net: nn.Module | None


def build_step(ref: StepRef, weights: str | None) -> Step:
    """Load one step's network from a weights folder (None: the shipped folder)."""
    info = STAGES[ref.stage]
    if info.arch is None:
        return Step(ref, info, None)
    tensors, card = load_state(weights or str(SHIPPED), ref.stage, ref.flavour)
    arch = info.archs.get(card.get("arch"))
    if arch is None:
        raise WeightsError(f"weights for '{ref}' are a {card.get('arch')}, but the stage takes one of: "
                           f"{', '.join(info.archs)}")
    try:
        net = arch(**card.get("args", {}))
        net.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise WeightsError(f"weights for '{ref}' do not match {arch.__name__}{card.get('args')}: "
                           f"{detail}") from err
    if getattr(net, "scale", info.scale) != info.scale:
        raise WeightsError(f"weights for '{ref}' upscale {net.scale}x, but the stage {ref.stage} is {info.scale}x: "
                           f"they belong to another stage")
    window = 2 * info.radius + 1
    if isinstance(net, RestorerNet) and net.in_frames != window:
        raise WeightsError(f"weights for '{ref}' read {net.in_frames} frame(s), but the stage gives each frame a "
                           f"window of {window}; retrain them with this version (`reelmend train {ref.stage}`)")
    return Step(ref, info, net.eval())


class Chain:
    """An ordered list of loaded steps that runs over a window of frames (uint8 or uint16 NHWC numpy)."""

    def __init__(self, steps: list[Step], device: torch.device | None = None, batch_frames: int | None = None,
                 tile: int | None = None, tile_overlap: int = 32):
        self.steps = steps
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_frames = batch_frames
        # Tile side in input pixels; None: only when one frame alone exceeds the per-forward pixel budget.
        self.tile = tile
        self.tile_overlap = tile_overlap
        # Output pixels per forward, which bounds activation memory: ~2 MP on CPU (cache friendly), ~32 MP on a
        # GPU. A caller that runs out of memory lowers it and runs again (smaller batches, then tiles).
        self.pixel_budget = 32e6 if self.device.type == "cuda" else 2e6
        for step in steps:
            if step.net is not None:
                step.net.to(self.device)
        refs = [s.ref for s in steps]
        self.scale, self.temporal_factor, self.context = chain_geometry(refs)
        # Reduced precision only where it is fast and safe: bf16 keeps fp32's range (no overflow in convs).
        self.autocast_dtype = None
        if self.device.type == "cuda":
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def __str__(self) -> str:
        return ",".join(str(s.ref) for s in self.steps)

    @property
    def min_pixel_budget(self) -> float:
        """Below this budget nothing shrinks further: one frame per batch, tiles of the smallest side."""
        return float((2 * self.tile_overlap + 16) ** 2)

    def _batch(self, height: int, width: int, scale: int) -> int:
        if self.batch_frames:
            return self.batch_frames
        return max(1, int(self.pixel_budget // (height * width * scale * scale)))

    def _tile_for(self, height: int, width: int, scale: int) -> int | None:
        """The tile side for a frame of this size, or None when it runs whole."""
        if self.tile:
            return self.tile if max(height, width) > self.tile else None
        if height * width * scale * scale <= self.pixel_budget:
            return None
        return max(2 * self.tile_overlap + 16, int(math.sqrt(self.pixel_budget) / scale))

    @torch.inference_mode()
    def run(self, frames: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) -> (n * temporal_factor, H * scale, W * scale, 3), same dtype.

        Between steps frames are kept as uint16 (1/65535 precision, half of float32's memory); the window is
        processed in batches, so memory is the input, the output and one batch of activations.
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"expected (n, H, W, 3) uint8/uint16 frames, got {frames.shape} {frames.dtype}")
        out_dtype = frames.dtype
        x = frames
        for i, step in enumerate(self.steps):
            dtype = out_dtype if i == len(self.steps) - 1 else np.dtype(np.uint16)
            x = self._run_step(step, x, dtype)
        return x

    def _run_step(self, step: Step, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
        n, h, w, _ = x.shape
        info = step.info
        if step.net is None:
            return _requantize(x, dtype)
        s, t = info.scale, info.temporal_factor
        out = np.empty((n * t, h * s, w * s, 3), dtype=dtype)
        b = self._batch(h, w, s)
        if info.is_interp:
            out[0::2] = _requantize(x, dtype)
            for i in range(0, n - 1, b):
                j = min(i + b, n - 1)
                mid = self._forward(step.net, s, self._to_tensor(x[i:j]), self._to_tensor(x[i + 1:j + 1]))
                out[2 * i + 1:2 * j + 1:2] = self._to_numpy(mid, dtype)
            out[-1] = out[-2]  # the last frame has no successor: a copy (DESIGN.md)
            return out
        for i in range(0, n, b):
            j = min(i + b, n)
            if info.radius:
                # Clamp neighbour indices at the window edges; the chunk's context frames make sure the
                # clamped (wrong) neighbours only touch frames that are cropped away, except at the true
                # start and end of the video, where clamping is the intended boundary rule.
                offsets = np.arange(-info.radius, info.radius + 1)
                idx = np.clip(np.arange(i, j)[:, None] + offsets[None, :], 0, n - 1)
                batch = self._to_tensor(x[idx.reshape(-1)]).reshape(j - i, len(offsets), 3, h, w)
            else:
                batch = self._to_tensor(x[i:j])
                if isinstance(step.net, RestorerNet):
                    batch = batch.unsqueeze(1)  # (B, 1, 3, H, W): a one-frame window
            out[i:j] = self._to_numpy(self._forward(step.net, s, batch), dtype)
        return out

    def _forward(self, net: nn.Module, scale: int, *inputs: torch.Tensor) -> torch.Tensor:
        h, w = inputs[0].shape[-2:]
        tile = self._tile_for(h, w, scale)
        if tile is None:
            return self._net(net, *inputs)
        return run_tiled(lambda *xs: self._net(net, *xs), inputs, scale, tile, self.tile_overlap)

    def _net(self, net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return net(*inputs)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return net(*inputs).float()

    def _to_tensor(self, x: np.ndarray) -> torch.Tensor:
        scale = 255.0 if x.dtype == np.uint8 else 65535.0
        with warnings.catch_warnings():
            # frames from Ray's object store are read-only (zero copy); this tensor is only read: .float() copies
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(scale)

    @staticmethod
    def _to_numpy(y: torch.Tensor, dtype: np.dtype) -> np.ndarray:
        scale = 255.0 if dtype == np.uint8 else 65535.0
        y = y.clamp_(0.0, 1.0).mul_(scale).round_().permute(0, 2, 3, 1)
        return y.to(torch.int32).cpu().numpy().astype(dtype)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size): stride tile - overlap, the last tile flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(length: int, fade_in: int, fade_out: int) -> torch.Tensor:
    """1-D blending weight: rises linearly over `fade_in` samples, falls over `fade_out`, 1 in between."""
    w = torch.ones(length)
    if fade_in:
        w[:fade_in] = torch.arange(1, fade_in + 1) / (fade_in + 1)
    if fade_out:
        w[length - fade_out:] = torch.minimum(w[length - fade_out:], torch.arange(fade_out, 0, -1) / (fade_out + 1))
    return w


def run_tiled(fn, inputs: tuple[torch.Tensor, ...], scale: int, tile: int, overlap: int) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of `inputs` (same trailing H, W) and blend the outputs.

    Each output tile is weighted by linear ramps over the parts it shares with a neighbour, so the seams a
    network's border effects would leave fade out; edges of the frame keep full weight. Memory is one tile's
    activations plus the output.
    """
    h, w = inputs[0].shape[-2:]
    overlap = min(overlap, tile // 2)
    out = weight = None
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    for y0 in ys:
        for x0 in xs:
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            y = fn(*(t[..., y0:y1, x0:x1] for t in inputs))
            if out is None:
                out = y.new_zeros(*y.shape[:-2], h * scale, w * scale)
                weight = y.new_zeros(h * scale, w * scale)
            # Fade only where the neighbouring tile overlaps this one (its real overlap, which the flush last
            # tile makes larger than `overlap`).
            top = (ys[ys.index(y0) - 1] + tile - y0) if y0 > 0 else 0
            left = (xs[xs.index(x0) - 1] + tile - x0) if x0 > 0 else 0
            bottom = overlap if y1 < h else 0
            right = overlap if x1 < w else 0
            wy = _ramp((y1 - y0) * scale, min(top, y1 - y0) * scale, bottom * scale)
            wx = _ramp((x1 - x0) * scale, min(left, x1 - x0) * scale, right * scale)
            wt = (wy[:, None] * wx[None, :]).to(y.device, y.dtype)
            out[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] += y * wt
            weight[y0 * scale:y1 * scale, x0 * scale:x1 * scale] += wt
    return out / weight


def _requantize(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Exact between 8 and 16 bit: 65535 = 255 * 257."""
    if x.dtype == dtype:
        return x
    if x.dtype == np.uint8:
        return x.astype(np.uint16) * 257
    return ((x.astype(np.uint32) + 128) // 257).astype(np.uint8)


def load_chain(steps: str | tuple[str, ...] | list[str], weights: str | None = None,
               device: torch.device | None = None, batch_frames: int | None = None,
               tile: int | None = None) -> Chain:
    """Build a runnable chain; `weights` is a folder URI (None: the shipped weights)."""
    return Chain([build_step(ref, weights) for ref in parse_chain(steps)], device, batch_frames, tile)


def check_weights(steps: str | tuple[str, ...] | list[str], weights: str | None = None) -> None:
    """Fail before any work starts when a stage of the chain has no weights, or weights its network cannot
    take (WeightsError says what to do): every step is built here once, as the restore actors will."""
    for ref in parse_chain(steps):
        build_step(ref, weights)
