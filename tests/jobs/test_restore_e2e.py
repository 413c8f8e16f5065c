"""End to end through the CLI on real footage and FFmpeg-made sources, on the session's real Ray instance."""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import decode, ffmpeg, make_clip, probe_stream, psnr, stream_hashes, write_tiny_weights
from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def duration(path: Path) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return float(out)


def only_job(dest: Path) -> Path:
    (job,) = (dest / "_reelmend").iterdir()
    return job


@pytest.fixture(scope="module")
def archive(tmp_path_factory, clips, ray_address):
    """bikes.mp4 and bigbuckbunny.mp4 (with audio) in a nested layout, a 10-bit FFmpeg source, a text file,
    restored once with identity in lossless mode and chunks small enough for at least 4 per video."""
    src = tmp_path_factory.mktemp("archive")
    (src / "street").mkdir()
    (src / "street" / "bikes.mp4").write_bytes((clips / "bikes.mp4").read_bytes())
    (src / "bunny with spaces.mp4").write_bytes((clips / "bigbuckbunny.mp4").read_bytes())
    make_clip(src / "deep" / "ten-bit.mkv", size="64x48", frames=30,
              extra=("-c:v", "libx264", "-pix_fmt", "yuv420p10le", "-crf", "10"))
    (src / "notes.txt").write_text("not a video\n")
    # subtitles, chapters and global metadata that must survive the restore untouched
    work = src.parent / "work"
    make_clip(work / "clip.mkv", size="64x48", frames=50, extra=("-c:v", "ffv1"))
    (work / "subs.srt").write_text("1\n00:00:00,500 --> 00:00:01,500\nHello archive\n")
    (work / "meta.txt").write_text(";FFMETADATA1\ntitle=Reel 7\n[CHAPTER]\nTIMEBASE=1/1000\nSTART=0\nEND=1000\n"
                                   "title=Opening\n[CHAPTER]\nTIMEBASE=1/1000\nSTART=1000\nEND=2000\ntitle=End\n")
    ffmpeg("-i", str(work / "clip.mkv"), "-i", str(work / "subs.srt"), "-i", str(work / "meta.txt"),
           "-map", "0", "-map", "1", "-map_metadata", "2", "-map_chapters", "2", "-c", "copy",
           "-metadata:s:s:0", "language=fra", str(src / "with subtitles.mkv"))
    dest = src.parent / "restored"
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "30")
    return src, dest, result


def test_identity_lossless_matches_every_source_frame(archive):
    src, dest, result = archive
    assert result.exit_code == 3, result.output  # notes.txt failed, everything else done
    for rel in ("street/bikes.mkv", "bunny with spaces.mkv"):
        source = decode(src / rel.replace(".mkv", ".mp4"))
        restored = decode(dest / rel)
        assert restored.shape == source.shape
        # frame by frame: an off-by-one at a chunk boundary would drop PSNR far below this
        assert min(psnr(a, b) for a, b in zip(source, restored)) >= 45


def test_audio_is_copied_packet_for_packet_and_duration_holds(archive):
    src, dest, _ = archive
    source, restored = src / "bunny with spaces.mp4", dest / "bunny with spaces.mkv"
    assert stream_hashes(restored, "0:a") == stream_hashes(source, "0:a")
    s, r = probe_stream(source, "duration,nb_read_packets"), probe_stream(restored, "nb_read_packets")
    assert int(r["nb_read_packets"]) == int(s["nb_read_packets"])
    assert abs(duration(restored) - duration(source)) <= 1 / 25  # within one frame


def test_subtitles_chapters_and_metadata_are_kept(archive):
    src, dest, _ = archive
    show = ["ffprobe", "-v", "error", "-show_chapters", "-show_streams", "-show_format", "-of", "json"]
    a, b = (json.loads(subprocess.run([*show, str(d / "with subtitles.mkv")], capture_output=True, text=True,
                                      check=True).stdout) for d in (src, dest))
    assert [c["tags"]["title"] for c in b["chapters"]] == ["Opening", "End"]
    assert b["format"]["tags"]["title"] == "Reel 7"
    subs = [s for s in b["streams"] if s["codec_type"] == "subtitle"]
    assert len(subs) == 1 and subs[0]["tags"]["language"] == "fra"
    assert stream_hashes(dest / "with subtitles.mkv", "0:s") == stream_hashes(src / "with subtitles.mkv", "0:s")
    assert len(a["chapters"]) == 2


