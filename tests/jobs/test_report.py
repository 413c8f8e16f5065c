"""`reelmend report DEST`: one self-contained HTML page per job, checked as a reader sees it: the text it holds,
the frames it pairs, and what headless Chromium actually draws."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import Result
from conftest import decode, ffmpeg, make_clip, psnr, write_tiny_weights
from typer.testing import CliRunner

from jobs.cli import app
from jobs.report import busy_seconds, esc, quality_section, utc
from jobs.status import pick_job
from models.weights import SHIPPED
from pipeline.manifest import Manifest

runner = CliRunner()
ODD = "a'b\"c;$(touch x)&<b>.mp4"  # random bytes: must fail, and its name must render as text
SAMPLES = 3
SOURCE_FRAMES = 25


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@dataclass
class Job:
    src: Path  # the local source folder
    dest: str  # s3://...: the page is written beside the manifest in the bucket
    result: Result  # of `reelmend report DEST`
    page: Path  # a local copy of the page
    source: np.ndarray  # bikes.mkv's frames
    output: np.ndarray  # and its restored frames


@pytest.fixture(scope="module")
def job(tmp_path_factory, clips, s3, ray_address) -> Job:
    """1 s of bikes.mp4 at 96 px high with an audio track, a corrupt upload and a video that cannot be decoded,
    restored once (two chunks each) into a bucket with tiny sr2x then interp2x weights: the output has twice the
    size and twice the frames of its source. Then `reelmend report DEST`, which reads the manifest and the output
    from the bucket."""
    root = tmp_path_factory.mktemp("report")
    src = root / "in"
    src.mkdir()
    ffmpeg("-i", str(clips / "bikes.mp4"), "-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-t", "1",
           "-map", "0:v", "-map", "1:a", "-vf", "scale=-2:96", "-c:v", "ffv1", "-c:a", "aac", str(src / "bikes.mkv"))
    (src / ODD).write_bytes(np.random.default_rng(0).bytes(4096))
    # a video that probes but cannot be decoded (as tests/jobs/test_bad_inputs.py makes one): its chunk 0 fails
    whole = make_clip(root / "whole.mp4", frames=30, extra=("-c:v", "libx264", "-threads", "1", "-g", "10"))
    damaged = bytearray(whole.read_bytes())
    mdat = damaged.find(b"mdat")
    for at in range(mdat + 3000, mdat + 4000, 50):
        damaged[at:at + 8] = b"\xff" * 8
    (src / "corrupt packets.mp4").write_bytes(bytes(damaged))
    weights = write_tiny_weights(root / "weights", "sr2x", perturb=0.02)
    write_tiny_weights(weights, "interp2x")
    fs = fsspec.filesystem("s3")
    bucket = f"report-{os.getpid()}"
    fs.mkdir(bucket)
    dest = f"s3://{bucket}/restored"
    restored = cli("restore", str(src), dest, "--chain", "sr2x,interp2x", "--models", str(weights), "--lossless",
                   "--chunk-frames", "13", "--max-attempts", "2")
    assert restored.exit_code == 3, restored.output  # the corrupt files failed, bikes.mkv is done
    result = cli("report", dest, "--samples", str(SAMPLES))
    (job_id,) = fs.ls(f"{bucket}/restored/_reelmend")
    fs.get_file(f"{job_id}/report.html", str(root / "report.html"))
    fs.get_file(f"{bucket}/restored/bikes.mkv", str(root / "bikes.mkv"))
    source, output = decode(src / "bikes.mkv"), decode(root / "bikes.mkv")
    assert source.shape == (SOURCE_FRAMES, 96, 226, 3) and output.shape == (2 * SOURCE_FRAMES, 192, 452, 3)
    return Job(src, dest, result, root / "report.html", source, output)


FIRST = int(0.5 / SAMPLES * SOURCE_FRAMES)  # the first sample: source frame 4, at (0 + 0.5) / 3 of the video


def test_cli_writes_the_page_beside_the_manifest_and_names_it(job, tmp_path):
    assert job.result.exit_code == 0, job.result.output
    (job_root,) = fsspec.filesystem("s3").ls(f"{job.dest.removeprefix('s3://')}/_reelmend")
    # stdout only: the S3 proxy's threads log to stderr when FFmpeg drops a connection it has read enough of
    assert job.result.stdout.strip() == f"report: s3://{job_root}/report.html"
    elsewhere = tmp_path / "pages" / "job.html"
    result = cli("report", job.dest, "--out", str(elsewhere), "--samples", "1")
    assert result.exit_code == 0, result.output
    assert str(elsewhere) in result.output and elsewhere.read_text().startswith("<!doctype html>")
    # one sample: side by side, slider and crop, two images each; and one source frame of the undecodable video
    assert elsewhere.read_text().count("<img ") == 6 + 1
    folder = cli("report", job.dest, "--out", str(tmp_path / "pages"))  # a folder is not a page's name
    assert folder.exit_code == 2 and "is a folder: give a file name" in folder.output


def test_videos_limits_the_detailed_sections_failed_ones_first(job, tmp_path):
    """A bucket of thousands of videos: the table lists them all, frames are read for --videos of them."""
    out = tmp_path / "two.html"
    result = cli("report", job.dest, "--out", str(out), "--samples", "1", "--videos", "2")
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.count('<h2 id="video-') == 2 and "corrupt packets.mp4</h2>" in page and "bikes.mkv</h2>" not in page
    assert "for 2 of 3 videos, failed ones first" in page
    assert page.count("<img ") == 1  # the undecodable video's source frame; bikes.mkv's frames are not read
    assert ">bikes.mkv</td>" in page  # still in the table, without a link to a section it does not have
    assert cli("report", job.dest, "--videos", "0").exit_code == 2


def test_the_table_of_a_huge_job_lists_the_failed_first_and_says_how_many(job):
    from jobs.report import videos_table
    from jobs.status import job_status

    html = str(videos_table(job_status(job.dest, None), set(), limit=1))  # (a page of 5,000 rows by default)
    assert html.count("<tr>") == 2 and "bikes.mkv" not in html  # the header, and one of the two failed videos
    assert "corrupt packets.mp4" in html or esc(ODD) in html
    assert "The table lists 1 of 3 videos, failed ones first" in html


def test_a_folder_without_a_job_exits_2_with_one_line(tmp_path):
    result = cli("report", str(tmp_path))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "no reelmend job" in result.output


def wall_time(page: str) -> float:
    found = re.search(r"<td>wall time</td><td>([\d.]+) s with chunks in flight", page)
    assert found, "the page shows no wall time"
    return float(found.group(1))


def test_a_job_resumed_a_day_later_counts_the_time_of_its_runs_not_the_day_between(job, tmp_path):
    """The job above, then a second run a day later that redoes one chunk in 10 s (dispatched, decoding from
    2 s on, recorded at 10 s): the wall time is the two runs' time added up, and the throughput is over that."""
    first = Manifest(job.dest, pick_job(job.dest, None))
    resumed = Manifest(str(tmp_path / "restored"), first.job_id)
    resumed.write_spec(first.read_spec())
    resumed.write_plan(first.read_plan().to_pylist())
    events = first.read_events().to_pylist()
    resumed.append_events(events)  # the first run, as it recorded itself
    chunk = [e for e in events if e["status"] == "done" and e["chunk_index"] >= 0][-1]
    later = max(t for e in events for t in (e["started_at"], e["finished_at"]) if t) + timedelta(days=1)
    resumed.append_events([{"video_id": chunk["video_id"], "chunk_index": chunk["chunk_index"], "status": "running",
                            "attempt": chunk["attempt"], "started_at": later}])
    resumed.append_events([{**chunk, "started_at": later + timedelta(seconds=2),
                            "finished_at": later + timedelta(seconds=10)}])
    out = tmp_path / "page.html"
    result = cli("report", str(tmp_path / "restored"), "--out", str(out), "--samples", "1")
    assert result.exit_code == 0, result.output
    page = out.read_text()
    alone = wall_time(job.page.read_text())  # the first run's page
    assert 0 < alone < 600
    assert abs(wall_time(page) - (alone + 10.0)) <= 0.11  # not a day and more
    assert f"and {utc(later + timedelta(seconds=10))})" in page  # the span itself is still shown
    frames = int(re.search(r"(\d+) source frames in done chunks", page).group(1))
    throughput = float(re.search(r"([\d.]+) source frames/s over the wall time", page).group(1))
    assert abs(throughput - frames / (alone + 10.0)) < 0.01 * frames / alone


