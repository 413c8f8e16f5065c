"""Jobs on multi-node Ray clusters (ray.cluster_utils.Cluster: several raylets on this machine), driven the way
a user drives one, `reelmend restore ... --address <cluster>`: a worker node dies mid-job and the job still
completes frame-exact; on CPU and GPU nodes, the restore actors land on the GPU node, and everything else off it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
from conftest import decode, ffmpeg, free_port, make_clip, write_tiny_weights
from ray.cluster_utils import Cluster


def restore(c: Cluster, src: Path, dest: Path, *args: str, address: str | None = None,
            **env_vars: str) -> subprocess.Popen:
    """`reelmend restore` joining the cluster at `address` (default: the head's GCS address). With "auto" Ray
    finds it as on a cluster's own node: no RAY_ADDRESS, the address `ray start` (and Cluster) left in
    /tmp/ray/ray_current_cluster."""
    reelmend = str(Path(sys.executable).with_name("reelmend"))
    env = {**{k: v for k, v in os.environ.items() if k not in ("REELMEND_FAULTS", "RAY_ADDRESS")}, **env_vars}
    return subprocess.Popen([reelmend, "restore", str(src), str(dest), "--address", address or c.address, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def node_running(workers, name: str):
    """The worker node whose raylet is an ancestor of a process whose title contains `name` (Ray titles
    an actor's process ray::<class>, a task's process ray::<function> while it runs), or None."""
    nodes = nodes_running(workers, name)
    return nodes[0] if nodes else None


def nodes_running(workers, name: str) -> list:
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in workers}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if name in " ".join(proc.info["cmdline"] or []):
                found += [raylets[p.pid] for p in proc.parents() if p.pid in raylets]
        except psutil.Error:
            continue  # it ended while we looked
    return found


def python_paths(name: str) -> list[str]:
    """The PYTHONPATH of each process whose title contains `name`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if name in " ".join(proc.info["cmdline"] or []):
                found.append(proc.environ().get("PYTHONPATH", ""))
        except psutil.Error:
            continue
    return found


def done_events(dest: Path) -> list[dict]:
    jobs = list(dest.glob("_reelmend/job-*/events"))
    if not jobs or not any(jobs[0].glob("part-*.parquet")):
        return []
    return [e for e in pq.read_table(jobs[0]).to_pylist() if e["status"] == "done" and e["chunk_index"] >= 0]


def test_worker_node_killed_mid_job_still_completes_frame_exact(tmp_path, clips, cluster):
    c, workers = cluster([{"num_cpus": 2}, {"num_cpus": 2}])
    src = tmp_path / "in"
    src.mkdir()
    for name, start in (("a.mp4", 0), ("b.mp4", 50)):
        ffmpeg("-ss", f"{start / 25:.2f}", "-i", str(clips / "bikes.mp4"), "-frames:v", "120", "-vf",
               "scale=320:136", "-c:v", "libx264", str(src / name))
    dest = tmp_path / "out"
    # --address auto: the driver finds the cluster as from a shell on one of its nodes
    driver = restore(c, src, dest, "--chain", "identity", "--lossless", "--chunk-frames", "10", address="auto")
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


def test_restore_actors_run_on_the_gpu_node_and_the_rest_on_cpu_nodes(tmp_path, clips, cluster):
    # One node declares a GPU (this machine has none: the actor's torch falls back to the CPU) and one CPU.
    # Ray's scheduler keeps tasks that need no GPU off GPU nodes only while CPU nodes have room
    # (RAY_scheduler_avoid_gpu_nodes); with --cpu-resource the CPU side asks for a resource only CPU nodes have.
    client_port = free_port()  # and the driver joins through Ray Client, as from a laptop: ray://head:port
    c, (cpu_node, gpu_node) = cluster([{"num_cpus": 2, "resources": {"cpu_node": 1000}},
                                       {"num_cpus": 1, "num_gpus": 1}], ray_client_server_port=client_port)
    src = tmp_path / "in"
    src.mkdir()
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "60", "-vf", "scale=160:68", "-c:v", "libx264",
           str(src / "bikes.mp4"))
    weights = write_tiny_weights(tmp_path / "weights", "sr2x", perturb=0.05)
    dest = tmp_path / "out"
    driver = restore(c, src, dest, "--chain", "sr2x", "--models", str(weights), "--lossless", "--chunk-frames",
                     "10", "--actors", "1:2", "--cpu-resource", "cpu_node", address=f"ray://127.0.0.1:{client_port}")
    seen: dict[str, set] = {"RestoreStage": set(), "decode_chunk": set(), "encode_chunk": set()}
    paths = set()
    while driver.poll() is None:
        for name, nodes in seen.items():
            nodes.update(id(n) for n in nodes_running([cpu_node, gpu_node], name))
        paths.update(python_paths("RestoreStage"))
        time.sleep(0.02)
    shown = driver.stdout.read().decode(errors="replace")
    assert driver.returncode == 0, shown[-3000:]
    # Ray Data cannot drive a job through Ray Client: the driver ran on the head node, its progress relayed here
    assert "stitching 1 video(s)" in shown and "60/60 frames (100%)" in shown, shown[-3000:]
    assert seen["RestoreStage"] == {id(gpu_node)}  # every restore actor, on the GPU node
    # the code reached the workers through the job's runtime environment (py_modules), not the workers' venv
    assert any("runtime_resources/py_modules_files" in p for p in paths), paths
    # the CPU side asks for a sliver of `cpu_node`, which only the CPU node declares: never on the GPU node
    assert seen["decode_chunk"] == {id(cpu_node)} and seen["encode_chunk"] == {id(cpu_node)}
    frames = decode(dest / "bikes.mkv")
    assert frames.shape == (60, 136, 320, 3)


