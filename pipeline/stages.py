"""The three Ray Data stages of a restoration job, each with its resources declared beside it.

A row is one chunk: the plan columns of `schema.TASK_FIELDS`, the `frames` the stages pass along, and the
result columns of `schema.RESULT_FIELDS`. A stage that fails on a chunk does not raise (one bad video must
never stop the dataset): it returns the row with `error_kind`/`error_message` set and empty frames, the later
stages pass it through, and the driver records the failure in the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

import numpy as np

from pipeline import faults, ffmpeg, storage
from pipeline.config import EncodeSpec
from pipeline.probe import VideoInfo

EMPTY = np.zeros((0, 1, 1, 3), dtype=np.uint8)

# Ray Data retries a task and restarts an actor whose process or node died (system failures); a chunk that
# fails by itself (bad input, encoder error) is retried by the driver, up to --max-attempts. A chunk whose
# process keeps dying is failed as "lost" when it starts for the (PROCESS_RETRIES + 2)th time in one pass
# (`run.Tries` counts), where Ray alone would run it again forever.
PROCESS_RETRIES = 2


def lost_reason(what: str) -> str:
    return (f"the worker process running this {what} died {PROCESS_RETRIES + 1} times (a crash, a kill for memory "
            f"or a lost node); see `ray logs` on its node")


def _lost(stage: str, row: dict[str, Any], tries) -> bool:
    """Count this start of the chunk in `stage`; True when its process has died too often already."""
    return _starts(stage, row, tries) > PROCESS_RETRIES + 1


def _starts(stage: str, row: dict[str, Any], tries) -> int:
    """Count this start of the chunk in `stage`: how often it has started there in this pass, this time
    included (1 when not counted)."""
    if tries is None:  # run outside a job (tests of one stage)
        return 1
    import ray

    try:
        return ray.get(tries.start.remote(f"{stage}/{row['video_id']}/{int(row['chunk_index'])}"), timeout=60)
    except (ray.exceptions.RayError, TimeoutError) as err:  # the counter is gone with the driver: count nothing
        logging.getLogger(__name__).warning("cannot count the starts of chunk %s of %s (%s): not counted",
                                            row["chunk_index"], row["video_id"], type(err).__name__)
        return 1


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _failed(row: dict[str, Any], kind: str, err: BaseException | str) -> dict[str, Any]:
    message = " ".join(str(err).split()) or type(err).__name__
    return {**row, "frames": EMPTY, "error_kind": kind, "error_message": message[:2000], "worker": _worker()}


def decode_chunk(row: dict[str, Any], *, storage_options: dict, tries=None, conceal: bool = False,
                 deinterlace: bool = False, double_rate: bool = False, context: tuple[int, int] = (0, 0)
                 ) -> dict[str, Any]:
    """CPU task: decode the chunk's frames with context, [decode_start, decode_end), as RGB (16-bit for
    sources deeper than 8 bits). `conceal`: frames the decoder cannot produce repeat a neighbour
    (`ffmpeg.decode_frames_concealing`); the chunk's own ones are counted in `frames_concealed` and listed,
    as source frame indices, in `concealed_at`.

    `deinterlace` (an interlaced source): the plan decodes one frame more on each side than the chain's
    `context` needs, where the video has one, for the deinterlacer to see the neighbours a whole-video
    deinterlace would; those are dropped here, so the chain gets exactly its window. With `double_rate`, each
    field becomes a frame: the chain gets two frames per source frame, and the row says so (`fields_per_frame`)
    to the stages after it."""
    storage.configure(storage_options)
    row = {**row, "started_at": time.time(), "error_kind": "", "error_message": "", "frames_in": 0,
           "frames_out": 0, "frames_concealed": 0, "concealed_at": "", "segment_uri": "", "worker": _worker(),
           "fields_per_frame": 1}
    if _lost("decode", row, tries):
        return _failed(row, "lost", f"decode: {lost_reason('chunk')}")
    try:
        faults.maybe_fail("decode", row)
        storage.check_version(row["source_uri"], row.get("source_version") or "")
        info = VideoInfo.model_validate_json(row["probe_json"])
        n = int(row["decode_end"] - row["decode_start"])
        parity = info.parity if deinterlace else None
        per_field = bool(parity and double_rate)
        row["fields_per_frame"] = 2 if per_field else 1
        what = {"stream_index": info.stream_index, "seek": float(row["seek_time"]), "n_frames": n,
                "width": info.width, "height": info.height, "high_depth": info.bit_depth > 8, "matrix": info.matrix,
                "full_range": info.full_range, "deinterlace": parity}
        with storage.ffmpeg_input(row["source_uri"], version=row.get("source_version") or "") as src:
            # (the job spec refuses --conceal-damage with --double-rate)
            frames = (ffmpeg.decode_frames_concealing(src, **what) if conceal
                      else ffmpeg.decode_frames(src, **what, per_field=per_field))
        if conceal:
            frames, missing = frames
            if missing:  # frames missing because the file changed as it was read are not damage
                storage.check_version(row["source_uri"], row.get("source_version") or "")
            own = [int(row["decode_start"]) + j for j in missing
                   if row["frame_start"] <= int(row["decode_start"]) + j < row["frame_end"]]
            row = {**row, "frames_concealed": len(own), "concealed_at": ", ".join(map(str, own))}
        if parity:
            frames, row = _drop_deinterlace_margin(frames, row, context, int(info.n_frames), row["fields_per_frame"])
    except storage.SourceChanged as err:
        return _failed(row, "source", err)
    except Exception as err:  # noqa: BLE001 - any failure is this chunk's, recorded with its reason
        return _failed(row, "decode", err)
    return {**row, "frames": frames, "frames_in": int(row["frame_end"] - row["frame_start"])}


def _drop_deinterlace_margin(frames: np.ndarray, row: dict[str, Any], context: tuple[int, int],
                             n: int, per_frame: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """The frames of the chain's window, [frame_start - before, frame_end + after) within the video, out of the
    decode's, which the plan widened by a frame on each side for the deinterlacer (`per_frame` frames out of
    each source frame: 2 made one per field)."""
    start = max(0, int(row["frame_start"]) - context[0])
    end = min(n, int(row["frame_end"]) + context[1])
    first = start - int(row["decode_start"])
    frames = frames[first * per_frame:(first + end - start) * per_frame]
    return frames, {**row, "decode_start": start, "decode_end": end}


class RestoreStage:
    """Actor: loads the chain once, then restores one chunk per call (the chain batches its frames).

    Declared with one CPU, and one GPU per actor when the cluster has GPUs (`pipeline.run`)."""

    def __init__(self, chain: tuple[str, ...], models: str | None, storage_options: dict, threads: int = 1,
                 tries=None):
        import torch

        self.tries = tries
        storage.configure(storage_options)  # --models may be a bucket

        from models.chain import load_chain

        torch.set_num_threads(max(1, threads))
        # the weights may be in a bucket: a transient error there is retried, not the end of the whole job
        self.chain = storage.retrying(load_chain)(chain, models)
        if (limit := faults.memory_limit()) is not None:
            faults.limit_memory(self.chain, *limit)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        row = {k: v[0] for k, v in batch.items()}
        if not row["error_kind"]:
            starts = _starts("restore", row, self.tries)
            lost = starts > PROCESS_RETRIES + 1
            row = _failed(row, "lost", f"restore: {lost_reason('chunk')}") if lost else self._restore(row, starts - 1)
        return {k: _one(v) for k, v in row.items()}

    def _restore(self, row: dict[str, Any], deaths: int = 0) -> dict[str, Any]:
        t = self.chain.temporal_factor * int(row.get("fields_per_frame") or 1)  # output frames per source frame
        own = slice(int(row["frame_start"] - row["decode_start"]) * t, int(row["frame_end"] - row["decode_start"]) * t)
        try:
            faults.maybe_fail("restore", row)
            out = self._run_within_memory(np.asarray(row["frames"]), deaths)
        except OutOfMemory as err:
            return _failed(row, "oom", err)
        except Exception as err:  # noqa: BLE001
            return _failed(row, "restore", err)
        return {**row, "frames": np.ascontiguousarray(out[own]), "worker": _worker()}

    def _run_within_memory(self, frames: np.ndarray, deaths: int = 0) -> np.ndarray:
        """Run the chain; out of memory, run it again with a quarter of the pixels per forward (fewer frames
        per batch, then smaller tiles) until it fits or nothing can shrink further. Outputs are the same
        whatever the budget, up to the blending of tile seams.

        `deaths`: how often a worker died running this chunk before. An OOM killer (the kernel's, a container's,
        Ray's memory monitor) ends the process with nothing to catch, and it looks like any other death; so a
        chunk run again after one starts at a quarter of what it needed per forward, a sixteenth after two."""
        import torch

        budget = self.chain.pixel_budget
        if deaths:
            _, h, w, _ = frames.shape
            needed = len(frames) * h * w * self.chain.scale ** 2
            self.chain.pixel_budget = max(self.chain.min_pixel_budget, min(budget, needed) / 4 ** deaths)
            logging.getLogger(__name__).warning("a worker died %d time(s) running this chunk: restoring it with at "
                                                "most %d output pixels per forward", deaths, self.chain.pixel_budget)
        try:
            while True:
                try:
                    return self.chain.run(frames)
                except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
                    if not _out_of_memory(err):
                        raise
                    if self.chain.pixel_budget / 4 < self.chain.min_pixel_budget:
                        raise OutOfMemory(f"out of memory even one frame at a time in the smallest tiles "
                                          f"({err}); give the restore actors more memory") from err
                    self.chain.pixel_budget /= 4
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
        finally:
            self.chain.pixel_budget = budget  # the next chunk may be smaller; start from the full budget


class OutOfMemory(RuntimeError):
    """The chain did not fit in memory at any batch size or tile size."""


def _out_of_memory(err: BaseException) -> bool:
    # torch raises OutOfMemoryError on GPUs, but cuDNN and cuBLAS report theirs as RuntimeErrors
    # (CUDNN_STATUS_ALLOC_FAILED), as does its CPU allocator ("DefaultCPUAllocator: can't allocate memory").
    import torch

    text = str(err)
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or any(
        sign in text for sign in ("can't allocate memory", "CUDA out of memory", "CUDA error: out of memory",
                                  "ALLOC_FAILED"))


def _one(value: Any) -> np.ndarray:
    """A batch of one row: the value with a leading axis of 1 (object dtype for strings)."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value[None]
    out = np.empty(1, dtype=object)
    out[0] = value
    return out


def encode_chunk(row: dict[str, Any], *, encode: EncodeSpec, segments_root: str, temporal: int,
                 storage_options: dict, tries=None) -> dict[str, Any]:
    """CPU task: encode the restored frames to a video-only segment in the job area; drop the frames."""
    storage.configure(storage_options)
    if not row["error_kind"] and _lost("encode", row, tries):
        row = _failed(row, "lost", f"encode: {lost_reason('chunk')}")
    elif not row["error_kind"]:
        try:
            faults.maybe_fail("encode", row)
            row = _encode(row, encode, segments_root, temporal)
        except Exception as err:  # noqa: BLE001
            row = _failed(row, "encode", err)
    row.pop("frames", None)
    return row


def output_times(chunk_times: list[float], temporal: int) -> list[float]:
    """Each output frame's time in a variable-rate chunk (its `chunk_times`: source frames, then the next
    chunk's start): a source frame's own, and for a chain that makes `temporal` frames of each, the others
    evenly between it and the next."""
    return [t + (after - t) * k / temporal for t, after in zip(chunk_times, chunk_times[1:]) for k in range(temporal)]


def _encode(row: dict[str, Any], encode: EncodeSpec, segments_root: str, temporal: int) -> dict[str, Any]:
    info = VideoInfo.model_validate_json(row["probe_json"])
    frames = np.asarray(row["frames"])
    temporal *= int(row.get("fields_per_frame") or 1)  # a frame of each field, made before the chain
    expected = int(row["frame_end"] - row["frame_start"]) * temporal
    if len(frames) != expected:  # a chain bug, never silently papered over
        raise RuntimeError(f"restore returned {len(frames)} frames, expected {expected}")
    _, h, w, _ = frames.shape
    codec_args = ffmpeg.encode_args(codec=encode.codec, crf=encode.crf, preset=encode.preset,
                                    lossless=encode.lossless, depth=info.bit_depth,
                                    chroma=info.chroma if info.chroma in ("420", "422", "444") else "420",
                                    odd_size=bool(w % 2 or h % 2))
    uri = storage.join(segments_root, row["video_id"], f"{int(row['chunk_index']):06d}.mkv")
    times = output_times(json.loads(row["chunk_times"]), temporal) if row.get("chunk_times") else None
    with storage.staging_dir(segments_root) as tmp:
        ffmpeg.encode_segment(frames, str(tmp / "segment.mkv"), fps=info.fps * temporal, codec_args=codec_args,
                              matrix=info.matrix, full_range=info.full_range, colour_tags=info.colour_tags(),
                              times=times)
        storage.publish(tmp / "segment.mkv", uri)
    return {**row, "frames_out": len(frames), "segment_uri": uri, "worker": _worker()}
