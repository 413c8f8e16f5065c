"""`reelmend report DEST`: one self-contained HTML page about a job (issue 8).

The page holds, per job: its chain, counts, wall time and throughput; the quality figures measured for its
models; and per video: before/after sample frames (side by side, a slider and a zoomed centre crop), the
source's and the output's properties, the chunks' compute time and retries, and the reason of a failure.

Self-contained means one file that opens anywhere, offline, and can be mailed or archived beside the outputs:
no network assets, every image a base64 `data:` URI, the CSS and the few lines of JS inline. Every piece of
text that comes from a file (names, reasons, codecs, tags) goes through `esc`: a file may be called
`<b>.mp4`. Frames come from FFmpeg (through `pipeline.ffmpeg.run`, argument lists only) as JPEGs.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from datetime import datetime, timezone
from fractions import Fraction

from jobs.status import failed_first, job_status, pick_job
from models.chain import STAGES
from models.geometry import parse_chain
from models.weights import SHIPPED, read_card, stem
from pipeline import ffmpeg, storage
from pipeline.config import JobSpec
from pipeline.manifest import Manifest
from pipeline.probe import ProbeError, VideoInfo, probe

DISPLAY_WIDTH = 960  # frames wider than this are downscaled for the side-by-side view and the slider
CROP = (240, 160)  # the zoomed crop: at most this many output pixels from the frame's centre, shown at 2x
# FFmpeg's -q:v for MJPEG, 2 (best) .. 31: in 4:4:4 at 2, about 38 dB on a noisy frame, a fraction of PNG's size
JPEG_QUALITY = "2"

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
p, .note { max-width: 1100px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 18px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; } td, th { border: 1px solid #ddd; padding: 3px 8px;
  text-align: left; vertical-align: top; } th { background: #f4f4f4; }
.done { color: #186a18; } .failed { color: #b00020; } .pending { color: #a06000; }
.note { color: #555; } .reason { color: #b00020; font-family: ui-monospace, monospace; }
.pair { display: flex; gap: 8px; flex-wrap: wrap; align-items: flex-start; }
.sbs { display: flex; gap: 8px; align-items: flex-start; } .sbs figure { flex: 0 1 auto; min-width: 0; }
figure { margin: 0 0 10px; } figcaption { font-size: 12px; color: #555; }
img { display: block; max-width: 100%; height: auto; }
img.zoom { image-rendering: pixelated; }
.stack { position: relative; display: inline-block; }
.stack img.after { position: absolute; top: 0; left: 0; clip-path: inset(0 0 0 50%); }
.slider { max-width: 100%; } .slider input { display: block; width: 100%; margin: 4px 0; }
"""

# Dragging the slider uncovers the restored frame from the right: the "after" image lies over the "before"
# one and is clipped from its left edge to the slider's position.
SLIDER_JS = "this.parentNode.querySelector('img.after').style.clipPath='inset(0 0 0 '+this.value+'%)'"
# The slider shows the side-by-side pair's two frames again: each is in the page once, and copied here on load.
COPY_JS = ("<script>for (const i of document.querySelectorAll('img[data-copy]')) "
           "i.src = document.getElementById(i.dataset.copy).src;</script>")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>reelmend report: {title}</title>
<style>{css}</style></head>
<body>
{body}
{script}
</body></html>
"""


class Html(str):
    """Markup this module built itself (already escaped); anything else is text and gets escaped."""


def esc(value: object) -> Html:
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def table(header: list[str] | None, rows: list[list[object]]) -> Html:
    """A table of text cells (escaped) and Html cells (as they are); no header row when `header` is None."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Html(f"<table>{head}{body}</table>")


def status_span(status: str) -> Html:
    return Html(f'<span class="{esc(status)}">{esc(status)}</span>')


# -- the page ---------------------------------------------------------------------------------------------

