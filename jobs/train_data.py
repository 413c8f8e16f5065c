"""Training data on Ray Data: clean footage -> a pool of clean clips -> degraded (input, target) pairs.

    list --data (fsspec)  ->  probe (CPU tasks)  ->  clip plan: random clips of `clip_frames` consecutive
    frames, training clips from the first 90% of each video, validation clips from the last 10% (or, with
    only still images, from images held out of training)
      -> decode + random crop (Ray Data, CPU tasks, FFmpeg)  ->  the clean pool, materialised once
      -> per sample (Ray Data, CPU tasks): pick a pool clip, cut a patch, flip/rotate, degrade it with the
         stage's recipe  ->  rows {lq, hq} streamed to the training workers
      (with --pool-variants N, each pool clip is degraded N times up front instead, and a sample is a patch cut
       from one of those pairs, flipped and rotated: for damage too slow to make per sample)

Every random choice is drawn from a generator seeded with (run seed, sample index), so a sample is the same
whichever worker makes it, and a resumed run continues with the indices after its checkpoint's. Decoding once
keeps FFmpeg off the training hot path; degrading per sample means the model rarely sees the same damage
twice (a worker group restarted mid-run replays its stream from the top).
"""

from __future__ import annotations

import math
import posixpath
from typing import Any

import numpy as np
import ray

from jobs.train_config import TrainSpec
from models import degrade
from models.chain import STAGES
from models.recipes import RECIPES, describe
from pipeline import ffmpeg, storage
from pipeline.plan import seek_time
from pipeline.probe import VideoInfo
from pipeline.run import probe_all

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
LICENCE_PREFIXES = ("license", "licence", "copying")
VAL_SEED = 1_000_003  # validation pairs come from their own seed stream, never from training samples'
VARIANT_SEED = 2_000_003  # and the degraded pool variants from theirs


def list_sources(data: str) -> tuple[list[str], list[str]]:
    """(media URIs, licence file names) under `data`. Licence files are recorded in the model card."""
    try:
        files = storage.list_files(data)
    except storage.SourceMissing as err:
        raise FileNotFoundError(f"--data {data} does not exist") from err
    licences = [rel for _, rel, _ in files if posixpath.basename(rel).lower().startswith(LICENCE_PREFIXES)]
    media = [uri for uri, rel, _ in files
             if not posixpath.basename(rel).lower().startswith(LICENCE_PREFIXES + ("readme",))
             and not rel.lower().endswith((".txt", ".md", ".json"))]
    if not media:
        raise FileNotFoundError(f"no videos or images under {data}")
    return media, licences


