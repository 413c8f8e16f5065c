"""Training data on Ray Data: clean footage -> a pool of clean clips -> degraded (input, target) pairs.

    list --data (fsspec)  ->  probe (CPU tasks)  ->  clip plan: random clips of `clip_frames` consecutive
    frames, training clips from the first 90% of each video, validation clips from the last 10%
      -> decode + random crop (Ray Data, CPU tasks, FFmpeg)  ->  the clean pool, materialised once
      -> per sample (Ray Data, CPU tasks): pick a pool clip, cut a patch, flip/rotate, degrade it with the
         stage's recipe  ->  rows {lq, hq} streamed to the training workers

Every random choice is drawn from a generator seeded with (run seed, sample index), so a sample is the same
whichever worker makes it. Decoding once keeps FFmpeg off the training hot path; degrading per sample means
the model never sees the same damage twice.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import ray

from jobs.train_config import TrainSpec
from models import degrade
from models.chain import STAGES
from models.recipes import RECIPES
from pipeline import ffmpeg, storage
from pipeline.plan import seek_time
from pipeline.probe import VideoInfo
from pipeline.run import probe_all

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
LICENCE_PREFIXES = ("license", "licence", "copying")
VAL_SEED = 1_000_003  # validation pairs come from their own seed stream, never from training samples'


def list_sources(data: str) -> tuple[list[str], list[str]]:
    """(media URIs, licence file names) under `data`. Licence files are recorded in the model card."""
    files = storage.list_files(data)
    licences = [rel for _, rel in files if posixpath.basename(rel).lower().startswith(LICENCE_PREFIXES)]
    media = [uri for uri, rel in files
             if not posixpath.basename(rel).lower().startswith(LICENCE_PREFIXES + ("readme",))
             and not rel.lower().endswith((".txt", ".md", ".json"))]
    if not media:
        raise FileNotFoundError(f"no videos or images under {data}")
    return media, licences


def plan_clips(spec: TrainSpec, infos: dict[str, VideoInfo]) -> tuple[list[dict], list[dict]]:
    """Training and validation clip rows: where each clip starts and how to decode it."""
    rng = np.random.default_rng(spec.seed)
    t = spec.clip_frames
    videos = {u: i for u, i in infos.items() if i.n_frames >= t}
    images = {u: i for u, i in infos.items() if i.n_frames < t}
    if STAGES[spec.stage].is_interp or not images:
        images = {}  # a still image has no motion to learn interpolation from
    usable = list(videos) + list(images)
    if not usable:
        raise ValueError(f"no source under {spec.data} has {t} frames or more for stage {spec.stage}")

    def row(uri: str, start: int, seed: int) -> dict:
        info = infos[uri]
        still = uri in images
        return {"uri": uri, "seek": 0.0 if still else seek_time(info, start), "frames": 1 if still else t,
                "repeat": t if still else 1, "stream_index": info.stream_index, "width": info.width,
                "height": info.height, "matrix": info.matrix, "full_range": info.full_range, "seed": seed}

    train, val = [], []
    for k in range(spec.pool_clips):
        uri = usable[k % len(usable)]
        n = infos[uri].n_frames
        cut = max(t, int(n * 0.9)) if uri in videos else n
        start = int(rng.integers(0, max(1, cut - t + 1))) if uri in videos else 0
        train.append(row(uri, start, spec.seed * 7919 + k))
    held_out = list(videos) or usable
    for k in range(spec.val_clips):
        uri = held_out[k % len(held_out)]
        n = infos[uri].n_frames
        first = min(int(n * 0.9), n - t) if uri in videos else 0
        start = int(rng.integers(first, n - t + 1)) if uri in videos else 0
        val.append(row(uri, start, VAL_SEED + k))
    return train, val


def decode_clip(row: dict[str, Any], crop: int, source_scale: float) -> dict[str, Any]:
    """CPU task: decode a clip, downscale it (area) if asked, and keep a random `crop`-sided square of it."""
    with storage.ffmpeg_input(row["uri"]) as src:
        frames = ffmpeg.decode_frames(src, stream_index=row["stream_index"], seek=row["seek"],
                                      n_frames=row["frames"], width=row["width"], height=row["height"],
                                      high_depth=False, matrix=row["matrix"], full_range=row["full_range"])
    if row["repeat"] > 1:
        frames = np.repeat(frames, row["repeat"], axis=0)
    if source_scale < 1:
        h, w = (max(1, round(d * source_scale)) for d in frames.shape[1:3])
        frames = degrade.resize(frames, h, w, "area")
    rng = np.random.default_rng(row["seed"])
    h, w = frames.shape[1:3]
    if min(h, w) < crop:
        raise ValueError(f"{row['uri']} is {w}x{h} after scaling, smaller than the {crop}-pixel crop")
    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    return {"clip": np.ascontiguousarray(frames[:, y:y + crop, x:x + crop]), "seed": row["seed"]}


def pool_crop(spec: TrainSpec) -> int:
    """Side of the clean crops kept in the pool: room for patches at many offsets, bounded memory."""
    return 2 * spec.patch


def make_pairs(batch: dict[str, np.ndarray], pool: list, spec: TrainSpec) -> dict[str, np.ndarray]:
    """CPU task: sample indices -> degraded (lq, hq) clips. `pool` is [ObjectRef of the clean pool]."""
    clips = ray.get(pool[0])
    recipe = RECIPES[spec.stage]
    lqs, hqs = [], []
    for index in batch["id"]:
        rng = np.random.default_rng([spec.seed, int(index)])
        clip = clips[int(rng.integers(0, len(clips)))]
        lq, hq = sample_pair(clip, spec, recipe, rng)
        lqs.append(lq)
        hqs.append(hq)
    return {"lq": np.stack(lqs), "hq": np.stack(hqs)}


def sample_pair(clip: np.ndarray, spec: TrainSpec, recipe, rng: np.random.Generator,
                augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A random patch of a clean clip, flipped and rotated (the dihedral augmentations of EDSR), degraded."""
    p = spec.patch
    y, x = (int(rng.integers(0, d - p + 1)) for d in clip.shape[1:3])
    patch = clip[:, y:y + p, x:x + p]
    if augment:
        if rng.random() < 0.5:
            patch = patch[:, :, ::-1]
        patch = np.rot90(patch, int(rng.integers(0, 4)), axes=(1, 2))
        if rng.random() < 0.5:
            patch = patch[::-1]  # time reversal: motion is as plausible backwards
    return degrade.make_pair(np.ascontiguousarray(patch), recipe, rng, roundtrip=ffmpeg.codec_roundtrip)