def test_wall_time_is_the_union_of_the_chunks_in_flight():
    """Chunks in flight together count once; a chunk counts from its wave's dispatch, not from its decode; the
    night between two runs, and events without a duration (a stitch, a chunk failed before dispatch), add nothing."""
    t0 = datetime(2024, 5, 1, 20, 0, tzinfo=timezone.utc)

    def at(seconds: float) -> datetime:
        return t0 + timedelta(seconds=seconds)

    def event(chunk: int, status: str, start: float | None, end: float | None) -> dict:
        return {"video_id": "v", "chunk_index": chunk, "status": status, "started_at": None if start is None else at(start),
                "finished_at": None if end is None else at(end)}

    night = 12 * 3600
    events = [event(0, "running", 0, None), event(1, "running", 0, None),
              event(0, "done", 3, 20), event(1, "failed", 5, 30),  # run 1, wave 1: 0 to 30 s
              event(2, "failed", None, 31),  # too big for any node: never dispatched
              event(1, "running", 32, None), event(1, "done", 33, 40),  # wave 2: 32 to 40 s
              event(-1, "done", None, 45),  # stitched
              event(3, "running", night, None), event(3, "done", night + 1, night + 5)]  # run 2: 5 s
    assert busy_seconds(events) == 30 + 8 + 5
    assert busy_seconds([]) == 0.0


