"""Probe a video with ffprobe into a pydantic model: the stream to restore, its exact frame count and
per-frame timestamps (from packets), rate, size, depth, colour, rotation, field order, and every other stream."""

from __future__ import annotations

import os
import re
from fractions import Fraction

from pydantic import BaseModel, ConfigDict, Field

from pipeline import ffmpeg

# Frame sizes beyond these are a damaged or forged header, not a video: one RGB frame of the largest is 0.8 GB.
MAX_SIDE, MAX_PIXELS = 32768, 16384 * 16384

# ffprobe's words for some failures, and what they mean for the file
HINTS = {"moov atom not found": "no MP4 index (moov atom): the file is truncated, was never finalised, or is not an "
                                "MP4"}

# scale filter names for the colour matrices FFmpeg tags (ITU-T H.273 matrix_coefficients)
MATRICES = {"bt709": "bt709", "smpte170m": "bt601", "bt470bg": "bt601", "fcc": "fcc", "smpte240m": "smpte240m",
            "bt2020nc": "bt2020", "bt2020c": "bt2020"}


class ProbeError(RuntimeError):
    """The file is not a restorable video; the message says why in one line."""


class OtherStream(BaseModel):
    model_config = ConfigDict(frozen=True)
    index: int
    kind: str  # audio | subtitle | attachment | data | video (a second video stream) | cover (cover art)
    codec: str | None = None
    language: str | None = None


class VideoInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_name: str
    start_time: float
    duration: float
    stream_index: int
    codec: str
    width: int
    height: int
    pix_fmt: str
    bit_depth: int
    chroma: str  # "420" | "422" | "444" | "rgb" | "gray"
    fps_num: int
    fps_den: int
    vfr: bool
    n_frames: int
    color_range: str | None = None
    color_space: str | None = None
    color_transfer: str | None = None
    color_primaries: str | None = None
    rotation: int = 0  # the display matrix's rotation as ffprobe reports it, in [0, 360)
    field_order: str | None = None  # interlaced: "tt", "bb", "tb" or "bt" (frames stay woven, as stored)
    # Interlaced: which field comes first in time, "tff" or "bff". From the first frames' own flags where the
    # probe read them (`fields=True`: the container's field order can be missing, as in DV in AVI, or contradict
    # the frames, as x264's bottom-first streams in MPEG-TS do), else from the container's field order.
    parity: str | None = None
    streams: tuple[OtherStream, ...] = ()
    chapters: int = 0
    # Presentation time (s) of each frame in display order; used for seeking, not stored in the manifest.
    frame_times: tuple[float, ...] = Field(default=(), exclude=True, repr=False)

    @property
    def is_still(self) -> bool:
        """A photo or poster (one frame read by an image demuxer): training uses it, a restore job does not."""
        return self.n_frames == 1 and (self.format_name == "image2" or self.format_name.endswith("_pipe"))

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)

    @property
    def matrix(self) -> str:
        return MATRICES.get(self.color_space or "", "auto")

    @property
    def full_range(self) -> bool | None:
        return {"pc": True, "tv": False}.get(self.color_range or "")

    def colour_tags(self) -> dict[str, str]:
        """Encoder options that carry the source's colour description (only what the source declared). An RGB
        source's matrix ("gbr", the identity) is not one an encoded output can carry: its YUV encodes are
        converted with their own matrix, and FFV1's planar RGB needs none."""
        tags = {"color_primaries": self.color_primaries, "color_trc": self.color_transfer,
                "colorspace": None if self.color_space == "gbr" else self.color_space,
                "color_range": self.color_range}
        return {k: v for k, v in tags.items() if v and v not in ("unknown", "reserved")}


def _fraction(text: str | None) -> Fraction | None:
    if not text or "/" not in text:
        return None
    num, den = text.split("/")
    return Fraction(int(num), int(den)) if int(num) > 0 and int(den) > 0 else None


