"""Faults inside a job on the session's Ray instance: a stage raising on a chunk, a worker process dying, the
model running out of memory. Each job must finish what it can, retry what it should, and say what failed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from conftest import decode, make_clip, psnr, write_tiny_weights
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.plan import video_id

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def chunk_events(dest: Path) -> list[dict]:
    (job,) = (dest / "_reelmend").iterdir()
    return [e for e in pq.read_table(job / "events").to_pylist() if e["chunk_index"] >= 0]


def status(dest: Path) -> dict[str, dict]:
    result = cli("status", str(dest), "--json")
    return {v["path"]: v for v in json.loads(result.output)["videos"]}


def test_a_chunk_that_keeps_failing_fails_its_video_alone(tmp_path, ray_address, inject):
    src = tmp_path / "in"
    make_clip(src / "flaky.mkv", frames=40, extra=("-c:v", "ffv1"))
    make_clip(src / "broken.mkv", frames=40, extra=("-c:v", "ffv1"))
    make_clip(src / "fine.mkv", frames=40, extra=("-c:v", "ffv1"))
    inject([{"stage": "restore", "rel_path": "flaky.mkv", "chunk_index": 1, "kind": "raise", "times": 1},
            {"stage": "restore", "rel_path": "broken.mkv", "chunk_index": 2, "kind": "raise", "times": 2}])
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "10",
                 "--max-attempts", "2")
    assert result.exit_code == 3, result.output

    videos = status(dest)
    assert videos["flaky.mkv"]["status"] == "done"  # failed once, then succeeded on its second attempt
    assert videos["fine.mkv"]["status"] == "done"
    assert videos["broken.mkv"]["status"] == "failed"
    assert "chunk 2" in videos["broken.mkv"]["reason"] and "injected fault" in videos["broken.mkv"]["reason"]
    assert not (dest / "broken.mkv").exists()
    for name in ("flaky.mkv", "fine.mkv"):
        assert np.array_equal(decode(dest / name), decode(src / name))

    events = chunk_events(dest)
    failed = [(e["video_id"], e["chunk_index"], e["attempt"]) for e in events if e["status"] == "failed"]
    # broken's chunk 2 was tried --max-attempts times, flaky's chunk 1 once; nothing else failed
    assert sorted(failed) == sorted([(video_id("broken.mkv"), 2, 1), (video_id("broken.mkv"), 2, 2),
                                     (video_id("flaky.mkv"), 1, 1)])

    # a second run gives the failed video no more attempts, and changes nothing
    again = cli("resume", str(dest))
    assert again.exit_code == 3
    assert len(chunk_events(dest)) == len(events)

    # its cause fixed (the fault fired its two times), a resume with a larger budget retries only that chunk
    again = cli("resume", str(dest), "--max-attempts", "3")
    assert again.exit_code == 0, again.output
    assert status(dest)["broken.mkv"]["status"] == "done"
    assert np.array_equal(decode(dest / "broken.mkv"), decode(src / "broken.mkv"))
    after = chunk_events(dest)
    new = [(e["video_id"], e["chunk_index"], e["status"]) for e in after if e["attempt"] == 3]
    assert len(after) == len(events) + 2 and sorted(new) == [(video_id("broken.mkv"), 2, "done"),
                                                            (video_id("broken.mkv"), 2, "running")]
    assert cli("status", str(dest)).exit_code == 0  # and status counts with the raised budget
    # the original command run again (without --max-attempts) keeps the budget the resume set
    assert cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "10").exit_code == 0
    (job,) = (dest / "_reelmend").iterdir()
    assert json.loads((job / "job.json").read_text())["max_attempts"] == 3


def test_a_worker_process_that_dies_mid_chunk_is_replaced(tmp_path, ray_address, inject):
    src = tmp_path / "in"
    make_clip(src / "clip.mkv", frames=40, extra=("-c:v", "ffv1"))
    inject([{"stage": "restore", "rel_path": "clip.mkv", "chunk_index": 1, "kind": "crash", "times": 1},
            {"stage": "decode", "rel_path": "clip.mkv", "chunk_index": 3, "kind": "crash", "times": 1}])
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "10")
    assert result.exit_code == 0, result.output
    assert np.array_equal(decode(dest / "clip.mkv"), decode(src / "clip.mkv"))
    done = [e for e in chunk_events(dest) if e["status"] == "done"]
    assert sorted(e["chunk_index"] for e in done) == [0, 1, 2, 3]  # each recorded done once


def test_a_chunk_that_kills_its_worker_every_time_fails_its_video_instead_of_hanging(tmp_path, ray_address, inject):
    """Ray Data would run such a chunk again forever (its default for a dead process); reelmend bounds that,
    records the attempt as lost, and the job's own --max-attempts decide, as for any other failure."""
    src = tmp_path / "in"
    make_clip(src / "killer.mkv", frames=20, extra=("-c:v", "ffv1"))
    make_clip(src / "fine.mkv", frames=20, extra=("-c:v", "ffv1"))
    inject([{"stage": "restore", "rel_path": "killer.mkv", "chunk_index": 1, "kind": "crash"}])
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "10",
                 "--max-attempts", "2")
    assert result.exit_code == 3, result.output
    videos = status(dest)
    assert videos["fine.mkv"]["status"] == "done"
    assert np.array_equal(decode(dest / "fine.mkv"), decode(src / "fine.mkv"))
    assert videos["killer.mkv"]["status"] == "failed" and not (dest / "killer.mkv").exists()
    assert "chunk 1: lost" in videos["killer.mkv"]["reason"] and "died 3 times" in videos["killer.mkv"]["reason"]
    failed = [(e["chunk_index"], e["attempt"], e["error_kind"]) for e in chunk_events(dest) if e["status"] == "failed"]
    assert sorted(failed) == [(1, 1, "lost"), (1, 2, "lost")]


