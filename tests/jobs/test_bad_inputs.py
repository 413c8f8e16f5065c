"""A corpus of bad and awkward inputs, made with FFmpeg and byte edits, restored by one `reelmend restore`: each
input is restored frame-exact where that is possible, and otherwise fails alone with a one-line reason that says
what is wrong, in the manifest and in `reelmend status`. The job finishes (pytest-timeout guards a hang), never
crashes, and writes nothing outside DEST."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ffmpeg, make_clip, probe_stream, stream_hashes
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.config import JobSpec
from pipeline.plan import failed_video_row, plan_video
from pipeline.probe import probe

runner = CliRunner()

NASTY_NAME = "a'b\"c;$(touch x)&.mp4"  # quotes and shell metacharacters: a shell would run `touch x`
DASH_NAME = "-rf [1] *?|<>.mkv"  # an option-like name, glob characters, brackets (markup to a console)
MARKUP_NAME = "take[/b] [bold]1.mkv"  # rich console markup, printed as text (the '/' makes it a folder "take[")
BACKSLASH_NAME = "back\\slash.mkv"  # an ordinary character in POSIX names and object keys

# input -> output name (FFV1, from --lossless, fits no MP4: those become .mkv)
RESTORED = {
    "odd 721x481.mkv": "odd 721x481.mkv",
    "rotated.mp4": "rotated.mkv",
    "vfr.mkv": "vfr.mkv",
    "ten-bit.mkv": "ten-bit.mkv",
    "two videos.mkv": "two videos.mkv",
    "interlaced.mkv": "interlaced.mkv",
    "broadcast.ts": "broadcast.mkv",  # MPEG-TS seeks land between keyframes: chunks must still be exact
    "raw.h264": "raw.mkv",  # an elementary stream: no timestamps, no seeking
    # AVI stores decode times only: with B-frames every chunk after the first came out a frame or two early
    "xvid b-frames.avi": "xvid b-frames.mkv",  # MPEG-4 ASP, open GOPs (leading B-frames after each keyframe)
    "h264 b-frames.avi": "h264 b-frames.mkv",  # x264's B-pyramid reorders more than FFmpeg's guess assumes
    "xvid 29.97 with audio.avi": "xvid 29.97 with audio.mkv",  # keyframes 4 frames apart, no B-frames, a gap
    "dvd.vob": "dvd.mkv",  # MPEG-PS seeks by scanning, landing up to a GOP late: its last chunk came out short
    "damaged cluster.mkv": "damaged cluster.mkv",  # frames lost to container damage: restored as it now reads
    "with spaces.mkv": "with spaces.mkv",
    "ünïcødé 映像.mkv": "ünïcødé 映像.mkv",
    NASTY_NAME: NASTY_NAME.replace(".mp4", ".mkv"),
    DASH_NAME: DASH_NAME,
    MARKUP_NAME: MARKUP_NAME,
    BACKSLASH_NAME: BACKSLASH_NAME,
    "clash.mov": "clash.mkv",  # its sibling clash.mp4 would become clash.mkv too
}

# input -> what its reason must say
FAILED = {
    "empty.mp4": r"^the file is empty \(0 bytes\)$",
    "random bytes.mp4": r"not a readable media file",
    "truncated.mp4": r"not a readable media file \(no MP4 index \(moov atom\): the file is truncated",
    "audio only.mp4": r"no decodable video stream \(streams: audio\)",
    # A still is not restored: a one-frame .mkv of a poster is not what an archive run asks for (and it would
    # take the output name of a video with the same stem).
    "still.png": r"a still image \(png\), not a video",
    "zero frames.y4m": r"the video stream has no frames",
    "unknown codec.mkv": r"no decodable video stream \(stream 0 has a codec FFmpeg does not know\)",
    "absurd 99999x99999.y4m": r"not a readable media file \(Picture size 99999x99999 is invalid",
    "wide 40000x8.y4m": r"declared frame size 40000x8 is beyond what reelmend restores",
    # Two packets the decoder rejects outright: those frames do not exist, and the next chunk's frames must
    # not take their place (that would be a silently shifted output).
    "corrupt packets.mp4": r"chunk 0: decode: decoding 10 frames failed: produced 8 of 10 frames \(",
    # A broadcast capture cut mid-GOP: the frames before the first keyframe cannot be decoded.
    "cut mid-GOP.ts": r"chunk 0: decode: decoding 10 frames failed: produced 0 of 10 frames \(",
    # a playlist naming a file outside SRC: FFmpeg would read it into the output (file inclusion)
    "hls playlist.mp4": r"^refused: its format \(hls\) names other files or URLs for FFmpeg to open",
    # two inputs, one output name: the second must not silently replace the first
    "clash.mp4": r"its output \S+/clash\.mkv is also the output of clash\.mov; rename one of them",
}


def frames_of(path: Path | str, pix_fmt: str = "rgb24", stream: str = "0:v:0") -> np.ndarray:
    """Every frame of one stream, in stored orientation, with no rate conversion (sizes read from JSON:
    conftest's csv reading trips on MPEG-TS's program section)."""
    info = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
                                     check=True, capture_output=True, text=True, timeout=60).stdout)
    index = int(stream.split(":")[-1])
    video = [s for s in info["streams"] if s["codec_type"] == "video"][index]
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "quiet", "-noautorotate", "-i", str(path), "-map", stream,
                          "-fps_mode", "passthrough", "-vf", "scale=flags=accurate_rnd+full_chroma_int",
                          "-pix_fmt", pix_fmt, "-f", "rawvideo", "pipe:1"], capture_output=True, timeout=300).stdout
    dtype = np.uint16 if pix_fmt == "rgb48le" else np.uint8
    return np.frombuffer(raw, dtype=dtype).reshape(-1, video["height"], video["width"], 3)


def packet_positions(path: Path) -> list[int]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pos",
                          "-of", "csv=p=0", str(path)], check=True, capture_output=True, text=True).stdout
    return [int(line.strip(",")) for line in out.split()]


X264 = ("-c:v", "libx264", "-threads", "1")


def corrupt_packets(work: Path) -> bytes:
    """30 frames of H.264 (GOPs of 10) with bytes overwritten inside packets the index still lists: the decoder
    rejects two of them."""
    data = make_clip(work / "whole.mp4", frames=30, extra=(*X264, "-g", "10")).read_bytes()
    damaged = bytearray(data)
    mdat = damaged.find(b"mdat")
    for at in range(mdat + 3000, mdat + 4000, 50):
        damaged[at:at + 8] = b"\xff" * 8
    return bytes(damaged)


def cut_mid_gop(work: Path, frames: int = 40, gop: int = 20) -> tuple[Path, bytes]:
    """An MPEG-TS capture (B-frames) and a copy cut after its first keyframe: the keyframe (with SPS/PPS) and the
    packet after it are gone, so nothing decodes before the next keyframe."""
    whole = work / f"gop-{frames}-{gop}.ts"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-frames:v", str(frames), *X264, "-g", str(gop),
           "-bf", "2", str(whole))
    pos = packet_positions(whole)  # file order; PAT and PMT come before the first
    data = whole.read_bytes()
    return whole, data[:pos[0]] + data[pos[2]:]


def build_corpus(src: Path, work: Path) -> None:
    """At least 15 kinds of bad input, each tiny. x264 runs with one thread where bytes are edited afterwards:
    its output (and so what an edit hits) depends on the thread count."""
    x264 = X264
    # -- what cannot be restored
    (src / "empty.mp4").write_bytes(b"")
    (src / "random bytes.mp4").write_bytes(random.Random(7).randbytes(64 * 1024))
    whole = make_clip(work / "whole.mp4", frames=30, extra=(*x264, "-g", "10"))
    data = whole.read_bytes()
    assert data.find(b"moov") > data.find(b"mdat")  # FFmpeg writes the index last: a cut loses it
    (src / "truncated.mp4").write_bytes(data[: len(data) * 2 // 3])
    (src / "corrupt packets.mp4").write_bytes(corrupt_packets(work))
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(src / "audio only.mp4"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48", "-frames:v", "1", str(src / "still.png"))
    (src / "zero frames.y4m").write_bytes(b"YUV4MPEG2 W96 H64 F25:1 Ip A1:1 C420jpeg\n")  # a header, no FRAME
    (src / "absurd 99999x99999.y4m").write_bytes(b"YUV4MPEG2 W99999 H99999 F25:1 Ip A1:1 C420jpeg\nFRAME\n"
                                                 + bytes(96 * 64 * 3 // 2))
    (src / "wide 40000x8.y4m").write_bytes(b"YUV4MPEG2 W40000 H8 F25:1 Ip A1:1 C420jpeg\nFRAME\n"
                                           + bytes(40000 * 8 * 3 // 2))
    mkv = make_clip(work / "h264.mkv", frames=20, extra=x264).read_bytes()
    assert mkv.count(b"V_MPEG4/ISO/AVC") == 1  # Matroska's codec id, replaced by one of the same length
    (src / "unknown codec.mkv").write_bytes(mkv.replace(b"V_MPEG4/ISO/AVC", b"V_REELMEND/XYZ1"))
    gop, cut = cut_mid_gop(work)
    (src / "cut mid-GOP.ts").write_bytes(cut)
    data = gop.read_bytes()
    (src / "hls playlist.mp4").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.6,\nfile://{gop}\n"
                                         "#EXT-X-ENDLIST\n")
    # -- what can
    (src / "broadcast.ts").write_bytes(data)
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=722x482:rate=25", "-frames:v", "12", "-vf",
           "format=yuv444p,crop=721:481:0:0", "-c:v", "ffv1", str(src / "odd 721x481.mkv"))
    plain = make_clip(work / "plain.mp4", frames=20, extra=x264)
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(src / "rotated.mp4"))
    # variable frame rate: 12 frames 40 ms apart, then 12 frames 100 ms apart, with sound
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-f", "lavfi", "-i", "sine=frequency=440:duration=1.7",
           "-frames:v", "24", "-vf", "settb=1/1000,setpts='if(lt(N,12),N*40,480+(N-12)*100)'", "-fps_mode",
           "passthrough", *x264, "-c:a", "aac", str(src / "vfr.mkv"))
    make_clip(src / "ten-bit.mkv", size="64x48", frames=20, extra=(*x264, "-pix_fmt", "yuv420p10le"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-f", "lavfi", "-i", "smptebars=size=64x48:rate=25",
           "-map", "0", "-map", "1", "-frames:v", "20", "-c:v", "ffv1", "-disposition:v:0", "default",
           "-disposition:v:1", "default", str(src / "two videos.mkv"))  # both default, as mkvmerge marks them
    make_clip(src / "interlaced.mkv", frames=20, extra=(*x264, "-flags", "+ilme+ildct", "-top", "1"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-frames:v", "20", *x264, "-f", "h264",
           str(src / "raw.h264"))
    for name, codec in (("xvid b-frames.avi", ("-c:v", "mpeg4", "-bf", "2", "-q:v", "4")),
                        ("h264 b-frames.avi", (*x264, "-bf", "3")),
                        ("dvd.vob", ("-c:v", "mpeg2video", "-bf", "2", "-q:v", "4", "-f", "vob"))):
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-frames:v", "40", *codec, "-g", "12",
               str(src / name))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=30000/1001", "-f", "lavfi", "-i", "sine", "-frames:v",
           "40", "-c:v", "mpeg4", "-bf", "0", "-g", "4", "-c:a", "pcm_s16le", "-shortest",
           str(src / "xvid 29.97 with audio.avi"))
    cluster = bytearray(make_clip(work / "damaged.mkv", size="160x96", frames=30, extra=(*x264, "-g", "10"))
                        .read_bytes())
    mid = len(cluster) // 2
    cluster[mid:mid + 512] = random.Random(3).randbytes(512)
    (src / "damaged cluster.mkv").write_bytes(bytes(cluster))
    for name in ("with spaces.mkv", "ünïcødé 映像.mkv", DASH_NAME, MARKUP_NAME, BACKSLASH_NAME):
        make_clip(src / name, frames=20, extra=("-c:v", "ffv1"))
    make_clip(src / "clash.mov", frames=20, extra=("-c:v", "ffv1"))
    make_clip(src / "clash.mp4", frames=20, extra=x264)
    make_clip(src / NASTY_NAME, frames=20, extra=x264)


def tree(root: Path, skip: Path) -> dict[str, str]:
    """Every file under `root` but those under `skip`, with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and skip not in p.parents}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ray_address):
    root = tmp_path_factory.mktemp("bad-inputs")
    src, work, dest = root / "src", root / "work", root / "restored"
    src.mkdir()
    work.mkdir()
    build_corpus(src, work)
    assert len(RESTORED) + len(FAILED) == len(list(src.iterdir())) >= 15
    before, cwd_before = tree(root, dest), sorted(os.listdir())
    result = runner.invoke(app, ["restore", str(src), str(dest), "--chain", "identity", "--lossless",
                                 "--chunk-frames", "10"], catch_exceptions=False)
    status = runner.invoke(app, ["status", str(dest), "--json"], catch_exceptions=False)
    return {"src": src, "dest": dest, "root": root, "result": result, "status": status,
            "before": before, "after": tree(root, dest), "cwd": (cwd_before, sorted(os.listdir()))}


