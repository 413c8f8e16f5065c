"""The manifest's event log: chunk states folded incrementally agree with a fold of every part from scratch."""

from __future__ import annotations

import os

from pipeline.manifest import Manifest


def event(chunk: int, status: str, attempt: int = 1) -> dict:
    return {"video_id": "v1", "chunk_index": chunk, "status": status, "attempt": attempt,
            "error_kind": "decode" if status == "failed" else None,
            "error_message": "boom" if status == "failed" else None, "frames_out": 10 if status == "done" else None}


def test_chunk_states_read_only_new_parts_and_match_a_fresh_fold(tmp_path, monkeypatch):
    dest = str(tmp_path / "out")
    m = Manifest(dest, "job-a")
    read = []
    original = Manifest._read_parts
    monkeypatch.setattr(Manifest, "_read_parts", lambda self, names: read.extend(names) or original(self, names))

    m.append_events([event(0, "running"), event(1, "running")])
    m.append_events([event(0, "failed")])
    assert m.chunk_states()[("v1", 0)].failures == 1
    assert len(read) == 2

    read.clear()
    m.append_events([event(0, "running", 2)])
    m.append_events([event(0, "done", 2), event(1, "done")])
    states = m.chunk_states()
    assert len(read) == 2, "only the two parts committed since the last call are read"
    assert states == Manifest(dest, "job-a").chunk_states()
    assert states[("v1", 0)].status == "done" and states[("v1", 0)].failures == 1
    assert states[("v1", 1)].frames_out == 10

    read.clear()
    assert m.chunk_states() == states and not read  # nothing new, nothing read


def test_a_part_that_sorts_before_the_folded_ones_refolds_everything(tmp_path):
    """A driver whose clock stepped back commits a part whose name sorts first: the states are still those of the
    parts in name order, as a fresh reader sees them."""
    dest = str(tmp_path / "out")
    m = Manifest(dest, "job-b")
    m.append_events([event(0, "done")])
    assert m.chunk_states()[("v1", 0)].status == "done"
    m.append_events([event(0, "failed")])
    folder = os.path.join(dest, "_reelmend", "job-b", "events")
    newest = sorted(os.listdir(folder))[-1]
    os.rename(os.path.join(folder, newest), os.path.join(folder, "part-00000000000000000001-early.parquet"))
    states = m.chunk_states()
    assert states == Manifest(dest, "job-b").chunk_states()
    assert states[("v1", 0)].status == "done" and states[("v1", 0)].failures == 1


def _event(i: int) -> dict:
    return {"video_id": "v", "chunk_index": i, "status": "done", "attempt": 1}


def test_event_writer_commits_while_no_result_comes_and_keeps_what_a_failed_commit_held(tmp_path, monkeypatch):
    import time

    from pipeline.manifest import EventWriter

    manifest = Manifest(str(tmp_path / "out"), "job-x")
    with EventWriter(manifest, interval=0.1) as writer:
        writer.add(_event(0))
        writer.add(_event(1))
        deadline = time.monotonic() + 10
        while manifest.read_events().num_rows < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # nothing else is added: the writer's own thread must commit them
        assert [e["chunk_index"] for e in manifest.read_events().to_pylist()] == [0, 1]

        real = manifest.append_events
        monkeypatch.setattr(manifest, "append_events", lambda *a: (_ for _ in ()).throw(OSError("store down")))
        writer.add(_event(2))
        time.sleep(0.35)  # commits fail: the event stays buffered
        monkeypatch.setattr(manifest, "append_events", real)
        writer.add(_event(3))
    assert [e["chunk_index"] for e in manifest.read_events().to_pylist()] == [0, 1, 2, 3]


