"""A job whose driver is killed mid-way completes on `resume`, redoing only unfinished chunks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from conftest import decode, ffmpeg, write_tiny_weights
from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner()


def done_chunks(job: Path) -> set[tuple[str, int]]:
    if not (job / "events").exists() or not any((job / "events").glob("part-*.parquet")):
        return set()
    events = pq.read_table(job / "events").to_pylist()
    return {(e["video_id"], e["chunk_index"]) for e in events if e["status"] == "done" and e["chunk_index"] >= 0}


def test_driver_killed_mid_job_resumes_only_unfinished_chunks(tmp_path, clips, ray_address, cluster):
    """On a cluster of two worker nodes (the driver's head holds no work), as a user runs it with --address."""
    c, _ = cluster([{"num_cpus": 2}, {"num_cpus": 1}])
    src = tmp_path / "in"
    src.mkdir()
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "150", "-vf", "scale=320:136", "-c:v", "libx264",
           str(src / "bikes.mp4"))  # real footage, 15 chunks of 10 frames
    weights = write_tiny_weights(tmp_path / "weights", "sr2x", perturb=0.05)
    args = ["--chain", "sr2x", "--models", str(weights), "--lossless", "--chunk-frames", "10"]
    dest = tmp_path / "out"
    reelmend = str(Path(sys.executable).with_name("reelmend"))
    driver = subprocess.Popen([reelmend, "restore", str(src), str(dest), *args, "--address", c.address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300
    before: set = set()
    while time.monotonic() < deadline and driver.poll() is None:
        jobs = list((dest / "_reelmend").glob("job-*")) if (dest / "_reelmend").exists() else []
        before = done_chunks(jobs[0]) if jobs else set()
        if len(before) >= 3:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the job finished before it could be interrupted"
    os.kill(driver.pid, signal.SIGKILL)  # the driver dies without any chance to clean up
    driver.wait()
    (job,) = (dest / "_reelmend").glob("job-*")
    before = done_chunks(job)
    assert 3 <= len(before) < 15
    assert not (dest / "bikes.mkv").exists()

    resume = subprocess.run([reelmend, "resume", str(dest), "--address", c.address], capture_output=True,
                            text=True, timeout=600)
    assert resume.returncode == 0, resume.stdout[-2000:] + resume.stderr[-2000:]

    events = pq.read_table(job / "events").to_pylist()
    chunk_events = [e for e in events if e["chunk_index"] >= 0]
    done = Counter((e["video_id"], e["chunk_index"]) for e in chunk_events if e["status"] == "done")
    runs = Counter((e["video_id"], e["chunk_index"]) for e in chunk_events if e["status"] == "running")
    assert len(done) == 15 and set(done.values()) == {1}  # every chunk recorded done exactly once
    assert all(runs[key] == 1 for key in before)  # chunks done before the kill were not run again
    assert not list(job.rglob(".staging-*"))  # the killed run's temporary files were cleaned up

    uninterrupted = tmp_path / "reference"
    result = runner.invoke(app, ["restore", str(src), str(uninterrupted), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert np.array_equal(decode(dest / "bikes.mkv"), decode(uninterrupted / "bikes.mkv"))


def test_of_two_resumes_on_the_same_dest_one_proceeds_and_the_other_stops(tmp_path, clips, ray_address):
    src = tmp_path / "in"
    src.mkdir()
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "80", "-vf", "scale=160:68", "-c:v", "libx264",
           str(src / "bikes.mp4"))
    dest = tmp_path / "out"
    planned = runner.invoke(app, ["restore", str(src), str(dest), "--chain", "identity", "--lossless",
                                  "--chunk-frames", "10", "--plan-only"])
    assert planned.exit_code == 0, planned.output
    (job,) = (dest / "_reelmend").glob("job-*")
    reelmend = str(Path(sys.executable).with_name("reelmend"))
    first = subprocess.Popen([reelmend, "resume", str(dest), "--address", ray_address],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300  # it holds the lease once it records its first chunks as running
    while time.monotonic() < deadline and first.poll() is None and not list(job.glob("events/part-*")):
        time.sleep(0.05)
    assert first.poll() is None, "the first run finished before the second could start"

    second = runner.invoke(app, ["resume", str(dest)])
    assert second.exit_code == 2
    assert "already being run" in second.output and f"pid {first.pid}" in second.output

    assert first.wait(timeout=300) == 0
    done = Counter((e["video_id"], e["chunk_index"]) for e in pq.read_table(job / "events").to_pylist()
                   if e["status"] == "done" and e["chunk_index"] >= 0)
    assert len(done) == 8 and set(done.values()) == {1}
    assert np.array_equal(decode(dest / "bikes.mkv"), decode(src / "bikes.mp4"))
    # the lease went with the first run: a later resume proceeds (and has nothing left to do)
    assert runner.invoke(app, ["resume", str(dest)]).exit_code == 0