def test_the_page_is_self_contained_and_shows_the_failure_as_text(job):
    page = job.page.read_text()
    # nothing is fetched: no remote or protocol-relative src/href, no CSS url() or @import, no external script
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "url(" not in page and "@import" not in page and "<script src" not in page
    # the output was read through a presigned URL: neither its signature nor the secret reaches the page
    assert "Signature" not in page and os.environ["AWS_SECRET_ACCESS_KEY"] not in page
    images = re.findall(r"<img\b[^>]*>", page)
    assert len(images) == SAMPLES * 6 + 1
    # each frame is in the page once: the slider's two images copy the side-by-side pair's on load
    copies = [tag for tag in images if "data-copy=" in tag]
    assert len(copies) == SAMPLES * 2
    ids = set(re.findall(r'\bid="([^"]+)"', page))
    assert all(re.search(r'data-copy="([^"]+)"', tag).group(1) in ids for tag in copies)
    for tag in (t for t in images if t not in copies):
        data = re.search(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', tag)
        assert data, tag[:120]
        assert base64.b64decode(data.group(1))[:3] == b"\xff\xd8\xff"  # a JPEG
    # the corrupt upload: its name as text (never markup), and the reason `reelmend status` gives
    assert html.escape(ODD) in page and "<b>.mp4" not in page
    assert "not a readable media file" in page
    # a video that failed after probing: its reason, how often its chunk was tried, and a frame of its source
    assert re.search(r"chunk 0: decode: decoding \d+ frames failed: produced \d+ of \d+ frames", page)
    failed = page[page.index("corrupt packets.mp4</h2>"):]
    # its timings: chunk 0 tried twice (--max-attempts 2), failing both times
    assert re.search(r"<th>most attempts</th><th>failed attempts</th></tr><tr>(<td>[^<]*</td>){4}<td>2</td><td>2</td>",
                     failed)
    assert 'alt="source frame 15"' in failed
    assert not (Path.cwd() / "x").exists() and not (job.src / "x").exists()
    # the source's properties (from the plan's probe) and the output's (probed now), side by side
    assert "<td>size</td><td>226x96</td><td>452x192</td>" in page
    assert "<td>fps</td><td>25</td><td>50</td>" in page
    assert "<td>frames</td><td>25</td><td>50</td>" in page
    assert "<td>audio</td><td>audio aac</td><td>audio aac</td>" in page
    # bikes.mkv's 25 frames and the undecodable video's chunks that did restore; only bikes.mkv was written
    restored = re.search(r"(\d+) source frames in done chunks, 50 output frames in finished videos", page)
    assert restored and 25 < int(restored.group(1)) < 25 + 30
    assert '<input type="range"' in page


def page_image(page: str, kind: str, frame: int, folder: Path) -> np.ndarray:
    """The page's first image of `kind` ("source" or "restored") at a source frame, decoded by FFmpeg."""
    for data, alt in re.findall(r'<img src="data:image/jpeg;base64,([^"]+)" alt="([^"]*)"', page):
        alt = html.unescape(alt)
        if alt.startswith(f"{kind} at ") and alt.endswith(f"(source frame {frame})"):
            path = folder / "image.jpg"
            path.write_bytes(base64.b64decode(data))
            return decode(path)[0]
    raise AssertionError(f"no {kind} image of source frame {frame} in the page")


def test_frames_are_paired_by_time_not_index(job, tmp_path):
    """The page pairs source frame k with output frame 2k (the same presentation time at twice the rate), and
    shows the source scaled up to the output's size."""
    source, output, page = job.source, job.output, job.page.read_text()
    after, before = page_image(page, "restored", FIRST, tmp_path), page_image(page, "source", FIRST, tmp_path)
    assert after.shape == before.shape == (192, 452, 3)
    # the page's JPEG of output frame 2k, not of the interpolated frames beside it
    scores = {j: psnr(after, output[j]) for j in (2 * FIRST - 1, 2 * FIRST, 2 * FIRST + 1)}
    assert scores[2 * FIRST] > 35 and scores[2 * FIRST] > max(scores[2 * FIRST - 1], scores[2 * FIRST + 1]) + 3
    upscaled = {j: psnr(before, source[j].repeat(2, axis=0).repeat(2, axis=1)) for j in (FIRST - 1, FIRST, FIRST + 1)}
    assert max(upscaled, key=upscaled.get) == FIRST, upscaled


def test_chromium_draws_the_sample_frames(job, tmp_path):
    """Render the page headless and find the frames in the screenshot: broken or blank images, or frames from
    the wrong time, would not be found."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("REELMEND_REQUIRE_CHROMIUM", "") not in ("", "0"):  # set by `make test`
            pytest.fail("chromium is not on PATH but REELMEND_REQUIRE_CHROMIUM is set: `make chromium` installs it")
        pytest.skip("chromium is not installed (`make test` installs it and requires it)")
    output = job.output
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1200,2400", f"--screenshot={shot}", job.page.as_uri()],
                   check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    screen = grey(decode(shot)[0])
    # the source frame as FFmpeg scales it to the output's size, and the output frame at the same time
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(job.src / "bikes.mkv"), "-vf",
                          f"select=eq(n\\,{FIRST}),scale=452:192:flags=lanczos", "-frames:v", "1", "-pix_fmt", "rgb24",
                          "-f", "rawvideo", "pipe:1"], check=True, capture_output=True, timeout=60).stdout
    before = np.frombuffer(raw, np.uint8).reshape(192, 452, 3)
    (score_before, (y_before, x_before)), (score_after, (y_after, x_after)) = (
        match(screen, grey(before)), match(screen, grey(output[2 * FIRST])))
    assert score_before > 0.98 and score_after > 0.98
    assert abs(y_before - y_after) <= 2 and x_after >= x_before + 452  # side by side, on one row
    # the zoomed crop: the output's centre 240x160 at 2x, pixel for pixel
    centre = grey(output[2 * FIRST][16:176, 106:346]).repeat(2, axis=0).repeat(2, axis=1)
    assert best_match(screen, centre) > 0.98
    # a frame from another time is not what the page shows
    assert best_match(screen, grey(output[2 * FIRST + 8])) < 0.95


def test_in_a_narrow_window_the_pair_shrinks_side_by_side_and_the_slider_shows_both_frames(job, tmp_path):
    """Laid out by Chromium in a window narrower than the two frames: before and after stay on one row, shrunk to
    fit, and the slider's images (copies made on load) are decoded frames."""
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("REELMEND_REQUIRE_CHROMIUM", "") not in ("", "0"):
            pytest.fail("chromium is not on PATH but REELMEND_REQUIRE_CHROMIUM is set: `make chromium` installs it")
        pytest.skip("chromium is not installed (`make test` installs it and requires it)")
    probe = ("<script>window.addEventListener('load', () => { const r = i => { const b = i.getBoundingClientRect(); "
             "return [b.top, b.left, b.width, i.naturalWidth]; }; document.title = JSON.stringify({"
             "before: r(document.querySelector('.sbs img.before')), after: r(document.querySelector('.sbs img.after')),"
             "copies: [...document.querySelectorAll('img[data-copy]')].map(i => i.naturalWidth)}); });</script>")
    page = tmp_path / "page.html"
    page.write_text(job.page.read_text().replace("</body>", probe + "</body>"))
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--force-device-scale-factor=1",
                          f"--user-data-dir={tmp_path / 'profile'}", "--window-size=700,1200",
                          "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], check=True, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HOME": str(tmp_path)}).stdout
    laid = json.loads(html.unescape(re.search(r"<title>(.*?)</title>", dom, re.S).group(1)))
    (top_b, left_b, width_b, natural_b), (top_a, left_a, width_a, _) = laid["before"], laid["after"]
    assert abs(top_b - top_a) < 1 and left_a > left_b + width_b - 1  # one row
    assert width_b < natural_b == 452 and abs(width_a - width_b) < 1  # shrunk alike to fit 700 px
    assert len(laid["copies"]) == SAMPLES * 2 and all(w == 452 for w in laid["copies"])


def grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ [0.299, 0.587, 0.114]


def best_match(image: np.ndarray, template: np.ndarray) -> float:
    return match(image, template)[0]


def match(image: np.ndarray, template: np.ndarray) -> tuple[float, tuple[int, int]]:
    """The highest normalised cross-correlation of `template` at any position in `image`, and that position (y, x)
    (J. P. Lewis, "Fast normalized cross-correlation", 1995: correlation by FFT, window energies from summed-area
    tables)."""
    ih, iw = image.shape
    th, tw = template.shape
    t = template - template.mean()
    shape = (ih + th, iw + tw)
    corr = np.fft.irfft2(np.fft.rfft2(image, shape) * np.conj(np.fft.rfft2(t, shape)), shape)
    corr = corr[:ih - th + 1, :iw - tw + 1]

    def window_sums(a: np.ndarray) -> np.ndarray:
        s = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        return s[th:, tw:] - s[:-th, tw:] - s[th:, :-tw] + s[:-th, :-tw]

    n = th * tw
    energy = window_sums(image**2) - window_sums(image) ** 2 / n
    ncc = corr / np.sqrt(np.maximum(energy, 1e-9) * (t**2).sum())
    ncc[energy <= 1e-3 * n] = -1.0  # the flat page background has no texture to correlate
    y, x = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    return float(ncc[y, x]), (int(y), int(x))


