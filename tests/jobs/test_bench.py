"""`reelmend bench`'s parts count what they claim to: the sequential baseline restores every frame into a
playable file, the model-only bound runs every frame, the temporary-disk probe sees staging folders.
(No timings are asserted: the figures themselves are for `reelmend bench`, not for tests.)"""

from __future__ import annotations

from conftest import decode, make_clip

from jobs.bench import cut_clips, decode_all, model_bound, sequential, temp_bytes
from pipeline.config import EncodeSpec


def test_baselines_restore_every_frame(tmp_path, clips):
    paths = cut_clips(clips / "bikes.mp4", tmp_path / "in", videos=2, frames=12, height=48)
    decoded = [decode_all(p) for p in paths]
    assert [f.shape for f in decoded] == [(12, 48, 112, 3)] * 2
    assert not (decoded[0] == decoded[1]).all()  # cut from different offsets of the clip

    fps = sequential("identity", paths, tmp_path / "seq", threads=1, chunk=5, encode=EncodeSpec())
    assert fps > 0
    for path in paths:
        out = decode(tmp_path / "seq" / f"{path.stem}.mp4")
        assert out.shape == (12, 48, 112, 3)  # every frame, in chunks of 5 (the last one short)
    assert model_bound("identity", decoded, threads=1, chunk=5) > 0


def test_temporary_disk_counts_staging_folders(tmp_path):
    dest = tmp_path / "out"
    staging = dest / "_reelmend" / "job-1" / "segments" / ".staging-abc"
    make_clip(staging / "segment.mkv", frames=5)
    assert temp_bytes(dest) == (staging / "segment.mkv").stat().st_size


def test_cpu_account_counts_a_child_process_cpu_time():
    """A child that burns one CPU-second (by its own clock, so the machine's load does not matter) shows as
    one second under its name; the sampling loses at most its last interval, and it sleeps through that."""
    import subprocess
    import sys

    from jobs.bench import CpuAccount

    burn = ("import time\nwhile time.process_time() < 1.0: pass\ntime.sleep(0.5)")
    with CpuAccount(interval=0.05) as account:
        subprocess.run([sys.executable, "-c", burn], check=True, timeout=120)
    report = account.report(cpus=2)
    child = max((v for k, v in report["seconds"].items() if k.startswith("python")), default=0.0)
    assert 0.9 <= child <= 1.3, report
    assert report["capacity_s"] >= 2 * 1.0 and 0.0 <= report["idle_share"] <= 1.0
