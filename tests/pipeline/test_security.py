"""No shell anywhere: every subprocess gets an argument list. Checked over the source itself, so a later change
that reaches for a shell fails here, not in a user's archive with a file named `$(rm -rf ~).mp4`."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for pkg in ("pipeline", "models", "jobs") for p in (ROOT / pkg).rglob("*.py"))
# os.*, subprocess.* and asyncio.* helpers that run their command through a shell
SHELL_CALLS = {"system", "popen", "getoutput", "getstatusoutput", "create_subprocess_shell"}
SHELLS = {"sh", "bash", "dash", "zsh", "/bin/sh", "/bin/bash", "/usr/bin/env"}  # [shell, "-c", command] lists


def shell_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name in SHELL_CALLS:
            found.append(f"line {node.lineno}: {name}()")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"line {node.lineno}: shell={ast.unparse(kw.value)}")
        if name in ("run", "Popen", "check_output", "check_call", "call") and node.args \
                and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
            found.append(f"line {node.lineno}: {name}() given a command string")
    for node in ast.walk(tree):  # an argument list that starts a shell on a command string, wherever it is built
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts and isinstance(node.elts[0], ast.Constant) \
                and node.elts[0].value in SHELLS:
            found.append(f"line {node.lineno}: [{node.elts[0].value!r}, ...]")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = ast.parse("import os, subprocess\nos.system('ls')\nsubprocess.run('ls', shell=True)\n"
                    "subprocess.run(f'ffmpeg -i {x}')\nsubprocess.run(['sh', '-c', cmd])\n"
                    "asyncio.create_subprocess_shell(cmd)\n")
    assert len(shell_uses(bad)) == 6


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shell_in(path):
    assert shell_uses(ast.parse(path.read_text(), str(path))) == []


def playlists(folder: Path) -> dict[str, Path]:
    """An HLS playlist and an ffconcat list, each dressed as an .mp4, naming a real clip (outside `folder`): what
    an untrusted bucket could hold to make FFmpeg read a local file (or fetch a URL) into a restored output."""
    secret = folder.parent / f"{folder.name}-secret.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25",
                    "-frames:v", "10", "-c:v", "mpeg2video", str(secret)], check=True, timeout=60)
    folder.mkdir()
    hls = folder / "playlist.mp4"
    hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:0.4,\nfile://{secret}\n#EXT-X-ENDLIST\n")
    concat = folder / "list.mp4"  # (its safe mode, the default, follows only names beside the list)
    (folder / "part.ts").write_bytes(secret.read_bytes())
    concat.write_text("ffconcat version 1.0\nfile part.ts\n")
    return {"hls": hls, "concat": concat}


def test_playlists_and_reference_files_are_refused(tmp_path):
    from pipeline import ffmpeg
    from pipeline.probe import ProbeError, probe

    assert {"hls", "concat"} <= ffmpeg.INDIRECT_DEMUXERS
    allowed = set(ffmpeg.allowed_demuxers().split(","))
    assert {"mov", "mp4", "matroska", "avi", "mpegts", "image2"} <= allowed
    assert not allowed & (ffmpeg.INDIRECT_DEMUXERS | {"lavfi", "x11grab", "v4l2"})  # nor capture devices
    for kind, path in playlists(tmp_path / "src").items():
        # Without reelmend's input options FFmpeg follows the list to the file outside:
        plain = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=format_name", "-of", "csv=p=0",
                                str(path)], capture_output=True, text=True, timeout=60)
        assert plain.stdout.strip() == kind
        with pytest.raises(ProbeError, match=rf"^refused: its format \({kind}\) names other files or URLs"):
            probe(str(path))
        with pytest.raises(ffmpeg.FFmpegError, match=r"refused: its format"):  # nor does a decode reach it
            ffmpeg.decode_frames(str(path), stream_index=0, seek=0.0, n_frames=1, width=64, height=48,
                                 high_depth=False, matrix="bt601", full_range=None)
