"""`pipeline.ffmpeg.run`, the one way reelmend starts FFmpeg: a call that never ends is killed at its timeout and
reaped, and a call that fails says why in FFmpeg's own words."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest

from pipeline import ffmpeg

# A source that never ends by itself: the test pattern with no duration, read in real time (-re), so FFmpeg runs
# until it is killed, without spinning a core the way an unthrottled source would.
ENDLESS = [*ffmpeg.BASE, "-re", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25"]


def ffmpeg_children() -> list[psutil.Process]:
    """This process's FFmpeg children, zombies (exited but never waited for) included."""
    return [p for p in psutil.Process().children(recursive=True) if p.name() == "ffmpeg"]


@pytest.mark.parametrize("output", ["returned", "read into an array"])
def test_an_endless_call_is_killed_at_its_timeout_and_reaped(output):
    assert not ffmpeg_children()
    started = time.monotonic()
    with pytest.raises(ffmpeg.FFmpegError) as raised:
        if output == "returned":  # nothing on stdout: run waits for FFmpeg to exit
            ffmpeg.run([*ENDLESS, "-f", "null", "-"], timeout=2.0, what="reading the test pattern failed")
        else:  # frames on stdout, fewer than asked for in 2 s at 25 frames/s
            frames = np.empty((1000, 48, 64, 3), np.uint8)
            ffmpeg.run([*ENDLESS, "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"], timeout=2.0, stdout_into=frames,
                       what="reading the test pattern failed")
    elapsed = time.monotonic() - started
    assert str(raised.value) == "reading the test pattern failed: timed out after 2 s"
    # killed at the timeout rather than left to run (generous: a loaded machine takes a while to start FFmpeg)
    assert 2.0 <= elapsed < 30.0
    assert not ffmpeg_children()  # killed and waited for: neither running nor a zombie


def test_a_missing_input_fails_with_ffmpegs_reason(tmp_path):
    missing = str(tmp_path / "gone.mp4")
    with pytest.raises(ffmpeg.FFmpegError) as raised:
        ffmpeg.run([*ffmpeg.BASE, *ffmpeg.input_args(missing), "-i", missing, "-f", "null", "-"], timeout=60.0,
                   what="decoding failed")
    assert str(raised.value) == f"decoding failed: {missing}: No such file or directory"
    assert raised.value.what == "decoding failed" and not ffmpeg_children()


def test_a_file_that_is_not_media_fails_with_ffmpegs_reason_on_one_line(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ffmpeg.FFmpegError) as raised:
        ffmpeg.run([*ffmpeg.BASE, *ffmpeg.input_args(str(junk)), "-i", str(junk), "-f", "null", "-"], timeout=60.0,
                   what="decoding failed")
    message = str(raised.value)
    assert message.startswith("decoding failed: ") and "Invalid data found when processing input" in message
    # FFmpeg's log context ("[mov,mp4,... @ 0x55d3a861e1c0]") is dropped, and the reason is one line
    assert "@ 0x" not in message and "\n" not in message


def test_a_variable_rate_segment_keeps_every_frame_time():
    """Jittery phone-style spacing (a piece per two frames, past FFmpeg's nesting limit unless balanced) and a
    rate change: each frame lands at its time, to Matroska's millisecond."""
    import random
    import subprocess
    import tempfile
    from fractions import Fraction

    from pipeline.stages import output_times

    rng = random.Random(1)
    jitter = [0.0]
    for _ in range(299):
        jitter.append(round(jitter[-1] + rng.uniform(0.030, 0.045), 6))
    change = [i * 0.04 for i in range(12)] + [0.48 + i * 0.1 for i in range(12)]
    for times in (jitter, change, output_times([*change, 1.68], 2)):
        frames = np.random.default_rng(0).integers(0, 255, (len(times), 48, 64, 3), dtype=np.uint8)
        args = ffmpeg.encode_args(codec="h264", crf=18, preset="veryfast", lossless=False, depth=8, chroma="420",
                                  odd_size=False)
        with tempfile.TemporaryDirectory() as tmp:
            ffmpeg.encode_segment(frames, f"{tmp}/seg.mkv", fps=Fraction(30), codec_args=args, matrix="bt709",
                                  full_range=False, colour_tags={}, times=times)
            out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries", "frame=pts_time",
                                  "-of", "csv=p=0", f"{tmp}/seg.mkv"], capture_output=True, text=True).stdout
        got = [float(x.strip(",")) for x in out.split()]
        assert len(got) == len(times) and max(abs(a - b) for a, b in zip(got, times)) <= 0.0006
    assert output_times([0.0, 0.04, 0.14], 2) == [0.0, 0.02, 0.04, 0.09]


def test_concealing_places_frames_by_time_and_fills_from_the_nearest_decoded_one():
    from pipeline.ffmpeg import conceal

    def chunk(n: int, decoded: list[int]) -> np.ndarray:  # n places, the decoded pictures first
        frames = np.full((n, 1, 1, 1), 99, dtype=np.uint8)
        frames[:len(decoded), 0, 0, 0] = decoded
        return frames

    times = [0.0, 0.04, 0.08, 0.12, 0.16, 0.20]
    # decoded: a frame halfway between two places (dropped, not squeezed in), then those at 0.08, 0.12 and 0.20
    frames = chunk(6, [7, 1, 2, 3])
    assert conceal(frames, 4, [0.02, 0.08, 0.12, 0.2], times) == [0, 1, 4]
    assert frames.ravel().tolist() == [1, 1, 1, 2, 2, 3]
    # the packets ended before the chunk did: the places go on at the last spacing
    frames = chunk(4, [1, 2])
    assert conceal(frames, 2, [0.0, 0.04], times[:2]) == [2, 3]
    assert frames.ravel().tolist() == [1, 2, 2, 2]
    frames = chunk(3, [])
    assert conceal(frames, 0, [], times) == [0, 1, 2] and not frames.any()  # nothing decoded: black
