"""Bad usage and bad job specs fail before any work starts, with exit status 2 and one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_clip
from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_bad_specs_exit_2_and_write_nothing(tmp_path):
    src = make_clip(tmp_path / "in" / "a.mkv", frames=3, extra=("-c:v", "ffv1")).parent
    dest = tmp_path / "out"
    before = [p.name for p in tmp_path.iterdir()]
    cases = [
        (["--chain", "denoise,sr3x"], "unknown stage 'sr3x'"),
        (["--crf", "60"], "--crf 60 is out of range for h264"),
        (["--crf", "99"], "--crf: Input should be less than or equal to 63"),
        (["--chain", "sr2x", "--models", str(tmp_path / "nowhere")], "no weights for stage 'sr2x'"),
        (["--chain", "sr2x:gan", "--models", str(tmp_path / "nowhere")], "no weights for stage 'sr2x:gan'"),
        (["--chunk-frames", "1"], "--chunk-frames: Input should be greater than or equal to 2"),
        (["--actors", "3:2"], "--actors MIN:MAX"),
        (["--storage-options", "@/nonexistent.json"], "--storage-options @/nonexistent.json: cannot read"),
        (["--codec", "mpeg1"], "codec"),
    ]
    for extra, message in cases:
        result = run("restore", str(src), str(dest), *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), (extra, result.output)
        assert result.output.startswith("error: ") and "Traceback" not in result.output
        assert not dest.exists()
    result = run("restore", str(src), str(src / "inside"))
    assert result.exit_code == 2 and "must not be SRC or lie inside it" in " ".join(result.output.split())
    # the same folder written another way, and the other direction (an output could replace its own source)
    for other_src, other_dest in ((f"file://{src}/", f"{src}/./restored"), (str(src), f"{src}/sub/.."),
                                  (str(next(src.iterdir())), str(src)), (str(src), str(tmp_path))):
        result = run("restore", other_src, other_dest)
        assert result.exit_code == 2, (other_src, other_dest, result.output)
        assert "must not" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    result = run("restore", str(tmp_path / "missing"), str(dest))
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not dest.exists()  # not even the job's lease
    (tmp_path / "empty").mkdir()
    result = run("restore", str(tmp_path / "empty"), str(dest))
    assert result.exit_code == 2 and "no files under" in result.output
    assert not dest.exists()
    dest.write_bytes(b"not a folder")  # a DEST that is a file: said at once, exit 2
    result = run("restore", str(src), str(dest))
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output


def test_a_rejected_spec_never_prints_its_credentials(tmp_path):
    """pydantic puts the rejected value in its message; --verbose prints the traceback: neither may show a secret."""
    src = make_clip(tmp_path / "in" / "a.mkv", frames=3, extra=("-c:v", "ffv1")).parent
    secret = "s3cr3t-42"  # short: pydantic elides the middle of a long value, which would hide a leak here
    options = tmp_path / "store.json"
    options.write_text(f'{{"S3": {{"key": "AKIA1", "secret": "{secret}"}}}}')
    reelmend = str(Path(sys.executable).with_name("reelmend"))  # a real process: what the terminal shows
    for verbose in ([], ["--verbose"]):
        result = subprocess.run([reelmend, "restore", str(src), str(tmp_path / "out"), "--storage-options",
                                 f"@{options}", *verbose], capture_output=True, text=True, timeout=120)
        shown = result.stdout + result.stderr
        assert result.returncode == 2, shown
        assert "not a protocol name" in shown and ("Traceback" in shown) == bool(verbose)
        assert secret not in shown and "AKIA1" not in shown


def test_status_and_resume_of_a_folder_without_a_job(tmp_path):
    for command in ("status", "resume"):
        result = run(command, str(tmp_path))
        assert result.exit_code == 2 and "no reelmend job" in result.output


def test_bad_train_commands_exit_2_before_ray_starts(tmp_path):
    out = tmp_path / "run"
    cases = [
        (["identity"], "cannot train stage 'identity'"),
        (["sr4x", "--patch", "48"], "--patch must be a multiple of 32"),
        (["denoise", "--arch", "RRDBNet"], "takes architecture RestorerNet"),
        (["denoise", "--arch-args", "{features: 8}"], "--arch-args is not JSON"),
        (["denoise", "--adversarial", "wasserstein"], "adversarial"),
        (["denoise", "--steps", "0"], "needs --init DIR"),
        (["denoise", "--resume"], "nothing to resume"),
        (["denoise", "--lr-schedule", "step"], "--lr-schedule: Input should be"),
        (["denoise", "--d-lr", "0"], "--d-lr: Input should be greater than 0"),
        (["denoise", "--init", str(tmp_path / "nowhere")], "no weights for stage 'denoise'"),
        (["denoise", "--init", str(tmp_path / "nowhere")], "`--init DIR` to train from"),
    ]
    for extra, message in cases:
        result = run("train", *extra, "--data", str(tmp_path), "--out", str(out))
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), (extra, result.output)
        assert not out.exists()
    for data, message in ((tmp_path / "nowhere", f"--data {tmp_path / 'nowhere'} does not exist"),
                          (tmp_path, f"no videos or images under {tmp_path}")):
        result = run("train", "denoise", "--data", str(data), "--out", str(out))
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output and "Ray" not in result.output  # Ray was never started
        assert not out.exists()
    out.write_bytes(b"a file")
    result = run("train", "denoise", "--data", str(tmp_path), "--out", str(out))
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output


def test_train_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    """Ray's workers run in other directories: a relative --data, --out or --init must not reach them."""
    from jobs.train_config import TrainSpec

    monkeypatch.chdir(tmp_path)
    spec = TrainSpec(stage="denoise", data="clips", out="runs/a", init="weights")
    assert (spec.data, spec.out, spec.init) == (str(tmp_path / "clips"), str(tmp_path / "runs/a"),
                                                str(tmp_path / "weights"))
    remote = TrainSpec(stage="denoise", data="s3://bucket/clips", out="s3://bucket/runs")
    assert (remote.data, remote.out, remote.init) == ("s3://bucket/clips", "s3://bucket/runs", None)