def plan_clips(spec: TrainSpec, infos: dict[str, VideoInfo]) -> tuple[list[dict], list[dict], str]:
    """Training and validation clip rows (where each clip starts and how to decode it), and how validation was
    held out, for the model card."""
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

    # Each video is cut once: training clips lie wholly before `cut`, validation clips wholly after it. A video
    # too short to give both sides trains only. With no video, whole images are held out.
    cuts = {u: infos[u].n_frames - max(t, math.ceil(0.1 * infos[u].n_frames)) for u in videos}
    val_videos = [u for u in videos if cuts[u] >= t]
    still = list(images)
    val_images = still[len(still) - max(1, len(still) // 10):] if not val_videos and len(still) > 1 else []
    train_sources = [u for u in usable if u not in val_images]
    if val_videos:
        how = "held-out clips from the last 10% of each video's frames"
        val_sources = val_videos
    elif val_images:
        how = f"{len(val_images)} held-out image(s)"
        val_sources = val_images
    else:
        how = "NOT held out: the only source is also the training source"
        val_sources = train_sources

    def clip_start(uri: str, validation: bool) -> int:
        if uri not in videos:
            return 0
        n = infos[uri].n_frames
        if uri not in val_videos:
            return int(rng.integers(0, n - t + 1))
        lo, hi = (cuts[uri], n - t) if validation else (0, cuts[uri] - t)
        return int(rng.integers(lo, hi + 1))

    train, val = [], []
    for k in range(spec.pool_clips):  # sources in turn, so each contributes about equally
        uri = train_sources[k % len(train_sources)]
        train.append(row(uri, clip_start(uri, validation=False), spec.seed * 7919 + k))
    for k in range(spec.val_clips):
        uri = val_sources[k % len(val_sources)]
        val.append(row(uri, clip_start(uri, validation=True), VAL_SEED + k))
    return train, val, how


def decode_clip(row: dict[str, Any], crop: int, source_scale: float, storage_options: dict | None = None
                ) -> dict[str, Any]:
    """CPU task: decode a clip, downscale it (area) if asked, and keep a random `crop`-sided square of it."""
    storage.configure(storage_options or {})
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


def make_pairs(batch: dict[str, np.ndarray], pool: list, spec: TrainSpec, offset: int) -> dict[str, np.ndarray]:
    """CPU task: sample indices -> degraded (lq, hq) clips. `pool` is [ObjectRef of the clean pool] or, with
    pool variants, [clean pool, its degraded variants] and, for windowed stages, the clean windows the variants were
    made from; `offset` is the index of the run's first sample (non-zero when resuming)."""
    clips = ray.get(pool[0])
    variants = ray.get(pool[1]) if len(pool) > 1 else None
    windows = ray.get(pool[2]) if len(pool) > 2 else None
    recipe = RECIPES[spec.stage]
    lqs, hqs = [], []
    for index in batch["id"]:
        rng = np.random.default_rng([spec.seed, offset + int(index)])
        if variants is None:
            lq, hq = sample_pair(clips[int(rng.integers(0, len(clips)))], spec, recipe, rng)
        else:
            k = int(rng.integers(0, len(variants)))
            clean = windows[k] if windows is not None else clips[k // spec.pool_variants]
            lq, hq = cut_pair(variants[k], clean, spec, recipe.scale, rng)
        lqs.append(lq)
        hqs.append(hq)
    return {"lq": np.stack(lqs), "hq": np.stack(hqs)}


def degrade_pool(batch: dict[str, np.ndarray], pool: list, spec: TrainSpec) -> dict[str, np.ndarray]:
    """CPU task: variant indices -> the pool clip `index // pool_variants` (for windowed stages, a window of it,
    half the time panning), degraded by the recipe; rows {id, lq} and, for windowed stages, the clean window hq."""
    clips = ray.get(pool[0])
    recipe = RECIPES[spec.stage]
    windowed = bool(STAGES[spec.stage].radius)
    lqs, hqs = [], []
    for index in batch["id"]:
        rng = np.random.default_rng([spec.seed, VARIANT_SEED, int(index)])
        clean = clips[int(index) // spec.pool_variants]
        if windowed:
            clean = pool_window(clean, spec.patch, rng)
            hqs.append(clean)
        lq, _ = degrade.make_pair(clean, recipe, rng, roundtrip=ffmpeg.codec_roundtrip)
        lqs.append(lq)
    return {"id": batch["id"], "lq": np.stack(lqs), **({"hq": np.stack(hqs)} if windowed else {})}


def pool_window(clip: np.ndarray, patch: int, rng: np.random.Generator) -> np.ndarray:
    """A window of a pool clip, halfway between the patch and the clip in size, for a windowed stage's pool
    variant: half the time a camera pan (see PAN_PROBABILITY), else still. The pan must come before the damage,
    so the codec sees the motion; patches are then cut from the window at random offsets."""
    side = (patch + clip.shape[1]) // 2
    window = panned_patch(clip, side, rng) if rng.random() < PAN_PROBABILITY else None
    if window is None:
        y, x = (int(rng.integers(0, d - side + 1)) for d in clip.shape[1:3])
        window = clip[:, y:y + side, x:x + side]
    return np.ascontiguousarray(window)


# Interpolation patches: the most moving of this many random candidates. Most patches of real footage are static
# background, where the frame average is already right and the flow gets no gradient; the first interpolator
# trained on uniform patches learnt to average (0.0-0.2 dB over the average of the neighbours, where FFmpeg's
# minterpolate gains 0.2-1.6 dB). Video interpolation training sets are curated for motion the same way
# (Vimeo-90K's triplets were selected for it: Xue et al., IJCV 2019).
MOTION_CANDIDATES = 4


# Windowed stages (descratch, denoise, deblock) learn to use their neighbour frames from footage that is mostly shot
# from a tripod: half their patches follow a simulated camera pan instead, a window moving a random whole number of
# pixels per frame, so the net must learn to tell a static neighbour from a moved one. The five-frame denoiser trained
# without it averaged its neighbours regardless of motion (34.2 -> 29.6 dB on bikes.mp4 at sigma 5).
PAN_PROBABILITY = 0.5
PAN_MAX_SPEED = 8  # pixels per frame on each axis; the pool crop (twice the patch) leaves room for it


def sample_pair(clip: np.ndarray, spec: TrainSpec, recipe, rng: np.random.Generator,
                augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A random patch of a clean clip (for windowed stages, half the time a panning one), flipped and rotated
    (the dihedral augmentations of EDSR), degraded."""
    p = spec.patch
    patch = panned_patch(clip, p, rng) if STAGES[spec.stage].radius and rng.random() < PAN_PROBABILITY else None
    if patch is None:
        y, x = patch_origin(clip, p, spec, rng)
        patch = clip[:, y:y + p, x:x + p]
    if augment:
        (patch,) = dihedral(rng, patch)
    return degrade.make_pair(np.ascontiguousarray(patch), recipe, rng, roundtrip=ffmpeg.codec_roundtrip)


def cut_pair(lq_clip: np.ndarray, hq_clip: np.ndarray, spec: TrainSpec, scale: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random patch of a degraded pool clip and of its clean original (`scale` times larger), flipped
    and rotated together."""
    q = spec.patch // scale
    y, x = patch_origin(lq_clip, q, spec, rng)
    lq = lq_clip[:, y:y + q, x:x + q]
    hq = hq_clip[:, y * scale:(y + q) * scale, x * scale:(x + q) * scale]
    return tuple(np.ascontiguousarray(c) for c in dihedral(rng, lq, hq))


def patch_origin(clip: np.ndarray, side: int, spec: TrainSpec, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a random `side`-pixel patch (for interpolation the most moving of a few)."""
    candidates = MOTION_CANDIDATES if STAGES[spec.stage].is_interp else 1
    origins = [tuple(int(rng.integers(0, d - side + 1)) for d in clip.shape[1:3]) for _ in range(candidates)]
    return max(origins, key=lambda o: motion(clip[:, o[0]:o[0] + side, o[1]:o[1] + side]))


def panned_patch(clip: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray | None:
    """A `side`-pixel window that moves (vy, vx) whole pixels per frame across the clip: a camera pan over the
    scene, both directions and speeds up to PAN_MAX_SPEED drawn at random. None where the clip has no room."""
    t, h, w = clip.shape[:3]
    speeds = []
    for d in (h, w):
        fastest = min(PAN_MAX_SPEED, (d - side) // max(1, t - 1))
        speeds.append(int(rng.integers(-fastest, fastest + 1)) if fastest > 0 else 0)
    if not any(speeds):
        return None
    origin = []
    for d, v in zip((h, w), speeds):
        travel = abs(v) * (t - 1)
        start = int(rng.integers(0, d - side - travel + 1))
        origin.append(start if v >= 0 else start + travel)
    (y, x), (vy, vx) = origin, speeds
    return np.stack([clip[k, y + k * vy:y + k * vy + side, x + k * vx:x + k * vx + side] for k in range(t)])


def dihedral(rng: np.random.Generator, *clips: np.ndarray) -> list[np.ndarray]:
    """One random flip, rotation and time reversal, the same for every clip given."""
    flip, turns, reverse = rng.random() < 0.5, int(rng.integers(0, 4)), rng.random() < 0.5
    out = []
    for clip in clips:
        clip = clip[:, :, ::-1] if flip else clip
        clip = np.rot90(clip, turns, axes=(1, 2))
        out.append(clip[::-1] if reverse else clip)  # time reversal: motion is as plausible backwards
    return out


def motion(clip: np.ndarray) -> float:
    """Mean absolute change between a clip's first and last frame."""
    return float(np.abs(clip[-1].astype(np.int16) - clip[0]).mean())


def build(spec: TrainSpec, log, first_step: int = 0, sources: tuple[list[str], list[str]] | None = None
          ) -> tuple[ray.data.Dataset, dict[str, np.ndarray], dict[str, Any]]:
    """The streaming training dataset for steps [first_step, total), the validation pairs (numpy), and the
    data provenance for the card. `sources`: what `list_sources(spec.data)` gave, where the caller listed it."""
    media, licences = sources or list_sources(spec.data)
    infos, skipped = {}, []
    for uri, info in probe_all(media, spec.storage_options):
        (infos.__setitem__(uri, info) if isinstance(info, VideoInfo) else skipped.append(f"{uri}: {info}"))
    for reason in skipped:
        log(f"skipping {reason}")
    if not infos:
        raise ValueError(f"none of the {len(media)} file(s) under {spec.data} is readable media")
    train_rows, val_rows, held_out = plan_clips(spec, infos)
    crop = pool_crop(spec)
    log(f"decoding {len(train_rows)} training and {len(val_rows)} validation clips of {spec.clip_frames} "
        f"frames from {len(infos)} source(s)")

    def decode(rows: list[dict]) -> np.ndarray:
        ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64))
        ds = ds.map(decode_clip, fn_kwargs={"crop": crop, "source_scale": spec.source_scale,
                                            "storage_options": spec.storage_options}, num_cpus=1)
        return np.stack([r["clip"] for r in sorted(ds.take_all(), key=lambda r: r["seed"])])

    pool = decode(train_rows)
    val_clean = decode(val_rows)
    recipe = RECIPES[spec.stage]
    val_lq, val_hq = zip(*(sample_pair(c, spec, recipe, np.random.default_rng(VAL_SEED + i), augment=False)
                           for i, c in enumerate(val_clean)))
    val = {"lq": np.stack(val_lq), "hq": np.stack(val_hq)}

    # One pass of the stream covers the remaining steps, split equally between the workers.
    per_step = spec.batch * spec.workers
    samples = max(1, spec.total_steps - first_step) * per_step
    pool_refs = [ray.put(pool)]
    if spec.pool_variants:
        n = len(pool) * spec.pool_variants
        log(f"degrading each of the {len(pool)} pool clips {spec.pool_variants} time(s)")
        made = ray.data.range(n, override_num_blocks=min(n, 64)).map_batches(
            degrade_pool, batch_size=8, num_cpus=1, fn_kwargs={"pool": pool_refs, "spec": spec})
        rows = sorted(made.take_all(), key=lambda r: r["id"])
        pool_refs.append(ray.put(np.stack([r["lq"] for r in rows])))
        if "hq" in rows[0]:  # windowed stages: the (possibly panning) clean windows the variants were made from
            pool_refs.append(ray.put(np.stack([r["hq"] for r in rows])))
    ds = ray.data.range(samples, override_num_blocks=max(1, samples // (4 * spec.batch)))
    ds = ds.map_batches(make_pairs, batch_size=spec.batch, num_cpus=1,
                        fn_kwargs={"pool": pool_refs, "spec": spec, "offset": first_step * per_step})
    used = sorted({r["uri"] for r in train_rows + val_rows})
    provenance = {
        "data": spec.data, "sources": len(used), "skipped": len(skipped),
        "source_files": [posixpath.basename(u) for u in used][:50],
        "licence_files": licences, "licence": spec.data_licence, "pool_clips": len(pool),
        "pool_variants": spec.pool_variants,
        "validation": held_out,
        "recipe": recipe_summary(spec.stage),
    }
    return ds, val, provenance


def recipe_summary(stage: str) -> dict:
    return describe(RECIPES[stage])