def test_ten_bit_source_stays_ten_bit(archive):
    src, dest, _ = archive
    out = probe_stream(dest / "deep" / "ten-bit.mkv", "pix_fmt")
    assert out["pix_fmt"].endswith("10le")
    a, b = decode(src / "deep" / "ten-bit.mkv", "rgb48le"), decode(dest / "deep" / "ten-bit.mkv", "rgb48le")
    assert a.shape == b.shape and psnr(a, b, 65535.0) >= 45


def test_manifest_reads_back_with_plain_pyarrow(archive):
    _, dest, _ = archive
    job = only_job(dest)
    plan = pq.read_table(job / "plan").to_pylist()
    events = pq.read_table(job / "events").to_pylist()
    per_video = {}
    for row in plan:
        per_video.setdefault(row["rel_path"], []).append(row)
    assert len(per_video["street/bikes.mp4"]) >= 4 and len(per_video["bunny with spaces.mp4"]) >= 4
    bikes = sorted(per_video["street/bikes.mp4"], key=lambda r: r["chunk_index"])
    assert [r["frame_start"] for r in bikes] == list(range(0, 250, 30))
    assert bikes[-1]["frame_end"] == 250
    done = [e for e in events if e["status"] == "done" and e["chunk_index"] >= 0]
    assert len(done) == sum(len(v) for k, v in per_video.items() if k != "notes.txt")
    assert json.loads((job / "job.json").read_text())["chain"] == ["identity"]


def test_status_names_the_failed_input_with_its_reason(archive):
    _, dest, _ = archive
    result = cli("status", str(dest), "--json")
    assert result.exit_code == 3
    videos = {v["path"]: v for v in json.loads(result.output)["videos"]}
    assert videos["notes.txt"]["status"] == "failed"
    assert "not a readable media file" in videos["notes.txt"]["reason"] or "no decodable" in videos["notes.txt"]["reason"]
    assert {videos[p]["status"] for p in ("street/bikes.mp4", "bunny with spaces.mp4", "deep/ten-bit.mkv",
                                          "with subtitles.mkv")} == {"done"}


def test_status_of_a_large_job_shows_the_failed_first_and_filters(archive):
    _, dest, _ = archive
    table = runner.invoke(app, ["status", str(dest), "--limit", "1"], env={"COLUMNS": "250"})
    assert table.exit_code == 3
    text = " ".join(table.output.split())
    assert "notes.txt" in text and "bikes.mp4" not in text  # the failed one, though the plan lists it later
    assert "showing 1 of 5 video(s), failed first" in text and "1 failed" in text and "4 done" in text
    failed = json.loads(cli("status", str(dest), "--json", "--state", "failed").output)["videos"]
    assert [v["path"] for v in failed] == ["notes.txt"]
    done = json.loads(cli("status", str(dest), "--json", "--state", "done", "--state", "pending").output)["videos"]
    assert len(done) == 4
    assert cli("status", str(dest), "--state", "lost").exit_code == 2


def test_rerun_resumes_and_redoes_nothing(archive):
    src, dest, _ = archive
    job = only_job(dest)
    before = len(list((job / "events").iterdir()))
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "30")
    assert result.exit_code == 3
    events = pq.read_table(job / "events").to_pylist()
    assert len(list((job / "events").iterdir())) == before  # nothing was left to do: no new events
    assert sum(e["status"] == "running" for e in events) == sum(e["status"] == "done" and e["chunk_index"] >= 0
                                                                   for e in events)