def test_a_commit_that_landed_but_reported_an_error_is_not_recorded_twice(tmp_path, monkeypatch):
    """A store can answer an error for a write that landed (a timeout after the PUT completed): the writer's next
    try writes the same part again, with what came since, instead of a second part holding the same events."""
    import pytest

    from pipeline.manifest import EventWriter

    manifest = Manifest(str(tmp_path / "out"), "job-x")
    real = manifest.append_events

    def landed_then_failed(events, name=None):
        real(events, name)
        monkeypatch.setattr(manifest, "append_events", real)
        raise OSError("read timeout")

    monkeypatch.setattr(manifest, "append_events", landed_then_failed)
    with EventWriter(manifest, interval=60) as writer:
        writer.add(_event(0))
        with pytest.raises(OSError):
            writer.flush()
        writer.add(_event(1))
    assert sorted(e["chunk_index"] for e in manifest.read_events().to_pylist()) == [0, 1]
    assert len(list((tmp_path / "out" / "_reelmend" / "job-x" / "events").glob("part-*"))) == 1


def test_reasons_are_kept_as_one_printable_line(tmp_path):
    """FFmpeg's multi-line errors and names holding newlines or terminal escapes reach the manifest as one line
    whose control characters are written out: status tables and logs stay one line a video, and inert."""
    from pipeline.plan import failed_video_row

    manifest = Manifest(str(tmp_path / "out"), "job-x")
    manifest.append_events([{**_event(0), "status": "failed", "error_message": "decode:\n  bad\tpacket\x1b[31m"}])
    assert manifest.read_events().to_pylist()[0]["error_message"] == "decode: bad packet\\x1b[31m"
    row = failed_video_row("job-x", "/in/a\nb.mkv", "a\nb.mkv", "its output is also that of a\x1bb.mov\nrename",
                           str(tmp_path / "out"))
    manifest.add_plan_part([row], 0)
    assert manifest.read_plan().to_pylist()[0]["error"] == "its output is also that of a\\x1bb.mov rename"


def test_event_writer_of_a_run_that_lost_its_lease_records_nothing(tmp_path):
    import pytest

    from pipeline.lease import LeaseLost
    from pipeline.manifest import EventWriter

    manifest = Manifest(str(tmp_path / "out"), "job-x")
    lost = False

    def check() -> None:
        if lost:
            raise LeaseLost("taken over")

    with pytest.raises(LeaseLost):
        with EventWriter(manifest, interval=0.1, check=check) as writer:
            lost = True
            writer.add(_event(0))
            writer.add(_event(1))
            raise LeaseLost("taken over")  # as the driver's own check would
    with EventWriter(manifest, interval=60, check=check) as writer:  # nor does leaving the block commit
        writer.add(_event(2))
        with pytest.raises(LeaseLost):
            writer.flush()
    assert manifest.read_events().num_rows == 0


def test_publish_to_a_store_without_atomic_puts_renames_a_hidden_upload_into_place(tmp_path, monkeypatch):
    """sftp, webdav, hdfs: an upload can be seen half-written, so it goes to a hidden sibling first (here a
    `dir://` filesystem, which fsspec does not treat as local, over a temporary folder)."""
    from fsspec.implementations.dirfs import DirFileSystem

    from pipeline import storage

    uploads = []
    put = DirFileSystem.put_file
    monkeypatch.setattr(DirFileSystem, "put_file", lambda self, lpath, rpath, **kw: uploads.append(rpath) or
                        put(self, lpath, rpath, **kw))
    storage.configure({"dir": {"path": str(tmp_path / "store"), "target_protocol": "file"}})
    try:
        (tmp_path / "store" / "out").mkdir(parents=True)
        local = tmp_path / "restored.mkv"
        local.write_bytes(b"frames" * 1000)
        storage.publish(local, "dir:///out/restored.mkv")
    finally:
        storage.configure({})
    assert (tmp_path / "store" / "out" / "restored.mkv").read_bytes() == b"frames" * 1000
    (upload,) = uploads
    assert upload.rsplit("/", 1)[-1].startswith(".") and upload != "/out/restored.mkv"
    assert sorted(p.name for p in (tmp_path / "store" / "out").iterdir()) == ["restored.mkv"]
