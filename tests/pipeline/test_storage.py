"""What storage does with what it is given: listings that survive a vanished file, URLs that would carry
credentials into the manifest, and the node's shared copies of sources from stores that cannot sign URLs."""

from __future__ import annotations

import threading

import fsspec
import pytest
from conftest import make_clip
from fsspec.implementations.memory import MemoryFileSystem

from pipeline import storage
from pipeline.config import JobSpec
from pipeline.probe import probe


def test_a_dangling_link_under_src_is_listed_to_fail_alone(tmp_path):
    src = tmp_path / "in"
    make_clip(src / "fine.mkv", frames=5, extra=("-c:v", "ffv1"))
    (src / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    assert [f.rel for f in storage.list_files(str(src))] == ["dangling.mp4", "fine.mkv"]
    with pytest.raises(storage.SourceMissing):  # SRC itself missing is another matter
        storage.list_files(str(tmp_path / "gone"))


@pytest.mark.parametrize("url", ["https://archive.example/clip.mkv?X-Amz-Signature=abc&X-Amz-Credential=AKIA",
                                 "s3://KEY:SECRET@bucket/raw", "sftp://user:pw@host/raw"])
def test_urls_carrying_credentials_are_refused_without_repeating_them(url, tmp_path):
    from jobs.cli import _validation_message
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        JobSpec(src=url, dest=str(tmp_path / "out"))
    message = _validation_message(err.value)
    assert "carries credentials" in message and "SECRET" not in message and "abc" not in message
    with pytest.raises(ValidationError):
        JobSpec(src=str(tmp_path / "in"), dest=url)


@pytest.fixture
def unsigned(tmp_path, monkeypatch):
    """A store that cannot sign URLs (fsspec's memory store, like sftp or gcsfs without a service account), holding
    real clips; downloads counted; the node's copies in a folder of the test's own."""
    monkeypatch.setenv("REELMEND_COPIES_DIR", str(tmp_path / "copies"))
    fs = fsspec.filesystem("memory")
    downloads = []
    real = MemoryFileSystem.get_file

    def counted(self, rpath, lpath, **kwargs):
        downloads.append(rpath)
        return real(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get_file", counted)
    for name in ("a.mkv", "b.mkv", "c.mkv"):
        clip = make_clip(tmp_path / "clips" / name, frames=5, extra=("-c:v", "ffv1"))
        fs.pipe(f"/reelmend-test/{name}", clip.read_bytes())
    yield downloads
    fs.rm("/reelmend-test", recursive=True)


def test_a_node_downloads_each_version_of_a_source_once_for_all_its_readers(unsigned, tmp_path):
    uri = "memory://reelmend-test/a.mkv"
    paths = []

    def read() -> None:
        with storage.ffmpeg_input(uri, version="v1") as local:
            paths.append(local)
            assert probe(local).n_frames == 5  # FFmpeg reads the copy

    readers = [threading.Thread(target=read) for _ in range(4)]  # at once, as a node's decode tasks do
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    assert len(set(paths)) == 1 and unsigned == ["/reelmend-test/a.mkv"]
    with storage.ffmpeg_input(uri, version="v2"):  # the file replaced: a new copy
        pass
    assert len(unsigned) == 2
    with storage.ffmpeg_input(uri) as local:  # no version known: a copy of its own, gone after
        own = local
    assert len(unsigned) == 3 and not (tmp_path / own).exists()


def test_copies_beyond_the_budget_go_least_recently_read_first_but_never_while_read(unsigned, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("REELMEND_COPIES_GB", str(1 / 2**30))  # one byte: every copy is over it
    copies = tmp_path / "copies"
    with storage.ffmpeg_input("memory://reelmend-test/a.mkv", version="1") as a:
        with storage.ffmpeg_input("memory://reelmend-test/b.mkv", version="1") as b:
            assert (tmp_path / a).exists() and (tmp_path / b).exists()  # both being read: both stay
        with storage.ffmpeg_input("memory://reelmend-test/c.mkv", version="1") as c:
            assert (tmp_path / a).exists() and not (tmp_path / b).exists()  # b was done with: it went
    # (trimmed when a copy is made: a, read until now, goes at the next one)
    left = {p.name for p in copies.iterdir() if not p.name.endswith(".lock")}
    assert left == {a.rsplit("/", 1)[-1], c.rsplit("/", 1)[-1]}
