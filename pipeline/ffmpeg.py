"""Every FFmpeg and ffprobe invocation: argument lists only (never a shell), stderr always drained by a
thread (an unread pipe stalls FFmpeg once it fills), and a timeout scaled to the work on every call.

Commands are built by hand as lists rather than through ffmpeg-python: the stitch needs optional maps
(`-map 1:a?`), `-map_metadata` with stream specifiers and per-codec output options, which read more plainly
as the arguments FFmpeg documents.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import re
import subprocess
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

FFMPEG = "ffmpeg"
FFPROBE = "ffprobe"
BASE = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]


class FFmpegError(RuntimeError):
    """An FFmpeg or ffprobe call failed; the message is one line a user can act on."""

    def __init__(self, what: str, detail: str):
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


def work_timeout(frames: int, pixels: int, seconds_per_mpx: float = 1.0, base: float = 60.0) -> float:
    """Timeout for a call that touches `frames` frames of `pixels` pixels: generous (x264 `medium` runs at
    >5 MP/s on one core), but finite, so a stuck decoder never hangs a job."""
    return base + frames * pixels / 1e6 * seconds_per_mpx


# FFmpeg names its input in errors; a presigned URL's query string is a credential (its signature), which must
# never reach a log or a manifest.
_SIGNED_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")


def redact(text: str) -> str:
    return _SIGNED_QUERY.sub(r"\1?<signature redacted>", text)


# FFmpeg's log context, "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d3a861e1c0] ": a memory address tells a user nothing,
# and a console that reads square brackets as markup eats it.
_LOG_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-fA-F]+\]\s*")
# What FFmpeg says when a source's format is not in `allowed_demuxers()`, and what that means for the file.
_REFUSED_FORMAT = re.compile(r"^\[([^\] ]+) @ 0x[0-9a-fA-F]+\]\s*Format not on whitelist.*")
_REFUSED_REASON = (r"refused: its format (\1) names other files or URLs for FFmpeg to open, which reelmend does "
                   r"not follow; restore the media it points at instead")


def _last_lines(stderr: bytes, n: int = 2) -> str:
    """FFmpeg's last `n` distinct log lines, as one line."""
    lines: list[str] = []
    for raw in stderr.decode("utf-8", "replace").splitlines():
        line = _LOG_CONTEXT.sub("", _REFUSED_FORMAT.sub(_REFUSED_REASON, raw.strip()))
        if line.startswith("refused: its format"):
            return line  # the cause; what follows is FFmpeg's "Invalid argument"
        if line and not line.startswith("Last message repeated") and line not in lines[-1:]:
            lines.append(line)
    return redact(" | ".join(lines[-n:])) if lines else "no error output"


# Demuxers that open other files or URLs named inside the input (playlists, edit lists, session descriptions,
# VobSub's .sub beside its .idx, SVG's linked images, scripts). An untrusted source in one of these formats
# could make FFmpeg read local files into a restored output or fetch internal URLs (the HLS file-inclusion and
# SSRF attacks of 2016-17); no archive video needs them. Capture devices are never sources either.
INDIRECT_DEMUXERS = frozenset({"avisynth", "concat", "dash", "hls", "imf", "rtp", "rtsp", "sap", "sdp",
                               "svg_pipe", "vapoursynth", "vobsub"})
_FORMAT_LINE = re.compile(r"^ ([D ])[E ] (\S+)")


@functools.cache
def allowed_demuxers() -> str:
    """The installed FFmpeg's demuxers less its devices and INDIRECT_DEMUXERS, as `-format_whitelist` takes
    them: what a source may be read as."""
    def listed(flag: str) -> set[str]:
        out = run([FFMPEG, "-hide_banner", flag], timeout=30.0, what=f"ffmpeg {flag} failed").decode()
        names = set()
        for line in out.splitlines():
            match = _FORMAT_LINE.match(line)
            if match and match.group(1) == "D":
                names.update(match.group(2).split(","))
        return names

    demuxers = listed("-demuxers") - listed("-devices") - INDIRECT_DEMUXERS
    if not demuxers:
        raise FFmpegError("ffmpeg -demuxers listed no demuxers: is FFmpeg installed correctly?", "")
    return ",".join(sorted(demuxers))


# Seconds more for a call reading over HTTP: two stalls of FFmpeg's full reconnect backoff (1 + 2 + ... + 32 s).
RECONNECT_BUDGET = 126.0


def input_args(src: str) -> list[str]:
    """Options for reading `src`, the same for every ffprobe and FFmpeg call on a source.

    `-fflags +genpts`: where the container stores decode times only (AVI, whose anchor frames in a stream with
    B-frames have no presentation time; MPEG-PS), the demuxer derives the missing presentation times from the
    decode times and the codec's reordering, so the probe, the packet windows and the decoder all see the frames
    at the same times and chunks are cut by them (without it, every chunk of such an AVI after the first came
    out one frame early). Streams that carry presentation times are untouched.

    Over HTTP (a presigned object URL): reconnect on dropped connections and 5xx answers with backoff for up to
    a minute, as reelmend's storage calls retry, instead of failing the chunk on the first throttled range
    request.

    A source is read only as a self-contained media file (`allowed_demuxers`) and only over its own protocol
    (a local file, or HTTP(S) for a presigned URL), so nothing in it can point FFmpeg elsewhere."""
    args = ["-fflags", "+genpts", "-format_whitelist", allowed_demuxers()]
    if not src.startswith(("http://", "https://")):
        return [*args, "-protocol_whitelist", "file"]
    return [*args, "-protocol_whitelist", "http,https,tcp,tls", "-reconnect", "1", "-reconnect_on_network_error",
            "1", "-reconnect_on_http_error", "5xx", "-reconnect_delay_max", "60"]


