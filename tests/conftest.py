"""Shared test fixtures: one real local Ray instance per session, real clips, FFmpeg-made sources, and helpers
that look at outputs the way a user would (decoded frames, packet hashes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from jobs.demo import sample_clips_dir  # noqa: E402
from models.chain import STAGES  # noqa: E402
from models.weights import save_weights  # noqa: E402

TINY_ARGS = {
    "RestorerNet": {"features": 8, "blocks": 2},
    "CompactSR": {"features": 8, "convs": 2},
    "FlowInterp": {"features": 8, "levels": 2},
}


@pytest.fixture(scope="session")
def faults_file(tmp_path_factory) -> Path:
    """Where the fault-injection suite writes its faults (pipeline/faults.py); Ray's workers inherit the
    variable from this process, which starts Ray. No file, no faults."""
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    os.environ["REELMEND_FAULTS"] = str(path)
    return path


@pytest.fixture
def inject(faults_file):
    """inject([...faults]) arms faults for the rest of the test; they are disarmed afterwards."""
    def arm(faults: list[dict]) -> None:
        faults_file.write_text(json.dumps(faults))
    yield arm
    for path in faults_file.parent.glob("faults.json*"):
        path.unlink()


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server on loopback (moto, behind a proxy that misbehaves on demand). Clients find it
    the way users' do, through the standard AWS variables, which Ray's workers inherit from this process."""
    import logging

    from s3server import FlakyS3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = FlakyS3().start()
    os.environ.update(AWS_ACCESS_KEY_ID="reelmend-test-key", AWS_SECRET_ACCESS_KEY="reelmend-test-secret-0123",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=server.endpoint)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_address(faults_file, s3):
    """A real local Ray instance shared by the session (starting one costs ~5 s)."""
    import ray

    from pipeline.run import start_local

    start_local(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def clips() -> Path:
    return sample_clips_dir()


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True,
                   timeout=300)


def make_clip(path: Path, *, size: str = "96x64", frames: int = 40, rate: str = "25", extra: tuple = ()) -> Path:
    """A synthetic source with motion everywhere (testsrc2), so any frame misplacement shows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-frames:v", str(frames), *extra, str(path))
    return path


def decode(path: Path | str, pix_fmt: str = "rgb24") -> np.ndarray:
    """All frames of the first video stream as (n, H, W, 3), in stored orientation and without rate changes."""
    info = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                           "stream=width,height", "-of", "csv=p=0", str(path)],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip().split(",")
    w, h = int(info[0]), int(info[1])
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-noautorotate", "-i", str(path), "-map", "0:v:0",
                          "-fps_mode", "passthrough", "-vf", "scale=flags=accurate_rnd+full_chroma_int",
                          "-pix_fmt", pix_fmt, "-f", "rawvideo", "pipe:1"],
                         check=True, capture_output=True, timeout=300).stdout
    dtype = np.uint16 if pix_fmt == "rgb48le" else np.uint8
    return np.frombuffer(raw, dtype=dtype).reshape(-1, h, w, 3)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def stream_hashes(path: Path | str, selector: str) -> list[str]:
    """Per-packet MD5s of the selected streams, copied without decoding (FFmpeg's framemd5 muxer)."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", selector, "-c", "copy",
                          "-f", "framemd5", "pipe:1"], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    return [line.rsplit(",", 1)[-1].strip() for line in out.splitlines() if line and not line.startswith("#")]


def video_md5(path: Path | str) -> str:
    return hashlib.md5(decode(path).tobytes()).hexdigest()


def probe_stream(path: Path | str, entries: str, selector: str = "v:0") -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", selector, "-count_packets",
                          "-show_entries", f"stream={entries}", "-of", "default=nw=1", str(path)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def write_tiny_weights(folder: Path, stage: str, flavour: str = "fidelity", perturb: float = 0.0,
                       seed: int = 0, args: dict | None = None) -> Path:
    """Freshly initialised tiny weights for `stage`, saved the way `reelmend train --out` saves them.
    With `perturb`, every parameter gets seeded noise, so the stage is not the identity its init is; `args`
    override the architecture's arguments."""
    info = STAGES[stage]
    args = {**info.default_args, **TINY_ARGS[info.arch.__name__], **(args or {})}
    torch.manual_seed(seed)
    net = info.arch(**args)
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * perturb)
    save_weights(net, str(folder), stage, flavour, args, {"command": "tests: fresh tiny init"})
    return folder


@pytest.fixture
def copy_clip(clips):
    def copy(name: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clips / name, dest)
        return dest
    return copy


@pytest.fixture
def cluster():
    """cluster([node args...]): a head that holds the driver and no work (num_cpus=0), plus worker nodes."""
    from ray.cluster_utils import Cluster

    made = []

    def make(nodes: list[dict], **head):
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                          "dashboard_agent_listen_port": free_port(), **head})
        made.append(c)
        workers = [c.add_node(object_store_memory=150 * 2**20, **args) for args in nodes]
        c.wait_for_nodes()
        return c, workers

    yield make
    for c in made:
        c.shutdown()


def free_port() -> int:
    """A port for a head's dashboard agent: its default (52365) is taken by the session's own Ray instance."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- where the suite's time goes: seconds per test file at the end of the run (CI's log keeps it) ------------

_file_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report) -> None:
    path = report.nodeid.split("::", 1)[0]
    _file_seconds[path] = _file_seconds.get(path, 0.0) + report.duration  # setup, call and teardown


def pytest_terminal_summary(terminalreporter) -> None:
    if not _file_seconds:
        return
    terminalreporter.section("seconds per test file")
    for path, seconds in sorted(_file_seconds.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}  {path}")
