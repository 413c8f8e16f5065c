"""`reelmend bench memory`: peak memory of a whole restoration job (driver, Ray's processes and workers, the
object store) for an input 10x longer than another. Memory must not grow with video length.

Each run is a fresh `reelmend restore` process starting its own local Ray instance; its process tree is
sampled for PSS (proportional set size: shared pages such as the object store's are split among the
processes that map them, so they are counted once).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from jobs.demo import sample_clips_dir
from pipeline import ffmpeg


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure_restore(src: Path, dest: Path, chain: str, interval: float = 0.25) -> dict:
    """Run one restore in a child process; return its wall time and peak PSS of its process tree."""
    args = [str(Path(sys.executable).with_name("reelmend")), "restore", str(src), str(dest), "--chain", chain]
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_pss(root))
        time.sleep(interval)
    if proc.returncode != 0:
        raise RuntimeError(f"restore exited with {proc.returncode}: {' '.join(args)}")
    return {"seconds": round(time.monotonic() - started, 2), "peak_pss_mb": round(peak / 2**20, 1)}


def bench_memory(json_out: str | None, seconds: int = 4, factor: int = 10, chain: str = "identity") -> dict:
    with tempfile.TemporaryDirectory(prefix="reelmend-bench-") as tmp:
        root = Path(tmp)
        runs = {}
        for name, loops in (("1x", 1), (f"{factor}x", factor)):
            src = root / name / "in"
            src.mkdir(parents=True)
            # bikes.mp4 (real footage, 640x272, 25 fps), `seconds` long, looped to make the longer input
            subprocess.run([*ffmpeg.BASE, "-stream_loop", str(loops - 1), "-i", str(sample_clips_dir() / "bikes.mp4"),
                            "-t", str(seconds * loops), "-c:v", "libx264", "-preset", "veryfast",
                            str(src / "clip.mp4")], check=True, timeout=600, capture_output=True)
            runs[name] = {"frames": 25 * seconds * loops, **measure_restore(src, root / name / "out", chain)}
    result = {"chain": chain, "runs": runs,
              "memory_ratio": round(runs[f"{factor}x"]["peak_pss_mb"] / runs["1x"]["peak_pss_mb"], 3)}
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result