def test_a_job_waits_for_a_node_it_needs_on_a_cluster_that_can_grow(tmp_path, clips, cluster):
    """A GPU actor asked for on a cluster with no GPU node up yet (an autoscaling cluster scaled to zero): the
    job asks the autoscaler for one and waits; here the node is added by hand while it waits. With no node
    coming, the job is refused (exit 2) once the wait is over, DEST untouched."""
    c, _ = cluster([{"num_cpus": 2}])
    src = tmp_path / "in"
    src.mkdir()
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "20", "-vf", "scale=96:64", "-c:v", "ffv1",
           str(src / "bikes.mkv"))
    refused = restore(c, src, tmp_path / "refused", "--restore-gpus", "1", "--lossless", REELMEND_NODE_WAIT_S="2")
    shown = refused.communicate(timeout=300)[0].decode(errors="replace")
    assert refused.returncode == 2, shown[-3000:]
    assert "no node of this cluster offers 1 CPU, 1 GPU" in " ".join(shown.split())
    assert not (tmp_path / "refused").exists()

    driver = restore(c, src, tmp_path / "out", "--restore-gpus", "1", "--lossless")
    time.sleep(10)
    assert driver.poll() is None  # still waiting
    c.add_node(num_cpus=1, num_gpus=1, object_store_memory=150 * 2**20)
    shown = driver.communicate(timeout=300)[0].decode(errors="replace")
    assert driver.returncode == 0, shown[-3000:]
    assert "waiting up to 600 s for the cluster to add nodes" in shown
    assert "Dataset" not in shown, shown[-3000:]  # Ray Data's own progress and log lines stay off
    assert np.array_equal(decode(tmp_path / "out" / "bikes.mkv"), decode(src / "bikes.mkv"))


