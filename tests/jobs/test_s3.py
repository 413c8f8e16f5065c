"""A restore from one bucket to another on an S3-compatible server (moto on loopback) that throttles and drops
connections for a while, refuses to serve one source and to store one output for good: the transient errors
are retried, the refused videos fail alone, and the manifest lives in the bucket beside the outputs, with no
credential in it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
from conftest import decode, ffmpeg, stream_hashes
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.manifest import Manifest

runner = CliRunner()


def test_restore_between_buckets_through_storage_faults(tmp_path, clips, s3, ray_address):
    local = tmp_path / "in"
    local.mkdir()
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "50", "-vf", "scale=320:180", "-c:v", "libx264",
           str(local / "bikes.mp4"))
    ffmpeg("-i", str(clips / "bigbuckbunny.mp4"), "-t", "2", "-vf", "scale=320:180", "-c:v", "libx264",
           "-c:a", "copy", str(local / "bunny.mp4"))
    fs = fsspec.filesystem("s3")
    bucket = f"archive-{os.getpid()}"
    fs.mkdir(bucket)
    for name in ("bikes.mp4", "bunny.mp4"):
        fs.put_file(str(local / name), f"{bucket}/raw/{name}")
    fs.put_file(str(local / "bikes.mp4"), f"{bucket}/raw/sealed/denied.mp4")
    fs.put_file(str(local / "bikes.mp4"), f"{bucket}/raw/locked.mp4")
    first_request = len(s3.log)

    faults = [
        s3.fail(None, 403, match="denied.mp4"),     # permanent: this object is refused for good
        s3.fail(None, 403, match="/restored/locked.mkv", method="PUT"),  # permanent: its output cannot be written
        s3.fail(6, 503, match="/_reelmend/"),       # the driver's manifest commits are throttled...
        s3.fail(3, None, match="/_reelmend/"),      # ...then their connections dropped
        s3.fail(4, 503, match="/raw/bikes.mp4"),    # FFmpeg's range reads (probe, decode) are throttled
        s3.fail(4, None, match="/segments/"),       # the workers' segment uploads and reads are dropped
    ]
    try:
        result = runner.invoke(app, ["restore", f"s3://{bucket}/raw", f"s3://{bucket}/restored", "--chain",
                                     "identity", "--lossless", "--chunk-frames", "20"], catch_exceptions=False)
    finally:
        s3.heal()
    assert result.exit_code == 3, result.output  # two videos failed, the others are done
    assert all(f.spoiled > 0 for f in faults)
    assert all(f.remaining == 0 for f in faults[2:])  # every transient fault was hit, and outlasted
    # FFmpeg read the sources itself, through presigned URLs, a byte range at a time: no copy was downloaded
    source_reads = [(path, byte_range) for method, path, byte_range in s3.log[first_request:]
                    if method == "GET" and f"/{bucket}/raw/" in path]
    assert source_reads and all("Signature=" in path and byte_range for path, byte_range in source_reads)

    outputs = sorted(fs.find(f"{bucket}/restored", maxdepth=1, withdirs=False))
    assert outputs == [f"{bucket}/restored/bikes.mkv", f"{bucket}/restored/bunny.mkv"]
    for name in ("bikes", "bunny"):
        fs.get_file(f"{bucket}/restored/{name}.mkv", str(tmp_path / f"{name}.mkv"))
        assert np.array_equal(decode(tmp_path / f"{name}.mkv"), decode(local / f"{name}.mp4"))
    assert stream_hashes(tmp_path / "bunny.mkv", "0:a") == stream_hashes(local / "bunny.mp4", "0:a")

    (job,) = fs.ls(f"{bucket}/restored/_reelmend")
    plan = pq.read_table(io.BytesIO(fs.cat_file(f"{job}/plan/part-00000.parquet"))).to_pylist()
    assert {r["source_uri"] for r in plan} == {f"s3://{bucket}/raw/{n}" for n in
                                              ("bikes.mp4", "bunny.mp4", "locked.mp4", "sealed/denied.mp4")}
    status = runner.invoke(app, ["status", f"s3://{bucket}/restored", "--json"])
    assert status.exit_code == 3
    videos = {v["path"]: v for v in json.loads(status.output)["videos"]}
    assert {p: v["status"] for p, v in videos.items()} == {
        "bikes.mp4": "done", "bunny.mp4": "done", "locked.mp4": "failed", "sealed/denied.mp4": "failed"}
    assert videos["locked.mp4"]["reason"] == (f"stitch: cannot write s3://{bucket}/restored/locked.mkv: "
                                               "PermissionError: injected")  # what the store answered
    assert "denied" in videos["sealed/denied.mp4"]["reason"].lower()

    # no credential anywhere: not the secret, not a presigned URL's signature
    texts = [result.output, status.output] + [fs.cat_file(p).decode("utf-8", "replace")
                                               for p in fs.find(f"{bucket}/restored/_reelmend")]
    for text in texts:
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and "Signature=" not in text
    # the published videos' segments are cleaned up; the unwritable one keeps its own, for a resume to stitch
    (locked,) = [v["video_id"] for v in videos.values() if v["path"] == "locked.mp4"]
    kept = {p.split("/segments/")[1].split("/")[0] for p in fs.find(f"{bucket}/restored/_reelmend")
            if "/segments/" in p}
    assert kept == {locked}

    # once the store takes writes again, a resume with a larger budget (its stitch used up the job's three
    # attempts) stitches it from those segments, restoring nothing again
    resumed = runner.invoke(app, ["resume", f"s3://{bucket}/restored", "--max-attempts", "4"],
                            catch_exceptions=False)
    assert resumed.exit_code == 3, resumed.output  # denied.mp4 is still unreadable
    fs.get_file(f"{bucket}/restored/locked.mkv", str(tmp_path / "locked.mkv"))
    assert np.array_equal(decode(tmp_path / "locked.mkv"), decode(local / "bikes.mp4"))
    events = Manifest(f"s3://{bucket}/restored", job.rsplit("/", 1)[1]).read_events().to_pylist()
    runs = Counter(e["chunk_index"] for e in events
                   if e["video_id"] == locked and e["chunk_index"] >= 0 and e["status"] == "running")
    assert runs and set(runs.values()) == {1}
    assert not [p for p in fs.find(f"{bucket}/restored/_reelmend") if "/segments/" in p]  # now cleaned up


def test_storage_options_instead_of_the_environment_are_never_stored(tmp_path, clips, s3):
    """A store the environment does not describe: endpoint and credentials given as --storage-options reach
    the driver, the probe, decode, encode and stitch tasks (a fresh local Ray whose workers have no AWS
    variables at all), and appear in no file."""
    fs = fsspec.filesystem("s3")
    bucket = f"options-{os.getpid()}"
    fs.mkdir(bucket)
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "20", "-vf", "scale=160:90", "-c:v", "libx264",
           str(tmp_path / "clip.mp4"))
    fs.put_file(str(tmp_path / "clip.mp4"), f"{bucket}/raw/clip.mp4")
    secret = "storage-options-secret-9876"
    options = {"s3": {"endpoint_url": s3.endpoint, "key": os.environ["AWS_ACCESS_KEY_ID"], "secret": secret}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REELMEND_", "RAY_ADDRESS"))}
    reelmend = str(Path(sys.executable).with_name("reelmend"))
    run = subprocess.run([reelmend, "restore", f"s3://{bucket}/raw", f"s3://{bucket}/out", "--lossless",
                          "--storage-options", json.dumps(options)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    fs.get_file(f"{bucket}/out/clip.mkv", str(tmp_path / "out.mkv"))
    assert np.array_equal(decode(tmp_path / "out.mkv"), decode(tmp_path / "clip.mp4"))
    status = subprocess.run([reelmend, "status", f"s3://{bucket}/out", "--json", "--storage-options",
                             json.dumps(options)], env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and '"status": "done"' in status.stdout
    without = subprocess.run([reelmend, "status", f"s3://{bucket}/out"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert without.returncode != 0  # no endpoint, no credentials: the options were what made it work
    for text in [run.stdout, run.stderr, status.stdout] + [fs.cat_file(p).decode("utf-8", "replace")
                                                           for p in fs.find(f"{bucket}/out")]:
        assert secret not in text


def test_weights_in_a_bucket_are_read_through_its_transient_errors(tmp_path, clips, s3, ray_address):
    """--models s3://...: the driver's check and every restore actor read the weights from the bucket; a store
    that throttles and drops those reads for a while does not fail the job (an actor whose setup raises
    would fail the whole dataset)."""
    from conftest import write_tiny_weights

    fs = fsspec.filesystem("s3")
    bucket = f"weights-{os.getpid()}"
    fs.mkdir(bucket)
    weights = write_tiny_weights(tmp_path / "weights", "deblock", perturb=0.05)
    for path in weights.iterdir():
        fs.put_file(str(path), f"{bucket}/weights/{path.name}")
    (tmp_path / "in").mkdir()
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "10", "-vf", "scale=96:64", "-c:v", "ffv1",
           str(tmp_path / "in" / "clip.mkv"))
    args = ["--chain", "deblock", "--lossless", "--chunk-frames", "5"]
    local = runner.invoke(app, ["restore", str(tmp_path / "in"), str(tmp_path / "ref"), "--models", str(weights),
                                *args], catch_exceptions=False)
    assert local.exit_code == 0, local.output
    faults = [s3.fail(3, 503, match="/weights/"), s3.fail(3, None, match="/weights/")]
    try:
        result = runner.invoke(app, ["restore", str(tmp_path / "in"), str(tmp_path / "out"), "--models",
                                     f"s3://{bucket}/weights", *args], catch_exceptions=False)
    finally:
        s3.heal()
    assert result.exit_code == 0, result.output
    assert all(f.remaining == 0 for f in faults)
    assert np.array_equal(decode(tmp_path / "out" / "clip.mkv"), decode(tmp_path / "ref" / "clip.mkv"))

    # the restore actor's own setup (which of the job's readers met the faults above is up to timing)
    from pipeline.stages import RestoreStage

    fault = s3.fail(12, 503, match="/weights/")  # more than botocore's own retries absorb
    try:
        stage = RestoreStage(("deblock",), f"s3://{bucket}/weights", {})
    finally:
        s3.heal()
    assert fault.remaining == 0 and stage.chain.steps[0].net is not None
