"""`reelmend bench`'s parts count what they claim to: the sequential baseline restores every frame into a
playable file, the model-only bound runs every frame, the temporary-disk probe sees staging folders.
(No timings are asserted: the figures themselves are for `reelmend bench`, not for tests.)"""

from __future__ import annotations

import tempfile

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


def test_temporary_disk_counts_staging_folders(tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # not what other programs keep in /tmp
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


def test_the_printed_table_holds_every_figure_of_the_json():
    """`reelmend bench` prints its JSON's figures as a table: every key the table reads is one the bench
    writes (a figure added to one and not the other would break the command only after its 13 minutes)."""
    from rich.console import Console

    from jobs.cli import perf_table

    cpu = {"share": {"ray::MapWorker(MapBatches(RestoreStage))": 0.78, "driver": 0.04}, "idle_share": 0.03}
    result = {"chain": "sr2x", "machine": {"cpus": 2, "memory_gb": 24.0},
              "input": {"videos": 4, "frames": 320, "size": "320x136"},
              "model_only_fps": {1: 1.9, 2: 3.5}, "sequential_fps": 3.4, "fps": 3.7, "fps_end_to_end": 3.2,
              "efficiency": 1.05, "efficiency_end_to_end": 0.91,
              "vs_sequential": 1.09, "vs_sequential_end_to_end": 0.94,
              "memory_ratio": 1.15, "tmp_disk_mb": 7.0, "memory": {"second_half_over_first": 1.01},
              "scaling": {"speedup_2_over_1": 1.67, "runs": [{"actors": 1, "steady_fps": 2.2, "cpu": cpu},
                                                             {"actors": 2, "steady_fps": 3.7, "cpu": cpu}]},
              "fixed_cost_s": 6.0}
    console = Console(width=200, record=True)
    console.print(perf_table(result))
    text = console.export_text()
    for figure, value in (("efficiency", "1.05"), ("memory_ratio", "1.15"), ("within the 10x", "1.01"),
                          ("scaling", "1.67x"), ("CPU of the job", "78%")):
        assert any(figure in line and value in line for line in text.splitlines()), (figure, text)
