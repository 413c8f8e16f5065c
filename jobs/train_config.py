"""The training spec: one frozen pydantic tree for `reelmend train`, validated before Ray starts.

It travels unchanged to every training worker (as a dict) and into the checkpoint and the model card, so a run
can be resumed, and its weights explained, from what was written.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.chain import STAGES


class Frozen(BaseModel):
    # hide_input_in_errors: a rejected value may hold credentials (storage_options)
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class LossSpec(Frozen):
    """Loss terms and weights. The pixel term drives the fidelity phase alone; the GAN phase adds feature
    matching on the discriminators' features, the adversarial term, and the temporal-consistency term that
    keeps a frame-by-frame generator from flickering."""

    pixel: Literal["charbonnier", "l1", "l2"] = "charbonnier"
    adversarial: Literal["hinge", "relativistic"] = "hinge"
    w_pixel: float = Field(1.0, ge=0)
    w_feature: float = Field(1.0, ge=0)
    w_adversarial: float = Field(0.05, ge=0)
    w_temporal_adversarial: float = Field(0.02, ge=0)
    w_temporal: float = Field(0.5, ge=0)
    # What the discriminators look at (models.losses.detail_view): "detail", the frames' fine detail amplified,
    # or "rgb", the frames as they are (every `:gan` flavour shipped before 2026-11-23 was trained so).
    d_view: Literal["detail", "rgb"] = "detail"
    # GAN phase: the pixel loss's target is the clean frame unsharp-masked by this amount (models.losses.unsharp,
    # Real-ESRGAN's l1_gt_usm); 0 leaves it as it is. The discriminators always see the clean frame.
    sharpen_target: float = Field(0.0, ge=0, le=2)
    # Where the per-frame discriminator's judgement counts (models.losses.undamaged): "all" pixels, or only those
    # the damage left alone, so that for local damage (descratch) what it learns to tell apart is texture, not
    # the leftovers of a repair. Its features (feature matching) and the temporal discriminator still see all.
    d_region: Literal["all", "undamaged"] = "all"


class TrainSpec(Frozen):
    stage: str
    data: str = Field(min_length=1)
    out: str = Field(min_length=1)
    # fsspec options per protocol for DATA, OUT and --init (`--storage-options`): credentials, so never dumped
    # (nor into checkpoints or cards); the driver and the data tasks configure them, and Ray Train's checkpoint
    # filesystem is built with them
    storage_options: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude=True, repr=False)
    arch: str | None = None  # default: the stage's default architecture (models/chain.STAGES)
    arch_args: dict[str, Any] = Field(default_factory=dict)  # overrides of the architecture's defaults
    init: str | None = None  # a weights folder whose fidelity weights start the generator
    workers: int = Field(2, ge=1)
    gpu: bool = False
    worker_cpus: float | None = Field(None, gt=0)  # None: share the CPUs, leaving one for the data pipeline
    steps: int = Field(2000, ge=0)  # fidelity phase
    gan_steps: int = Field(1000, ge=0)  # GAN phase, fine-tuning the fidelity weights
    batch: int = Field(8, ge=1)  # clips per worker per step
    patch: int = Field(96, ge=16)  # side of the clean (target) patch in pixels
    lr: float = Field(2e-4, gt=0)  # fidelity phase: the peak, decayed by `lr_schedule`
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine: lr -> lr/100 over the fidelity phase
    gan_lr: float = Field(5e-5, gt=0)
    d_lr: float = Field(1e-4, gt=0)
    d_features: int = Field(32, ge=4)
    # GAN-phase steps, at its start, that train only the discriminators (BasicSR's net_d_init_iters), so the
    # generator's first adversarial gradients come from a discriminator that already tells real from restored.
    d_warmup: int = Field(0, ge=0)
    loss: LossSpec = LossSpec()
    pool_clips: int = Field(400, ge=1)  # clean clips decoded once, patches cut from them per step
    # 0: every sample is degraded afresh. N: each pool clip is degraded N times once, before training, and samples
    # are patches cut from those pairs: for recipes whose damage is slow to make (deblock's codec round trips
    # start two FFmpeg processes per sample: 0.21 steps/s, against 0.42 with 3 variants, denoise's speed with the
    # same network).
    pool_variants: int = Field(0, ge=0)
    val_clips: int = Field(16, ge=1)
    source_scale: float = Field(1.0, gt=0, le=1)  # area downscale of sources first (removes their artifacts)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0)
    seed: int = Field(0, ge=0)
    resume: bool = False
    data_licence: str | None = None
    command: str = ""
    fail_at_step: int | None = Field(None, ge=1)  # fault drill: the last worker dies at this step (first try)

    @field_validator("data", "out", "init")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Local paths are made absolute here, on the driver: Ray's workers run in other directories."""
        return value if value is None or "://" in value else os.path.abspath(os.path.expanduser(value))

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        info = STAGES.get(self.stage)
        if info is None or info.arch is None:
            trainable = [s for s, i in STAGES.items() if i.arch is not None]
            raise ValueError(f"cannot train stage '{self.stage}'; trainable stages: {', '.join(trainable)}")
        if self.arch is not None and self.arch not in info.archs:
            raise ValueError(f"stage '{self.stage}' takes architecture {' or '.join(info.archs)}, not '{self.arch}'")
        if self.steps + self.gan_steps == 0:
            raise ValueError("nothing to train: --steps and --gan-steps are both 0")
        if self.steps == 0 and self.init is None:
            raise ValueError("--steps 0 (GAN phase only) needs --init DIR with the stage's fidelity weights")
        if self.patch % (info.scale * 8):
            raise ValueError(f"--patch must be a multiple of {info.scale * 8} for {self.stage}")
        if self.gan_steps and self.d_warmup >= self.gan_steps:
            raise ValueError(f"--d-warmup ({self.d_warmup}) must be less than --gan-steps ({self.gan_steps})")
        if self.loss.d_region == "undamaged" and (info.scale != 1 or info.is_interp):
            raise ValueError(f"--d-region undamaged needs a stage whose input and output frames align; {self.stage} "
                             "changes their size or count")
        if self.fail_at_step is not None and self.fail_at_step <= self.checkpoint_every:
            raise ValueError("--fail-at-step must come after the first checkpoint (> --checkpoint-every)")
        return self

    def fidelity_lr(self, step: int) -> float:
        """The generator's learning rate at a fidelity step: cosine annealing (SGDR without restarts, as
        BasicSR's SR recipes use) from `lr` to `lr / 100`, a pure function of the step so resumes need no
        scheduler state."""
        if self.lr_schedule == "constant" or self.steps <= 1:
            return self.lr
        low = self.lr / 100
        return low + 0.5 * (self.lr - low) * (1 + math.cos(math.pi * min(step, self.steps) / self.steps))

    @property
    def total_steps(self) -> int:
        return self.steps + self.gan_steps

    @property
    def arch_name(self) -> str:
        return self.arch or STAGES[self.stage].arch.__name__

    @property
    def generator_args(self) -> dict[str, Any]:
        return {**STAGES[self.stage].default_args, **self.arch_args}

    @property
    def out_frames(self) -> int:
        """Restored frames per training clip: 3, enough for the temporal discriminator and loss."""
        return 3

    @property
    def clip_frames(self) -> int:
        """Clean frames per training clip: interpolation reads (0, 2) to make 1 (one output frame, the clip
        is its temporal context); windowed stages need their radius on each side of the 3 outputs."""
        info = STAGES[self.stage]
        if info.is_interp:
            return 3
        return self.out_frames + 2 * info.radius
