"""The flat, typed columns shared by the plan, the events and the rows that flow through Ray Data."""

from __future__ import annotations

import pyarrow as pa

# One row per chunk. A video that could not be probed gets a single row with chunk_index = -1, n_chunks = 0
# and its reason in `error`, so the manifest names every input, restorable or not.
PLAN = pa.schema([
    ("job_id", pa.string()),
    ("video_id", pa.string()),
    ("source_uri", pa.string()),
    # The source's size and version tag when listed (storage.version_of): a chunk decoded or a video stitched from
    # a source that has changed since fails rather than mix two versions in one output. Empty in old plans.
    ("source_version", pa.string()),
    ("output_uri", pa.string()),
    ("rel_path", pa.string()),
    ("chunk_index", pa.int32()),
    ("n_chunks", pa.int32()),
    ("frame_start", pa.int64()),   # the chunk's own frames [frame_start, frame_end), source frame indices
    ("frame_end", pa.int64()),
    ("decode_start", pa.int64()),  # with the chain's context frames [decode_start, decode_end)
    ("decode_end", pa.int64()),
    ("seek_time", pa.float64()),   # seconds from the file's start; between frames decode_start-1 and decode_start
    ("n_frames", pa.int64()),      # frames in the whole video
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("bit_depth", pa.int32()),
    ("fps_num", pa.int64()),
    ("fps_den", pa.int64()),
    ("out_format", pa.string()),   # FFmpeg muxer of the output: mp4 | mov | matroska
    ("probe_json", pa.string()),   # the VideoInfo dump: what the encode and stitch need of the source
    # Variable-rate videos: a JSON list of the chunk's own frames' source times, in seconds from its first frame,
    # then the time the next chunk starts at; the segment keeps them. Empty at a constant rate (and in old plans).
    ("chunk_times", pa.string()),
    ("error", pa.string()),
])

STATUSES = ("running", "done", "failed")

# Append-only; the state of a chunk is its latest event. chunk_index = -1 marks a video-level event
# (probe failure, stitch done or failed).
EVENTS = pa.schema([
    ("video_id", pa.string()),
    ("chunk_index", pa.int32()),
    ("status", pa.string()),
    ("attempt", pa.int32()),
    ("error_kind", pa.string()),
    ("error_message", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("frames_in", pa.int64()),
    ("frames_out", pa.int64()),
    # Source frames of the chunk that could not be decoded and repeat a neighbour (--conceal-damage); their
    # indices are in error_message, with error_kind "concealed", of the chunk's done event. Null in old parts.
    ("frames_concealed", pa.int64()),
    ("segment_uri", pa.string()),
    ("worker", pa.string()),
])

# The plan columns a chunk task carries through decode -> restore -> encode, plus what the stages add.
TASK_FIELDS = ("video_id", "source_uri", "source_version", "chunk_index", "frame_start", "frame_end", "decode_start",
               "decode_end", "seek_time", "width", "height", "bit_depth", "fps_num", "fps_den", "probe_json",
               "chunk_times")
RESULT_FIELDS = ("attempt", "error_kind", "error_message", "started_at", "frames_in", "frames_out", "frames_concealed",
                 "concealed_at",
                 "segment_uri", "worker")
