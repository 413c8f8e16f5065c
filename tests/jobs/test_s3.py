"""A restore from one bucket to another on an S3-compatible server (moto on loopback) that throttles and drops
connections for a while and refuses one object for good: the transient errors are retried, the refused video
fails alone, and the manifest lives in the bucket beside the outputs, with no credential in it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
from conftest import decode, ffmpeg, stream_hashes
from typer.testing import CliRunner

from jobs.cli import app

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

    faults = [
        s3.fail(None, 403, match="denied.mp4"),     # permanent: this object is refused for good
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
    assert result.exit_code == 3, result.output  # one video failed, the others are done
    assert all(f.spoiled > 0 for f in faults)
    assert all(f.remaining == 0 for f in faults[1:])  # every transient fault was hit, and outlasted

    outputs = sorted(fs.find(f"{bucket}/restored", maxdepth=1, withdirs=False))
    assert outputs == [f"{bucket}/restored/bikes.mkv", f"{bucket}/restored/bunny.mkv"]
    for name in ("bikes", "bunny"):
        fs.get_file(f"{bucket}/restored/{name}.mkv", str(tmp_path / f"{name}.mkv"))
        assert np.array_equal(decode(tmp_path / f"{name}.mkv"), decode(local / f"{name}.mp4"))
    assert stream_hashes(tmp_path / "bunny.mkv", "0:a") == stream_hashes(local / "bunny.mp4", "0:a")

    (job,) = fs.ls(f"{bucket}/restored/_reelmend")
    plan = pq.read_table(io.BytesIO(fs.cat_file(f"{job}/plan/part-00000.parquet"))).to_pylist()
    assert {r["source_uri"] for r in plan} == {f"s3://{bucket}/raw/{n}" for n in
                                              ("bikes.mp4", "bunny.mp4", "sealed/denied.mp4")}
    status = runner.invoke(app, ["status", f"s3://{bucket}/restored", "--json"])
    assert status.exit_code == 3
    assert '"status": "failed"' in status.output and "denied" in status.output

    # no credential anywhere: not the secret, not a presigned URL's signature
    texts = [result.output, status.output] + [fs.cat_file(p).decode("utf-8", "replace")
                                               for p in fs.find(f"{bucket}/restored/_reelmend")]
    for text in texts:
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and "Signature=" not in text
    assert not [p for p in fs.find(f"{bucket}/restored/_reelmend") if "/segments/" in p]  # cleaned up


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
