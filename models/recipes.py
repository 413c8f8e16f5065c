"""Degradation recipes: each training stage's mix of damage, written as data.

A `Recipe` is a set of weighted alternative `Branch`es; `models.degrade.make_pair` picks one branch per clip and
applies its ops in order, each with its own probability, drawing each parameter from its range once per clip
(the damage a source has: the per-frame randomness, such as noise and dust, lives inside the ops). Branches
express "one of these per clip" (deblock's codecs, the SR recipes' clean-or-degraded split); per-op
probabilities express "sometimes".

The recipes are data so that a model card can record exactly what a model was trained against (`describe`).
`interlace` is an available op that no recipe uses yet: no stage is trained to deinterlace.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The ops a recipe may name, and the parameters it samples for each: the arguments of the functions in
# models/degrade.py, less those make_pair supplies (the rng, the codec roundtrip, the target size).
# "resize" scales by `factor` relative to the current size; "downscale" resizes to the recipe's target size
# (H // scale, W // scale), and with method "bicubic" it is exactly `degrade.bicubic_downscale`.
OP_PARAMS: dict[str, tuple[str, ...]] = {
    "blur": ("sigma_x", "sigma_y", "theta"),
    "resize": ("factor", "method"),
    "downscale": ("method",),
    "gaussian_noise": ("sigma", "gray"),
    "poisson_noise": ("scale", "gray"),
    "jpeg": ("quality",),
    "video_codec": ("codec", "quality"),
    "film_grain": ("strength", "size"),
    "scratches": ("count",),
    "dust": ("count",),
    "blotches": ("count",),
    "interlace": (),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Uniform(_Frozen):
    """A float drawn uniformly from [low, high]."""

    kind: Literal["uniform"] = "uniform"
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.low > self.high:
            raise ValueError(f"uniform range [{self.low}, {self.high}] is empty")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))

    def __str__(self) -> str:
        return f"uniform({self.low:g}, {self.high:g})"


class Integers(_Frozen):
    """An integer drawn uniformly from low..high, both included."""

    kind: Literal["integers"] = "integers"
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self) -> Integers:
        if self.low > self.high:
            raise ValueError(f"integer range {self.low}..{self.high} is empty")
        return self

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))

    def __str__(self) -> str:
        return f"integers({self.low}..{self.high})"


class Choice(_Frozen):
    """One of `values`, with `weights` (uniform when omitted); a single value is a constant."""

    kind: Literal["choice"] = "choice"
    values: tuple[bool | int | float | str, ...] = Field(min_length=1)
    weights: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> Choice:
        if self.weights is not None and (len(self.weights) != len(self.values) or min(self.weights) < 0
                                         or sum(self.weights) <= 0):
            raise ValueError(f"choice weights {self.weights} do not fit values {self.values}")
        return self

    def sample(self, rng: np.random.Generator) -> bool | int | float | str:
        if len(self.values) == 1:
            return self.values[0]
        p = None if self.weights is None else np.asarray(self.weights) / sum(self.weights)
        return self.values[int(rng.choice(len(self.values), p=p))]

    def __str__(self) -> str:
        if len(self.values) == 1:
            return str(self.values[0])
        weights = self.weights or (1.0,) * len(self.values)
        total = sum(weights)
        return "choice(" + ", ".join(f"{v}: {w / total:.2f}" for v, w in zip(self.values, weights)) + ")"


Param = Annotated[Uniform | Integers | Choice, Field(discriminator="kind")]


class Op(_Frozen):
    """One degradation: applied with probability `p`, its parameters drawn from `params` once per clip."""

    name: str
    p: float = Field(1.0, ge=0.0, le=1.0)
    params: dict[str, Param] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> Op:
        if self.name not in OP_PARAMS:
            raise ValueError(f"unknown degradation op {self.name!r}; known: {', '.join(OP_PARAMS)}")
        if set(self.params) != set(OP_PARAMS[self.name]):
            raise ValueError(f"op {self.name!r} takes parameters {OP_PARAMS[self.name]}, got {tuple(self.params)}")
        return self


class Branch(_Frozen):
    """An ordered list of ops, chosen for a clip with probability weight / (sum of the recipe's weights)."""

    name: str
    weight: float = Field(gt=0.0)
    ops: tuple[Op, ...] = ()


class Recipe(_Frozen):
    """A stage's degradation mix. `scale` is the stage's upscaling factor: the low-quality side of a pair is
    (H // scale, W // scale), so for scale > 1 every branch must reach that size with one `downscale` op."""

    name: str
    scale: Literal[1, 2, 4] = 1
    why: str
    branches: tuple[Branch, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _reaches_target_size(self) -> Recipe:
        for branch in self.branches:
            names = [op.name for op in branch.ops]
            where = f"recipe {self.name!r}, branch {branch.name!r}"
            if self.scale == 1:
                if {"resize", "downscale"} & set(names):
                    raise ValueError(f"{where}: a scale-1 recipe must keep the frame size (no resize/downscale)")
                continue
            downs = [op for op in branch.ops if op.name == "downscale"]
            if len(downs) != 1 or downs[0].p != 1.0:
                raise ValueError(f"{where}: needs exactly one `downscale` op with p=1 to reach 1/{self.scale} size")
            if "resize" in names[names.index("downscale"):]:
                raise ValueError(f"{where}: a `resize` after `downscale` would leave the target size")
        return self

    def uses(self, op_name: str) -> bool:
        return any(op.name == op_name for branch in self.branches for op in branch.ops)


def describe(recipe: Recipe) -> dict:
    """A JSON-serialisable summary for model cards: branches with their probabilities, ops with theirs, and
    each parameter's distribution as a short string."""
    total = sum(b.weight for b in recipe.branches)
    return {
        "name": recipe.name,
        "scale": recipe.scale,
        "why": recipe.why,
        "branches": [
            {"name": b.name, "probability": round(b.weight / total, 4),
             "ops": [{"op": op.name, "p": op.p, "params": {k: str(v) for k, v in op.params.items()}}
                     for op in b.ops]}
            for b in recipe.branches
        ],
    }


# -- building blocks ----------------------------------------------------------------------------------------

def uniform(low: float, high: float) -> Uniform:
    return Uniform(low=low, high=high)


def integers(low: int, high: int) -> Integers:
    return Integers(low=low, high=high)


def choice(*values: bool | int | float | str, weights: tuple[float, ...] | None = None) -> Choice:
    return Choice(values=values, weights=weights)


def op(name: str, p: float = 1.0, **params: Param) -> Op:
    return Op(name=name, p=p, params=params)


def blur(sigma_high: float, p: float = 1.0) -> Op:
    """Real-ESRGAN's anisotropic Gaussian blur: both sigmas and the angle drawn independently."""
    return op("blur", p, sigma_x=uniform(0.2, sigma_high), sigma_y=uniform(0.2, sigma_high),
              theta=uniform(-math.pi, math.pi))


# Real-ESRGAN draws gray (luma-only) noise with probability 0.4 (Wang et al., ICCVW 2021, sec. 3.1).
GRAY = choice(True, False, weights=(0.4, 0.6))
METHODS = choice("area", "bilinear", "bicubic")


# -- the stages' recipes ------------------------------------------------------------------------------------

DENOISE = Recipe(
    name="denoise",
    why=("Every common kind of archive noise, from barely visible to heavy, one kind per clip so each is "
         "learned on its own: additive Gaussian (sigma 1..30 of 255, colour or luma-only, Real-ESRGAN's "
         "range), signal-dependent Poisson shot noise (Real-ESRGAN's scale range), and spatially correlated, "
         "luma-dependent film grain. A mild blur before the noise on a fifth of the clips, because noisy "
         "sources are rarely sharp and the noise is added after the optics blurred the image."),
    branches=(
        Branch(name="gaussian", weight=0.5, ops=(
            blur(1.0, p=0.2),
            op("gaussian_noise", sigma=uniform(1, 30), gray=GRAY),
        )),
        Branch(name="poisson", weight=0.2, ops=(
            blur(1.0, p=0.2),
            op("poisson_noise", scale=uniform(0.05, 3.0), gray=GRAY),
        )),
        Branch(name="film_grain", weight=0.3, ops=(
            blur(1.0, p=0.2),
            op("film_grain", strength=uniform(2, 16), size=uniform(0.4, 1.5)),
        )),
    ),
)

DEBLOCK = Recipe(
    name="deblock",
    why=("Real codec damage through real encoders, one codec per clip because each leaves its own artifact "
         "signature: H.264 from just past x264's default (CRF 24) to starved (CRF 42), as web uploads and "
         "mezzanines are; MPEG-2 at fixed quantisers 4..20, as DVDs and broadcast captures are; JPEG quality "
         "15..80 for intra-only blocking (Motion-JPEG, DV-like captures, frames of still sequences)."),
    branches=(
        Branch(name="h264", weight=0.45, ops=(op("video_codec", codec=choice("h264"), quality=integers(24, 42)),)),
        Branch(name="mpeg2", weight=0.25, ops=(op("video_codec", codec=choice("mpeg2"), quality=integers(4, 20)),)),
        Branch(name="jpeg", weight=0.3, ops=(op("jpeg", quality=integers(15, 80)),)),
    ),
)

DESCRATCH = Recipe(
    name="descratch",
    why=("Film damage as Kokaram's restoration work models it: line scratches that persist over frames, and "
         "dust and blotches that are temporally impulsive (one frame each), which is why the model reads "
         "neighbouring frames. Mild grain first, because scans of damaged film are grainy and the damage must "
         "be found among grain; the target is the clean frame, so mild grain is removed too. Each kind is "
         "present on most clips, and a few clips carry none, so clean frames pass unchanged."),
    branches=(
        Branch(name="film_damage", weight=1.0, ops=(
            op("film_grain", p=0.5, strength=uniform(1, 6), size=uniform(0.5, 1.2)),
            op("scratches", p=0.6, count=integers(1, 4)),
            op("dust", p=0.8, count=integers(1, 20)),
            op("blotches", p=0.5, count=integers(1, 3)),
        )),
    ),
)


def _super_resolution(scale: int) -> Recipe:
    """Real-ESRGAN's second-order degradation (Wang et al., ICCVW 2021), kept light, beside plain bicubic."""
    first_order = (
        blur(0.5 + 0.25 * scale, p=0.6),
        op("resize", p=0.5, factor=uniform(0.5, 1.25), method=METHODS),
        op("gaussian_noise", p=0.3, sigma=uniform(1, 6), gray=GRAY),
        op("jpeg", p=0.4, quality=integers(60, 95)),
    )
    second_order = (
        blur(1.0, p=0.3),
        op("gaussian_noise", p=0.2, sigma=uniform(1, 4), gray=GRAY),
    )
    downscale = op("downscale", method=METHODS)
    return Recipe(
        name=f"sr{scale}x",
        scale=scale,
        why=("Fidelity SR is judged by PSNR against bicubic-downscaled inputs, so half the clips are exactly that "
             "(a bicubic downscale, antialiased). The other half get Real-ESRGAN's second-order degradation, "
             "light: blur, resize, noise and JPEG, then blur and noise again, then the final resize to "
             f"1/{scale} with the compression on either side of it as Real-ESRGAN randomises (H.264 of the "
             "delivered low-resolution video, or JPEG before it), so real archive inputs are not out of "
             "distribution. Noise stays at a few levels of 255: heavy noise is the denoise stage's job."),
        branches=(
            Branch(name="bicubic", weight=0.5, ops=(op("downscale", method=choice("bicubic")),)),
            Branch(name="second_order_h264_last", weight=0.3, ops=(
                *first_order, *second_order, downscale,
                op("video_codec", codec=choice("h264"), quality=integers(18, 30)),
            )),
            Branch(name="second_order_jpeg_first", weight=0.2, ops=(
                *first_order, *second_order, op("jpeg", quality=integers(60, 95)), downscale,
            )),
        ),
    )


INTERP2X = Recipe(
    name="interp2x",
    why=("The interpolator is trained on (frame 0, frame 2) -> frame 1 by the trainer; this recipe only says "
         "what its inputs suffer. Mostly nothing, because in a chain it runs after the restoring stages; "
         "sometimes light H.264 (CRF 16..23), so the small artifacts of a typical source do not throw its "
         "motion estimate."),
    branches=(
        Branch(name="clean", weight=0.7),
        Branch(name="light_h264", weight=0.3, ops=(
            op("video_codec", codec=choice("h264"), quality=integers(16, 23)),
        )),
    ),
)

RECIPES: dict[str, Recipe] = {
    "denoise": DENOISE,
    "deblock": DEBLOCK,
    "descratch": DESCRATCH,
    "sr2x": _super_resolution(2),
    "sr4x": _super_resolution(4),
    "interp2x": INTERP2X,
}