def write_report(dest: str, job_id: str | None, *, out: str | None, quality: str | None, samples: int,
                 videos: int = 50) -> str:
    """Write the job's report page to `out` (default: report.html in the job's manifest folder); returns
    where it was written. The table lists the videos (failed first, at most TABLE_ROWS); `videos` of them get
    a section with frames, failed ones first (each costs a few FFmpeg reads, and the page a few hundred kB)."""
    job_id = pick_job(dest, job_id)
    if out:
        storage.check_file(out, "--out")
    manifest = Manifest(dest, job_id)
    spec = manifest.read_spec()
    bench = read_quality_file(quality) if quality else None  # a wrong file fails before any FFmpeg work
    status = job_status(dest, job_id)
    plan = {row["video_id"]: row for row in manifest.read_plan().to_pylist()}  # one row per video is enough
    events = manifest.read_events().to_pylist()
    by_video: dict[str, list[dict]] = {}
    for e in events:
        by_video.setdefault(e["video_id"], []).append(e)
    models = spec.models or str(SHIPPED)
    rank = {"failed": 0, "done": 1}
    shown = sorted(sorted(range(len(status["videos"])), key=lambda i: rank.get(status["videos"][i]["status"], 2))
                   [:videos])
    body = [
        job_section(status, spec, events),
        videos_table(status, set(shown)),
        quality_section(bench, quality, spec.chain, models),
        *(video_section(i, status["videos"][i], plan[status["videos"][i]["video_id"]],
                        by_video.get(status["videos"][i]["video_id"], []), samples) for i in shown),
    ]
    page = PAGE.format(title=esc(job_id), css=CSS, body="\n".join(body), script=COPY_JS)
    uri = out or storage.join(manifest.root, "report.html")
    storage.write_bytes(uri, page.encode())
    return uri if "://" in uri else os.path.abspath(uri)


def job_section(status: dict, spec: JobSpec, events: list[dict]) -> Html:
    counts = status["counts"]
    times = [t for e in events for t in (e["started_at"], e["finished_at"]) if t is not None]
    wall = busy_seconds(events)
    done = latest_done_chunks(events)
    frames_in = sum(e["frames_in"] or 0 for e in done.values())
    frames_out = sum(v["frames_out"] for v in status["videos"] if v["status"] == "done")
    compute = sum(seconds(e) for e in done.values())
    encode = "FFV1 lossless (RGB)" if spec.encode.lossless else f"{spec.encode.codec} CRF {spec.encode.crf}"
    rows = [
        ["job", status["job_id"]],
        ["chain", status["chain"]],
        ["models", spec.models or "shipped weights"],
        ["encode", encode],
        *([["options", options]] if (options := _options(spec)) else []),
        ["source", spec.src],
        ["destination", spec.dest],
        ["manifest", status["manifest"]],
        ["videos", Html(", ".join(f"{counts.get(k, 0)} {status_span(k)}" for k in ("done", "failed", "pending")))],
        ["wall time", f"{wall:.1f} s with chunks in flight" + (f" (between {utc(min(times))} and {utc(max(times))})"
                                                               if times else "")],
        ["frames restored", f"{frames_in} source frames in done chunks, {frames_out} output frames in finished "
                            "videos" + (f"; {concealed} source frames could not be decoded and were concealed"
                                        if (concealed := sum(v["frames_concealed"] for v in status["videos"]))
                                        else "")],
        ["throughput", f"{frames_in / wall:.2f} source frames/s over the wall time" if wall else "n/a"],
        # a chunk's time runs from its decode starting to the driver recording it: queueing between stages included
        ["chunk time", f"{compute:.1f} s (sum over done chunks, from decode to result recorded)"],
    ]
    return Html(f"<h1>reelmend report: job {esc(status['job_id'])}</h1>\n" + table(None, rows))


def _options(spec: JobSpec) -> str:
    """The job's options that change which files it takes or how it decodes them (empty: none set)."""
    parts = [f"--include {' '.join(spec.include)}"] if spec.include else []
    parts += [f"--exclude {' '.join(spec.exclude)}"] if spec.exclude else []
    parts += ["--deinterlace"] if spec.deinterlace else []
    parts += ["--double-rate"] if spec.double_rate else []
    parts += ["--conceal-damage"] if spec.conceal_damage else []
    return " ".join(parts)


# Rows of the videos table at most: a job of a million videos would make a page of hundreds of MB.
TABLE_ROWS = 5000