def test_out_of_memory_retries_with_smaller_batches_then_fails_cleanly(tmp_path, ray_address, inject):
    src = tmp_path / "in"
    make_clip(src / "clip.mkv", size="96x64", frames=20, extra=("-c:v", "ffv1"))
    weights = write_tiny_weights(tmp_path / "weights", "deblock", perturb=0.05)
    args = ["--chain", "deblock", "--models", str(weights), "--lossless", "--chunk-frames", "10"]
    reference = tmp_path / "reference"
    assert cli("restore", str(src), str(reference), *args).exit_code == 0

    # one 96x64 frame with its window of five (30,720 pixels) fits under the limit, a batch of two does not:
    # the chunks succeed once the stage has come down to one frame per forward
    inject([{"stage": "restore", "kind": "memory", "max_pixels": 40000}])
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), *args)
    assert result.exit_code == 0, result.output
    assert psnr(decode(dest / "clip.mkv"), decode(reference / "clip.mkv")) > 50

    # a frame too large for even one whole frame per forward: the stage comes down to tiles, blended as one
    make_clip(tmp_path / "large" / "clip.mkv", size="320x176", frames=10, extra=("-c:v", "ffv1"))
    large_args = [a if a != "10" else "5" for a in args]
    assert cli("restore", str(tmp_path / "large"), str(tmp_path / "large-ref"), *large_args).exit_code == 0
    inject([{"stage": "restore", "kind": "memory", "max_pixels": 60000}])  # a 5-frame window of 109x109 tiles
    result = cli("restore", str(tmp_path / "large"), str(tmp_path / "large-out"), *large_args)
    assert result.exit_code == 0, result.output
    assert psnr(decode(tmp_path / "large-out" / "clip.mkv"), decode(tmp_path / "large-ref" / "clip.mkv")) > 40

    # not even one tile fits: the chunk fails with the reason, the job ends with exit code 3
    inject([{"stage": "restore", "kind": "memory", "max_pixels": 1000}])
    dest = tmp_path / "starved"
    result = cli("restore", str(src), str(dest), *args, "--max-attempts", "1")
    assert result.exit_code == 3, result.output
    reason = status(dest)["clip.mkv"]["reason"]
    assert "oom" in reason and "out of memory" in reason and "\n" not in reason

    # the OOM killer's way: the process dies over the limit, with nothing to catch. Started again, a chunk runs
    # at a quarter of what it needed per forward (a sixteenth after two deaths: tiles here), and fits before its
    # starts run out
    inject([{"stage": "restore", "kind": "memory", "max_pixels": 40000, "action": "crash"}])
    dest = tmp_path / "killed"
    result = cli("restore", str(src), str(dest), *args)
    assert result.exit_code == 0, result.output
    assert psnr(decode(dest / "clip.mkv"), decode(reference / "clip.mkv")) > 40
    assert sorted(e["chunk_index"] for e in chunk_events(dest) if e["status"] == "done") == [0, 1]