def test_default_encode_is_h264_and_keeps_colour_rotation_and_extra_streams(tmp_path, clips, ray_address):
    src = tmp_path / "in"
    src.mkdir()
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "50", "-vf", "scale=160:68", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace", "bt709",
           str(src / "tagged.mp4"))
    ffmpeg("-i", str(src / "tagged.mp4"), "-c", "copy", "-metadata:s:v:0", "rotate=270", str(src / "phone.mp4"))
    # variable frame rate: 20 frames 40 ms apart, then 20 frames 80 ms apart
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-frames:v", "40", "-vf",
           "settb=1/1000,setpts='if(lt(N,20),N*40,800+(N-20)*80)'", "-fps_mode", "passthrough", "-c:v", "libx264",
           str(src / "vfr.mkv"))
    # QuickTime with a second video stream (a picture-in-picture) and a timecode track; MP4 with cover art
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25:duration=0.8", "-f", "lavfi", "-i",
           "smptebars=size=64x48:rate=25:duration=0.8", "-map", "0", "-map", "1", "-c:v", "libx264",
           "-timecode", "01:02:03:04", str(src / "extras.mov"))
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25", "-f", "lavfi", "-i", "smptebars=size=64x48",
           "-map", "0", "-map", "1", "-frames:v:0", "20", "-frames:v:1", "1", "-c:v:0", "libx264", "-c:v:1", "mjpeg",
           "-disposition:v:1", "attached_pic", str(src / "cover.mp4"))
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), "--chunk-frames", "12")
    assert result.exit_code == 0, result.output
    rotated = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json",
                                         str(dest / "phone.mp4")], capture_output=True, text=True).stdout)
    assert rotated["streams"][0]["side_data_list"][0]["rotation"] == -90  # the phone's 270 degrees, kept
    vfr_in, vfr_out = probe_stream(src / "vfr.mkv", "nb_read_packets"), probe_stream(dest / "vfr.mkv", "nb_read_packets,avg_frame_rate")
    assert vfr_out["nb_read_packets"] == vfr_in["nb_read_packets"] == "40"
    assert abs(duration(dest / "vfr.mkv") - duration(src / "vfr.mkv")) <= 1 / float(Fraction(vfr_out["avg_frame_rate"]))
    out = probe_stream(dest / "tagged.mp4", "codec_name,nb_read_packets,color_space,color_primaries,pix_fmt")
    assert out["codec_name"] == "h264" and out["nb_read_packets"] == "50" and out["pix_fmt"] == "yuv420p"
    assert out["color_space"] == "bt709" and out["color_primaries"] == "bt709"
    # CRF 18 of the same frames (RGB processing clips out-of-gamut YUV, so not the ~45 dB of a YUV re-encode)
    assert psnr(decode(src / "tagged.mp4"), decode(dest / "tagged.mp4")) > 35
    assert not list((only_job(dest) / "segments").rglob("*.mkv"))  # segments are cleaned after the stitch

    # extra streams come through untouched, in the source's container: the second video packet for packet, the
    # timecode (the MOV muxer rebuilds its track from the video's tag), the cover art still cover art (in MP4)
    extras = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json",
                                        str(dest / "extras.mov")], capture_output=True, text=True).stdout)["streams"]
    assert [(s["codec_type"], s.get("width")) for s in extras[:2]] == [("video", 96), ("video", 64)]
    timecodes = [s for s in extras[2:] if s["codec_type"] == "data"]  # one per video stream, as in the source
    assert timecodes and all(s["tags"]["timecode"] == "01:02:03:04" for s in extras[:1] + timecodes)
    assert stream_hashes(dest / "extras.mov", "0:v:1") == stream_hashes(src / "extras.mov", "0:v:1")
    cover = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json",
                                       str(dest / "cover.mp4")], capture_output=True, text=True).stdout)["streams"]
    assert [(s["codec_name"], s["disposition"]["attached_pic"]) for s in cover] == [("h264", 0), ("mjpeg", 1)]
    assert stream_hashes(dest / "cover.mp4", "0:v:1") == stream_hashes(src / "cover.mp4", "0:v:1")


def test_sr2x_doubles_both_sides(tmp_path, ray_address):
    src = make_clip(tmp_path / "in" / "small.mkv", size="48x32", frames=24, extra=("-c:v", "ffv1"))
    weights = write_tiny_weights(tmp_path / "weights", "sr2x", perturb=0.05)
    dest = tmp_path / "out"
    result = cli("restore", str(src.parent), str(dest), "--chain", "sr2x", "--models", str(weights),
                 "--lossless", "--chunk-frames", "6")
    assert result.exit_code == 0, result.output
    frames = decode(dest / "small.mkv")
    assert frames.shape == (24, 64, 96, 3)


def test_interp2x_doubles_frames_and_keeps_source_frames(tmp_path, ray_address):
    src = make_clip(tmp_path / "in" / "motion.mkv", size="64x48", frames=25, extra=("-c:v", "ffv1"))
    # A fresh FlowInterp without its block-matching prior predicts zero flow and an even blend: the midpoint is
    # the average of its neighbours, which pins down which source frames each output frame came from, across
    # chunk boundaries too.
    weights = write_tiny_weights(tmp_path / "weights", "interp2x", args={"search": 0})
    dest = tmp_path / "out"
    result = cli("restore", str(src.parent), str(dest), "--chain", "interp2x", "--models", str(weights),
                 "--lossless", "--chunk-frames", "6")
    assert result.exit_code == 0, result.output
    source, out = decode(src), decode(dest / "motion.mkv")
    assert len(out) == 2 * len(source)
    assert np.array_equal(out[0::2], source)
    mid = (source[:-1].astype(np.int16) + source[1:]) / 2
    assert np.abs(out[1:-1:2] - mid).max() <= 1.0
    assert np.array_equal(out[-1], source[-1])
    rate = probe_stream(dest / "motion.mkv", "avg_frame_rate")["avg_frame_rate"]
    assert Fraction(rate) == 50