def _depth_and_chroma(pix_fmt: str, bits_raw: str | None) -> tuple[int, str]:
    m = re.search(r"(\d+)(le|be)$", pix_fmt)
    depth = int(m.group(1)) if m else 8
    if bits_raw and bits_raw.isdigit() and int(bits_raw) > 8:
        depth = max(depth, int(bits_raw))
    if pix_fmt.startswith(("gbr", "rgb", "bgr", "argb", "abgr", "rgba", "bgra", "0rgb", "rgb0", "bgr0")):
        chroma = "rgb"
    elif pix_fmt.startswith(("gray", "ya")):
        chroma = "gray"
    else:
        m = re.match(r"yuva?j?(4\d\d)", pix_fmt)
        chroma = m.group(1) if m else "420"
    return depth, chroma


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(round(float(side["rotation"]))) % 360
    # MP4's `rotate` tag, or the ROTATE tag reelmend writes in Matroska (which FFmpeg 5.1 gives no display matrix)
    tags = {k.lower(): v for k, v in (stream.get("tags") or {}).items()}
    rotate = tags.get("rotate")
    return int(rotate) % 360 if rotate and rotate.lstrip("-").isdigit() else 0


def _field_order(stream: dict) -> str | None:
    order = stream.get("field_order")
    return order if order in ("tt", "bb", "tb", "bt") else None


# FFmpeg's field orders: the first letter is the field coded first, the second the one shown first ("tb": top
# coded first, bottom shown first).
SHOWN_FIRST = {"tt": "tff", "bt": "tff", "bb": "bff", "tb": "bff"}


def _parity(src: str, stream_index: int, field_order: str | None, fields: bool) -> str | None:
    """"tff" or "bff" for an interlaced video stream, None for a progressive one (or one that says nothing)."""
    if fields:
        flags = ffmpeg.frame_fields(src, stream_index)
        interlaced = [top for woven, top in flags if woven]
        if interlaced and 2 * len(interlaced) > len(flags):
            return "tff" if 2 * sum(interlaced) >= len(interlaced) else "bff"
    return SHOWN_FIRST.get(field_order or "")


def _kind(stream: dict) -> str:
    if stream.get("codec_type") == "video" and (stream.get("disposition") or {}).get("attached_pic"):
        return "cover"  # cover art: a picture FFmpeg lists as a one-frame video stream
    return stream.get("codec_type") or "data"


def _choose_video(streams: list[dict]) -> dict:
    candidates = [s for s in streams if _kind(s) == "video"
                  and s.get("codec_name") and int(s.get("width") or 0) > 0 and int(s.get("height") or 0) > 0]
    if not candidates:
        raise ProbeError(f"no decodable video stream ({_why_no_video(streams)})")
    defaults = [s for s in candidates if (s.get("disposition") or {}).get("default")]
    return (defaults or candidates)[0]


def _why_no_video(streams: list[dict]) -> str:
    videos = [s for s in streams if s.get("codec_type") == "video"]
    for s in videos:
        if (s.get("disposition") or {}).get("attached_pic"):
            continue
        if not s.get("codec_name"):
            tag = s.get("codec_tag_string") or ""
            known = tag if re.fullmatch(r"[A-Za-z0-9 ._-]{4}", tag) else ""
            return f"stream {s.get('index')} has a codec FFmpeg does not know" + (f" ({known})" if known else "")
        return f"stream {s.get('index')} ({s['codec_name']}) declares no frame size"
    if videos:
        return "only a cover image"
    kinds = sorted({s.get("codec_type") or "unknown" for s in streams})
    return f"streams: {', '.join(kinds)}" if kinds else "no streams at all"


def probe(src: str, fields: bool = False) -> VideoInfo:
    """Probe `src` (a path or URL FFmpeg can open). Raises ProbeError with a one-line reason. `fields`: decode
    the first frames to read whether they are interlaced, and which field comes first (`VideoInfo.parity`)."""
    if os.path.isfile(src) and os.path.getsize(src) == 0:
        raise ProbeError("the file is empty (0 bytes)")
    try:
        return _probe(src, fields)
    except ffmpeg.FFmpegError as err:
        if err.detail.startswith("refused: "):  # a playlist or reference file (ffmpeg.allowed_demuxers)
            raise ProbeError(err.detail) from err
        # FFmpeg prefixes its last error with the input's path: the manifest names the file already
        detail = next((hint for words, hint in HINTS.items() if words in err.detail),
                      err.detail.replace(f"{src}: ", ""))
        raise ProbeError(f"not a readable media file ({detail})") from err
    except (KeyError, TypeError, ValueError) as err:  # ffprobe reported something malformed (a damaged header)
        detail = " ".join(str(err).split())
        raise ProbeError(f"ffprobe's report on the file is malformed ({type(err).__name__}: {detail})") from err