def test_the_job_finishes_with_the_bad_inputs_failed_and_the_rest_done(corpus):
    result, status = corpus["result"], corpus["status"]
    assert result.exit_code == 3, result.output  # some failed, the rest done: not a crash (1)
    assert status.exit_code == 3
    videos = {v["path"]: v for v in json.loads(status.output)["videos"]}
    assert set(videos) == set(RESTORED) | set(FAILED)  # every input is named
    assert {p for p, v in videos.items() if v["status"] == "done"} == set(RESTORED)
    assert {p for p, v in videos.items() if v["status"] == "failed"} == set(FAILED)
    assert MARKUP_NAME in " ".join(result.output.split())  # names print as they are


@pytest.mark.parametrize("name", sorted(RESTORED))
def test_restorable_inputs_come_back_frame_exact(corpus, name):
    source, out = corpus["src"] / name, corpus["dest"] / RESTORED[name]
    assert out.is_file()
    deep = name == "ten-bit.mkv"
    a, b = frames_of(source, "rgb48le" if deep else "rgb24"), frames_of(out, "rgb48le" if deep else "rgb24")
    assert len(b) == probe(str(source)).n_frames  # every frame the probe counted, none made up
    if deep:  # the output holds 10 bits per RGB channel (gbrp10le): all of them equal the source's
        a, b = a >> 6, b >> 6
    assert a.shape == b.shape and np.array_equal(a, b)  # lossless identity: the source's frames, in order