def test_ray_job_submit_runs_a_restore_on_the_cluster(tmp_path):
    """`ray job submit -- reelmend restore ...`: the driver runs on the cluster (RAY_ADDRESS set by Ray's job
    supervisor) and finds it without --address."""
    port = free_port()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                      "dashboard_host": "127.0.0.1", "dashboard_port": port,
                                                      "dashboard_agent_listen_port": free_port()})
    try:
        c.add_node(num_cpus=2, object_store_memory=150 * 2**20)
        c.wait_for_nodes()
        src = tmp_path / "in"
        make_clip(src / "clip.mkv", frames=30, extra=("-c:v", "ffv1"))
        dest = tmp_path / "out"
        bin_dir = Path(sys.executable).parent
        deadline = time.monotonic() + 120
        while True:  # the head's job agent comes up some seconds after the node: the server says to retry
            submit = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{port}", "--",
                 str(bin_dir / "reelmend"), "restore", str(src), str(dest), "--chain", "identity", "--lossless",
                 "--chunk-frames", "10"],
                capture_output=True, text=True, timeout=600, env={k: v for k, v in os.environ.items()
                                                                  if k not in ("REELMEND_FAULTS", "RAY_ADDRESS")})
            if "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
        assert "1/1 video(s) restored" in submit.stdout + submit.stderr  # the driver's own report, via Ray
        assert np.array_equal(decode(dest / "clip.mkv"), decode(src / "clip.mkv"))
    finally:
        c.shutdown()


def test_workers_of_a_cluster_the_driver_joins_learn_where_the_store_is_but_not_its_credentials(monkeypatch):
    """A driver told AWS_ENDPOINT_URL (an S3-compatible store) lists that store; its workers on other nodes must
    read and write the same one, so the runtime environment carries the endpoint and region, never the keys."""
    from pipeline.run import code_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.archive.example")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-shipped")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = code_env()
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "https://s3.archive.example"
    assert env["env_vars"]["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert "never-shipped" not in str(env) and len(env["py_modules"]) == 3
    monkeypatch.setenv("REELMEND_SHIP_CODE", "0")
    assert "py_modules" not in code_env() and code_env()["env_vars"]


def test_on_a_cluster_a_chunk_that_keeps_raising_fails_its_video_alone(tmp_path, inject, cluster):
    """The fault suite's injected errors, on two worker nodes: a stage that raises on a chunk every time fails
    its video after --max-attempts, with the reason; one that raises once is retried wherever Ray places it;
    the rest of the job completes frame-exact and the exit code is 3."""
    from typer.testing import CliRunner

    from jobs.cli import app

    src = tmp_path / "in"
    for name in ("broken.mkv", "flaky.mkv", "fine.mkv"):
        make_clip(src / name, frames=30, extra=("-c:v", "ffv1"))
    inject([{"stage": "restore", "rel_path": "broken.mkv", "chunk_index": 1, "kind": "raise"},
            {"stage": "encode", "rel_path": "flaky.mkv", "chunk_index": 0, "kind": "raise", "times": 1}])
    c, _ = cluster([{"num_cpus": 2}, {"num_cpus": 2}])
    dest = tmp_path / "out"
    driver = restore(c, src, dest, "--chain", "identity", "--lossless", "--chunk-frames", "10", "--max-attempts", "2")
    output, _ = driver.communicate(timeout=600)
    assert driver.returncode == 3, output.decode(errors="replace")[-3000:]
    status = CliRunner().invoke(app, ["status", str(dest), "--json"], catch_exceptions=False)
    videos = {v["path"]: v for v in json.loads(status.output)["videos"]}
    assert videos["broken.mkv"]["status"] == "failed" and "chunk 1" in videos["broken.mkv"]["reason"]
    assert "injected fault" in videos["broken.mkv"]["reason"] and not (dest / "broken.mkv").exists()
    for name in ("flaky.mkv", "fine.mkv"):
        assert videos[name]["status"] == "done"
        assert np.array_equal(decode(dest / name), decode(src / name))
    failed = Counter((e["chunk_index"], e["attempt"]) for e in failed_events(dest))
    assert failed == Counter({(1, 1): 1, (1, 2): 1, (0, 1): 1})  # broken's chunk twice, flaky's once


def failed_events(dest: Path) -> list[dict]:
    (job,) = dest.glob("_reelmend/job-*/events")
    return [e for e in pq.read_table(job).to_pylist() if e["status"] == "failed" and e["chunk_index"] >= 0]