def videos_table(status: dict, shown: set[int], limit: int = TABLE_ROWS) -> Html:
    """The same one line per video as `reelmend status`, failed ones first, at most `limit`, linking to each
    video's section (those `shown`)."""
    rows = []
    videos = status["videos"]
    index = {id(v): i for i, v in enumerate(videos)}  # (a video's section is named by its place in the plan)
    for v in failed_first(videos)[:limit]:
        i = index[id(v)]
        c = v["chunks"]
        name = Html(f'<a href="#video-{i}">{esc(v["path"])}</a>') if i in shown else esc(v["path"])
        rows.append([name, status_span(v["status"]),
                     f"{c['done']}/{sum(c.values())} done" + (f", {c['failed']} failed" if c["failed"] else ""),
                     v["frames_out"] or "", Html(f'<span class="reason">{esc(v["reason"])}</span>')])
    note = "" if len(rows) == len(videos) else (
        f"<p>The table lists {len(rows)} of {len(videos)} videos, failed ones first; <code>reelmend status DEST "
        "--json</code> lists every one.</p>")
    note += "" if len(shown) == len(videos) else (
        f'<p>Frames, properties and timings below for {len(shown)} of {len(videos)} videos, failed ones first '
        "(<code>reelmend report --videos N</code> shows more).</p>")
    return Html("<h2>Videos</h2>\n" + table(["video", "status", "chunks", "frames out", "reason"], rows) + note)