def test_bad_bench_commands_exit_2(tmp_path):
    cases = [
        (["quality"], "needs --clean URI"),
        (["quality", "--clean", str(tmp_path), "--stages", "sr3x"], "unknown stage(s) sr3x"),
        (["quality", "--clean", str(tmp_path), "--clean-scale", "2"], "--clean-scale must be in (0, 1]"),
        (["speed"], "unknown benchmark 'speed'"),
    ]
    for extra, message in cases:
        result = run("bench", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), (extra, result.output)


def test_resume_refuses_a_dest_that_was_moved(tmp_path, monkeypatch):
    """A job's plan names every output's place: resumed from a moved or copied DEST it would write to the old one."""
    from pipeline.config import JobSpec
    from pipeline.manifest import Manifest

    monkeypatch.chdir(tmp_path)
    spec = JobSpec(src="in/", dest="out")  # local paths are made absolute: workers and later runs agree on them
    assert (spec.src, spec.dest) == (str(tmp_path / "in"), str(tmp_path / "out"))
    Manifest(spec.dest, spec.resolved_job_id()).write_spec(spec)
    (tmp_path / "out").rename(tmp_path / "moved")
    result = run("resume", "moved")
    assert result.exit_code == 2 and f"was made for DEST {tmp_path / 'out'}" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_job_id_given_again_with_other_options_says_which_differ(tmp_path, ray_address):
    src = make_clip(tmp_path / "in" / "a.mkv", frames=3, extra=("-c:v", "ffv1")).parent
    dest = tmp_path / "out"
    planned = run("restore", str(src), str(dest), "--job-id", "mine", "--crf", "18", "--plan-only")
    assert planned.exit_code == 0, planned.output
    again = run("restore", str(src), str(dest), "--job-id", "mine", "--crf", "20", "--chain", "identity")
    assert again.exit_code == 2
    said = " ".join(again.output.split())
    assert "planned with other options" in said and "encode.crf: 18 planned, 20 given" in said, said
    assert "chain:" not in said  # identity is the default chain: no difference there


