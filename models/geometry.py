"""What each stage does to frames, and the chain grammar: no torch here.

The driver's job-spec validation and the CPU decode and encode workers need only this; importing torch there
costs each fresh Ray worker process about 1.5 s of CPU, which on a small node is taken from the restore actors.
`models.chain` adds the networks behind the stages.

Frame semantics (DESIGN.md): spatial stages map N -> N frames; `denoise`, `deblock` and `descratch` read `radius`
neighbours each side (noise, coding error and damage differ from frame to frame, the scene mostly does not);
`interp2x` maps N -> 2N with frame 2k = source k, 2k+1 = midpoint(k, k+1), and the last frame a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLAVOURS = ("fidelity", "gan")


@dataclass(frozen=True)
class Geometry:
    scale: int = 1
    temporal_factor: int = 1
    radius: int = 0  # neighbour frames read on each side (windowed temporal stages)

    @property
    def is_interp(self) -> bool:
        return self.temporal_factor == 2


GEOMETRY: dict[str, Geometry] = {
    "identity": Geometry(),
    "denoise": Geometry(radius=4),
    "deblock": Geometry(radius=2),
    "descratch": Geometry(radius=1),
    "sr2x": Geometry(scale=2),
    "sr4x": Geometry(scale=4),
    "interp2x": Geometry(temporal_factor=2),
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
        if stage not in GEOMETRY:
            raise ValueError(f"unknown stage '{stage}' in chain; stages are: {', '.join(GEOMETRY)}")
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
        geo = GEOMETRY[ref.stage]
        if geo.is_interp:
            before, after = math.ceil(before / 2), math.ceil(after / 2) + 1
        else:
            before, after = before + geo.radius, after + geo.radius
    scale = math.prod(GEOMETRY[r.stage].scale for r in refs)
    temporal = math.prod(GEOMETRY[r.stage].temporal_factor for r in refs)
    return scale, temporal, (before, after)
