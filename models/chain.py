"""The restoration chain: stage names -> networks, their frame semantics, and running them over frames.

The pipeline only calls `parse_chain`, `load_chain` and `Chain.run`; everything a stage means (scale, temporal
factor, neighbour frames) is known here.

Frame semantics (DESIGN.md): spatial stages map N -> N frames; `descratch` reads `radius` neighbours each side;
`interp2x` maps N -> 2N with frame 2k = source k, 2k+1 = midpoint(k, k+1), and the last frame a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.compact_sr import CompactSR
from models.flow_interp import FlowInterp
from models.restorer_net import RestorerNet
from models.weights import SHIPPED, WeightsError, load_state

FLAVOURS = ("fidelity", "gan")


@dataclass(frozen=True)
class StageInfo:
    """What a stage does to frames, and which architecture backs it (None: no model)."""

    arch: type[nn.Module] | None
    default_args: dict[str, Any] = field(default_factory=dict)
    scale: int = 1
    temporal_factor: int = 1
    radius: int = 0  # neighbour frames read on each side (windowed temporal stages)

    @property
    def is_interp(self) -> bool:
        return self.temporal_factor == 2


STAGES: dict[str, StageInfo] = {
    "identity": StageInfo(arch=None),
    "denoise": StageInfo(RestorerNet, {"in_frames": 1}),
    "deblock": StageInfo(RestorerNet, {"in_frames": 1}),
    "descratch": StageInfo(RestorerNet, {"in_frames": 3}, radius=1),
    "sr2x": StageInfo(CompactSR, {"scale": 2}, scale=2),
    "sr4x": StageInfo(CompactSR, {"scale": 4}, scale=4),
    "interp2x": StageInfo(FlowInterp, {}, temporal_factor=2),
}


@dataclass(frozen=True)
class StepRef:
    stage: str
    flavour: str = "fidelity"

    def __str__(self) -> str:
        return self.stage if self.flavour == "fidelity" else f"{self.stage}:{self.flavour}"


def parse_chain(steps: str | tuple[str, ...] | list[str]) -> list[StepRef]:
    """`"denoise,sr2x:gan"` -> [StepRef(denoise), StepRef(sr2x, gan)]; ValueError naming what is wrong."""
    items = steps.split(",") if isinstance(steps, str) else list(steps)
    refs = []
    for item in (s.strip() for s in items):
        stage, _, flavour = item.partition(":")
        if stage not in STAGES:
            raise ValueError(f"unknown stage '{stage}' in chain; stages are: {', '.join(STAGES)}")
        flavour = flavour or "fidelity"
        if flavour not in FLAVOURS or (stage == "identity" and flavour != "fidelity"):
            raise ValueError(f"unknown flavour '{flavour}' for stage '{stage}'; use '{stage}' or '{stage}:gan'")
        refs.append(StepRef(stage, flavour))
    if not refs:
        raise ValueError("the chain is empty")
    return refs


def chain_geometry(refs: list[StepRef]) -> tuple[int, int, tuple[int, int]]:
    """(scale, temporal factor, (frames before, frames after)) of context a chunk must decode.

    Walk the chain backwards from the output, which needs no context: a windowed stage widens the need by its
    radius; interpolation halves it (two output frames per input) and needs one more frame after, the first
    frame of the next chunk, to make its last midpoint.
    """
    before = after = 0
    for ref in reversed(refs):
        info = STAGES[ref.stage]
        if info.is_interp:
            before, after = math.ceil(before / 2), math.ceil(after / 2) + 1
        else:
            before, after = before + info.radius, after + info.radius
    scale = math.prod(STAGES[r.stage].scale for r in refs)
    temporal = math.prod(STAGES[r.stage].temporal_factor for r in refs)
    return scale, temporal, (before, after)


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
    if card.get("arch") != info.arch.__name__:
        raise WeightsError(f"weights for '{ref}' are a {card.get('arch')}, but the stage needs a "
                           f"{info.arch.__name__}")
    try:
        net = info.arch(**card.get("args", {}))
        net.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:300]
        raise WeightsError(f"weights for '{ref}' do not match {info.arch.__name__}{card.get('args')}: "
                           f"{detail}") from err
    return Step(ref, info, net.eval())


class Chain:
    """An ordered list of loaded steps that runs over a window of frames (uint8 or uint16 NHWC numpy)."""

    def __init__(self, steps: list[Step], device: torch.device | None = None, batch_frames: int | None = None):
        self.steps = steps
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_frames = batch_frames
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

    def _batch(self, height: int, width: int) -> int:
        if self.batch_frames:
            return self.batch_frames
        # Bound activation memory by pixels per forward: ~2 MP on CPU (cache friendly), ~32 MP on a GPU.
        budget = 32e6 if self.device.type == "cuda" else 2e6
        return max(1, int(budget // (height * width * self.scale * self.scale)))

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
        b = self._batch(h, w)
        if info.is_interp:
            out[0::2] = _requantize(x, dtype)
            for i in range(0, n - 1, b):
                j = min(i + b, n - 1)
                mid = self._forward(step.net, self._to_tensor(x[i:j]), self._to_tensor(x[i + 1:j + 1]))
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
            out[i:j] = self._to_numpy(self._forward(step.net, batch), dtype)
        return out

    def _forward(self, net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return net(*inputs)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return net(*inputs).float()

    def _to_tensor(self, x: np.ndarray) -> torch.Tensor:
        scale = 255.0 if x.dtype == np.uint8 else 65535.0
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)
        return t.permute(0, 3, 1, 2).float().div_(scale)

    @staticmethod
    def _to_numpy(y: torch.Tensor, dtype: np.dtype) -> np.ndarray:
        scale = 255.0 if dtype == np.uint8 else 65535.0
        y = y.clamp_(0.0, 1.0).mul_(scale).round_().permute(0, 2, 3, 1)
        return y.to(torch.int32).cpu().numpy().astype(dtype)


def _requantize(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Exact between 8 and 16 bit: 65535 = 255 * 257."""
    if x.dtype == dtype:
        return x
    if x.dtype == np.uint8:
        return x.astype(np.uint16) * 257
    return ((x.astype(np.uint32) + 128) // 257).astype(np.uint8)


def load_chain(steps: str | tuple[str, ...] | list[str], weights: str | None = None,
               device: torch.device | None = None, batch_frames: int | None = None) -> Chain:
    """Build a runnable chain; `weights` is a folder URI (None: the shipped weights)."""
    return Chain([build_step(ref, weights) for ref in parse_chain(steps)], device, batch_frames)


def check_weights(steps: str | tuple[str, ...] | list[str], weights: str | None = None) -> None:
    """Fail before any work starts when a stage of the chain has no weights (WeightsError says what to do)."""
    for ref in parse_chain(steps):
        if STAGES[ref.stage].arch is not None:
            load_state(weights or str(SHIPPED), ref.stage, ref.flavour)