def test_temporal_context_makes_chunking_invisible(tmp_path, ray_address):
    """descratch reads neighbours and interp2x the next frame: chunked output must equal one-chunk output."""
    src = make_clip(tmp_path / "in" / "clip.mkv", size="48x32", frames=20, extra=("-c:v", "ffv1"))
    weights = tmp_path / "weights"
    write_tiny_weights(weights, "descratch", perturb=0.1)
    write_tiny_weights(weights, "interp2x", perturb=0.02)
    outs = []
    for chunk in ("5", "20"):
        dest = tmp_path / f"out{chunk}"
        result = cli("restore", str(src.parent), str(dest), "--chain", "descratch,interp2x", "--models",
                     str(weights), "--lossless", "--chunk-frames", chunk)
        assert result.exit_code == 0, result.output
        outs.append(decode(dest / "clip.mkv"))
    assert outs[0].shape == (40, 32, 48, 3)
    # equal up to float rounding between batch sizes; a context error changes frames by far more
    assert np.abs(outs[0].astype(int) - outs[1]).max() <= 1


def test_rgb_source_restores_lossless_and_encoded(tmp_path, ray_address):
    """A planar-RGB source (FFV1 gbrp, as scans and evaluation files are) declares the identity matrix "gbr",
    which no encoder accepts as a colour tag: both outputs must still be written, the lossless one bit-exact."""
    src = make_clip(tmp_path / "in" / "rgb.mkv", size="64x48", frames=12, extra=("-c:v", "ffv1", "-pix_fmt", "gbrp"))
    for extra, out in ((["--lossless"], "lossless"), ([], "h264")):
        result = cli("restore", str(src.parent), str(tmp_path / out), "--chain", "identity", *extra)
        assert result.exit_code == 0, result.output
    assert np.array_equal(decode(tmp_path / "lossless" / "rgb.mkv"), decode(src))
    # The H.264 output is 4:2:0: on testsrc2's saturated colour edges at 64x48 that alone costs RGB PSNR (24 dB,
    # as a plain `ffmpeg -c:v libx264 -pix_fmt yuv420p` gets too), so compare luma, which a wrong matrix would shift.
    luma = np.array([0.2126, 0.7152, 0.0722])
    assert psnr(decode(tmp_path / "h264" / "rgb.mkv") @ luma, decode(src) @ luma) > 35


def test_include_and_exclude_pick_the_inputs_and_make_their_own_job(tmp_path, ray_address):
    """A bucket holds sidecars and thumbnails beside its videos: they are left out, not failed."""
    src = tmp_path / "in"
    make_clip(src / "reel 1.MOV", frames=12, extra=("-c:v", "ffv1"))
    make_clip(src / "day 2" / "reel 2.mp4", frames=12, extra=("-c:v", "libx264"))
    make_clip(src / "thumbnails" / "reel 1.mp4", frames=1, extra=("-c:v", "libx264"))
    (src / "reel 1.json").write_text('{"shelf": "B7"}')
    args = ("--chain", "identity", "--lossless")

    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), *args, "--exclude", "*.json", "--exclude", "thumbnails/*")
    assert result.exit_code == 0, result.output
    videos = json.loads(cli("status", str(dest), "--json").output)["videos"]
    assert sorted(v["path"] for v in videos) == ["day 2/reel 2.mp4", "reel 1.MOV"]
    assert (dest / "reel 1.mkv").is_file() and not (dest / "thumbnails").exists()

    only_mov = tmp_path / "mov"
    assert cli("restore", str(src), str(only_mov), *args, "--include", "*.mov").exit_code == 0  # case ignored
    assert [v["path"] for v in json.loads(cli("status", str(only_mov), "--json").output)["videos"]] == ["reel 1.MOV"]

    # the selection is part of the job: another one over the same DEST is another job, not a resume of this one
    again = cli("restore", str(src), str(only_mov), *args, "--include", "*.mov", "--include", "*.mp4")
    assert again.exit_code == 0, again.output
    assert len(list((only_mov / "_reelmend").iterdir())) == 2 and (only_mov / "thumbnails" / "reel 1.mkv").is_file()

    nothing = cli("restore", str(src), str(tmp_path / "none"), *args, "--include", "*.avi")
    assert nothing.exit_code == 2 and "none of the 4 file(s)" in nothing.output


