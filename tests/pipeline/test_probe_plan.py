"""Probing real and FFmpeg-made files, and planning frame-exact chunks from the probe."""

from __future__ import annotations

import pytest
from conftest import ffmpeg, make_clip

from models.geometry import chain_geometry, parse_chain
from pipeline.config import JobSpec
from pipeline.ffmpeg import carries as ffmpeg_carries
from pipeline.plan import output_name, plan_video
from pipeline.probe import OtherStream, ProbeError, probe


def test_probe_real_clip_with_audio(clips):
    info = probe(str(clips / "bigbuckbunny.mp4"))
    assert (info.width, info.height, info.n_frames, info.fps_num, info.fps_den) == (1280, 720, 132, 25, 1)
    assert (info.bit_depth, info.chroma, info.vfr, info.rotation) == (8, "420", False, 0)
    assert [(s.kind, s.codec) for s in info.streams] == [("audio", "aac")]
    assert len(info.frame_times) == 132 and info.frame_times[1] == pytest.approx(0.04)


def test_probe_counts_frames_when_the_container_does_not_say(tmp_path):
    # Matroska stores no frame count: it must come from the packets.
    clip = make_clip(tmp_path / "c.mkv", frames=37, extra=("-c:v", "libx264", "-pix_fmt", "yuv422p10le"))
    info = probe(str(clip))
    assert (info.n_frames, info.bit_depth, info.chroma) == (37, 10, "422")


def test_probe_detects_variable_frame_rate_and_rotation(tmp_path):
    vfr = tmp_path / "vfr.mkv"
    # 20 frames 40 ms apart, then 20 frames 80 ms apart
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25", "-frames:v", "40", "-vf",
           "settb=1/1000,setpts='if(lt(N,20),N*40,800+(N-20)*80)'", "-fps_mode", "passthrough", "-c:v", "ffv1",
           str(vfr))
    info = probe(str(vfr))
    assert info.vfr and info.n_frames == 40
    assert float(info.fps) == pytest.approx(39 / (0.8 + 19 * 0.08), rel=1e-3)  # same frames, same duration

    plain = make_clip(tmp_path / "plain.mp4", frames=5, extra=("-c:v", "libx264"))
    rotated = tmp_path / "rot.mp4"
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=270", str(rotated))  # a phone's portrait
    assert probe(str(rotated)).rotation == 270 and probe(str(plain)).rotation == 0


def test_probe_refuses_what_is_not_a_video(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ProbeError, match="not a readable media file"):
        probe(str(tmp_path / "notes.txt"))
    audio = tmp_path / "tone.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(audio))
    with pytest.raises(ProbeError, match="no decodable video stream"):
        probe(str(audio))


def test_chain_geometry_accumulates_context():
    assert chain_geometry(parse_chain("identity")) == (1, 1, (0, 0))
    assert chain_geometry(parse_chain("sr2x,sr4x")) == (8, 1, (0, 0))
    assert chain_geometry(parse_chain("deblock,sr2x,sr4x")) == (8, 1, (2, 2))
    assert chain_geometry(parse_chain("denoise,sr2x,sr4x")) == (8, 1, (4, 4))  # nine-frame windows
    assert chain_geometry(parse_chain("denoise,descratch")) == (1, 1, (5, 5))
    assert chain_geometry(parse_chain("descratch")) == (1, 1, (1, 1))
    assert chain_geometry(parse_chain("interp2x")) == (1, 2, (0, 1))
    # descratch after interpolation needs one interpolated frame each side: one more source frame after
    assert chain_geometry(parse_chain("interp2x,descratch")) == (1, 2, (1, 2))
    assert chain_geometry(parse_chain("descratch,interp2x:gan")) == (1, 2, (1, 2))
    with pytest.raises(ValueError, match="unknown stage 'sr3x'"):
        parse_chain("denoise,sr3x")


def test_plan_covers_every_frame_once_with_context(clips, tmp_path):
    info = probe(str(clips / "bikes.mp4"))
    spec = JobSpec(src=str(tmp_path / "in"), dest=str(tmp_path / "out"), chain="descratch,interp2x",
                   chunk_frames=40)
    rows = plan_video(spec, "job-x", str(clips / "bikes.mp4"), "a/bikes.mp4", info, (1, 2))
    assert [(r["frame_start"], r["frame_end"]) for r in rows] == [(i, min(i + 40, 250)) for i in range(0, 250, 40)]
    assert rows[0]["decode_start"] == 0 and rows[0]["decode_end"] == 42
    assert rows[3]["decode_start"] == 119 and rows[3]["decode_end"] == 162
    assert rows[-1]["decode_end"] == 250
    t = info.frame_times
    assert t[118] < rows[3]["seek_time"] + info.start_time < t[119]
    assert rows[0]["output_uri"].endswith("/out/a/bikes.mp4") and rows[0]["out_format"] == "mp4"
    assert {r["n_chunks"] for r in rows} == {7}