def video_times(path) -> list[float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    return [float(line.strip(",")) for line in out.split()]


def test_awkward_properties_are_kept(corpus):
    src, dest = corpus["src"], corpus["dest"]
    assert frames_of(dest / "odd 721x481.mkv").shape == (12, 481, 721, 3)
    # Matroska (FFV1 cannot go in MP4) in FFmpeg 5.1 has no display matrix: the rotation is kept as a tag
    assert probe(str(dest / "rotated.mkv")).rotation == 90
    assert probe_stream(dest / "interlaced.mkv", "field_order")["field_order"] == "tt"  # fields as stored
    assert probe_stream(dest / "ten-bit.mkv", "pix_fmt")["pix_fmt"] == "gbrp10le"
    # every frame at its source time (Matroska counts milliseconds), so the copied sound stays in sync throughout
    vfr_in, vfr_out = (video_times(p) for p in (src / "vfr.mkv", dest / "vfr.mkv"))
    assert len(vfr_out) == len(vfr_in) == 24
    assert max(abs((a - vfr_in[0]) - (b - vfr_out[0])) for a, b in zip(vfr_in, vfr_out)) <= 0.0015, vfr_out
    assert stream_hashes(dest / "vfr.mkv", "0:a") == stream_hashes(src / "vfr.mkv", "0:a")
    streams = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json",
                                         str(dest / "two videos.mkv")], capture_output=True, text=True).stdout)
    # the first, default stream restored; the second carried as it was, packet for packet
    assert [(s["codec_type"], s["width"]) for s in streams["streams"]] == [("video", 96), ("video", 64)]
    assert streams["streams"][0]["disposition"]["default"] == 1  # the restored one is what players open
    assert stream_hashes(dest / "two videos.mkv", "0:v:1") == stream_hashes(src / "two videos.mkv", "0:v:1")


