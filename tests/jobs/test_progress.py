"""What `restore`, `resume` and `train` show while they run: a live bar on a terminal, JSON lines for logs
and CI (`--jsonl`), or silence (`--quiet`). Real jobs on the session's Ray instance."""

from __future__ import annotations

import io
import re
import json

from conftest import make_clip
from rich.console import Console
from typer.testing import CliRunner

from jobs.cli import app
from jobs.progress import Progress

runner = CliRunner()


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def archive(root):
    make_clip(root / "in" / "a.mkv", frames=50, extra=("-c:v", "ffv1"))
    (root / "in" / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    return root / "in"


def test_jsonl_reports_every_chunk_progress_to_the_end_and_the_result(ray_address, tmp_path):
    src, dest = archive(tmp_path), tmp_path / "out"
    result = runner.invoke(app, ["restore", str(src), str(dest), "--chunk-frames", "20", "--jsonl"],
                           catch_exceptions=False)
    assert result.exit_code == 3
    events = lines(result.stdout)  # every line of stdout is one JSON object
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "summary" and kinds.count("video") == 2 and "log" in kinds
    chunks = [e for e in events if e["event"] == "chunk"]
    assert sorted(e["chunk_index"] for e in chunks) == [0, 1, 2] and all(e["status"] == "done" for e in chunks)
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[0]["done"] == 0 and progress[0]["total"] == 50 and progress[0]["chunks_total"] == 3
    assert progress[-1]["done"] == 50 and progress[-1]["chunks_done"] == 3 and progress[-1]["eta_s"] == 0
    assert progress[-1]["failures"] == 1 and progress[-1]["rate"] > 0  # the broken file
    videos = {e["path"]: e for e in events if e["event"] == "video"}
    assert videos["a.mkv"]["status"] == "done" and videos["a.mkv"]["frames_out"] == 50
    assert videos["broken.mp4"]["status"] == "failed" and "not a readable media file" in videos["broken.mp4"]["reason"]
    summary = events[-1]
    assert (summary["done"], summary["failed"], summary["exit_code"]) == (1, 1, 3)

    # a resume counts what earlier runs did: it starts (and ends) at 50 of 50 frames
    again = runner.invoke(app, ["resume", str(dest), "--jsonl"], catch_exceptions=False)
    progress = [e for e in lines(again.stdout) if e["event"] == "progress"]
    assert progress[0]["done"] == progress[0]["total"] == 50 and again.exit_code == 3

    # --quiet: nothing on stdout; only the failed video, on stderr
    quiet = runner.invoke(app, ["resume", str(dest), "--quiet"], catch_exceptions=False)
    assert quiet.exit_code == 3 and quiet.stdout == ""
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()] and "broken.mp4" in quiet.stderr
    # plain: a run with nothing left to do says so
    plain = runner.invoke(app, ["resume", str(dest)], catch_exceptions=False)
    assert "nothing left to do: 1 of 2 video(s) were restored before this run, 1 failed" in " ".join(
        plain.stdout.split()), plain.stdout

    # status: a table per job with frames, duration and compute time; the same as JSON for scripts
    table = runner.invoke(app, ["status", str(dest)], catch_exceptions=False)
    assert table.exit_code == 3
    (row,) = [line for line in table.stdout.splitlines() if "a.mkv" in line]
    assert [cell.strip() for cell in row.split("│")[1:6]] == ["a.mkv", "done", "3/3", "50/50", "2.0 s"]
    assert "broken" in table.stdout and "failed" in table.stdout
    (info,) = json.loads(runner.invoke(app, ["status", str(dest), "--all", "--json"]).stdout)
    (a,) = [v for v in info["videos"] if v["path"] == "a.mkv"]
    assert a["frames_in"] == a["frames_out"] == 50 and a["duration_s"] == 2.0 and a["compute_s"] > 0


def test_jsonl_errors_are_json_too(tmp_path):
    result = runner.invoke(app, ["resume", str(tmp_path), "--jsonl"], catch_exceptions=False)
    assert result.exit_code == 2
    (event,) = lines(result.stdout)
    assert event["event"] == "error" and "no reelmend job" in event["message"] and event["exit_code"] == 2
    both = runner.invoke(app, ["resume", str(tmp_path), "--jsonl", "--quiet"], catch_exceptions=False)
    assert both.exit_code == 2 and "exclude each other" in both.stderr


def test_the_live_bar_shows_counts_rate_and_failures():
    term = Console(file=io.StringIO(), force_terminal=True, width=160)
    progress = Progress("rich", console=term)
    progress.start("restoring", total=100, done=20, unit="frames", detail="chunks {chunks_done}/{chunks_total}, "
                   "{failures} failed", chunks_done=1, chunks_total=5, failures=0)
    progress.log("a line above the bar")
    progress.update(advance=40, chunks_done=3, failures=1)
    progress.stop()
    text = term.file.getvalue()
    assert "a line above the bar" in text and "60/100 frames" in text and "chunks 3/5, 1 failed" in text
    assert "frames/s" in text
    assert re.search(r"ETA \d+:\d\d:\d\d", text)  # an estimate from the run's rate, however slow its updates


def test_plain_lines_for_logs_say_where_the_job_is():
    said = []
    progress = Progress("plain", log=said.append, every=0)
    progress.start("training", total=10, unit="steps", detail="{phase}", phase="fidelity")
    progress.update(advance=4, phase="gan")
    progress.stop()
    assert said[0].startswith("0/10 steps (0%)") and "4/10 steps (40%)" in said[-1] and said[-1].endswith("gan")


def test_an_error_in_a_ray_data_stage_is_named_by_its_cause(ray_address):
    """Ray Data hands the driver "UserCodeException: UDF failed to process a data block", the cause left on the
    worker: the one line a user sees names the cause from the remote traceback."""
    import pytest
    import ray

    from jobs.progress import error_line

    def stage(row):
        raise KeyError("the real cause")

    with pytest.raises(Exception) as err:
        ray.data.range(1).map(stage).take_all()
    assert error_line(err.value) == "KeyError: 'the real cause'"