def test_default_chunks_are_about_two_seconds(clips, tmp_path):
    info = probe(str(clips / "bikes.mp4"))
    spec = JobSpec(src=str(tmp_path / "in"), dest=str(tmp_path / "out"), encode={"lossless": True})
    rows = plan_video(spec, "job-x", "x", "bikes.mp4", info, (0, 0))
    assert rows[0]["frame_end"] == 50 and len(rows) == 5
    assert rows[0]["output_uri"].endswith("bikes.mkv")  # FFV1 cannot go in MP4


def test_outputs_keep_their_container_where_it_holds_every_stream_carried(clips, tmp_path):
    """MP4 and MOV outputs stay MP4 and MOV when they carry every stream a Matroska output would (second video
    streams included); otherwise the output becomes Matroska rather than lose a stream. Streams no container
    carries (cover art FFmpeg cannot keep as such, data tracks, unknown codecs) do not decide it."""
    info = probe(str(clips / "bikes.mp4"))
    spec = JobSpec(src=str(tmp_path / "in"), dest=str(tmp_path / "out"))

    def output(ext: str, *streams: tuple[str, str | None]) -> tuple[str, str]:
        others = tuple(OtherStream(index=i, kind=kind, codec=codec) for i, (kind, codec) in enumerate(streams, 1))
        return output_name("v" + ext, info.model_copy(update={"streams": others}), spec)

    assert output(".mp4", ("audio", "aac"), ("video", "h264"), ("cover", "mjpeg"), ("data", None)) == ("v.mp4", "mp4")
    assert output(".mp4", ("video", "ffv1")) == ("v.mkv", "matroska")
    assert output(".mov", ("video", "ffv1"), ("cover", "png")) == ("v.mov", "mov")
    assert output(".mov", ("video", "vp9")) == ("v.mkv", "matroska")  # QuickTime refuses VP9 (MP4 only)
    assert output(".mp4", ("cover", "bmp")) == ("v.mp4", "mp4")
    assert ffmpeg_carries("mp4", "cover", "png") and not ffmpeg_carries("mov", "cover", "png")
    assert not ffmpeg_carries("matroska", "cover", "mjpeg") and ffmpeg_carries("matroska", "video", "vp9")
    assert output(".mp4", ("video", None)) == ("v.mp4", "mp4")  # a codec FFmpeg does not know: not carried


def test_object_keys_cannot_escape_dest(clips, tmp_path):
    info = probe(str(clips / "bikes.mp4"))
    spec = JobSpec(src=str(tmp_path / "in"), dest=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"'\.\.' part|escape"):
        plan_video(spec, "job-x", "x", "../../etc/bikes.mp4", info, (0, 0))
    # keys that would normalise into DEST's job area, or onto another key's output ("a//b.mp4" onto "a/b.mp4")
    for key in ("./_reelmend/job-abc/segments/0123/000000.mkv", "/dup.mkv", "a//b.mp4", "a/./b.mp4"):
        with pytest.raises(ValueError, match="empty, '.' or '..' part"):
            plan_video(spec, "job-x", "x", key, info, (0, 0))


def test_job_ids_stay_those_of_jobs_made_before_the_newer_options():
    """A re-run `restore` of a job made before --conceal-damage, --deinterlace and --include existed must find it."""
    import hashlib
    import json

    spec = JobSpec(src="/archive/raw", dest="/archive/out", chain="denoise,sr2x")
    old = spec.model_dump(include={"src", "dest", "chain", "models", "chunk_frames", "encode"})
    assert spec.resolved_job_id() == "job-" + hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    for changed in ({"conceal_damage": True}, {"deinterlace": True}, {"include": ["*.mov"]}, {"exclude": ["*.json"]}):
        assert JobSpec(**{**spec.model_dump(), **changed}).resolved_job_id() != spec.resolved_job_id(), changed
    frames = JobSpec(**{**spec.model_dump(), "deinterlace": True})
    fields = JobSpec(**{**spec.model_dump(), "deinterlace": True, "double_rate": True})
    assert fields.resolved_job_id() != frames.resolved_job_id()  # twice the frames: another job
    # one selection, one job, whatever the globs' case or order
    a = JobSpec(src="/a", dest="/b", include=["*.MOV", "*.mp4"])
    assert a.resolved_job_id() == JobSpec(src="/a", dest="/b", include=["*.mp4", "*.mov", "*.mov"]).resolved_job_id()