def manifest_reasons(dest: Path) -> dict[str, list[str]]:
    """rel_path -> every failure reason the manifest holds for it (the plan's, then each failed event's)."""
    (job,) = (dest / "_reelmend").iterdir()
    plan = pq.read_table(job / "plan").to_pylist()
    events = pq.read_table(job / "events").to_pylist()
    paths = {r["video_id"]: r["rel_path"] for r in plan}
    reasons: dict[str, list[str]] = {}
    for row in plan:
        if row["error"]:
            reasons.setdefault(row["rel_path"], []).append(row["error"])
    for e in events:
        if e["status"] == "failed":
            reasons.setdefault(paths[e["video_id"]], []).append(e["error_message"])
    return reasons


@pytest.mark.parametrize("name", sorted(FAILED))
def test_unrestorable_inputs_fail_alone_with_a_one_line_reason(corpus, name):
    dest = corpus["dest"]
    reasons = manifest_reasons(dest).get(name)
    assert reasons and all(r and "\n" not in r for r in reasons), reasons
    video = next(v for v in json.loads(corpus["status"].output)["videos"] if v["path"] == name)
    assert video["status"] == "failed" and "\n" not in video["reason"]
    assert re.search(FAILED[name], video["reason"]), video["reason"]
    assert " @ 0x" not in video["reason"]  # FFmpeg's log context is noise to a user
    stem = Path(name).stem
    assert not [p for p in dest.rglob("*") if p.is_file() and p.stem == stem and "_reelmend" not in p.parts
                and p.name not in RESTORED.values()]