def test_a_quality_file_is_tabled_with_where_it_came_from(job, tmp_path):
    row = {"task": "denoise σ=<25>", "stage": "denoise", "metric": "PSNR", "bar_db": 0.5,
           "best_baseline": {"name": "nlmeans s=12", "psnr": 30.588, "sharpness": 1.2},
           "fidelity": {"psnr": 31.25, "sharpness": 0.7}, "gan": {"psnr": 30.5, "sharpness": 0.9},
           "margin_db": 0.662, "meets_bar": True}
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"clips": [{"name": "bikes"}], "models": "models/weights", "tasks": [row]}))
    out = tmp_path / "page.html"
    result = cli("report", job.dest, "--out", str(out), "--quality", str(quality), "--samples", "1")
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<td>denoise σ=&lt;25&gt;</td><td>PSNR</td><td>nlmeans s=12: 30.59 dB</td><td>31.25 dB</td>" in page
    assert "+0.66 dB" in page and ">met<" in page and str(quality) in page
    # the job's own stages: tiny weights whose cards record no measured figures, which the page says
    assert "sr2x: its model card records no measured figures" in page
    quality.write_text(json.dumps({"tasks": [{"task": "x"}]}))
    result = cli("report", job.dest, "--out", str(out), "--quality", str(quality))
    assert result.exit_code == 2 and "is not the JSON of `reelmend bench quality --json`" in result.output


def test_model_stages_show_the_figures_of_their_model_cards():
    card = json.loads((SHIPPED / "sr2x-gan.json").read_text())
    task = card["bench_quality"]["tasks"][0]
    section = quality_section(None, None, ("identity", "sr2x:gan"), str(SHIPPED))
    assert "sr2x-gan.json" in section and html.escape(task["task"]) in section
    assert f"{task['psnr']:.2f} dB" in section and f"{task['margin_db']:+.2f} dB" in section
    assert "No quality figures" in quality_section(None, None, ("identity",), str(SHIPPED))