def run(args: list[str], *, timeout: float, what: str, stdin: memoryview | bytes | None = None,
        stdout_into: np.ndarray | None = None) -> bytes:
    """Run a command. `stdin` is written by a thread; stdout is returned as bytes, or read straight into
    `stdout_into` (exactly filling it; fewer bytes is an error). Raises FFmpegError on failure or timeout."""
    ran = execute(args, timeout=timeout, what=what, stdin=stdin, stdout_into=stdout_into)
    if stdout_into is not None and ran.got != stdout_into.nbytes:
        raise FFmpegError(what, short_detail(ran, stdout_into))
    return ran.out


@dataclass(frozen=True)
class Ran:
    out: bytes  # stdout, unless it was read into an array
    got: int  # bytes read into the array (-1: none given)
    stderr: bytes  # its last lines


def execute(args: list[str], *, timeout: float, what: str, stdin: memoryview | bytes | None = None,
            stdout_into: np.ndarray | None = None) -> Ran:
    """`run`, except that stdout read into `stdout_into` may fall short: the caller judges (`Ran.got`). Raises
    FFmpegError on a non-zero exit or a timeout.

    A call that reads over HTTP (`input_args`: it reconnects, backing off for up to a minute a stall) gets
    `RECONNECT_BUDGET` more: a store that throttles or drops connections for a while slows the call down instead
    of timing it out and failing the chunk."""
    if "-reconnect" in args:
        timeout += RECONNECT_BUDGET
    proc = subprocess.Popen(args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err_tail: deque[bytes] = deque(maxlen=64)
    threads = [threading.Thread(target=lambda: err_tail.extend(iter(proc.stderr.readline, b"")), daemon=True)]
    if stdin is not None:
        threads.append(threading.Thread(target=_feed, args=(proc, stdin), daemon=True))
    for t in threads:
        t.start()
    timed_out = threading.Event()
    timer = threading.Timer(timeout, lambda: (timed_out.set(), proc.kill()))
    timer.start()
    try:
        if stdout_into is not None:
            got = _read_into(proc.stdout, memoryview(stdout_into.reshape(-1)).cast("B"))
            proc.stdout.read()  # drain anything past the expected size
            out = b""
        else:
            out, got = proc.stdout.read(), -1
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # interrupted here (Ctrl-C, a task cancelled): FFmpeg must not outlive its reader
            proc.kill()
            proc.wait()
        for t in threads:
            t.join(timeout=10)
    stderr = b"".join(err_tail)
    if proc.returncode != 0:
        if timed_out.is_set():
            raise FFmpegError(what, f"timed out after {timeout:.0f} s")
        raise FFmpegError(what, _last_lines(stderr))
    return Ran(out, got, stderr)


def short_detail(ran: Ran, into: np.ndarray) -> str:
    why = _last_lines(ran.stderr) if ran.stderr else "stream ended early"
    if into.ndim == 4 and len(into):  # frames: a count says more than bytes
        return f"produced {ran.got // into[0].nbytes} of {len(into)} frames ({why})"
    return f"produced {ran.got} of {into.nbytes} expected bytes ({why})"


def _feed(proc: subprocess.Popen, data: memoryview | bytes) -> None:
    try:
        proc.stdin.write(data)
    except (BrokenPipeError, ValueError):
        pass  # FFmpeg exited early; its stderr says why
    finally:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass


def _read_into(stream, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


# -- ffprobe ------------------------------------------------------------------------------------------------

def probe_json(src: str, timeout: float = 120.0) -> dict:
    args = [FFPROBE, "-v", "error", *input_args(src), "-print_format", "json", "-show_format", "-show_streams",
            "-show_chapters", src]
    out = run(args, timeout=timeout, what="ffprobe could not read the file")
    return json.loads(out)


def packet_times(src: str, stream_index: int, timeout: float) -> tuple[list[float | None], list[bool]]:
    """Presentation time and keyframe flag of every packet of one stream that the demuxer does not discard
    (packets flagged D, e.g. before an MP4 edit list's start, never become output frames)."""
    args = [FFPROBE, "-v", "error", *input_args(src), "-select_streams", str(stream_index), "-show_entries",
            "packet=pts_time,dts_time,flags", "-of", "csv=p=0", src]
    out = run(args, timeout=timeout, what="ffprobe could not read the packets")
    times: list[float | None] = []
    keys: list[bool] = []
    for line in out.decode().splitlines():
        fields = line.split(",")
        if len(fields) < 3 or "D" in fields[2]:
            continue
        pts = fields[0] if fields[0] not in ("", "N/A") else fields[1]
        times.append(float(pts) if pts not in ("", "N/A") else None)
        keys.append("K" in fields[2])
    return times, keys


def frame_fields(src: str, stream_index: int, packets: int = 12) -> list[tuple[bool, bool]]:
    """(interlaced, top field first) of the frames the first `packets` packets of one stream decode to."""
    args = [FFPROBE, "-v", "error", *input_args(src), "-select_streams", str(stream_index), "-read_intervals",
            f"%+#{packets}", "-show_entries", "frame=interlaced_frame,top_field_first", "-of", "json", src]
    frames = json.loads(run(args, timeout=60.0, what="ffprobe could not decode the first frames")).get("frames") or []
    return [(int(f.get("interlaced_frame") or 0) == 1, int(f.get("top_field_first") or 0) == 1) for f in frames]


# -- decode -------------------------------------------------------------------------------------------------

# Frames a decoder may hold back to reorder them (H.264 and HEVC allow up to 16): a packet read later can
# still be presented earlier than the last ones read, by at most this many frames.
REORDER = 16
# MPEG program streams (DVD .vob, .mpg): FFmpeg seeks in them by scanning for timestamps, not by an index, and
# can land up to a GOP late (a DVD GOP is at most 18 frames); decoding two seconds more costs little.
PROGRAM_STREAMS = {"mpeg", "vob"}
PS_SEEK_BACK = 2.0


@dataclass(frozen=True)
class Window:
    """How to decode one chunk, in seconds on the decode's timeline (0 at `seek`, or at the file's start; with
    `copyts`, the stream's own timestamps)."""

    seek: float | None  # -ss: at the last keyframe at or before the chunk's first frame; None: from the start
    start: float | None  # frames before this are dropped (decoded only as references); None: see chunk_window
    end: float | None  # halfway past the chunk's last frame; None: the chunk ends with the stream
    copyts: bool = False  # cut by the stream's own timestamps (-copyts)
    skip: int | None = None  # AVI: cut by counting frames instead, dropping this many from the keyframe's on
    times: tuple[float, ...] = ()  # where the packets put the chunk's frames, on the decode's timeline


# FFmpeg's -ss in a container that seeks by decode time, where any stream has B-frames (a reorder delay), seeks
# this much earlier than asked (fftools: a "rough guess", 3/23 s).
SEEK_EARLY = 3 / 23


def _avi_window(src: str, times: list[float], keys: list[tuple[float, float]], first: float, base: float,
                at: float) -> Window:
    """AVI stores no presentation times, only each frame's number (its decode time is number / rate). With
    B-frames the demuxer's guesses at presentation times (genpts) rank the frames right, but the decoder's
    output times do not follow them wherever the codec reorders more than the guess assumes (H.264 in AVI
    came out a frame early when cut by time). So cut by counting frames instead: land exactly on the keyframe,
    and drop the frames shown from it up to the chunk's first. That holds where a keyframe is shown before every
    frame after it in the file (closed GOPs, as x264 writes them), and where the frames after it shown before
    it are B-frames needing the GOP before (MPEG-4 ASP's open GOPs): after the seek the decoder drops those,
    and the guesses rank them before the keyframe, so they are not counted.

    Exactly: AVI's seek rounds the time asked for to the nearest frame and takes the last keyframe at or
    before it; FFmpeg first subtracts SEEK_EARLY where some stream has B-frames, so that is added back, and
    1 ms more keeps the time on the keyframe's side of the rounding."""
    if not keys:
        raise FFmpegError("decoding failed", f"the frame at {first - base:.3f} s comes before the stream's first "
                                             "keyframe: it cannot be decoded")
    key_time, key_at = max(keys)
    skip = sum(1 for t in times if key_time - 1e-6 <= t < first - 1e-6)
    seek = key_at - base + (SEEK_EARLY if _seeks_early(src) else 0.0) + 1e-3 if at > 0 else None
    return Window(seek=seek, start=None, end=None, skip=skip)


def _seeks_early(src: str) -> bool:
    """Whether any stream of the file has B-frames (a reorder delay): FFmpeg then seeks SEEK_EARLY early."""
    args = [FFPROBE, "-v", "error", *input_args(src), "-show_entries", "stream=has_b_frames", "-of", "csv=p=0",
            src]
    out = run(args, timeout=30.0, what="ffprobe could not read the file").decode().split()
    return any(v.strip().isdigit() and int(v) > 0 for v in out)


def chunk_window(src: str, stream_index: int, seek: float, n_frames: int) -> Window | None:
    """Where the chunk of `n_frames` frames from the first frame at or after `seek` (seconds from the file's
    start) lies, from the packets around it. None when the stream has no timestamps (raw elementary streams
    such as .h264 or .m2v, which FFmpeg cannot seek in). Packets that carry a decode time only (AVI, MPEG-PS)
    get presentation times from the demuxer (`input_args`: -fflags +genpts); where some still have none, the
    window is `seek` itself with no cuts, and FFmpeg's accurate seek and a frame count do the cutting.

    FFmpeg's -ss alone is not enough: in MPEG-TS/PS it lands on whatever packet is nearest, not on a keyframe,
    and the decoder then skips to the next keyframe; and a packet the decoder rejects (damage) yields no
    frame. Either way `-frames:v N` would quietly fill the chunk with the frames after it. Seeking to a
    keyframe found here and cutting at the chunk's end by timestamp makes such a chunk come out short instead,
    which fails loudly. MPEG-PS seeks by scanning for timestamps and can land a GOP past the keyframe asked
    for: there the seek goes `PS_SEEK_BACK` seconds earlier, and the cut by timestamp drops the extra frames."""
    back = 2.0  # look for the keyframe from this many seconds before `seek`
    count = int(back * 60) + n_frames + 1 + REORDER  # packets to read: those seconds at up to 60 fps, the chunk
    while True:
        origin = max(0.0, seek - back)
        # "+T" is relative to the file's start, as -ss is; "%+#N" reads N packets of the stream from there.
        interval = (f"+{origin:.6f}" if origin > 0 else "") + f"%+#{count}"
        args = [FFPROBE, "-v", "error", *input_args(src), "-select_streams", str(stream_index),
                "-read_intervals", interval, "-show_entries",
                "packet=pts_time,dts_time,flags:format=start_time,format_name",
                "-of", "json", src]
        try:
            meta = json.loads(run(args, timeout=work_timeout(count, 1, 1000.0),  # 1 ms a packet
                                  what="ffprobe could not read the packets"))
        except FFmpegError as err:
            if origin > 0 and "could not seek" in err.detail.lower():
                return None  # a stream without timestamps (or a demuxer that cannot seek)
            raise
        packets = meta.get("packets") or []
        base = float((meta.get("format") or {}).get("start_time") or 0.0)
        frames = []  # (presentation time, time to seek to, keyframe) of each packet that becomes a frame
        for p in packets:
            if "D" in p.get("flags", ""):
                continue  # discarded by the demuxer (before an edit list's start)
            pts, dts = (float(p[k]) if p.get(k) not in (None, "N/A") else None for k in ("pts_time", "dts_time"))
            frames.append((pts, dts if dts is not None else pts, "K" in p.get("flags", "")))
        if not frames or all(t is None and at is None for t, at, _ in frames):
            return None
        if any(t is None for t, _, _ in frames):
            return Window(seek=seek or None, start=None, end=None)
        times = sorted(t for t, _, _ in frames)
        eof = len(packets) < count
        # FFmpeg compares timestamps in microseconds: a frame within one of `seek` is at it
        after = [t for t in times if t >= base + seek - 1e-6] if seek > 0 else times
        if not after:
            if eof:
                raise FFmpegError("decoding failed", f"the stream has no frame at or after {seek:.3f} s")
            count *= 4
            continue
        first = after[0]
        keys = [(t, at) for t, at, key in frames if key and t <= first + 1e-6]
        if seek > 0 and not keys and origin > 0:
            back, count = back * 4, count * 4  # the keyframe is further back
            continue
        if len(after) < n_frames + 1 + REORDER and not eof:
            count *= 4
            continue
        # Seek to the keyframe's decode time (MPEG-TS seeks by decode time: its presentation time can lie past
        # the packets that follow it), 1 us past the printed value so that rounding never lands a GOP early.
        at = max(keys)[1] - base + 1e-6 if seek > 0 and keys else 0.0
        if at < 1e-3:
            at = 0.0  # the first keyframe: decode from the start (a seek to it in an AVI with B-frames misorders)
        # cut halfway to the frame before (frames of an earlier GOP may come out of a seek that lands early)
        before = [t for t in times if t < first]
        start = (before[-1] + first) / 2 if before else first - 1e-3
        end = (after[n_frames - 1] + after[n_frames]) / 2 if len(after) > n_frames else None
        if (meta.get("format") or {}).get("format_name") == "avi":
            return _avi_window(src, times, keys, first, base, at)
        if (meta.get("format") or {}).get("format_name") in PROGRAM_STREAMS:
            # Seek early and cut by the stream's own timestamps: where a program-stream seek lands, and so where
            # FFmpeg's timeline starts, is not exact.
            at = max(0.0, at - PS_SEEK_BACK) if at > 0 else 0.0
            return Window(seek=at or None, start=start, end=end, copyts=True, times=tuple(after[:n_frames]))
        zero = max(at, 0.0)  # the decode's timeline starts at the seek point
        return Window(seek=zero or None, start=start - base - zero,
                      end=None if end is None else end - base - zero,
                      times=tuple(t - base - zero for t in after[:n_frames]))


def decode_frames(src: str, *, stream_index: int, seek: float | None, n_frames: int, width: int, height: int,
                  high_depth: bool, matrix: str, full_range: bool | None, deinterlace: str | None = None,
                  per_field: bool = False) -> np.ndarray:
    """Decode exactly `n_frames` frames as RGB, starting at the first frame at or after `seek` seconds
    (relative to the file's start): FFmpeg seeks to the keyframe before it (`chunk_window`), decodes from there
    and keeps the frames from the first at or after `seek` to the chunk's last, by timestamp (in AVI, by count).
    A frame that cannot be decoded makes the call fail ("produced k of n frames"); no frame of a neighbour takes
    its place (`decode_frames_concealing` puts one there, knowingly).

    The frames keep their stored orientation (-noautorotate: rotation is metadata we copy at the stitch) and
    their timing is ignored (-fps_mode passthrough: no frame is duplicated or dropped to fit a rate).

    `deinterlace` ("tff" or "bff", the field order): each woven frame becomes a progressive one (`bwdif`, one
    frame out per frame in), from its own fields and its neighbours'. The first and last frames decoded have
    one neighbour only: a caller that wants frames as a whole-video deinterlace gives them decodes one frame
    more on each side and drops it (`stages.decode_chunk`). `per_field`: a progressive frame of each field instead
    (bwdif's send_field, first field first), two frames per frame decoded."""
    cmd = _decode_command(src, stream_index, seek, n_frames, high_depth, matrix, full_range, deinterlace, per_field)
    frames = np.empty((cmd.frames_out, height, width, 3), dtype=cmd.dtype)
    run([*cmd.args, *cmd.output_args, "-f", "rawvideo", "pipe:1"], stdout_into=frames,
        timeout=cmd.timeout(width * height), what=f"decoding {n_frames} frames failed")
    return frames


@dataclass(frozen=True)
class _Decode:
    args: list[str]  # FFmpeg up to the output's options
    output_args: list[str]  # the output's options but its format and name
    cut: str  # the filters that drop the frames outside the chunk, and deinterlace ("" or ending with ",")
    window: Window | None
    n_frames: int
    frames_before: int  # frames decoded before the chunk's first (for the timeout)
    dtype: type
    frames_out: int  # the frames it writes: n_frames, or twice that made one per field

    def timeout(self, pixels: int) -> float:
        return work_timeout(self.frames_out + self.frames_before, pixels)


def _decode_command(src: str, stream_index: int, seek: float | None, n_frames: int, high_depth: bool, matrix: str,
                    full_range: bool | None, deinterlace: str | None = None, per_field: bool = False) -> _Decode:
    pix_fmt, dtype = ("rgb48le", np.uint16) if high_depth else ("rgb24", np.uint8)
    rng = "auto" if full_range is None else ("full" if full_range else "limited")
    seek = seek if seek is not None and seek > 0 else 0.0
    window = chunk_window(src, stream_index, seek, n_frames)
    frames_before = 0
    args = [*BASE, "-noautorotate"]
    cut = ""
    if window is None:  # no timestamps, no seeking: decode from the start and drop the frames before `seek`
        args += [*input_args(src), "-i", src] + (["-ss", f"{seek:.6f}"] if seek else [])
        frames_before = int(seek * 240)  # a bound for the timeout: 240 fps at most
    elif window.skip is not None:  # AVI: land on the keyframe, then count frames
        if window.seek is not None:
            args += ["-noaccurate_seek", "-ss", f"{window.seek:.6f}"]
        args += [*input_args(src), "-i", src]
        cut = f"trim=start_frame={window.skip},"
        frames_before = window.skip
    elif window.start is None:  # presentation times unknown: FFmpeg seeks and cuts at `seek` by its guesses
        args += (["-ss", f"{seek:.6f}"] if seek else []) + [*input_args(src), "-i", src]
    else:
        if window.seek is not None:
            # -noaccurate_seek: FFmpeg's own cut at the seek point would drop the keyframe's frame when the
            # printed time rounds up past it; the trim below does the cutting.
            args += ["-noaccurate_seek", "-ss", f"{window.seek:.6f}"]
        args += [*input_args(src), "-i", src] + (["-copyts"] if window.copyts else [])
        # settb=AVTB first: trim rounds its times to the stream's time base, and where that is one frame's
        # duration (1/25, as some containers have it) a cut halfway between two frames rounds onto one of them;
        # in microseconds it falls between them.
        cut = (f"settb=AVTB,trim=start={window.start:.6f}" + (f":end={window.end:.6f}" if window.end is not None
                                                               else "") + ",")
        # for the timeout, the frames decoded from the keyframe up to the chunk (a long GOP: seconds of them),
        # at 240 fps at most
        lead = seek - (window.seek or 0.0) if window.copyts else window.start
        frames_before = int(max(0.0, lead) * 240)
    if deinterlace:
        # Bob Weaver (FFmpeg's best deinterlacer), every frame (the probe says the stream is interlaced; frames are
        # not always flagged), in the field order the probe found.
        cut += f"bwdif=mode={'send_field' if per_field else 'send_frame'}:parity={deinterlace}:deint=all,"
    frames_out = n_frames * (2 if deinterlace and per_field else 1)
    output = ["-map", f"0:{stream_index}", "-frames:v", str(frames_out), "-fps_mode", "passthrough",
              "-vf", f"{cut}scale=in_color_matrix={matrix}:in_range={rng}:flags=accurate_rnd+full_chroma_int",
              "-pix_fmt", pix_fmt]
    return _Decode(args, output, cut, window, n_frames, frames_before, dtype, frames_out)


# What FFmpeg logs when reading stopped for a reason other than the file's content (a connection, a disk, an
# expired URL): a chunk cut short by these is retried, never concealed.
IO_TROUBLE = re.compile(r"input/output error|i/o error|http error|server returned|connection (?:reset|refused|timed "
                        r"out)|error during demuxing", re.IGNORECASE)


def decode_frames_concealing(src: str, *, stream_index: int, seek: float | None, n_frames: int, width: int,
                             height: int, high_depth: bool, matrix: str, full_range: bool | None,
                             deinterlace: str | None = None) -> tuple[np.ndarray, list[int]]:
    """`decode_frames`, except that frames the decoder cannot produce (packets it rejects, a GOP whose keyframe
    is gone) are concealed: each repeats the decoded frame before it (the first decoded one, for those before
    that), or is black where no frame of the chunk decodes. Returns the frames and the indices of the
    concealed ones.

    Each decoded frame is put where its timestamp says, among the times the packets give the chunk's frames
    (`Window.times`), so no frame moves. Where the stream gives no such times (no timestamps, AVI's frame
    counting) a short chunk fails as in `decode_frames`, with the reason it could not be concealed; so does one
    whose reading stopped for another reason than its content (`IO_TROUBLE`: it is retried)."""
    cmd = _decode_command(src, stream_index, seek, n_frames, high_depth, matrix, full_range, deinterlace)
    # FFmpeg fails a run in which more than 2/3 of the frames had decoding errors; here the count decides
    args = [*cmd.args[:1], "-max_error_rate", "1", *cmd.args[1:]]
    what = f"decoding {n_frames} frames failed"
    frames = np.empty((n_frames, height, width, 3), dtype=cmd.dtype)
    ran = execute([*args, *cmd.output_args, "-f", "rawvideo", "pipe:1"], stdout_into=frames,
                  timeout=cmd.timeout(width * height), what=what)
    if ran.got == frames.nbytes:
        return frames, []
    times = cmd.window.times if cmd.window is not None else ()
    if IO_TROUBLE.search(ran.stderr.decode(errors="replace")):
        raise FFmpegError(what, short_detail(ran, frames))
    if not times:
        raise FFmpegError(what, f"{short_detail(ran, frames)}; it cannot be concealed: the stream gives no frame "
                                "times to place the decoded frames by")
    with tempfile.TemporaryDirectory(prefix="reelmend-conceal-") as tmp:
        crc = os.path.join(tmp, "frames.crc")
        # again, with a second output of the same decode: every kept frame's timestamp, in microseconds
        ran = execute([*args, *cmd.output_args, "-f", "rawvideo", "pipe:1",
                       "-map", f"0:{stream_index}", "-frames:v", str(n_frames), "-fps_mode", "passthrough",
                       "-vf", cmd.cut.rstrip(",") or "null", "-enc_time_base", "1:1000000", "-f", "framecrc", crc],
                      stdout_into=frames, timeout=cmd.timeout(width * height), what=what)
        stamps = _framecrc_times(Path(crc).read_text())
    if IO_TROUBLE.search(ran.stderr.decode(errors="replace")):
        raise FFmpegError(what, short_detail(ran, frames))
    decoded = min(ran.got // frames[0].nbytes, len(stamps))
    return frames, conceal(frames, decoded, stamps[:decoded], list(times))


def _framecrc_times(text: str) -> list[float]:
    """Presentation times (seconds) of the frames a framecrc output lists ("stream, dts, pts, duration, ...")."""
    tb = Fraction(1, 1_000_000)
    out = []
    for line in text.splitlines():
        if line.startswith("#tb 0:"):
            tb = Fraction(line.split(":", 1)[1].strip().replace(" ", ""))
        elif line and not line.startswith("#"):
            fields = [f.strip() for f in line.split(",")]
            out.append(float(int(fields[2]) * tb))
    return out


def conceal(frames: np.ndarray, decoded: int, stamps: list[float], times: list[float]) -> list[int]:
    """In place: `frames` holds the chunk's n places, its first `decoded` the frames the decoder produced (at
    presentation times `stamps`, increasing). Put each at its place among the chunk's frame times `times`
    (sorted; extended at the last spacing when the packets ended early), then fill every empty place from the
    decoded frame before it (the first decoded one, before that), or black where none decoded. Returns the
    filled places. In place: a chunk's frames are its decode task's memory; a second copy would double it."""
    n = len(frames)
    if len(times) < n:
        step = times[-1] - times[-2] if len(times) > 1 else 1 / 25
        times = times + [times[-1] + step * (k + 1) for k in range(n - len(times))]
    times = times[:n]
    place = [-1] * n  # the decoded frame (its index after compaction) each place shows
    kept = 0
    for i, t in enumerate(stamps[:decoded]):
        k = bisect.bisect_left(times, t)
        j = min((c for c in (k - 1, k) if 0 <= c < n), key=lambda c: abs(times[c] - t))
        spacing = min([abs(times[j] - times[c]) for c in (j - 1, j + 1) if 0 <= c < n] or [1.0])
        if abs(times[j] - t) < spacing / 2 and place[j] < 0 and (kept == 0 or j > max_j):
            frames[kept] = frames[i]  # compact: kept <= i, so nothing unread is overwritten
            place[j], kept, max_j = kept, kept + 1, j
    missing = [j for j in range(n) if place[j] < 0]
    last = 0  # places before the first decoded frame take it
    for j in range(n):  # the others the decoded frame before them
        if place[j] < 0:
            place[j] = last if kept else -1
        last = place[j]
    # Each place shows a compacted frame at or before it (the c-th kept frame sits at a place >= c): filling from
    # the end never overwrites a frame still to be read.
    for j in reversed(range(n)):
        if place[j] < 0:
            frames[j] = 0
        elif place[j] != j:
            frames[j] = frames[place[j]]
    return missing


# -- encode -------------------------------------------------------------------------------------------------

ENCODERS = {"h264": "libx264", "h265": "libx265", "av1": "libsvtav1"}


def encode_args(*, codec: str, crf: int, preset: str, lossless: bool, depth: int, chroma: str,
                odd_size: bool) -> list[str]:
    """Codec options for one segment. Lossless is FFV1 in planar RGB: bit-exact to the chain's output.
    Lossy keeps the source's chroma subsampling and bit depth where the encoder has them (4:4:4 for odd
    sizes, which 4:2:0 cannot represent)."""
    if lossless:
        pix = "gbrp" if depth == 8 else f"gbrp{depth}le"
        return ["-c:v", "ffv1", "-level", "3", "-slicecrc", "1", "-pix_fmt", pix]
    if odd_size:
        chroma = "444"
    if codec == "av1" and (chroma != "420" or depth > 10):
        chroma, depth = "420", min(depth, 10)  # SVT-AV1 encodes 4:2:0 at 8/10 bit only
        if odd_size:
            raise FFmpegError("encoding failed", "AV1 (SVT-AV1) cannot encode odd frame sizes; use --codec h264")
    depth = 8 if depth <= 8 else 10 if depth <= 10 else 12
    if codec == "h264" and depth == 12:
        depth = 10
    pix = f"yuv{chroma}p" + ("" if depth == 8 else f"{depth}le")
    args = ["-c:v", ENCODERS[codec], "-crf", str(crf), "-pix_fmt", pix]
    if codec == "av1":
        return args + ["-preset", "8" if preset == "medium" else preset]
    return args + ["-preset", preset] + (["-x265-params", "log-level=error"] if codec == "h265" else [])


def encode_segment(frames: np.ndarray, out_path: str, *, fps: Fraction, codec_args: list[str], matrix: str,
                   full_range: bool | None, colour_tags: dict[str, str], times: list[float] | None = None) -> None:
    """Pipe RGB frames into FFmpeg and write a video-only Matroska segment: at `fps`, or with each frame at its
    `times` (seconds from the first; a variable-rate source's)."""
    n, h, w, _ = frames.shape
    pix_in = "rgb48le" if frames.dtype == np.uint16 else "rgb24"
    rng = "auto" if full_range is None else ("full" if full_range else "limited")
    scale = f"scale=out_color_matrix={matrix}:out_range={rng}:flags=accurate_rnd+full_chroma_int"
    timing: list[str] = []
    if times is not None:
        if len(times) != n:
            raise ValueError(f"{len(times)} frame times for {n} frames")
        # a fine time base all the way to the muxer: the input's (1/fps) would round every time to a frame
        scale = f"settb=1/90000,setpts='({pts_expression(times)})/TB',{scale}"
        timing = ["-fps_mode", "passthrough", "-enc_time_base", "1/90000"]
    args = [*BASE, "-f", "rawvideo", "-pix_fmt", pix_in, "-s", f"{w}x{h}",
            "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0", "-vf", scale, *timing,
            *codec_args]
    for option, value in colour_tags.items():
        args += [f"-{option}", value]
    args += ["-f", "matroska", out_path]
    data = memoryview(np.ascontiguousarray(frames).reshape(-1)).cast("B")
    run(args, stdin=data, timeout=work_timeout(n, w * h, seconds_per_mpx=4.0),
        what=f"encoding {n} frames failed")


# -- stitch -------------------------------------------------------------------------------------------------

def pts_expression(times: list[float], max_runs: int = 2000) -> str:
    """An FFmpeg expression of the frame number N giving each frame's time (seconds): piecewise linear over the
    runs of equal spacing (one piece at a constant rate, a few where the rate changes, up to one per two frames
    where it jitters), chosen by a balanced tree of if()s (FFmpeg's parser nests about 100 levels deep at most).
    Beyond `max_runs` pieces the spacing is evened out between the first and last time."""
    runs: list[tuple[int, float, float]] = []  # (first frame, its time, spacing)
    for i, t in enumerate(times):
        if runs:
            first, t0, step = runs[-1]
            if i == first + 1:
                runs[-1] = (first, t0, t - t0)
                continue
            if abs(t0 + (i - first) * step - t) < 5e-5:
                continue
        runs.append((i, t, 0.0))
    if len(runs) > max_runs:
        runs = [(0, times[0], (times[-1] - times[0]) / max(1, len(times) - 1))]

    def tree(lo: int, hi: int) -> str:  # the pieces runs[lo:hi]
        if hi - lo == 1:
            first, t0, step = runs[lo]
            return f"{t0:.6f}+(N-{first})*{step:.9f}"
        mid = (lo + hi) // 2
        return f"if(lt(N,{runs[mid][0]}),{tree(lo, mid)},{tree(mid, hi)})"

    return tree(0, len(runs))


def concat_list(paths: list[str], durations: list[float] | None = None) -> str:
    """An FFmpeg concat-demuxer script; single quotes escaped as the demuxer's quoting rules require. With
    `durations`, each file starts exactly where the one before it ends by that much (variable-rate segments,
    whose last frame's duration the files cannot say)."""
    lines = []
    for i, p in enumerate(paths):
        lines.append("file '" + p.replace("'", "'\\''") + "'\n")
        if durations is not None:
            lines.append(f"duration {durations[i]:.6f}\n")
    return "ffconcat version 1.0\n" + "".join(lines)


# What each output container holds of a source's other streams, stream-copied (FFmpeg 5.1's muxers).
MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac", "opus", "mp2"}
MP4_VIDEO = {"h264", "hevc", "av1", "vp9", "mpeg4", "mpeg2video", "mpeg1video", "mjpeg", "png"}
MOV_VIDEO = (MP4_VIDEO - {"vp9", "av1"}) | {"prores", "dnxhd", "ffv1", "rawvideo", "qtrle", "dvvideo"}


def carries(out_format: str, kind: str, codec: str | None) -> bool:
    """Whether `stitch` into `out_format` (matroska, mp4, mov) carries a source stream of this kind and codec.

    Only the default video stream is restored; a second one is copied as it was. A stream in a codec FFmpeg
    does not know cannot be copied. Cover art stays cover art only in MP4: FFmpeg 5.1's MOV muxer drops it and
    its Matroska muxer would make it a one-frame video track. A timecode track is not mapped: the video stream's
    `timecode` tag, copied with its metadata, makes the MP4/MOV muxer write a new one (Matroska keeps the tag);
    other data tracks are not carried."""
    mkv = out_format == "matroska"
    if kind == "attachment":
        return mkv
    if not codec or kind not in ("audio", "subtitle", "video", "cover"):
        return False
    if kind == "audio":
        return mkv or codec in MP4_AUDIO or out_format == "mov" and codec.startswith("pcm")
    if kind == "subtitle":
        return mkv or codec == "mov_text"  # (mov_text becomes SubRip in Matroska)
    if kind == "video":
        return mkv or codec in (MOV_VIDEO if out_format == "mov" else MP4_VIDEO)
    return out_format == "mp4" and codec in ("mjpeg", "png")


def stitch(list_file: str, source: str, out_path: str, *, source_video_index: int, out_format: str,
           rotation: int, streams: list[tuple[int, str, str]], frames: int, pixels: int,
           field_order: str | None = None) -> None:
    """Concatenate the segments (stream copy) and take the source's other streams that the output container
    carries (`streams`: index, kind, codec of each; see `carries`), its chapters and its metadata (global and per
    stream), without re-encoding. The one exception: MP4's mov_text subtitles have no Matroska mapping, so they
    become SubRip text when the output is .mkv."""
    args = [*BASE, "-f", "concat", "-safe", "0", "-protocol_whitelist", "file,http,https,tcp,tls,crypto",
            "-i", list_file, *input_args(source), "-i", source, "-map", "0:v:0"]
    kept = [(i, kind, codec) for i, kind, codec in streams if carries(out_format, kind, codec)]
    for index, _, _ in kept:
        args += ["-map", f"1:{index}"]
    # Naming any stream's metadata source turns FFmpeg's automatic per-stream copy off: name them all.
    args += ["-map_metadata", "1", "-map_chapters", "1", "-map_metadata:s:0", f"1:s:{source_video_index}"]
    for out_index, (index, _, _) in enumerate(kept, start=1):
        args += [f"-map_metadata:s:{out_index}", f"1:s:{index}"]
    # The restored stream is the default one: the concat input has no disposition to copy, and a carried second
    # video marked default (mkvmerge and MP4Box mark every track so) would otherwise be the one players open.
    args += ["-c", "copy", "-disposition:v:0", "default"]
    if out_format == "matroska":
        for out_index, (_, kind, codec) in enumerate(kept, start=1):
            if kind == "subtitle" and codec == "mov_text":
                args += [f"-c:{out_index}", "srt"]
    if rotation:
        # FFmpeg 5.1 turns a `rotate` tag on a stream-copied output into a display matrix whose rotation, as
        # ffprobe reports it, is the tag's value (checked: 270 -> -90, 180 -> -180).
        args += ["-metadata:s:v:0", f"rotate={rotation % 360}"]
        if out_format == "matroska":
            # FFmpeg 5.1's Matroska muxer has no display matrix (it drops the above): keep the rotation as a
            # stream tag, which `probe` reads back, rather than lose it.
            args += ["-metadata:s:v:0", f"ROTATE={rotation % 360}"]
    if field_order:
        # Interlaced frames are restored woven, as stored; the container says so, or players would not deinterlace.
        # ("progressive": frames that were deinterlaced; the container must not still call them interlaced.)
        args += ["-field_order:v:0", field_order]
    if out_format in ("mp4", "mov"):
        args += ["-movflags", "+faststart"]
    args += ["-f", out_format, out_path]
    run(args, timeout=work_timeout(frames, pixels, seconds_per_mpx=0.05), what="stitching failed")


# -- training degradations ----------------------------------------------------------------------------------

# Codec name -> encoder options. Both encode 4:2:0, as delivered H.264 and DVD/broadcast MPEG-2 are. No x264
# `-tune`: its defaults (psychovisual RD on) are what real uploads and mezzanines were encoded with.
# `-threads 1`: x264's output depends on its thread count (frame threads change the lookahead and rate
# control), so one thread makes a training pair the same on every machine; the clips are tiny anyway.
_ROUNDTRIP_ENCODERS = {
    "h264": lambda q: ["-c:v", "libx264", "-preset", "veryfast", "-crf", str(q)],
    "mpeg2": lambda q: ["-c:v", "mpeg2video", "-q:v", str(q)],
}
# The encoders clamp out-of-range values silently; a recipe asking for one is a bug worth hearing about.
_ROUNDTRIP_QUALITY = {"h264": (0, 51), "mpeg2": (1, 31)}


def codec_roundtrip(frames: np.ndarray, codec: str, quality: int, timeout: float | None = None) -> np.ndarray:
    """Encode a (T, H, W, 3) uint8 RGB clip with a real codec and decode it back: the compression artifacts
    a training pair needs (blocking, ringing, mosquito noise, motion-compensated smearing across frames).

    `codec` is "h264" (libx264, `quality` is the CRF, 0..51) or "mpeg2" (mpeg2video, `quality` is the fixed
    quantiser -q:v, 1..31). The stream goes through pipes in NUT (no file is written). 4:2:0 needs even
    sizes, so an odd edge is padded by replicating its last row/column and cropped off again."""
    if codec not in _ROUNDTRIP_ENCODERS:
        raise ValueError(f"codec_roundtrip: unknown codec {codec!r}; expected one of "
                         f"{sorted(_ROUNDTRIP_ENCODERS)}")
    low, high = _ROUNDTRIP_QUALITY[codec]
    if not low <= quality <= high:
        raise ValueError(f"codec_roundtrip: {codec} quality {quality} is outside {low}..{high}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"codec_roundtrip: expected a (T, H, W, 3) uint8 clip, got {frames.shape} {frames.dtype}")
    n, h, w, _ = frames.shape
    padded = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    ph, pw = padded.shape[1:3]
    if timeout is None:
        timeout = work_timeout(n, ph * pw, seconds_per_mpx=4.0)
    swscale = "scale=flags=accurate_rnd+full_chroma_int"
    encode = [*BASE, "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{pw}x{ph}", "-framerate", "25",
              "-i", "pipe:0", "-vf", swscale, "-pix_fmt", "yuv420p", *_ROUNDTRIP_ENCODERS[codec](quality),
              "-threads", "1", "-f", "nut", "pipe:1"]
    stream = run(encode, stdin=memoryview(np.ascontiguousarray(padded).reshape(-1)).cast("B"), timeout=timeout,
                 what=f"{codec} encode of a {w}x{h} training clip at quality {quality} failed")
    decoded = np.empty_like(padded)
    decode = [*BASE, "-f", "nut", "-i", "pipe:0", "-fps_mode", "passthrough", "-vf", swscale,
              "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]
    run(decode, stdin=stream, stdout_into=decoded, timeout=timeout,
        what=f"decoding the {codec} training clip failed")
    return np.ascontiguousarray(decoded[:, :h, :w])


# -- classical filters (the baselines `reelmend bench quality` compares against) ------------------------------

def filter_frames(frames: np.ndarray, graph: str, *, fps: Fraction, out_frames: int, out_width: int,
                  out_height: int) -> np.ndarray:
    """Run a (T, H, W, 3) uint8 RGB clip through an FFmpeg filter graph (hqdn3d, nlmeans, deblock, lanczos
    scaling, minterpolate, tmedian, ...) and return its first `out_frames` RGB frames of the given size.

    Frames go in and out through pipes, so a baseline sees exactly the pixels the model saw. Filters that
    work in YUV get full-range 4:4:4 with accurate rounding, so the conversion itself costs no measurable
    PSNR; an empty graph returns the clip unchanged through the same conversions."""
    n, h, w, _ = frames.shape
    to_yuv = "scale=out_range=full:out_color_matrix=bt709:flags=accurate_rnd+full_chroma_int,format=yuv444p"
    to_rgb = "scale=in_range=full:in_color_matrix=bt709:flags=accurate_rnd+full_chroma_int,format=rgb24"
    chain = ",".join(part for part in (to_yuv, graph, to_rgb) if part)
    args = [*BASE, "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
            "-framerate", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0", "-vf", chain,
            "-frames:v", str(out_frames), "-fps_mode", "passthrough", "-pix_fmt", "rgb24", "-f", "rawvideo",
            "pipe:1"]
    out = np.empty((out_frames, out_height, out_width, 3), dtype=np.uint8)
    run(args, stdin=memoryview(np.ascontiguousarray(frames).reshape(-1)).cast("B"), stdout_into=out,
        timeout=work_timeout(max(n, out_frames), max(w * h, out_width * out_height), seconds_per_mpx=30.0),
        what=f"FFmpeg filter {graph or '(none)'} failed")
    return out