def test_nothing_is_written_outside_dest(corpus):
    assert corpus["after"] == corpus["before"]  # the sources and everything beside DEST unchanged
    assert corpus["cwd"][0] == corpus["cwd"][1] and not Path("x").exists()  # no shell ran `touch x`
    dest = corpus["dest"]
    outputs = [str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and "_reelmend" not in p.parts]
    assert sorted(outputs) == sorted(RESTORED.values())
    assert not [p for p in (dest / "_reelmend").rglob("*") if p.name.startswith(".staging-")]


def test_object_keys_with_dot_dot_parts_are_refused(tmp_path):
    """Plan level: a key with a '..' part never gets an output path, even one that stays inside DEST."""
    clip = make_clip(tmp_path / "in" / "c.mkv", frames=4, extra=("-c:v", "ffv1"))
    info = probe(str(clip))
    spec = JobSpec(src="s3://archive/raw", dest=str(tmp_path / "out"))
    # the listing gives the part below SRC literally (storage.list_files): a key's '..' stays in it
    for key, rel in (("raw/a/../../escape.mkv", "a/../../escape.mkv"), ("raw/x/../inside.mkv", "x/../inside.mkv")):
        with pytest.raises(ValueError, match=r"'\.\.' part"):
            plan_video(spec, "job-x", f"s3://archive/{key}", rel, info, (0, 0))
        assert failed_video_row("job-x", f"s3://archive/{key}", rel, "why", spec.dest)["output_uri"] == ""
    assert plan_video(spec, "job-x", "s3://archive/raw/a..b.mkv", "a..b.mkv", info, (0, 0))  # '..' in a name is fine
    # SRC itself may be spelled with '..' (`reelmend restore ../raw out`): only the part below SRC counts
    assert plan_video(spec, "job-x", "/home/me/../raw/c.mkv", "c.mkv", info, (0, 0))


def test_a_bucket_with_escaping_keys_restores_the_rest_inside_dest(tmp_path, s3, ray_address):
    """Object stores hold keys a folder cannot ("raw/a/../../escape.mkv"): those fail alone, nothing is written
    outside DEST, and the ordinary object is restored."""
    clip = make_clip(tmp_path / "work" / "c.mkv", frames=12, extra=("-c:v", "ffv1"))
    fs = fsspec.filesystem("s3")
    bucket = f"dots-{os.getpid()}"
    fs.mkdir(bucket)
    keys = ("raw/ok.mkv", "raw/a/../../escape.mkv", "raw/../../../evil.mkv")
    for key in keys:
        fs.put_file(str(clip), f"{bucket}/{key}")
    dest = tmp_path / "deep" / "restored"
    before = tree(tmp_path, dest)
    result = runner.invoke(app, ["restore", f"s3://{bucket}/raw", str(dest), "--chain", "identity", "--lossless"],
                           catch_exceptions=False)
    assert result.exit_code == 3, result.output
    assert tree(tmp_path, dest) == before  # nothing outside DEST (DEST/../escape.mkv would be in tmp_path)
    assert not (tmp_path / "deep" / "escape.mkv").exists() and not (tmp_path.parent / "evil.mkv").exists()
    assert sorted(p.name for p in dest.iterdir() if p.is_file()) == ["ok.mkv"]
    assert np.array_equal(frames_of(dest / "ok.mkv"), frames_of(clip))
    status = runner.invoke(app, ["status", str(dest), "--json"], catch_exceptions=False)
    videos = {v["path"]: v for v in json.loads(status.output)["videos"]}
    assert videos["ok.mkv"]["status"] == "done"
    failed = [v for v in videos.values() if v["status"] == "failed"]
    assert len(failed) == 2
    for v in failed:
        assert "'..' part" in v["reason"] and "\n" not in v["reason"] and v["output"] == ""
    (job,) = (dest / "_reelmend").iterdir()
    plan = pq.read_table(io.BytesIO((job / "plan" / "part-00000.parquet").read_bytes())).to_pylist()
    assert {r["source_uri"] for r in plan if r["error"]} == {f"s3://{bucket}/{k}" for k in keys[1:]}


