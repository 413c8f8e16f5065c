"""A worker node dies mid-job on a multi-node Ray cluster (ray.cluster_utils.Cluster: several raylets on this
machine): the job still completes, every output frame-exact, every chunk recorded done once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import decode, ffmpeg
from ray.cluster_utils import Cluster


@pytest.fixture
def cluster():
    # The head holds the driver and no work (num_cpus=0); the work runs on two worker nodes.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=2, object_store_memory=150 * 2**20) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def node_running(workers, name: str):
    """The worker node whose raylet is an ancestor of a process whose title contains `name` (Ray titles
    an actor's process ray::<class>), or None."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in workers}
    for proc in psutil.process_iter(["cmdline"]):
        if name in " ".join(proc.info["cmdline"] or []):
            for parent in proc.parents():
                if parent.pid in raylets:
                    return raylets[parent.pid]
    return None


def done_events(dest: Path) -> list[dict]:
    jobs = list(dest.glob("_reelmend/job-*/events"))
    if not jobs or not any(jobs[0].glob("part-*.parquet")):
        return []
    return [e for e in pq.read_table(jobs[0]).to_pylist() if e["status"] == "done" and e["chunk_index"] >= 0]


def test_worker_node_killed_mid_job_still_completes_frame_exact(tmp_path, clips, cluster):
    c, workers = cluster
    src = tmp_path / "in"
    src.mkdir()
    for name, start in (("a.mp4", 0), ("b.mp4", 50)):
        ffmpeg("-ss", f"{start / 25:.2f}", "-i", str(clips / "bikes.mp4"), "-frames:v", "120", "-vf",
               "scale=320:136", "-c:v", "libx264", str(src / name))
    dest = tmp_path / "out"
    reelmend = str(Path(sys.executable).with_name("reelmend"))
    env = {k: v for k, v in os.environ.items() if k != "REELMEND_FAULTS"}
    driver = subprocess.Popen([reelmend, "restore", str(src), str(dest), "--chain", "identity", "--lossless",
                               "--chunk-frames", "10", "--address", c.address],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    victim = None
    while time.monotonic() < deadline and driver.poll() is None:
        if len(done_events(dest)) >= 4:
            victim = node_running(workers, "RestoreStage")
            if victim is not None:
                break
        time.sleep(0.05)
    assert driver.poll() is None and victim is not None, "the job ended before a node could be killed"
    done_before = len(done_events(dest))
    c.remove_node(victim, allow_graceful=False)  # the node hosting the restore actor dies: SIGKILL, no cleanup

    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, output.decode(errors="replace")[-3000:]
    assert done_before < 24  # the kill happened mid-job
    done = Counter((e["video_id"], e["chunk_index"]) for e in done_events(dest))
    assert len(done) == 24 and set(done.values()) == {1}
    for name in ("a.mp4", "b.mp4"):
        out = dest / name.replace(".mp4", ".mkv")
        assert np.array_equal(decode(out), decode(src / name))
