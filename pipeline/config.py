"""The job spec: one frozen pydantic tree, validated at the edge (CLI or job.json), then passed down.

Everything a restoration job depends on lives here, so that the job id (a hash of the spec's inputs and
options) changes exactly when the output would.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.geometry import parse_chain

VERSION = "0.1.0"


class Frozen(BaseModel):
    # hide_input_in_errors: a rejected value may hold credentials (storage_options), and --verbose prints
    # the validation error's traceback
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class EncodeSpec(Frozen):
    """How restored chunks are encoded. `lossless` means FFV1 in RGB: the output frames are exactly the frames
    the chain produced (for evaluation), so it overrides codec and CRF."""

    codec: Literal["h264", "h265", "av1"] = "h264"
    crf: int = Field(18, ge=0, le=63)
    preset: str = Field("medium", pattern=r"^[a-z0-9]+$")
    lossless: bool = False

    @model_validator(mode="after")
    def _crf_in_codec_range(self) -> EncodeSpec:
        if self.codec in ("h264", "h265") and self.crf > 51:
            raise ValueError(f"--crf {self.crf} is out of range for {self.codec} (0-51)")
        return self


class ResourceSpec(Frozen):
    """Ray resources per stage. `restore_gpus` = None means: one GPU per actor when the cluster has GPUs."""

    decode_cpus: float = Field(1.0, gt=0)
    encode_cpus: float = Field(1.0, gt=0)
    restore_cpus: float = Field(1.0, gt=0)
    restore_gpus: float | None = Field(None, ge=0)
    restore_actors_min: int = Field(1, ge=1)
    restore_actors_max: int = Field(1, ge=1)
    # A custom resource only the CPU nodes declare (`ray start --resources='{"cpu_node": 1000}'`): decode, encode,
    # probe and stitch tasks then ask for a sliver of it, so they never take a GPU node's CPUs. Without it they
    # only avoid GPU nodes while the CPU nodes have room (Ray's default).
    cpu_resource: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")

    def cpu_task_resources(self) -> dict[str, float]:
        """The custom resources each CPU-side task asks for."""
        return {self.cpu_resource: 0.001} if self.cpu_resource else {}

    @model_validator(mode="after")
    def _pool_bounds(self) -> ResourceSpec:
        if self.restore_actors_max < self.restore_actors_min:
            raise ValueError("the restore actor pool's maximum (restore_actors_max) must be at least its minimum "
                             "(restore_actors_min): --actors MIN:MAX, e.g. 1:8")
        return self


class JobSpec(Frozen):
    src: str = Field(min_length=1)
    dest: str = Field(min_length=1)
    chain: tuple[str, ...] = ("identity",)
    models: str | None = None  # a folder `reelmend train --out` wrote; None = the shipped weights
    chunk_frames: int | None = Field(None, ge=2, le=100_000)  # None: about 2 s of frames per chunk
    max_attempts: int = Field(3, ge=1, le=100)
    # Frames the decoder cannot produce (damaged packets, a capture cut mid-GOP) repeat the decoded frame before them
    # in their chunk instead of failing the video; a video with more than half its frames concealed still fails.
    conceal_damage: bool = False
    # Interlaced sources (by the probe's field order) are deinterlaced as they are decoded, before the chain: models
    # see whole progressive frames, not two fields woven (combing, which super-resolution would enlarge). Off:
    # interlaced frames are restored woven, as stored, and the output keeps their field order.
    deinterlace: bool = False
    # With `deinterlace`: one frame per field (bwdif's send_field: 50i becomes 50p, all the motion the fields
    # caught), instead of one per frame (50i becomes 25p). Interlaced videos then have twice the frames.
    double_rate: bool = False
    # Which files under SRC are inputs: shell globs over the path below SRC ("*" crosses folders, as in
    # `aws s3 cp --exclude`), matched without regard to case (cameras write .MOV, people type .mov). A file is
    # an input when it matches an `include` (none given: every file) and no `exclude`.
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    encode: EncodeSpec = EncodeSpec()
    resources: ResourceSpec = ResourceSpec()
    job_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: str = VERSION
    # fsspec options per protocol, e.g. {"s3": {"endpoint_url": ..., "key": ..., "secret": ...}}, for stores the
    # environment does not describe. They may hold credentials: never written to job.json, never printed, and
    # not part of the job id (`resume` takes them again).
    storage_options: dict[str, dict[str, Any]] = Field(default_factory=dict, exclude=True, repr=False)

    @field_validator("chain", mode="before")
    @classmethod
    def _parse_chain(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = value.split(",")
        return tuple(step.strip() for step in value)  # type: ignore[union-attr]

    @field_validator("chain")
    @classmethod
    def _known_stages(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_chain(value)  # raises ValueError naming the unknown stage
        return value

    @model_validator(mode="after")
    def _double_rate_deinterlaces(self) -> JobSpec:
        if self.double_rate and not self.deinterlace:
            raise ValueError("--double-rate makes a frame of each field of what --deinterlace deinterlaces: "
                             "give both")
        if self.double_rate and self.conceal_damage:
            raise ValueError("--double-rate and --conceal-damage do not go together yet (a concealed frame's "
                             "place among fields is not tracked); restore such sources with one of them")
        return self

    def fields_per_frame(self, parity: str | None) -> int:
        """Output frames per source frame before the chain: 2 for an interlaced video (`parity`) made double
        rate, else 1."""
        return 2 if self.double_rate and self.deinterlace and parity else 1

    @field_validator("include", "exclude")
    @classmethod
    def _globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Matched without regard to case or order: one selection, one spelling (and one job id)."""
        return tuple(sorted({glob.lower() for glob in value}))

    @field_validator("storage_options")
    @classmethod
    def _protocols(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for protocol in value:
            if not protocol.isalnum() or not protocol.islower():
                raise ValueError(f"storage_options: {protocol!r} is not a protocol name (e.g. s3, gcs)")
        return value

    @field_validator("src", "dest")
    @classmethod
    def _normalise(cls, value: str) -> str:
        """No trailing slash; a local path made absolute, so a worker on another node (another working
        directory) and a `resume` from another folder mean the same files."""
        value = value.rstrip("/") or "/"
        protocol = fsspec.core.split_protocol(value)[0]
        if protocol and (re.match(r"[^:]+://[^/]*@", value) or (protocol in ("http", "https") and "?" in value)):
            # it would be written to job.json, the plan and every status line (the message leaves it out)
            raise ValueError("the URL carries credentials (user:password@, or a signed query string): give them "
                             "through the environment (AWS_ACCESS_KEY_ID, ...) or --storage-options @file.json")
        if not protocol:
            value = os.path.abspath(os.path.expanduser(value))
        return value

    def same_place(self, uri: str) -> bool:
        """Whether `uri` names this job's DEST (`./out`, `out/` and `file:///abs/out` do)."""
        return _comparable(self.dest) == _comparable(uri)

    def check_apart(self) -> None:
        """Refuse SRC and DEST that overlap, either way: outputs would become inputs, or replace their own
        sources. Checked when a job is created (not on reading job.json: jobs made before this check stay
        readable)."""
        (src_fs, src), (dest_fs, dest) = _comparable(self.src), _comparable(self.dest)
        if src_fs != dest_fs:
            return
        if dest == src or dest.startswith(src.rstrip("/") + "/"):
            raise ValueError("DEST must not be SRC or lie inside it: the outputs would become inputs")
        if src.startswith(dest.rstrip("/") + "/"):
            raise ValueError("SRC must not lie inside DEST: an output could replace its own source (restore into a "
                             "folder or bucket prefix of its own)")

    def resolved_job_id(self) -> str:
        """The given id, or one derived from everything that shapes the output, so re-running resumes."""
        if self.job_id:
            return self.job_id
        digest = hashlib.sha256(json.dumps(self.shaping(), sort_keys=True).encode()).hexdigest()
        return f"job-{digest[:12]}"

    def shaping(self) -> dict[str, Any]:
        """What shapes the outputs: a job is these. (The options added since the first jobs only when set, so the
        ids of jobs made before them stay the same.)"""
        shaping = self.model_dump(include={"src", "dest", "chain", "models", "chunk_frames", "encode"})
        added = self.model_dump(include={"conceal_damage", "deinterlace", "double_rate", "include", "exclude"},
                                 exclude_defaults=True)
        return {**shaping, **added}

    def selects(self, rel_path: str) -> bool:
        """Whether the file at `rel_path` below SRC is one of the job's inputs (`include`, `exclude`)."""
        path = rel_path.lower()
        return ((not self.include or any(fnmatch.fnmatchcase(path, g.lower()) for g in self.include))
                and not any(fnmatch.fnmatchcase(path, g.lower()) for g in self.exclude))


def _comparable(uri: str) -> tuple[str, str]:
    """(filesystem, path) as fsspec resolves `uri`: local paths absolute and normalised (`./raw`, `raw/`,
    `file:///d/raw`, `file:/d/raw` and `/d/raw/.` are one folder); `gs://` and `gcs://` one store."""
    protocol, _ = fsspec.core.split_protocol(uri)
    try:
        cls = fsspec.get_filesystem_class(protocol or "file")
    except (ImportError, ValueError):  # a store whose library is absent fails later, with its own message
        return protocol or "", uri.rstrip("/")
    path = cls._strip_protocol(uri)
    if issubclass(cls, LocalFileSystem):
        return "local", os.path.realpath(os.path.expanduser(path))
    return cls.__name__, str(path).rstrip("/")
