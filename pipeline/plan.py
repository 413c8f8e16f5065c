"""Plan frame-exact chunks for each probed video: frame ranges (never time ranges), the context frames the
chain needs on each side, the seek time that lands on the first decoded frame, and the output's name."""

from __future__ import annotations

import hashlib
import json
import posixpath

from pipeline import ffmpeg
from pipeline.config import JobSpec
from pipeline.probe import VideoInfo
from pipeline.storage import join, safe_relative

MP4_FAMILY = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}


def video_id(rel_path: str, generation: int = 0) -> str:
    """A video's id in its job. A source replaced after it was planned is planned again as a new generation
    (a later plan part), with an id of its own: the events of the old one never count for it."""
    key = rel_path if generation == 0 else f"{rel_path}\0{generation}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def output_name(rel_path: str, info: VideoInfo, spec: JobSpec) -> tuple[str, str]:
    """(relative output path, FFmpeg muxer). The source's name and container are kept when the container can
    hold the output streams; otherwise the output becomes .mkv (Matroska holds every codec we copy)."""
    rel = safe_relative(rel_path)
    stem, ext = posixpath.splitext(rel)
    family = MP4_FAMILY.get(ext.lower())
    fits = (
        family is not None
        and not spec.encode.lossless  # FFV1 has no MP4 mapping
        and not (family == "mov" and spec.encode.codec == "av1")  # FFmpeg's QuickTime muxer refuses AV1
        # every stream a Matroska output would carry, this container carries too
        and all(ffmpeg.carries(family, s.kind, s.codec) or not ffmpeg.carries("matroska", s.kind, s.codec)
                for s in info.streams)
    )
    if fits:
        return rel, family
    return (stem + ".mkv" if ext.lower() != ".mkv" else rel), "matroska"


def plan_video(spec: JobSpec, job_id: str, source_uri: str, rel_path: str, info: VideoInfo,
               context: tuple[int, int], *, version: str = "", generation: int = 0) -> list[dict]:
    """One plan row per chunk of about 2 s (or `spec.chunk_frames`) of source frames."""
    if _unsafe(rel_path):
        raise ValueError(f"object key {source_uri!r} has an empty, '.' or '..' part: its output would not be its own "
                         "path in DEST (rename the object)")
    n = info.n_frames
    size = spec.chunk_frames or max(2, round(2 * info.fps))
    n_chunks = -(-n // size)
    rel_out, out_format = output_name(rel_path, info, spec)
    before, after = context
    if spec.deinterlace and info.parity:  # the deinterlacer needs a frame on each side (see decode_chunk)
        before, after = before + 1, after + 1
    probe_json = info.model_dump_json()
    rows = []
    for i in range(n_chunks):
        start, end = i * size, min((i + 1) * size, n)
        d0, d1 = max(0, start - before), min(n, end + after)
        rows.append({
            "job_id": job_id, "video_id": video_id(rel_path, generation), "source_uri": source_uri,
            "source_version": version, "output_uri": join(spec.dest, rel_out), "rel_path": rel_path,
            "chunk_index": i, "n_chunks": n_chunks,
            "frame_start": start, "frame_end": end, "decode_start": d0, "decode_end": d1,
            "seek_time": seek_time(info, d0), "n_frames": n, "width": info.width, "height": info.height,
            "bit_depth": info.bit_depth, "fps_num": info.fps_num, "fps_den": info.fps_den,
            "out_format": out_format, "probe_json": probe_json, "chunk_times": chunk_times(info, start, end),
            "error": None,
        })
    return rows


def chunk_times(info: VideoInfo, start: int, end: int) -> str:
    """The `chunk_times` of frames [start, end) of a variable-rate video (see schema.PLAN), else ""."""
    t = info.frame_times
    if not info.vfr or len(t) != info.n_frames:
        return ""
    if end < len(t):
        following = t[end]
    else:  # the last frame lasts as long as the one before it (or a nominal frame)
        following = t[-1] + (t[-1] - t[-2] if len(t) > 1 else float(1 / info.fps))
    return json.dumps([round(x - t[start], 6) for x in (*t[start:end], following)])


def _unsafe(rel_path: str) -> bool:
    """An object store's key is a name, not a path: "raw/x/../a.mp4" is an object of its own, which a resolved
    relative path ("a.mp4", or "../a.mp4") would give another object's output, or one outside DEST; so are
    "raw/./_reelmend/..." (normalised, a path into DEST's job area) and "raw//a.mp4" (normalised, the output of
    "raw/a.mp4"). Only the part below SRC counts: SRC itself may be spelled with '..' ("../raw")."""
    return any(part in ("", ".", "..") for part in rel_path.split("/"))


def failed_video_row(job_id: str, source_uri: str, rel_path: str, reason: str, dest: str, *, version: str = "",
                     generation: int = 0) -> dict:
    """The plan row of an input that cannot be restored: it is listed, with its reason, and never run."""
    try:
        output_uri = "" if _unsafe(rel_path) else join(dest, safe_relative(rel_path))
    except ValueError:
        output_uri = ""
    return {"job_id": job_id, "video_id": video_id(rel_path, generation), "source_uri": source_uri,
            "source_version": version, "output_uri": output_uri,
            "rel_path": rel_path, "chunk_index": -1, "n_chunks": 0, "frame_start": 0, "frame_end": 0,
            "decode_start": 0, "decode_end": 0, "seek_time": 0.0, "n_frames": 0, "width": 0, "height": 0,
            "bit_depth": 0, "fps_num": 0, "fps_den": 1, "out_format": "", "probe_json": "", "chunk_times": "", "error": reason}


def seek_time(info: VideoInfo, frame: int) -> float:
    """Seconds from the file's start to halfway between `frame - 1` and `frame`: FFmpeg's accurate seek keeps
    frames at or after the seek point, so the first frame out is exactly `frame`, whatever the frame spacing."""
    if frame == 0:
        return 0.0
    t = info.frame_times
    return (t[frame - 1] + t[frame]) / 2 - info.start_time
