"""No shell anywhere: every subprocess gets an argument list. Checked over the source itself, so a later change
that reaches for a shell fails here, not in a user's archive with a file named `$(rm -rf ~).mp4`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for pkg in ("pipeline", "models", "jobs") for p in (ROOT / pkg).rglob("*.py"))
SHELL_CALLS = {"system", "popen", "getoutput", "getstatusoutput"}  # os.* / subprocess.* helpers that use a shell


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
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = ast.parse("import os, subprocess\nos.system('ls')\nsubprocess.run('ls', shell=True)\n"
                    "subprocess.run(f'ffmpeg -i {x}')\n")
    assert len(shell_uses(bad)) == 4


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shell_in(path):
    assert shell_uses(ast.parse(path.read_text(), str(path))) == []