def build(spec: TrainSpec, log) -> tuple[ray.data.Dataset, dict[str, np.ndarray], dict[str, Any]]:
    """The streaming training dataset, the validation pairs (numpy), and the data provenance for the card."""
    media, licences = list_sources(spec.data)
    infos, skipped = {}, []
    for uri, info in probe_all(media):
        (infos.__setitem__(uri, info) if isinstance(info, VideoInfo) else skipped.append(f"{uri}: {info}"))
    for reason in skipped:
        log(f"skipping {reason}")
    if not infos:
        raise ValueError(f"none of the {len(media)} file(s) under {spec.data} is readable media")
    train_rows, val_rows = plan_clips(spec, infos)
    crop = pool_crop(spec)
    log(f"decoding {len(train_rows)} training and {len(val_rows)} validation clips of {spec.clip_frames} "
        f"frames from {len(infos)} source(s)")

    def decode(rows: list[dict]) -> np.ndarray:
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64))
        ds = ds.map(decode_clip, fn_kwargs={"crop": crop, "source_scale": spec.source_scale}, num_cpus=1)
        return np.stack([r["clip"] for r in sorted(ds.take_all(), key=lambda r: r["seed"])])

    pool = decode(train_rows)
    val_clean = decode(val_rows)
    recipe = RECIPES[spec.stage]
    val_lq, val_hq = zip(*(sample_pair(c, spec, recipe, np.random.default_rng(VAL_SEED + i), augment=False)
                           for i, c in enumerate(val_clean)))
    val = {"lq": np.stack(val_lq), "hq": np.stack(val_hq)}

    # One pass of the stream covers the whole run; a restarted worker group starts the pass again.
    samples = spec.total_steps * spec.batch * spec.workers
    pool_ref = ray.put(pool)
    ds = ray.data.range(samples, override_num_blocks=max(1, samples // (4 * spec.batch)))
    ds = ds.map_batches(make_pairs, batch_size=spec.batch, num_cpus=1,
                        fn_kwargs={"pool": [pool_ref], "spec": spec})
    provenance = {
        "data": spec.data, "sources": len(infos), "skipped": len(skipped),
        "source_files": sorted(posixpath.basename(u) for u in infos)[:50],
        "licence_files": licences, "licence": spec.data_licence, "pool_clips": len(pool),
        "validation": "held-out clips from the last 10% of each video's frames",
        "recipe": recipe_summary(spec.stage),
    }
    return ds, val, provenance


def recipe_summary(stage: str) -> dict:
    from models.recipes import describe

    return describe(RECIPES[stage])