def test_a_chunk_no_node_can_hold_fails_up_front_instead_of_waiting_forever(tmp_path, ray_address):
    from jobs.restore import _fit_memory
    from pipeline.manifest import Manifest

    manifest = Manifest(str(tmp_path / "out"), "job-x")
    chunk = {"video_id": "v", "chunk_index": 0, "attempt": 1, "decode_start": 0, "decode_end": 10,
             "width": 96, "height": 64, "bit_depth": 8}
    huge = {**chunk, "chunk_index": 1, "width": 16384, "height": 16384, "decode_end": 60}  # 48 GB of frames
    fits, failed = _fit_memory([chunk, huge], manifest)
    assert fits == [chunk] and failed == 1
    (event,) = manifest.read_events().to_pylist()
    assert (event["chunk_index"], event["status"], event["error_kind"]) == (1, "failed", "resources")
    assert "more than any node offers" in event["error_message"] and "--chunk-frames" in event["error_message"]


def test_a_driver_error_mid_job_exits_1_with_one_line_and_resume_finishes(tmp_path, ray_address, inject):
    """An unexpected error on the driver's side once work has begun: exit 1 (not 2, "bad usage"), one line naming
    the error and how to go on, no traceback; `resume` then finishes the job, each chunk recorded done once."""
    src = tmp_path / "in"
    make_clip(src / "clip.mkv", frames=40, extra=("-c:v", "ffv1"))
    inject([{"stage": "driver", "rel_path": "clip.mkv", "chunk_index": 1, "kind": "raise", "times": 1}])
    dest = tmp_path / "out"
    result = cli("restore", str(src), str(dest), "--chain", "identity", "--lossless", "--chunk-frames", "10")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "stopped: InjectedFault: injected fault in driver of chunk 1" in errors[0]
    assert f"reelmend resume {dest}" in errors[0] and "--verbose" in errors[0]

    result = cli("resume", str(dest))
    assert result.exit_code == 0, result.output
    assert np.array_equal(decode(dest / "clip.mkv"), decode(src / "clip.mkv"))
    done = [e["chunk_index"] for e in chunk_events(dest) if e["status"] == "done"]
    assert sorted(done) == [0, 1, 2, 3]


def test_resources_no_node_offers_are_refused_before_any_work(tmp_path, ray_address):
    """Ray would wait forever for a node that can run such a stage: the job is refused up front (exit 2), and
    DEST is left untouched."""
    src = tmp_path / "in"
    make_clip(src / "clip.mkv", frames=4, extra=("-c:v", "ffv1"))
    dest = tmp_path / "out"
    for args, message in ((["--restore-gpus", "1"], "--restore-cpus/--restore-gpus: no node of this cluster "
                                                     "offers 1 CPU, 1 GPU"),
                          (["--decode-cpus", "64"], "--decode-cpus: no node of this cluster offers 64 CPU"),
                          (["--actors", "64:64"], "at least 64 restore actors asked for"),
                          (["--cpu-resource", "cpu_node"], "--decode-cpus/--cpu-resource: no node of this cluster "
                                                           "offers 1 CPU, 0.001 cpu_node")):
        result = cli("restore", str(src), str(dest), *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert not dest.exists()


def test_retries_of_what_an_outage_fails_wait_for_it_and_nothing_else_waits():
    from jobs.restore import retry_delay
    from pipeline.manifest import ChunkState

    def wave(*attempts):
        return [{"video_id": "v", "chunk_index": i, "attempt": a} for i, a in enumerate(attempts)]

    read_failed = {("v", i): ChunkState("failed", 1, "decode") for i in range(3)}
    assert retry_delay(wave(2, 2), read_failed) == 5.0
    assert retry_delay(wave(3, 4), {**read_failed, ("v", 1): ChunkState("failed", 3, "lost")}) == 10.0
    assert retry_delay(wave(9), read_failed) == 60.0  # at most a minute
    assert retry_delay(wave(2, 1), read_failed) == 0.0  # fresh work in the wave: no waiting
    assert retry_delay(wave(2, 2), {**read_failed, ("v", 1): ChunkState("failed", 1, "restore")}) == 0.0