def test_a_job_never_takes_over_another_jobs_outputs(tmp_path, ray_address):
    """Restoring into a DEST another job already writes to, with other options (another id), would overwrite
    that job's outputs while its manifest still calls them its own: refused before anything is written. A file
    a later re-run of a job finds, whose output another job has, fails alone."""
    from pipeline.manifest import Manifest, list_jobs

    src = make_clip(tmp_path / "in" / "a.mkv", frames=3, extra=("-c:v", "ffv1")).parent
    dest = tmp_path / "out"
    first = run("restore", str(src), str(dest), "--crf", "18", "--plan-only")
    assert first.exit_code == 0, first.output
    [job] = list_jobs(str(dest))
    again = run("restore", str(src), str(dest), "--crf", "20", "--plan-only")
    said = " ".join(again.output.split())
    assert again.exit_code == 2 and "error: " in said and "Traceback" not in said, said
    assert f"job {job} under {dest} already writes 1 of this job's outputs (e.g. a.mkv)" in said, said
    assert "encode.crf: 18 planned, 20 given" in said and f"--job-id {job}" in said, said
    assert list_jobs(str(dest)) == [job]  # nothing of the refused job's was written

    other = make_clip(tmp_path / "in2" / "b.mkv", frames=3, extra=("-c:v", "ffv1")).parent
    second = run("restore", str(other), str(dest), "--plan-only")  # other names: no clash
    assert second.exit_code == 0, second.output
    (other / "a.mkv").write_bytes((src / "a.mkv").read_bytes())  # now it has a file whose output is job's
    rerun = run("restore", str(other), str(dest), "--plan-only")
    assert rerun.exit_code == 3, rerun.output
    [job2] = [j for j in list_jobs(str(dest)) if j != job]
    plan = {r["rel_path"]: r for r in Manifest(str(dest), job2).read_plan().to_pylist()}
    assert plan["a.mkv"]["chunk_index"] == -1 and plan["b.mkv"]["chunk_index"] >= 0
    reasons = Manifest(str(dest), job2).read_events().to_pylist()
    assert any(f"also an output of job {job}" in (e["error_message"] or "") for e in reasons), reasons


def test_of_two_new_jobs_planning_one_output_at_once_neither_goes_on_alone(tmp_path, ray_address, monkeypatch):
    """Each job holds only its own lease, so a job can probe while another plans the same outputs: it checks
    again once its plan is written, and gives way (its plan removed) when the other's is there."""
    from jobs import restore
    from pipeline.manifest import Manifest, list_jobs

    src = make_clip(tmp_path / "in" / "a.mkv", frames=3, extra=("-c:v", "ffv1")).parent
    dest = tmp_path / "out"
    real, calls = restore.other_jobs_outputs, []

    def first_sees_nothing(dest_uri, job_id):  # as if the other job wrote its plan just after this one looked
        calls.append(job_id)
        return {} if len(calls) == 1 else real(dest_uri, job_id)

    assert run("restore", str(src), str(dest), "--crf", "18", "--plan-only").exit_code == 0
    [job] = list_jobs(str(dest))
    monkeypatch.setattr(restore, "other_jobs_outputs", first_sees_nothing)
    late = run("restore", str(src), str(dest), "--crf", "20", "--plan-only")
    assert late.exit_code == 2 and f"job {job} under {dest} already writes" in " ".join(late.output.split())
    assert len(calls) == 2 and list_jobs(str(dest)) == [job]  # its plan and spec removed
    assert not Manifest(str(dest), calls[0]).has_plan()


def test_a_job_spec_with_a_field_reelmend_does_not_know_is_refused(tmp_path, monkeypatch):
    """Specs forbid unknown fields: a job.json edited by hand (or written by another version) with a field this
    version does not know is refused, naming it, before any work; it is not silently ignored."""
    from pipeline.config import JobSpec
    from pipeline.manifest import Manifest

    spec = JobSpec(src=str(tmp_path / "in"), dest=str(tmp_path / "out"))
    manifest = Manifest(spec.dest, spec.resolved_job_id())
    manifest.write_spec(spec)
    job_json = Path(manifest.root) / "job.json"
    edited = {**json.loads(job_json.read_text()), "max_atempts": 9}  # a typo of max_attempts
    job_json.write_text(json.dumps(edited))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for command in ("resume", "status"):
        result = run(command, str(tmp_path / "out"))
        said = " ".join(result.output.split())
        assert result.exit_code == 2, said
        assert f"{job_json} is not a job spec" in said and "max_atempts: Extra inputs are not permitted" in said
        assert "Traceback" not in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