def decodable(path: Path) -> tuple[np.ndarray, list[int]]:
    """The frames FFmpeg can decode from a damaged file, and where each belongs: its index among the frames the
    packets promise (by presentation time)."""
    promised = sorted(t for t in (float(x.strip(",")) for x in subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time", "-of", "csv=p=0",
         str(path)], capture_output=True, text=True, check=True).stdout.split()))
    got = video_times(path)
    return frames_of(path), [min(range(len(promised)), key=lambda k: abs(promised[k] - t)) for t in got]


def test_conceal_damage_keeps_every_decodable_frame_in_its_place(tmp_path, ray_address):
    src, work, dest = tmp_path / "in", tmp_path / "work", tmp_path / "out"
    src.mkdir()
    work.mkdir()
    (src / "corrupt packets.mp4").write_bytes(corrupt_packets(work))
    (src / "cut mid-GOP.ts").write_bytes(cut_mid_gop(work)[1])
    # one GOP of 30 frames whose packets 4 to 23 have their headers overwritten: the decoder rejects them, and
    # the frames after them, which refer to them
    data = bytearray(make_clip(work / "one gop.mp4", frames=30, extra=(*X264, "-g", "30")).read_bytes())
    for at in packet_positions(work / "one gop.mp4")[4:24]:
        data[at:at + 8] = b"\xff" * 8
    (src / "mostly lost.mp4").write_bytes(bytes(data))
    result = runner.invoke(app, ["restore", str(src), str(dest), "--chain", "identity", "--lossless",
                                 "--chunk-frames", "10", "--conceal-damage"], catch_exceptions=False)
    assert result.exit_code == 3, result.output
    status = runner.invoke(app, ["status", str(dest), "--json"], catch_exceptions=False)
    videos = {v["path"]: v for v in json.loads(status.output)["videos"]}

    lost = videos["mostly lost.mp4"]  # four frames repeated throughout would not be a restoration: it fails
    assert lost["status"] == "failed" and re.search(r"^undecodable: 26 of its 30 frames could not be decoded",
                                                    lost["reason"]), lost
    assert not (dest / "mostly lost.mkv").exists()

    for name, out, concealed in (("corrupt packets.mp4", "corrupt packets.mkv", 2),
                                 ("cut mid-GOP.ts", "cut mid-GOP.mkv", 18)):
        video = videos[name]
        assert video["status"] == "done" and video["frames_concealed"] == concealed, video
        assert f"{concealed} frame(s) concealed" in video["reason"]
        restored = frames_of(dest / out)
        assert len(restored) == probe(str(src / name)).n_frames  # the frame count, and so the timing, kept
        frames, places = decodable(src / name)
        assert len(frames) == len(restored) - concealed
        for frame, place in zip(frames, places):  # each decodable frame exactly where it belongs
            assert np.array_equal(restored[place], frame), (name, place)
        for k in sorted(set(range(len(restored))) - set(places)):  # the others repeat a neighbour (or are black)
            assert any(np.array_equal(restored[k], restored[j]) for j in (k - 1, k + 1) if 0 <= j < len(restored)) \
                or not restored[k].any(), (name, k)
    (job,) = (dest / "_reelmend").iterdir()
    notes = [e["error_message"] for e in pq.read_table(job / "events").to_pylist() if e["error_kind"] == "concealed"]
    assert any("could not be decoded and repeat a neighbour: frame(s) 6, 7" in n for n in notes), notes
