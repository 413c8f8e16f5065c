"""Stitch one video once all its chunks are done: concatenate the segments, copy the source's other streams,
chapters and metadata, check the frame count, and publish the output atomically."""

from __future__ import annotations

import contextlib

from pipeline import ffmpeg, storage
from pipeline.probe import VideoInfo, probe


def stitch_video(*, source_uri: str, output_uri: str, out_format: str, probe_json: str, segments: list[str],
                 expected_frames: int, staging_near: str, durations: list[float] | None = None,
                 source_version: str = "", deinterlaced: bool = False) -> int:
    """Returns the output's frame count; raises (FFmpegError, RuntimeError, SourceChanged) with a one-line
    reason. The source's audio, subtitles and metadata are copied from it: it must be the file the chunks
    were made of."""
    storage.check_version(source_uri, source_version)
    info = VideoInfo.model_validate_json(probe_json)
    streams = [(s.index, s.kind, s.codec or "") for s in info.streams]
    with storage.staging_dir(staging_near) as tmp, contextlib.ExitStack() as stack:
        inputs = [stack.enter_context(storage.ffmpeg_input(uri, stage_in=tmp)) for uri in segments]
        list_file = tmp / "segments.ffconcat"
        list_file.write_text(ffmpeg.concat_list(inputs, durations), encoding="utf-8")
        source = stack.enter_context(storage.ffmpeg_input(source_uri, stage_in=tmp, version=source_version))
        out = tmp / f"output{_suffix(output_uri)}"
        ffmpeg.stitch(str(list_file), source, str(out), source_video_index=info.stream_index,
                      out_format=out_format, rotation=info.rotation,
                      field_order="progressive" if deinterlaced and info.parity else info.field_order,
                      streams=streams,
                      frames=expected_frames, pixels=info.width * info.height)
        got = probe(str(out)).n_frames
        if got != expected_frames:
            raise RuntimeError(f"stitched output has {got} frames, expected {expected_frames}")
        storage.publish(out, output_uri)
    return got


def _suffix(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    return name[name.rfind("."):] if "." in name else ""