def utc(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds(event: dict) -> float:
    start, end = event["started_at"], event["finished_at"]
    return (end - start).total_seconds() if start and end else 0.0


def busy_seconds(events: list[dict]) -> float:
    """The job's wall time: the union of the intervals during which some chunk was in flight, each from its wave's
    dispatch (its `running` event) to its result being recorded, so the idle time between runs (a job resumed a
    day later) counts for nothing. Stitching records no start and is not counted; nor is work a crashed run never
    recorded."""
    dispatched: dict[tuple[str, int], datetime] = {}
    spans = []
    for e in events:  # in commit order: a chunk's `running` event comes before its result
        key = (e["video_id"], e["chunk_index"])
        if e["status"] == "running" and e["started_at"] is not None:
            dispatched[key] = e["started_at"]
        elif e["chunk_index"] >= 0 and e["finished_at"] is not None:
            # its own start (decode) as well: the worker's clock may run a little behind the driver's
            starts = [t for t in (dispatched.pop(key, None), e["started_at"]) if t is not None]
            spans.append((min(starts, default=e["finished_at"]), e["finished_at"]))
    busy, reached = 0.0, None
    for start, end in sorted(spans):
        start = start if reached is None else max(start, reached)
        if end > start:
            busy += (end - start).total_seconds()
            reached = end
    return busy


def latest_done_chunks(events: list[dict]) -> dict[tuple[str, int], dict]:
    """The last done event of each chunk (a chunk is recorded done once, but a resumed run may add another)."""
    return {(e["video_id"], e["chunk_index"]): e for e in events
            if e["status"] == "done" and e["chunk_index"] >= 0}


# -- quality figures ----------------------------------------------------------------------------------------

BENCH_KEYS = ("task", "metric", "best_baseline", "fidelity", "gan", "margin_db", "bar_db", "meets_bar")


def read_quality_file(uri: str) -> dict:
    """A `reelmend bench quality --json` result, checked for the fields the table shows."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"--quality file {uri} does not exist")
    try:
        result = json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--quality file {uri} is not JSON ({err})") from None
    tasks = result.get("tasks") if isinstance(result, dict) else None
    missing = sorted({k for t in tasks for k in BENCH_KEYS if k not in t}) if isinstance(tasks, list) else ["tasks"]
    if missing:
        raise ValueError(f"--quality file {uri} is not the JSON of `reelmend bench quality --json` "
                         f"(missing: {', '.join(missing)})")
    return result


def quality_section(bench: dict | None, bench_uri: str | None, chain: tuple[str, ...], models: str) -> Html:
    parts = ["<h2>Quality</h2>"]
    if bench is not None:
        parts.append(bench_table(bench, bench_uri or ""))
    parts.append(card_tables(chain, models))
    return Html("\n".join(parts))


def bench_table(bench: dict, uri: str) -> Html:
    clips = ", ".join(str(c.get("name", c)) if isinstance(c, dict) else str(c) for c in bench.get("clips", []))
    rows = [[r["task"], r["metric"], f"{r['best_baseline']['name']}: {r['best_baseline']['psnr']:.2f} dB",
             f"{r['fidelity']['psnr']:.2f} dB", f"{r['margin_db']:+.2f} dB",
             f"≥ {r['bar_db']:+.1f}" if r["bar_db"] else "> 0",
             Html('<span class="done">met</span>' if r["meets_bar"] else '<span class="failed">not met</span>'),
             f"{r['gan']['psnr']:.2f} dB",
             f"{r['fidelity']['sharpness']:.3f} / {r['gan']['sharpness']:.3f}"]
            for r in bench["tasks"]]
    source = (f"From {uri}, written by `reelmend bench quality --json` on clean clips {clips or '(not named)'}, "
              f"models {bench.get('models', '(not named)')}.")
    return Html(f'<h3>Measured by bench quality</h3>\n<p class="note">{esc(source)}</p>\n'
                + table(["task", "metric", "best FFmpeg filter", "fidelity", "margin", "bar", "verdict", ":gan",
                         "sharpness fidelity / :gan (clean = 1)"], rows))


def card_tables(chain: tuple[str, ...], models: str) -> Html:
    """The figures `reelmend bench quality --update-cards` recorded in the card of each model of the chain."""
    parts = []
    for ref in parse_chain(chain):
        if STAGES[ref.stage].arch is None:
            continue  # identity: no model, nothing measured
        card = read_card(models, ref.stage, ref.flavour)
        name = f"{stem(ref.stage, ref.flavour)}.json in {models}"
        measured = (card or {}).get("bench_quality") or {}
        if not measured.get("tasks"):
            why = "no model card" if card is None else "its model card records no measured figures"
            parts.append(f'<p class="note">{esc(str(ref))}: {esc(why)} ({esc(name)}).</p>')
            continue
        rows = [[t["task"], t["metric"], f"{t['best_filter']['name']}: {t['best_filter']['psnr']:.2f} dB",
                 f"{t['psnr']:.2f} dB", f"{t['margin_db']:+.2f} dB", f"{t['sharpness']:.3f}"]
                for t in measured["tasks"]]
        clips = ", ".join(measured.get("clean_clips", [])) or "(not named)"
        source = (f"From the model card {name} (dated {card.get('date', 'unknown')}): measured by "
                  f"`{measured.get('command', 'reelmend bench quality')}` on clean clips {clips} at scale "
                  f"{measured.get('clean_scale', '?')}.")
        parts.append(f"<h3>{esc(str(ref))}</h3>\n<p class=\"note\">{esc(source)}</p>\n"
                     + table(["task", "metric", "best FFmpeg filter", "this model", "margin", "sharpness (clean = 1)"],
                             rows))
    if not parts:
        parts.append('<p class="note">No quality figures: the chain has no model stage (identity re-encodes) and '
                     "no <code>--quality</code> file was given.</p>")
    return Html("\n".join(parts))


# -- one video ------------------------------------------------------------------------------------------------

def video_section(index: int, video: dict, row: dict, events: list[dict], samples: int) -> Html:
    """Status and reason, frames, properties and timings of one video (`events`: its own)."""
    source = VideoInfo.model_validate_json(row["probe_json"]) if row["probe_json"] else None
    output, frames = None, Html("")
    try:
        if video["status"] == "done":
            with storage.ffmpeg_input(video["output"]) as path:
                output = probe(path)
            frames = comparisons(row["source_uri"], source, video["output"], output, samples)
        elif source is not None:
            frames = source_frame(row["source_uri"], source)
    except (ffmpeg.FFmpegError, ProbeError, OSError) as err:
        # The page still reports everything else; the reason frames are missing is shown in their place.
        frames = Html(f'<p class="reason">frames unavailable: {esc(" ".join(str(err).split()))}</p>')
    header = (f'<h2 id="video-{index}">{status_span(video["status"])} {esc(video["path"])}</h2>'
              + (f'<p class="reason">{esc(video["reason"])}</p>' if video["reason"] else ""))
    if source is None:  # never probed: nothing to describe or time
        return Html(header)
    output_uri = video["output"] if video["status"] == "done" else None
    # the frames first: they are what a reader comes for
    return Html("\n".join([header, frames, properties_table(row["source_uri"], source, output_uri, output),
                           timings_table(video, events)]))


def properties_table(source_uri: str, source: VideoInfo | None, output_uri: str | None,
                     output: VideoInfo | None) -> Html:
    src, out = describe(source), describe(output)
    rows = [["file", source_uri, output_uri or "(none)"], *([name, src[name], out[name]] for name in src)]
    return Html("<h4>Properties</h4>\n" + table(["", "source", "output"], rows))


def describe(info: VideoInfo | None) -> dict[str, str]:
    keys = ["container", "codec", "size", "fps", "frames", "duration", "bit depth", "colour", "rotation",
            "audio", "subtitles", "other streams", "chapters"]
    if info is None:
        return dict.fromkeys(keys, "")

    def streams(*kinds: str) -> str:
        found = [f"{s.kind} {s.codec or 'unknown codec'}" + (f" ({s.language})" if s.language else "")
                 for s in info.streams if s.kind in kinds]
        return ", ".join(found) or "none"

    colour = ", ".join(v for v in (info.color_space, info.color_range, info.color_transfer) if v) or "untagged"
    return {
        "container": info.format_name,
        "codec": f"{info.codec} ({info.pix_fmt})",
        "size": f"{info.width}x{info.height}",
        "fps": rate(info.fps) + (" (variable rate)" if info.vfr else ""),
        "frames": str(info.n_frames),
        "duration": f"{info.duration:.3f} s",
        "bit depth": f"{info.bit_depth} bit, {info.chroma}",
        "colour": colour,
        "rotation": f"{info.rotation}° (frames below are shown as stored)" if info.rotation else "none",
        "audio": streams("audio"),
        "subtitles": streams("subtitle"),
        "other streams": streams("video", "cover", "data", "attachment"),
        "chapters": str(info.chapters),
    }


def rate(fps: Fraction) -> str:
    return f"{float(fps):.3f}".rstrip("0").rstrip(".")


def timings_table(video: dict, events: list[dict]) -> Html:
    """The chunks' time (decode start to result recorded, as in `job_section`) and retries, from the video's
    events."""
    mine = [e for e in events if e["chunk_index"] >= 0]
    done = latest_done_chunks(mine)
    compute = sum(seconds(e) for e in done.values())
    attempts = max((e["attempt"] or 1 for e in mine), default=0)
    retries = sum(e["status"] == "failed" for e in mine)
    c = video["chunks"]
    rows = [[f"{c['done']}/{sum(c.values())}", c["failed"], f"{compute:.1f} s",
             f"{compute / len(done):.2f} s" if done else "", attempts, retries]]
    return Html("<h4>Timings</h4>\n" + table(["chunks done", "chunks failed", "chunk time (sum)", "per chunk",
                                              "most attempts", "failed attempts"], rows))


# -- frames ---------------------------------------------------------------------------------------------------

def sample_times(info: VideoInfo, samples: int) -> list[tuple[int, float]]:
    """(source frame, seconds from the file's start) of `samples` frames spread evenly over the video.

    Seeking to a quarter frame before frame k lands both files on the frame shown at frame k's time: the
    source's frame k, and in an output at twice the rate (interp2x) its frame 2k, the source frame's own
    restoration rather than an interpolated midpoint (those lie at k - 1/2)."""
    out = []
    for i in range(samples):
        k = min(info.n_frames - 1, int((i + 0.5) / samples * info.n_frames))
        out.append((k, max(0.0, (k - 0.25) / float(info.fps))))
    return out


def display_size(width: int, height: int) -> tuple[int, int]:
    if width <= DISPLAY_WIDTH:
        return width, height
    return DISPLAY_WIDTH, max(2, round(height * DISPLAY_WIDTH / width / 2) * 2)


def grab(src: str, info: VideoInfo, at: float, size: tuple[int, int], crop: tuple[int, int] | None = None) -> str:
    """One frame `at` seconds from the file's start, scaled to `size` (and centre-cropped to `crop`), as a JPEG
    data URI. Frames stay as stored (-noautorotate), as the restore decodes them.

    The colours go through RGB with the stream's own matrix and range, then to JPEG's full-range BT.601:
    swscale converts YUV to YUV without changing the matrix, which would tint a BT.709 source."""
    rng = "auto" if info.full_range is None else ("full" if info.full_range else "limited")
    vf = (f"scale={size[0]}:{size[1]}:in_color_matrix={info.matrix}:in_range={rng}"
          ":flags=lanczos+accurate_rnd+full_chroma_int,format=rgb24")
    if crop:
        vf += f",crop={crop[0]}:{crop[1]}:(iw-{crop[0]})/2:(ih-{crop[1]})/2"
    vf += ",scale=out_color_matrix=bt601:out_range=full:flags=accurate_rnd+full_chroma_int,format=yuvj444p"
    args = [*ffmpeg.BASE, "-noautorotate", "-ss", f"{at:.6f}", *ffmpeg.input_args(src), "-i", src,
            "-map", f"0:{info.stream_index}", "-frames:v", "1", "-vf", vf, "-c:v", "mjpeg", "-q:v", JPEG_QUALITY,
            "-f", "image2pipe", "pipe:1"]
    # decoding from the keyframe before `at`: a few hundred frames at most in any sane GOP
    jpeg = ffmpeg.run(args, timeout=ffmpeg.work_timeout(300, info.width * info.height),
                      what=f"extracting the frame at {at:.3f} s failed")
    if not jpeg:
        raise ffmpeg.FFmpegError(f"extracting the frame at {at:.3f} s failed", "no frame there")
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def img(uri: str, alt: str, size: tuple[int, int], cls: str = "", zoom: int = 1, ident: str = "") -> Html:
    """An image from a data URI, or (`uri` "#id") a copy of the page's image with that id, made on load."""
    source = f'data-copy="{uri[1:]}"' if uri.startswith("#") else f'src="{uri}"'
    return Html(f'<img {source} alt="{esc(alt)}" width="{size[0] * zoom}" height="{size[1] * zoom}"'
                + (f' class="{cls}"' if cls else "") + (f' id="{ident}"' if ident else "") + ">")


def figure(content: str, caption: str) -> Html:
    return Html(f"<figure>{content}<figcaption>{esc(caption)}</figcaption></figure>")


def comparisons(source_uri: str, source: VideoInfo, output_uri: str, output: VideoInfo, samples: int) -> Html:
    """Per sample time: source and output side by side, a slider over the two, and a 2x centre crop. The source
    is scaled to the output's size (super-resolution changes it), so the two line up pixel for pixel."""
    full = (output.width, output.height)
    shown = display_size(*full)
    crop = (min(CROP[0], full[0]), min(CROP[1], full[1]))
    parts = ["<h4>Before and after</h4>"]
    scaled = f", shown at {shown[0]}x{shown[1]}" if shown != full else ""
    with storage.ffmpeg_input(source_uri) as src, storage.ffmpeg_input(output_uri) as dst:
        for k, at in sample_times(source, samples):
            before, after = grab(src, source, at, shown), grab(dst, output, at, shown)
            zoom_before, zoom_after = grab(src, source, at, full, crop), grab(dst, output, at, full, crop)
            when = f"at {at:.3f} s (source frame {k})"
            ident = "f" + hashlib.sha256(f"{output_uri}\0{k}".encode()).hexdigest()[:12]  # unique in the page
            parts.append(f"<h4>{esc(when)}</h4>")
            parts.append('<div class="sbs">'
                         + figure(img(before, f"source {when}", shown, "before", ident=f"{ident}b"),
                                  f"source {source.width}x{source.height}, scaled to the output's {full[0]}x{full[1]}"
                                  + scaled)
                         + figure(img(after, f"restored {when}", shown, "after", ident=f"{ident}a"),
                                  f"restored {full[0]}x{full[1]}{scaled}")
                         + "</div>")
            parts.append(slider(f"#{ident}b", f"#{ident}a", shown))
            parts.append('<div class="pair">'
                         + figure(img(zoom_before, "source, centre crop", crop, "zoom", 2),
                                  f"source, centre {crop[0]}x{crop[1]} of the output size, 2x")
                         + figure(img(zoom_after, "restored, centre crop", crop, "zoom", 2),
                                  f"restored, centre {crop[0]}x{crop[1]}, 2x")
                         + "</div>")
    return Html("\n".join(parts))


def slider(before: str, after: str, size: tuple[int, int]) -> Html:
    """The restored frame over the source, uncovered from the right as the range input moves."""
    return Html(f'<figure class="slider" style="width: {size[0]}px">'
                f'<div class="stack">{img(before, "source", size)}{img(after, "restored", size, "after")}</div>'
                f'<input type="range" min="0" max="100" value="50" aria-label="compare" oninput="{esc(SLIDER_JS)}">'
                "<figcaption>drag: source on the left, restored on the right</figcaption></figure>")


def source_frame(source_uri: str, source: VideoInfo) -> Html:
    """A failed or pending video has no output: one source frame from its middle shows what it is."""
    shown = display_size(source.width, source.height)
    k, at = sample_times(source, 1)[0]
    with storage.ffmpeg_input(source_uri) as src:
        frame = grab(src, source, at, shown)
    return Html("<h4>Source</h4>\n"
                + figure(img(frame, f"source frame {k}", shown), f"source frame {k}, at {at:.3f} s"))
