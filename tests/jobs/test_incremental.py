"""Archives grow and get fixed: running `restore` again plans what SRC gained or replaced since the job was
planned, and nothing else; a source replaced under a job in flight fails its chunks with the reason instead of
mixing two versions of a file in one output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import decode, make_clip
from typer.testing import CliRunner

from jobs.cli import app
from pipeline import storage
from pipeline.plan import video_id

runner = CliRunner()
ARGS = ("--chain", "identity", "--lossless", "--chunk-frames", "10")


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def status(dest: Path) -> dict[str, dict]:
    return {v["path"]: v for v in json.loads(cli("status", str(dest), "--json").output)["videos"]}


def runs(dest: Path) -> list[str]:
    """The video id of every chunk run so far, once per run."""
    (job,) = (dest / "_reelmend").iterdir()
    return [e["video_id"] for e in pq.read_table(job / "events").to_pylist()
            if e["status"] == "running" and e["chunk_index"] >= 0]


def test_a_re_run_restores_new_and_replaced_files_and_redoes_nothing_else(tmp_path, ray_address):
    src, dest = tmp_path / "in", tmp_path / "out"
    make_clip(src / "kept.mkv", frames=40, extra=("-c:v", "ffv1"))
    make_clip(src / "replaced.mkv", frames=20, extra=("-c:v", "ffv1"))
    (src / "broken.mkv").write_bytes(random.Random(3).randbytes(20_000))  # a bad transfer, to be fetched again
    assert cli("restore", str(src), str(dest), *ARGS).exit_code == 3
    assert status(dest)["broken.mkv"]["status"] == "failed"
    before = runs(dest)

    make_clip(src / "broken.mkv", frames=30, extra=("-c:v", "ffv1"))  # fixed
    make_clip(src / "replaced.mkv", frames=30, extra=("-vf", "hflip", "-c:v", "ffv1"))  # a better copy
    make_clip(src / "sub" / "new.mkv", frames=20, extra=("-c:v", "ffv1"))  # digitised since
    result = cli("restore", str(src), str(dest), *ARGS)
    assert result.exit_code == 0, result.output
    assert "1 new and 2 replaced file(s)" in result.output

    videos = status(dest)
    assert sorted(videos) == ["broken.mkv", "kept.mkv", "replaced.mkv", "sub/new.mkv"]  # one row each, no ghosts
    assert {v["status"] for v in videos.values()} == {"done"}
    for name in ("kept.mkv", "replaced.mkv", "broken.mkv", "sub/new.mkv"):
        assert np.array_equal(decode(dest / name), decode(src / name)), name
    after = runs(dest)
    assert after[:len(before)] == before
    assert video_id("kept.mkv") not in after[len(before):]  # done and unchanged: not run again
    assert len(after) - len(before) == 3 + 3 + 2  # replaced (30 frames), broken (30), new (20)

    assert cli("restore", str(src), str(dest), *ARGS).exit_code == 0  # nothing changed since: nothing runs
    assert runs(dest) == after


def test_a_source_replaced_mid_job_fails_instead_of_mixing_versions(tmp_path, ray_address, inject):
    src, dest = tmp_path / "in", tmp_path / "out"
    make_clip(src / "film.mkv", frames=40, extra=("-c:v", "ffv1"))
    inject([{"stage": "restore", "rel_path": "film.mkv", "chunk_index": 2, "kind": "raise"}])
    assert cli("restore", str(src), str(dest), *ARGS, "--max-attempts", "1").exit_code == 3  # chunks 0, 1, 3 done
    inject([])
    # the same size and frame count, other pictures: decoding the remaining chunk from it would splice them in
    make_clip(src / "film.mkv", frames=40, extra=("-vf", "hflip", "-c:v", "ffv1"))

    result = cli("resume", str(dest), "--max-attempts", "2")
    assert result.exit_code == 3, result.output
    film = status(dest)["film.mkv"]
    assert film["status"] == "failed" and "source: the source changed since the job planned it" in film["reason"]
    assert "re-run `reelmend restore`" in film["reason"]
    assert not (dest / "film.mkv").exists()

    result = cli("restore", str(src), str(dest), *ARGS)  # as the reason says: the new file, restored whole
    assert result.exit_code == 0, result.output
    assert np.array_equal(decode(dest / "film.mkv"), decode(src / "film.mkv"))


@pytest.mark.parametrize("where", ["s3", "memory"])
def test_the_listed_version_tells_a_replaced_object_from_the_same_one(where, s3):
    fs = fsspec.filesystem(where)
    root = f"versions-{where}-{random.Random().randrange(10**9)}"
    if where == "s3":
        fs.mkdir(root)
    fs.pipe(f"{root}/raw/a.mp4", b"first")
    (listed,) = storage.list_files(f"{where}://{root}/raw")
    storage.check_version(listed.uri, listed.version)  # the same object: no error
    fs.pipe(f"{root}/raw/a.mp4", b"other")  # same size, other content
    with pytest.raises(storage.SourceChanged, match="changed since the job planned it"):
        storage.check_version(listed.uri, listed.version)
    fs.rm(f"{root}/raw/a.mp4")
    with pytest.raises(storage.SourceChanged, match="gone"):
        storage.check_version(listed.uri, listed.version)


def test_a_symlinked_source_is_the_file_it_links_to(tmp_path, ray_address):
    """A listing describes a symlink itself; FFmpeg reads what it links to: the version is the target's."""
    src, dest = tmp_path / "in", tmp_path / "out"
    target = make_clip(tmp_path / "store" / "film.mkv", frames=20, extra=("-c:v", "ffv1"))
    src.mkdir()
    (src / "film.mkv").symlink_to(target)
    assert cli("restore", str(src), str(dest), *ARGS).exit_code == 0
    assert np.array_equal(decode(dest / "film.mkv"), decode(target))
    before = runs(dest)
    assert cli("restore", str(src), str(dest), *ARGS).exit_code == 0 and runs(dest) == before  # not "replaced"


def test_plan_only_probes_and_plans_then_the_same_command_restores_with_that_plan(tmp_path, ray_address):
    src, dest = tmp_path / "in", tmp_path / "out"
    make_clip(src / "a.mkv", frames=40, extra=("-c:v", "ffv1"))
    make_clip(src / "b.mkv", frames=25, extra=("-c:v", "ffv1"))
    (src / "c.mp4").write_bytes(b"")
    planned = cli("restore", str(src), str(dest), *ARGS, "--plan-only")
    assert planned.exit_code == 3, planned.output  # an input cannot be restored; nothing else failed
    text = " ".join(planned.output.split())
    assert "probing 3 file(s)" in text
    assert "cannot restore c.mp4: the file is empty" in text
    assert "2 video(s) to restore, 0:00:03 of video (65 source frames in 7 chunks" in text
    assert "1 input(s) cannot be restored. Nothing was restored" in text
    assert sorted(p.name for p in dest.iterdir()) == ["_reelmend"]  # no output, no chunk run
    assert runs(dest) == []
    assert {v["path"]: v["status"] for v in status(dest).values()} == {"a.mkv": "pending", "b.mkv": "pending",
                                                                        "c.mp4": "failed"}

    result = cli("restore", str(src), str(dest), *ARGS)
    assert result.exit_code == 3 and "probing" not in result.output  # the plan made above, not a second probe
    assert np.array_equal(decode(dest / "a.mkv"), decode(src / "a.mkv"))
    again = cli("restore", str(src), str(dest), *ARGS, "--plan-only")
    assert "0 video(s) to restore" in " ".join(again.output.split())