def _probe(src: str, fields: bool = False) -> VideoInfo:
    meta = ffmpeg.probe_json(src)
    fmt = meta.get("format") or {}
    streams = meta.get("streams") or []
    video = _choose_video(streams)
    width, height = int(video["width"]), int(video["height"])
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise ProbeError(f"declared frame size {width}x{height} is beyond what reelmend restores (at most "
                         f"{MAX_SIDE} pixels a side and {MAX_PIXELS // 10**6} megapixels)")
    duration = float(fmt.get("duration") or video.get("duration") or 0.0)
    # ffprobe reads the whole stream (over HTTP too): 1 ms a packet, for up to 240 packets a second of video,
    # plus a second per MB read (a declared duration may be missing or wrong; DV or ProRes is ~30 MB a second)
    size = int(fmt.get("size") or 0)
    try:
        times, _ = ffmpeg.packet_times(src, int(video["index"]),
                                       timeout=ffmpeg.work_timeout(int(duration * 240) + 1000, 1, 1000.0) + size / 1e6)
    except ffmpeg.FFmpegError as err:
        raise ProbeError(f"the video stream's packets cannot be read ({err.detail})") from err
    n_frames = len(times)
    if n_frames == 0:
        raise ProbeError("the video stream has no frames")
    rate = _fraction(video.get("avg_frame_rate")) or _fraction(video.get("r_frame_rate"))
    known = [t for t in times if t is not None]
    if len(known) == n_frames:
        times_sorted = sorted(known)
    elif rate:  # no timestamps (raw streams): frames are evenly spaced
        times_sorted = [float(i / rate) for i in range(n_frames)]
    else:
        raise ProbeError("the video stream has neither timestamps nor a frame rate")
    steps = [b - a for a, b in zip(times_sorted, times_sorted[1:])]
    # Variable rate: frame spacing varies by more than 5% of the mean (millisecond-rounded timestamps of
    # 29.97 fps in Matroska vary by 3%, and are constant-rate).
    vfr = bool(steps) and (max(steps) - min(steps)) > 0.05 * (sum(steps) / len(steps))
    nominal = _fraction(video.get("r_frame_rate"))
    if not vfr and nominal and steps and abs(float(1 / nominal) - sum(steps) / len(steps)) < 1e-3:
        fps = nominal
    elif steps and times_sorted[-1] > times_sorted[0]:
        # Constant-rate output with the same frame count and duration (DESIGN: normalising VFR is fine).
        fps = Fraction(len(steps), 1) / Fraction(times_sorted[-1] - times_sorted[0]).limit_denominator(1_000_000)
        fps = fps.limit_denominator(100_000)
    else:
        fps = rate or Fraction(25)
    depth, chroma = _depth_and_chroma(video.get("pix_fmt") or "", video.get("bits_per_raw_sample"))
    others = tuple(
        OtherStream(index=int(s["index"]), kind=_kind(s), codec=s.get("codec_name"),
                    language=(s.get("tags") or {}).get("language"))
        for s in streams if s is not video)
    start = float(fmt.get("start_time") or 0.0)
    return VideoInfo(
        format_name=fmt.get("format_name", ""), start_time=start, duration=duration,
        stream_index=int(video["index"]), codec=video["codec_name"], width=width, height=height,
        pix_fmt=video.get("pix_fmt") or "unknown", bit_depth=depth, chroma=chroma,
        fps_num=fps.numerator, fps_den=fps.denominator, vfr=vfr, n_frames=n_frames,
        color_range=video.get("color_range"), color_space=video.get("color_space"),
        color_transfer=video.get("color_transfer"), color_primaries=video.get("color_primaries"),
        rotation=_rotation(video), field_order=_field_order(video),
        parity=_parity(src, int(video["index"]), _field_order(video), fields), streams=others,
        chapters=len(meta.get("chapters") or []), frame_times=tuple(times_sorted))