def whole_file_bwdif(path: Path, parity: str | None, size: tuple[int, int], mode: str = "send_frame") -> np.ndarray:
    """Every frame of `path`, deinterlaced by bwdif in one pass over the whole file (parity None: as stored;
    mode send_field: a frame of each field)."""
    deint = f"bwdif=mode={mode}:parity={parity}:deint=all," if parity else ""
    raw = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vf",
         f"{deint}scale=flags=accurate_rnd+full_chroma_int", "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"],
        capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, size[1], size[0], 3)


@pytest.mark.parametrize("order, name", [("tff", "tape.mkv"), ("bff", "tape.mkv"),
                                         ("bff", "broadcast.ts")])  # (the TS stream says "tt"; its frames, bff)
def test_deinterlace_gives_the_frames_of_a_whole_video_deinterlace_across_chunks(tmp_path, ray_address, order,
                                                                                 name):
    """Interlaced sources become progressive before the chain, each frame exactly as FFmpeg's bwdif over the
    whole file gives it in the field order the frames say, though every chunk is decoded on its own; progressive
    ones are untouched."""
    src = tmp_path / "in"
    top = "1" if order == "tff" else "0"
    make_clip(src / name, frames=23, extra=("-c:v", "libx264", "-flags", "+ilme+ildct", "-top", top))
    make_clip(src / "progressive.mkv", frames=12, extra=("-c:v", "ffv1"))
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "5",
                 "--deinterlace")
    assert result.exit_code == 0, result.output
    out = dest / (Path(name).stem + ".mkv")
    restored = decode(out)
    assert len(restored) == 23 and np.array_equal(restored, whole_file_bwdif(src / name, order, (96, 64)))
    assert not np.array_equal(restored, whole_file_bwdif(src / name, None, (96, 64)))  # (it did deinterlace)
    assert probe_stream(out, "field_order")["field_order"] == "progressive"
    assert np.array_equal(decode(dest / "progressive.mkv"), decode(src / "progressive.mkv"))


def test_double_rate_makes_a_frame_of_each_field_across_chunks_and_through_temporal_stages(tmp_path, ray_address):
    """--double-rate: 23 interlaced frames at 25 fps become 46 progressive ones at 50 fps, each as bwdif's
    send_field over the whole file gives it, though chunks are decoded apart; a windowed stage over them comes
    out the same chunked or not; a progressive file beside them is untouched."""
    src = tmp_path / "in"
    make_clip(src / "tape.mkv", frames=23, extra=("-c:v", "libx264", "-flags", "+ilme+ildct", "-top", "1"))
    make_clip(src / "progressive.mkv", frames=12, extra=("-c:v", "ffv1"))
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "5",
                 "--deinterlace", "--double-rate")
    assert result.exit_code == 0, result.output
    restored = decode(dest / "tape.mkv")
    assert len(restored) == 46 and np.array_equal(restored, whole_file_bwdif(src / "tape.mkv", "tff", (96, 64),
                                                                           "send_field"))
    out = probe_stream(dest / "tape.mkv", "r_frame_rate,field_order")
    assert out["r_frame_rate"] == "50/1" and out["field_order"] == "progressive"
    assert np.array_equal(decode(dest / "progressive.mkv"), decode(src / "progressive.mkv"))

    weights = write_tiny_weights(tmp_path / "weights", "descratch", perturb=0.1)  # reads a window of frames
    outs = []
    for chunk in ("5", "23"):
        result = cli("restore", str(src), str(tmp_path / f"w{chunk}"), "--chain", "descratch", "--models",
                     str(weights), "--lossless", "--chunk-frames", chunk, "--deinterlace", "--double-rate",
                     "--include", "tape.mkv")
        assert result.exit_code == 0, result.output
        outs.append(decode(tmp_path / f"w{chunk}" / "tape.mkv"))
    assert outs[0].shape == (46, 64, 96, 3) and np.abs(outs[0].astype(int) - outs[1]).max() <= 1

    refused = cli("restore", str(src), str(tmp_path / "x"), "--double-rate")
    assert refused.exit_code == 2 and "give both" in refused.output


def test_deinterlace_finds_dv_interlaced_though_its_container_says_nothing(tmp_path, ray_address):
    from pipeline.probe import probe

    src = tmp_path / "in"
    make_clip(src / "camcorder.avi", size="720x576", frames=11, extra=("-c:v", "dvvideo", "-pix_fmt", "yuv420p"))
    info = probe(str(src / "camcorder.avi"), fields=True)
    assert info.field_order is None and info.parity == "bff"  # from the frames' own flags
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "4",
                 "--deinterlace")
    assert result.exit_code == 0, result.output
    assert np.array_equal(decode(dest / "camcorder.mkv"), whole_file_bwdif(src / "camcorder.avi", "bff", (720, 576)))
