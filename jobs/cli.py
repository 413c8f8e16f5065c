"""The `reelmend` command line. Exit status: 0 every video succeeded, 3 some failed (the rest done),
2 bad usage or configuration, 1 a crash of the tool itself."""

from __future__ import annotations

import functools
import json
import re
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.table import Table

from pipeline.text import printable

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Restore video archives at scale with GAN models on Ray.")
# no emoji codes either: a file named "take:fire:1.mkv" prints as it is
console = Console(stderr=True, highlight=False, emoji=False)
out = Console(highlight=False, emoji=False)

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
_MORE = {False: " (--verbose shows the traceback)", True: ""}  # what an unexpected error's line ends with


def escape(text: str) -> str:
    """`text` as the console prints it: rich's markup escaped, control characters written out (a file's name
    may hold a newline or a terminal escape sequence)."""
    return escape_markup(printable(text))


def _fail(err: BaseException, code: int, verbose: bool, progress=None) -> None:
    if verbose:
        console.print(traceback.format_exc(), markup=False)
    message = " ".join(str(err).split()) or type(err).__name__
    if progress is not None:
        progress.stop()
        progress.event("error", message=message, exit_code=code)
    console.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        parts.append(f"{_where(e['loc'])}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _where(loc: tuple) -> str:
    """The command-line flag a rejected field came from (`chunk_frames` -> `--chunk-frames`, `encode.crf` ->
    `--crf`), or its place in the spec where no flag has its name (a job.json read back)."""
    if not loc:
        return "job spec"
    name = str(loc[-1])
    if name in ("src", "dest", "stage"):
        return name.upper()
    flag = "--" + name.replace("_", "-")
    if flag in _all_flags():
        return flag
    return ".".join(str(p) for p in loc)


@functools.cache
def _all_flags() -> frozenset[str]:
    group = typer.main.get_command(app)
    return frozenset(opt for command in group.commands.values() for p in command.params for opt in p.opts)


def _guarded(fn, verbose: bool, progress=None):
    """Map failures to exit codes: config and input problems found before any work are 2, anything unexpected
    (a job stopped mid-way included, whatever it raised) is 1."""
    from jobs.progress import JobStopped, error_line, raised_in_ray
    from models.weights import WeightsError
    from pipeline.lease import LeaseHeld

    try:
        return fn()
    except typer.Exit:
        raise
    except ValidationError as err:
        _fail(ValueError(_validation_message(err)), EXIT_USAGE, verbose, progress)
    except KeyboardInterrupt:
        console.print("interrupted; `reelmend resume DEST` continues where this stopped")
        raise typer.Exit(130)
    except JobStopped as err:
        _fail(RuntimeError(f"{err}{_MORE[verbose]}"), EXIT_CRASH, verbose, progress)
    except (WeightsError, FileNotFoundError, ValueError, LeaseHeld) as err:
        if raised_in_ray(err):  # a remote ValueError is a failure of the work, not of the command line
            _fail(RuntimeError(f"{error_line(err)}{_MORE[verbose]}"), EXIT_CRASH, verbose, progress)
        _fail(err, EXIT_USAGE, verbose, progress)
    except Exception as err:  # noqa: BLE001
        _fail(RuntimeError(f"{error_line(err)}{_MORE[verbose]}"), EXIT_CRASH, verbose, progress)


STORAGE_HELP = ("fsspec options per protocol as JSON, or @FILE holding it, e.g. '{\"s3\": {\"endpoint_url\": "
                "\"https://...\"}}'; default: the standard environment (AWS_* variables). Never stored.")


def _without_credentials(argv: list[str]) -> list[str]:
    """The command line as a model card records it: an inline --storage-options value (credentials, perhaps)
    left out; an @FILE stays, as it names only the file."""
    out, hide = [], False
    for arg in argv:
        if hide:
            out.append(arg if arg.startswith("@") else "<not recorded>")
            hide = False
        elif arg == "--storage-options":
            out.append(arg)
            hide = True
        elif arg.startswith("--storage-options=") and not arg.split("=", 1)[1].startswith("@"):
            out.append("--storage-options=<not recorded>")
        else:
            out.append(arg)
    return out


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as err:
            raise ValueError(f"--storage-options {text}: cannot read {text[1:]} ({err.strerror or err})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--storage-options is not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError('--storage-options must map protocols to options, e.g. {"s3": {"endpoint_url": "..."}}')
    return value


QUIET_HELP = "No progress and no per-video lines: only errors and failed videos (the exit status says the rest)."
JSONL_HELP = "Progress, log lines, per-video results and errors as JSON lines on stdout (for logs and CI)."


def _progress(quiet: bool, jsonl: bool):
    from jobs.progress import Progress, pick_mode

    return Progress(pick_mode(quiet, jsonl, console), console=console)


def _report(result, progress) -> None:
    fps = result.frames_in / result.seconds if result.seconds else 0.0
    if result.planned is not None:
        _report_plan(result, progress)
        return
    if progress.mode == "jsonl":
        for v in result.videos:
            progress.event("video", path=v.rel_path, status=v.status, output=v.output_uri, reason=v.reason,
                           frames_out=v.frames_out, frames_concealed=v.frames_concealed)
        progress.event("summary", job_id=result.job_id, manifest=result.manifest_uri,
                       done=sum(v.status == "done" for v in result.videos),
                       failed=sum(v.status == "failed" for v in result.videos),
                       pending=sum(v.status == "pending" for v in result.videos), seconds=round(result.seconds, 2),
                       frames_in=result.frames_in, frames_per_s=round(fps, 3), exit_code=result.exit_code)
        return
    if progress.mode == "quiet":
        for v in result.videos:
            if v.status != "done" or v.reason:  # failures, and what a done video could not keep (concealed frames)
                console.print(f"{v.status}: {escape(v.rel_path)}: {escape(v.reason)}", soft_wrap=True)
        return
    for v in result.videos:
        mark = {"done": "[green]done[/]", "failed": "[red]failed[/]"}.get(v.status, "[yellow]pending[/]")
        # file names and reasons are text, never markup: "take[/b]1.mkv" is a valid name
        line = f"{mark}  {escape(v.rel_path)}"
        if v.status == "done":
            line += f" -> {escape(v.output_uri)}" + (f" ({escape(v.reason)})" if v.reason else "")
        elif v.reason:
            line += f": {escape(v.reason)}"
        out.print(line, soft_wrap=True)
    done = sum(v.status == "done" for v in result.videos)
    if result.already_done:
        failed = sum(v.status == "failed" for v in result.videos)
        out.print(f"nothing left to do: {done} of {len(result.videos)} video(s) were restored before this run"
                  + (f", {failed} failed (`reelmend status {escape(result.manifest_uri.rsplit('/_reelmend', 1)[0])}`"
                     " says why)" if failed else "") + f"; manifest: {escape(result.manifest_uri)}", soft_wrap=True)
        return
    out.print(f"{done}/{len(result.videos)} video(s) restored in {result.seconds:.1f} s "
              f"({result.frames_in} source frames this run, {fps:.1f} frames/s); manifest: "
              f"{escape(result.manifest_uri)}",
              soft_wrap=True)


def _report_plan(result, progress) -> None:
    """--plan-only: the inputs that cannot be restored, and what the plan holds."""
    p = result.planned
    if progress.mode == "jsonl":
        for v in result.videos:
            progress.event("video", path=v.rel_path, status=v.status, output=v.output_uri, reason=v.reason)
        progress.event("plan", job_id=result.job_id, manifest=result.manifest_uri, exit_code=result.exit_code, **p)
        return
    for v in result.videos:
        if v.status == "failed":
            console.print(f"[red]cannot restore[/]  {escape(v.rel_path)}: {escape(v.reason)}", soft_wrap=True)
    if progress.mode == "quiet":
        return
    hours, rest = divmod(round(p["seconds"]), 3600)
    w, h = p["largest_output"]
    out.print(f"job {escape(result.job_id)} planned: {p['videos']} video(s) to restore, {hours}:{rest // 60:02d}:"
              f"{rest % 60:02d} of video ({p['frames']:,} source frames in {p['chunks']:,} chunks, "
              f"{p['output_frames']:,} output frames, the largest {w}x{h}); {p['cannot_restore']} input(s) cannot be "
              f"restored. Nothing was restored: run the same command without --plan-only to restore (it uses this "
              f"plan). Manifest: {escape(result.manifest_uri)}", soft_wrap=True)


@app.command()
def restore(
    src: Annotated[str, typer.Argument(help="Folder or bucket of videos (local path, file://, s3://, ...).")],
    dest: Annotated[str, typer.Argument(help="Where restored videos and the job manifest go.")],
    chain: Annotated[str, typer.Option(help="Stages in order, e.g. denoise,sr2x:gan.")] = "identity",
    models: Annotated[Optional[str], typer.Option(help="Weights folder from `reelmend train --out`.")] = None,
    job_id: Annotated[Optional[str], typer.Option(help="Job id (default: derived from the options).")] = None,
    chunk_frames: Annotated[Optional[int], typer.Option(help="Frames per chunk (default: about 2 s).")] = None,
    lossless: Annotated[bool, typer.Option(help="Encode FFV1 in RGB, bit-exact to the chain (evaluation).")] = False,
    crf: Annotated[int, typer.Option(help="Constant rate factor of the lossy encoder.")] = 18,
    codec: Annotated[str, typer.Option(help="h264, h265 or av1.")] = "h264",
    include: Annotated[Optional[list[str]], typer.Option(
        help="Only files whose path below SRC matches this glob (repeatable; '*' crosses folders, case ignored), "
             "e.g. --include '*.mov' --include '*.mp4'.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        help="Skip files whose path below SRC matches this glob (repeatable), e.g. --exclude '*.json' "
             "--exclude 'thumbnails/*'.")] = None,
    plan_only: Annotated[bool, typer.Option(
        help="Probe the inputs and write the job's plan, show what it holds (videos, hours, chunks, the inputs "
             "that cannot be restored), and stop: nothing is restored until the same command runs without "
             "it.")] = False,
    deinterlace: Annotated[bool, typer.Option(
        help="Make interlaced sources (as the probe finds them) progressive before the chain (bwdif, one frame "
             "per frame), so the models see whole frames, not woven fields; progressive ones are untouched.")] = False,
    double_rate: Annotated[bool, typer.Option(
        help="With --deinterlace: a frame of each field (50i becomes 50p, keeping all the motion the fields caught) "
             "instead of one per frame (50i becomes 25p).")] = False,
    conceal_damage: Annotated[bool, typer.Option(
        help="Frames the decoder cannot produce (damaged packets, a capture cut mid-GOP) repeat the decoded frame "
             "before them, and status names them, instead of failing the video (which still fails when more than half "
             "its frames are lost).")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto, ray://host:10001, ...")] = None,
    max_attempts: Annotated[Optional[int], typer.Option(
        help="Tries per chunk before its video fails (all runs counted) [default: 3, or what the job has]")] = None,
    actors: Annotated[str, typer.Option(help="Restore actor pool size, MIN:MAX (autoscales between them) or N.")] = "1",
    restore_gpus: Annotated[Optional[float], typer.Option(help="GPUs per restore actor (default: 1 when the cluster has GPUs, else 0).")] = None,
    restore_cpus: Annotated[float, typer.Option(help="CPUs per restore actor (its torch threads).")] = 1.0,
    decode_cpus: Annotated[float, typer.Option(help="CPUs per decode task.")] = 1.0,
    encode_cpus: Annotated[float, typer.Option(help="CPUs per encode task.")] = 1.0,
    cpu_resource: Annotated[Optional[str], typer.Option(
        help="A custom resource only CPU nodes declare: decode, encode, probe and stitch then never run on GPU "
             "nodes (e.g. cpu_node, with `ray start --resources='{\"cpu_node\": 1000}'` on the CPU nodes).")] = None,
    storage_options: Annotated[Optional[str], typer.Option(help=STORAGE_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help=JSONL_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")] = False,
) -> None:
    """Restore every video under SRC into DEST (run again: resumes, and restores files added or replaced since)."""
    from jobs.restore import run_job
    from pipeline.config import EncodeSpec, JobSpec, ResourceSpec

    def go():
        sizes = re.fullmatch(r"([0-9]+)(?::([0-9]+))?", actors)
        if not sizes:
            raise ValueError(f"--actors {actors!r}: expected N or MIN:MAX, e.g. 1:8")
        low, high = sizes.group(1), sizes.group(2) or sizes.group(1)
        resources = ResourceSpec(restore_actors_min=int(low), restore_actors_max=int(high),
                                 restore_gpus=restore_gpus, restore_cpus=restore_cpus, decode_cpus=decode_cpus,
                                 encode_cpus=encode_cpus, cpu_resource=cpu_resource)
        given = {"max_attempts": max_attempts} if max_attempts is not None else {}  # unset: 3, or the job's
        spec = JobSpec(src=src, dest=dest, chain=chain, models=models, job_id=job_id, chunk_frames=chunk_frames,
                       conceal_damage=conceal_damage, deinterlace=deinterlace, double_rate=double_rate,
                       include=tuple(include or ()), exclude=tuple(exclude or ()),
                       encode=EncodeSpec(codec=codec, crf=crf, lossless=lossless), resources=resources,
                       storage_options=_storage_options(storage_options), **given)
        return run_job(spec, address=address, progress=progress, plan_only=plan_only)

    progress = _guarded(lambda: _progress(quiet, jsonl), verbose)
    result = _guarded(go, verbose, progress)
    _report(result, progress)
    raise typer.Exit(result.exit_code)


@app.command()
def resume(
    dest: Annotated[str, typer.Argument(help="The DEST of an earlier `restore`.")],
    job_id: Annotated[Optional[str], typer.Option(help="Which job, when DEST holds several.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto, ray://host:10001, ...")] = None,
    max_attempts: Annotated[Optional[int], typer.Option(
        help="Set the job's tries per chunk (all runs counted): raise it to retry videos that failed, once "
             "their cause is fixed.")] = None,
    storage_options: Annotated[Optional[str], typer.Option(help=STORAGE_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help=JSONL_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Finish a stopped or partly failed job: redo only unfinished chunks, then stitch."""
    from jobs.restore import run_job
    from jobs.status import pick_job
    from pipeline import storage
    from pipeline.config import JobSpec
    from pipeline.manifest import Manifest

    def go():
        options = _storage_options(storage_options)
        storage.configure(options)  # to read the manifest itself
        picked = pick_job(dest.rstrip("/"), job_id)
        spec = Manifest(dest.rstrip("/"), picked).read_spec()
        if not spec.same_place(dest):  # moved or copied: its plan names outputs in the old place
            raise ValueError(f"job {picked} in {dest} was made for DEST {spec.dest}; resume it there (a DEST "
                             "cannot be moved mid-job: its plan names every output's place), or restore anew")
        raised = {"max_attempts": max_attempts} if max_attempts is not None else {}
        spec = JobSpec.model_validate({**spec.model_dump(), "job_id": picked, "storage_options": options, **raised})
        return run_job(spec, address=address, progress=progress, relist=False)

    progress = _guarded(lambda: _progress(quiet, jsonl), verbose)
    result = _guarded(go, verbose, progress)
    _report(result, progress)
    raise typer.Exit(result.exit_code)


@app.command()
def status(
    dest: Annotated[str, typer.Argument(help="The DEST of a job.")],
    job_id: Annotated[Optional[str], typer.Option(help="Which job, when DEST holds several.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    all_jobs: Annotated[bool, typer.Option("--all", help="Every job under DEST, a table each (--json: a list).")] = False,
    state: Annotated[Optional[list[str]], typer.Option(
        help="Only videos in this state: done, failed or pending (repeatable). The counts stay the job's.")] = None,
    limit: Annotated[int, typer.Option(
        help="Rows of the table, failed videos first, then pending, then done (0: all; --json lists all).")] = 50,
    storage_options: Annotated[Optional[str], typer.Option(help=STORAGE_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Per-video state of a job: done, failed (with the reason) or pending; frames, duration, compute time."""
    states = set(state or ())
    if states - {"done", "failed", "pending"}:
        _fail(ValueError(f"--state {', '.join(sorted(states - {'done', 'failed', 'pending'}))}: expected done, "
                         "failed or pending"), EXIT_USAGE, verbose)
    if limit < 0:
        _fail(ValueError(f"--limit {limit}: expected 0 (all) or more"), EXIT_USAGE, verbose)
    from jobs.status import job_status
    from pipeline import storage
    from pipeline.manifest import list_jobs

    def go():
        storage.configure(_storage_options(storage_options))
        if all_jobs:
            jobs = [job_id] if job_id else list_jobs(dest.rstrip("/"))
            return [job_status(dest.rstrip("/"), j) for j in jobs] or [job_status(dest.rstrip("/"), None)]
        return [job_status(dest.rstrip("/"), job_id)]

    infos = _guarded(go, verbose)
    ok = all(v["status"] == "done" for info in infos for v in info["videos"])
    if states:
        infos = [{**info, "videos": [v for v in info["videos"] if v["status"] in states]} for info in infos]
    if as_json:
        out.print_json(json.dumps(infos if all_jobs else infos[0]))
    else:
        for info in infos:
            out.print(status_table(info, limit))
            shown = len(info["videos"]) if not limit else min(limit, len(info["videos"]))
            if shown < len(info["videos"]):
                out.print(f"showing {shown:,} of {len(info['videos']):,} video(s), failed first; --limit 0 shows "
                          "all, --state failed only the failed ones, --json all of them for scripts", soft_wrap=True)
            out.print(f"manifest: {escape(info['manifest'])}", soft_wrap=True)
    raise typer.Exit(EXIT_OK if ok else EXIT_PARTIAL)


def status_table(info: dict, limit: int = 0) -> Table:
    """The job's videos, failed first (then pending, then done), at most `limit` rows (0: all)."""
    from jobs.status import failed_first

    counts = ", ".join(f"{n} {k}" for k, n in sorted(info["counts"].items()))
    table = Table(title=f"job {info['job_id']} ({info['chain']}): {counts}")
    rows = failed_first(info["videos"])[:limit or None]
    # names fold only past 40 characters (not letter by letter in a narrow terminal); no reason column when none
    table.add_column("video", overflow="fold", min_width=min(40, max((len(v["path"]) for v in rows), default=5)))
    # "chunk time": each chunk's time from its decode's start to its result recorded, summed (queueing included)
    for col in ("status", "chunks done", "frames in/out", "duration", "chunk time"):
        table.add_column(col, no_wrap=True)
    reasons = any(v["reason"] for v in rows)
    if reasons:
        table.add_column("reason", overflow="fold", ratio=1)
    for v in rows:
        c = v["chunks"]
        total = sum(c.values())
        chunks = f"{c['done']}/{total}" + (f", {c['failed']} failed" if c["failed"] else "") if total else ""
        frames = f"{v['frames_in']}/{v['frames_out'] or '-'}" if v["frames_in"] else ""
        table.add_row(escape(v["path"]), v["status"], chunks, frames,
                      f"{v['duration_s']:.1f} s" if v["duration_s"] else "",
                      f"{v['compute_s']:.1f} s" if v["compute_s"] else "", *([escape(v["reason"])] if reasons else []))
    return table


@app.command()
def report(
    dest: Annotated[str, typer.Argument(help="The DEST of a job.")],
    job_id: Annotated[Optional[str], typer.Option(help="Which job, when DEST holds several.")] = None,
    out_path: Annotated[Optional[str], typer.Option("--out", help="Where to write the page (default: report.html in the job's manifest folder).")] = None,
    quality: Annotated[Optional[str], typer.Option(help="A `reelmend bench quality --json` file to include.")] = None,
    samples: Annotated[int, typer.Option(help="Sample frames per video.")] = 3,
    videos: Annotated[int, typer.Option(
        help="Videos shown in detail (frames, properties, timings), failed ones first; the table lists all.")] = 50,
    storage_options: Annotated[Optional[str], typer.Option(help=STORAGE_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """One self-contained HTML page per job: before/after frames, properties, timings, failures, quality."""
    from jobs.report import write_report
    from pipeline import storage

    def go():
        if samples < 1 or videos < 1:
            raise ValueError(f"--samples and --videos must be at least 1, got {samples} and {videos}")
        storage.configure(_storage_options(storage_options))
        return write_report(dest.rstrip("/"), job_id, out=out_path, quality=quality, samples=samples,
                            videos=videos)

    uri = _guarded(go, verbose)
    out.print(f"report: {escape(uri)}", soft_wrap=True)


@app.command()
def train(
    stage: Annotated[str, typer.Argument(help="The stage to train: denoise, deblock, descratch, sr2x, sr4x, interp2x.")],
    data: Annotated[str, typer.Option(help="Clean videos and images (local path, s3://, ...).")],
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Weights folder to write (default: runs/STAGE).")] = None,
    workers: Annotated[int, typer.Option(help="Training workers (DDP ranks).")] = 2,
    gpu: Annotated[bool, typer.Option(help="One GPU per worker.")] = False,
    steps: Annotated[int, typer.Option(help="Fidelity (pixel loss) steps.")] = 2000,
    gan_steps: Annotated[int, typer.Option(help="GAN fine-tuning steps after the fidelity phase.")] = 1000,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT from its last checkpoint.")] = False,
    arch: Annotated[Optional[str], typer.Option(help="Generator architecture, e.g. RRDBNet for sr on GPUs.")] = None,
    arch_args: Annotated[Optional[str], typer.Option(help='Architecture arguments as JSON, e.g. \'{"features": 32}\'.')] = None,
    init: Annotated[Optional[str], typer.Option(help="Start from this folder's fidelity weights.")] = None,
    batch: Annotated[int, typer.Option(help="Clips per worker per step.")] = 8,
    patch: Annotated[int, typer.Option(help="Side of the clean training patch in pixels.")] = 96,
    lr: Annotated[float, typer.Option(help="Generator learning rate, fidelity phase (its peak).")] = 2e-4,
    lr_schedule: Annotated[str, typer.Option(help="cosine (decay to lr/100 over --steps) or constant.")] = "cosine",
    gan_lr: Annotated[float, typer.Option(help="Generator learning rate, GAN phase.")] = 5e-5,
    d_lr: Annotated[float, typer.Option(help="Discriminators' learning rate (GAN phase).")] = 1e-4,
    d_features: Annotated[int, typer.Option(help="Width of the discriminators (GAN phase cost).")] = 32,
    d_warmup: Annotated[int, typer.Option(help="GAN steps at the start that train only the discriminators.")] = 0,
    d_view: Annotated[str, typer.Option(help="What the discriminators see: detail (fine detail amplified) or rgb.")] = "detail",
    adversarial: Annotated[str, typer.Option(help="GAN loss: hinge or relativistic (ESRGAN's RaGAN).")] = "hinge",
    pixel_loss: Annotated[str, typer.Option(help="Pixel loss: charbonnier, l1, or l2 (what PSNR measures; for a last fine-tune).")] = "charbonnier",
    w_adversarial: Annotated[float, typer.Option(help="Weight of the per-frame adversarial term (GAN phase).")] = 0.05,
    w_feature: Annotated[float, typer.Option(help="Weight of feature matching on the discriminators' features (GAN phase).")] = 1.0,
    w_temporal_adversarial: Annotated[float, typer.Option(help="Weight of the temporal discriminator's adversarial term (GAN phase; 0: no temporal discriminator).")] = 0.02,
    sharpen_target: Annotated[float, typer.Option(help="GAN phase: unsharp-mask the pixel loss's target by this amount (Real-ESRGAN's gt_usm; 0: off).")] = 0.0,
    d_region: Annotated[str, typer.Option(help="Where the discriminator's judgement counts: all, or undamaged (pixels local damage left alone; descratch).")] = "all",
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (and validation).")] = 200,
    source_scale: Annotated[float, typer.Option(help="Area-downscale sources first (removes their artifacts).")] = 1.0,
    pool_clips: Annotated[int, typer.Option(help="Clean clips decoded once to cut patches from.")] = 400,
    pool_variants: Annotated[int, typer.Option(help="Degrade each pool clip this many times up front (0: every sample afresh).")] = 0,
    worker_cpus: Annotated[Optional[float], typer.Option(help="CPUs per worker (default: leave one for data).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initial weights and samples.")] = 0,
    data_licence: Annotated[Optional[str], typer.Option(help="Licence of the data, for the model card.")] = None,
    fail_at_step: Annotated[Optional[int], typer.Option(hidden=True, help="Fault drill: kill a worker.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto, ray://host:10001, ...")] = None,
    storage_options: Annotated[Optional[str], typer.Option(help=STORAGE_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress: only errors and the result.")] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Progress, checkpoints and the result as JSON lines on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")] = False,
) -> None:
    """Train a stage on Ray Train (fidelity, then GAN fine-tuning) and export its weights to OUT."""
    import shlex

    from jobs.train import run_training
    from jobs.train_config import LossSpec, TrainSpec

    def go():
        try:
            parsed_args = json.loads(arch_args) if arch_args else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"--arch-args is not JSON: {err}") from err
        spec = TrainSpec(stage=stage, data=data, out=out_dir or f"runs/{stage}", workers=workers, gpu=gpu, steps=steps,
                         gan_steps=gan_steps, resume=resume, arch=arch, arch_args=parsed_args, init=init,
                         batch=batch, patch=patch, lr=lr, lr_schedule=lr_schedule, gan_lr=gan_lr,
                         d_lr=d_lr, d_features=d_features, d_warmup=d_warmup, checkpoint_every=checkpoint_every,
                         loss=LossSpec(pixel=pixel_loss, adversarial=adversarial, w_adversarial=w_adversarial, w_feature=w_feature,
                                       w_temporal_adversarial=w_temporal_adversarial,
                                       d_view=d_view, sharpen_target=sharpen_target,
                                       d_region=d_region),
                         source_scale=source_scale, pool_clips=pool_clips, pool_variants=pool_variants, worker_cpus=worker_cpus, seed=seed,
                         data_licence=data_licence, fail_at_step=fail_at_step,
                         storage_options=_storage_options(storage_options),
                         command=shlex.join(["reelmend", *_without_credentials(sys.argv[1:])]))
        return run_training(spec, address=address, progress=progress)

    progress = _guarded(lambda: _progress(quiet, jsonl), verbose)
    result = _guarded(go, verbose, progress)
    if progress.mode == "jsonl":
        progress.event("summary", out=result.out, weights=result.weights, metrics=result.metrics,
                       seconds=round(result.seconds, 2))
        return
    for uri in result.weights:
        out.print(f"wrote {escape(uri)}", soft_wrap=True)
    m = result.metrics
    if "val_psnr" in m:
        out.print(f"validation PSNR {m['val_psnr']:.2f} dB (baseline {m['val_psnr_baseline']:.2f} dB) after "
                  f"{m['step']} steps in {result.seconds:.0f} s; restore with --models {result.out}")


@app.command("models")
def list_models(
    model: Annotated[Optional[str], typer.Argument(
        metavar="STAGE[:gan]", help="Print this model's card in full, e.g. sr2x or sr2x:gan.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The card as JSON (without STAGE: every shipped card).")] = False,
) -> None:
    """The shipped models: a table of all, or one model's card in full."""
    from models.chain import STAGES
    from models.weights import SHIPPED, read_card, stem

    if model is not None:
        stage, flavour = _model_ref(model)
        card = read_card(str(SHIPPED), stage, flavour)
        if card is None:
            _fail(ValueError(f"no shipped model '{model}' (no {stem(stage, flavour)}.json in {SHIPPED})"),
                  EXIT_USAGE, False)
        if as_json:
            out.print_json(json.dumps(card))
        else:
            _print_card(model, card, f"{SHIPPED}/{stem(stage, flavour)}.safetensors")
        return
    if as_json:
        cards = [read_card(str(SHIPPED), stage, flavour) for stage, info in STAGES.items() if info.arch
                 for flavour in ("fidelity", "gan")]
        out.print_json(json.dumps([c for c in cards if c]))
        return
    table = Table(title=f"shipped weights ({SHIPPED}; the cards beside them say how each was trained)")
    # the first column names each model as a chain (and `reelmend models NAME`) does
    for col in ("model", "architecture", "parameters", "CPU frames/s 640x360", "vs best FFmpeg filter"):
        table.add_column(col, no_wrap=col in ("model", "architecture"), ratio=2 if col.startswith("vs") else None)
    for stage, info in STAGES.items():
        if info.arch is None:
            table.add_row(stage, "no model", "0", "-", "-")
            continue
        for flavour in ("fidelity", "gan"):
            name = stage if flavour == "fidelity" else f"{stage}:{flavour}"
            card = read_card(str(SHIPPED), stage, flavour)
            if not card:
                table.add_row(name, info.arch.__name__, "-", "-", "[yellow]not shipped[/]")
                continue
            fps = card.get("cpu_fps_640x360")
            quality = "; ".join(f"{t['task']}: {t['psnr']:.2f} dB ({t['margin_db']:+.2f} vs {t['best_filter']['name']})"
                                for t in card.get("bench_quality", {}).get("tasks", []))
            table.add_row(name, card["arch"], f"{card['parameters']:,}",
                          "-" if fps is None else f"{fps:g}" + (" (est.)" if card.get("cpu_fps_640x360_estimated") else ""),
                          quality or "not measured")
    out.print(table)
    out.print("a model's whole card: `reelmend models NAME`, e.g. `reelmend models sr2x:gan` (--json: as JSON)")


def _model_ref(model: str) -> tuple[str, str]:
    """'sr2x' -> ('sr2x', 'fidelity'), 'sr2x:gan' -> ('sr2x', 'gan'), as a chain names them; exits 2 otherwise."""
    from models.chain import STAGES
    from models.geometry import FLAVOURS

    stage, _, flavour = model.strip().partition(":")
    with_models = [s for s, info in STAGES.items() if info.arch]
    if stage not in STAGES:
        _fail(ValueError(f"unknown stage '{stage}'; stages with models: {', '.join(with_models)}"), EXIT_USAGE, False)
    if STAGES[stage].arch is None:
        _fail(ValueError(f"stage '{stage}' has no model (it re-encodes only); stages with models: "
                         f"{', '.join(with_models)}"), EXIT_USAGE, False)
    flavour = flavour or "fidelity"
    if flavour not in FLAVOURS:
        _fail(ValueError(f"unknown flavour '{flavour}' for stage '{stage}'; use '{stage}' or '{stage}:gan'"),
              EXIT_USAGE, False)
    return stage, flavour


FLAVOUR_MEANING = {"fidelity": "trained for PSNR (the default: no invented detail)",
                   "gan": "fine-tuned adversarially for perceptual sharpness"}


def _card_text(value) -> str:
    """One line for a card value: nested mappings and lists inline, numbers short."""
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_card_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_card_text(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _print_card(name: str, card: dict, weights: str) -> None:
    """A model card in full, section by section; long values (commands, notes) are soft-wrapped, never cut,
    so they copy and paste whole. The degradation recipe's op parameters are in the JSON (--json) only."""
    from rich.rule import Rule

    card = dict(card)

    def line(label: str, value) -> None:
        text = value if isinstance(value, str) else _card_text(value)
        out.print(f"[bold]{escape(label):<17}[/] {escape(text)}", soft_wrap=True)

    def section(title: str) -> None:
        out.print(Rule(title, align="left", style="dim"))

    card.pop("stage", None)  # the name says it
    section(f"model card: {name}")
    args = card.pop("args", {})
    line("architecture", f"{card.pop('arch', '?')}({', '.join(f'{k}={v!r}' for k, v in args.items())})")
    if "parameters" in card:
        line("parameters", f"{card.pop('parameters'):,}")
    flavour = card.pop("flavour", "")
    line("flavour", f"{flavour}: {FLAVOUR_MEANING.get(flavour, '')}".rstrip(": "))
    line("weights", weights)
    line("sha256", card.pop("sha256", "missing: this card vouches for no weights, they would be refused"))
    line("date", f"{card.pop('date', '?')}" + (f", reelmend {card.pop('reelmend')}" if "reelmend" in card else ""))

    section("training")
    for key in ("command", "command_note", "trained_on"):
        if key in card:
            line(key.replace("_", " "), card.pop(key))
    for key, value in card.pop("training", {}).items():
        line(key.replace("_", " "), value)

    data = dict(card.pop("data", {}))
    if data:
        section("data")
        recipe = data.pop("recipe", None)
        files = data.pop("source_files", None)
        for key, value in data.items():
            if key == "sources" and files is not None:
                value, files = f"{value} files: {_card_text(files)}", None
            line(key.replace("_", " "), value)
        if files is not None:
            line("source files", files)
        if recipe:
            branches = "; ".join(f"{b.get('name')} {b.get('probability', 0):.0%} "
                                 f"({', '.join(o['op'] for o in b.get('ops', [])) or 'as it is'})"
                                 for b in recipe.get("branches", []))
            line("degradation", f"{recipe.get('name', '')}: {branches}")
            if recipe.get("why"):
                line("  why", recipe["why"])

    fps = card.pop("cpu_fps_640x360", None)
    estimated = card.pop("cpu_fps_640x360_estimated", False)
    notes = [card.pop(k) for k in ("cpu_fps_640x360_note", "cpu_fps_note") if k in card]
    if fps is not None or notes:
        section("speed")
        if fps is not None:
            line("CPU", f"{fps:g} frames/s at 640x360 ({'estimated' if estimated else 'measured'})")
        for note in notes:
            line("  note", note)

    bench = dict(card.pop("bench_quality", {}))
    metrics = dict(card.pop("metrics", {}))
    if bench or metrics:
        section("quality")
    for t in bench.pop("tasks", []):  # one line each: never cut to the terminal's width
        best = t.get("best_filter", {})
        line(f"{t.get('task', '?')}:", f"{t.get('metric', 'PSNR')} {t.get('psnr', 0):.2f} dB, the best FFmpeg filter "
                                 f"({best.get('name', '?')}) {best.get('psnr', 0):.2f} dB: {t.get('margin_db', 0):+.2f} dB; "
                                 f"sharpness {t.get('sharpness', 0):.3f} against {best.get('sharpness', 0):.3f}")
    if bench:
        line("clean footage", f"{_card_text(bench.pop('clean_clips', []))} (area-downscaled by "
                              f"{bench.pop('clean_scale', 1):g}); measured by `{bench.pop('command', '?')}`")
        for key, value in bench.items():
            line(key.replace("_", " "), value)
    if "val_psnr" in metrics:
        line("validation", f"PSNR {metrics.pop('val_psnr'):.2f} dB on the held-out training data, against "
                           f"{metrics.pop('val_psnr_baseline', float('nan')):.2f} dB without the model (the input, "
                           f"bicubic or the frame average), at step {metrics.pop('step', '?')}")
    if metrics:
        line("last metrics", metrics)

    if card:
        section("notes")
        for key, value in card.items():
            line(key.replace("_", " "), value)


@app.command()
def demo(
    workdir: Annotated[str, typer.Option(help="Where the sample archive and outputs go.")] = ".demo",
    chain: Annotated[Optional[str], typer.Option(
        hidden=True, help="Chain to run (default: the shipped trained denoise,deblock,sr2x).")] = None,
    seconds: Annotated[Optional[float], typer.Option(
        hidden=True, help="Seconds of each sample clip (default 4; another length gets its own folders).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Make a small degraded sample archive from real footage and restore it on a local Ray instance."""
    from jobs.demo import run_demo

    progress = _progress(False, False)
    length = {"seconds": seconds} if seconds is not None else {}  # unset: the demo's own default
    # soft-wrapped: the hints it ends with (paths, commands) stay one line to copy
    code = _guarded(lambda: run_demo(workdir, log=lambda m: console.print(m, markup=False, soft_wrap=True),
                                     progress=progress, chain=chain, **length),
                    verbose, progress)
    raise typer.Exit(code)


@app.command()
def bench(
    what: Annotated[str, typer.Argument(help="What to measure: perf (speed and memory), quality or memory.")] = "perf",
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the figures to this JSON file.")] = None,
    clean: Annotated[Optional[str], typer.Option(help="quality: folder or bucket of clean videos not used in training.")] = None,
    models: Annotated[Optional[str], typer.Option(help="quality: weights folder (default: the shipped weights).")] = None,
    stages: Annotated[Optional[str], typer.Option(help="quality: only these stages, comma-separated.")] = None,
    frames: Annotated[Optional[int], typer.Option(help="quality: frames per clean clip (25); perf: per video (80).")] = None,
    clean_scale: Annotated[float, typer.Option(help="quality: area-downscale the clean footage first.")] = 0.5,
    update_cards: Annotated[bool, typer.Option(help="quality: write the figures into the model cards.")] = False,
    markdown: Annotated[Optional[str], typer.Option(help="quality: also write the table as Markdown to this file.")] = None,
    seconds: Annotated[int, typer.Option(help="perf, memory: length of the 1x input of the memory runs in seconds.")] = 30,
    clip: Annotated[Optional[str], typer.Option(help="perf, memory: the real footage to cut inputs from (default: bikes.mp4).")] = None,
    chain: Annotated[str, typer.Option(help="perf: the chain to time.")] = "sr2x",
    height: Annotated[int, typer.Option(help="perf: height of the inputs in pixels.")] = 136,
    videos: Annotated[int, typer.Option(help="perf: videos in the batch.")] = 4,
    address: Annotated[Optional[str], typer.Option(help="quality: restore on this Ray cluster.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Measure reelmend (JSON out). `perf` (the default): throughput against the model-only bound and the
    single-process approach, 1 and 2 restore actors, memory for a 10x longer input, temporary disk, the fixed
    cost of a job; `quality`: the shipped stages against FFmpeg's classical filters on clean footage
    (--clean); `memory`: only the memory part of perf."""
    if what == "perf":
        from jobs.bench import bench_all

        result = _guarded(lambda: bench_all(json_out, clip=clip, chain=chain, videos=videos, height=height,
                                            frames=frames or 80, memory_seconds=seconds,
                                            log=lambda m: console.print(m, markup=False)), verbose)
        out.print(perf_table(result))
        return
    if what == "memory":
        from jobs.bench import bench_memory

        result = _guarded(lambda: bench_memory(json_out, seconds=seconds,
                                               clip=Path(clip) if clip else None), verbose)
        out.print_json(json.dumps(result))
        return
    if what != "quality":
        _fail(ValueError(f"unknown benchmark '{what}'; available: perf, quality, memory"), EXIT_USAGE, verbose)
    if not clean:
        _fail(ValueError("bench quality needs --clean URI: clean footage the models never saw"), EXIT_USAGE, verbose)
    if not 0 < clean_scale <= 1:
        _fail(ValueError(f"--clean-scale must be in (0, 1], got {clean_scale}"), EXIT_USAGE, verbose)
    from jobs.bench_quality import TASKS, bench_quality

    chosen = [s.strip() for s in stages.split(",")] if stages else None
    unknown = sorted(set(chosen or []) - {t.stage for t in TASKS})
    if unknown:
        _fail(ValueError(f"unknown stage(s) {', '.join(unknown)} for bench quality"), EXIT_USAGE, verbose)
    result = _guarded(lambda: bench_quality(clean, json_out, models=models, frames=frames or 25, clean_scale=clean_scale,
                                            stages=chosen, update_cards=update_cards, address=address,
                                            log=lambda m: console.print(m, markup=False)), verbose)
    out.print(quality_table(result))
    if markdown:
        from jobs.bench_quality import markdown_table

        Path(markdown).write_text(markdown_table(result) + "\n")


def perf_table(result: dict) -> Table:
    i = result["input"]
    table = Table(title=f"reelmend bench: {result['chain']} on {i['videos']} x {i['frames'] // i['videos']} frames "
                        f"{i['size']} ({result['machine']['cpus']} CPUs)")
    for col in ("figure", "value", "goal", "what it compares"):
        table.add_column(col)
    runs = result["scaling"]["runs"]
    bound = result["model_only_fps"][runs[-1]["actors"]]
    rows = [
        ("efficiency", f"{result['efficiency']:.2f}", "≥ 0.9",
         f"job in steady state {result['fps']:.2f} frames/s / model alone {bound:.2f}"),
        ("  end to end", f"{result['efficiency_end_to_end']:.2f}", "",
         f"whole job {result['fps_end_to_end']:.2f} frames/s (start and stitch included) / model alone"),
        ("vs_sequential", f"{result['vs_sequential']:.2f}", "≥ 1.0",
         f"job / FFmpeg pipe -> model -> FFmpeg pipe ({result['sequential_fps']:.2f} frames/s)"),
        ("  end to end", f"{result['vs_sequential_end_to_end']:.2f}", "", "whole job / sequential"),
        ("memory_ratio", f"{result['memory_ratio']:.2f}", "≤ 1.1", "peak PSS, 10x longer input / 1x"),
        ("  within the 10x", f"{result['memory']['second_half_over_first']:.2f}", "",
         "its second half's peak / its first half's"),
        ("tmp_disk_mb", f"{result['tmp_disk_mb']:.1f}", "a few chunks", "temporary disk peak"),
        ("scaling", f"{result['scaling']['speedup_2_over_1']:.2f}x", "", " / ".join(
            f"{r['actors']} actor(s) {r['steady_fps']:.2f} frames/s" for r in runs)),
        ("fixed_cost_s", f"{result['fixed_cost_s']:.1f}", "", "a job over a 1-second clip, Ray up"),
    ]
    share = runs[-1]["cpu"]["share"]
    actors = sum(v for k, v in share.items() if "RestoreStage" in k)
    rest = ", ".join(f"{_short(k)} {v:.0%}" for k, v in share.items() if "RestoreStage" not in k and v >= 0.01)
    rows.append(("CPU of the job", f"{actors:.0%}", "", f"restore actors; {rest}; idle {runs[-1]['cpu']['idle_share']:.0%}"))
    for row in rows:
        table.add_row(*row)
    return table


def _short(process: str) -> str:
    """'ray::Map(encode_chunk)' -> 'encode_chunk', 'ray::_StatsActor' -> '_StatsActor'."""
    name = process.removeprefix("ray::")
    while wrapped := re.fullmatch(r"\w+\((.*)\)", name):
        name = wrapped.group(1)
    return name


def quality_table(result: dict) -> Table:
    table = Table(title=f"reelmend vs FFmpeg filters ({len(result['clips'])} clean clips)")
    for col in ("task", "metric", "best filter", "filter dB", "fidelity dB", "margin", "bar", "gan dB",
                "sharpness fid/gan"):
        table.add_column(col)
    for r in result["tasks"]:
        ok = "[green]" if r["meets_bar"] else "[red]"
        table.add_row(r["task"], r["metric"], r["best_baseline"]["name"], f"{r['best_baseline']['psnr']:.2f}",
                      f"{r['fidelity']['psnr']:.2f}", f"{ok}{r['margin_db']:+.2f}[/]",
                      f"≥{r['bar_db']:.1f}" if r["bar_db"] else ">0",
                      f"{r['gan']['psnr']:.2f}", f"{r['fidelity']['sharpness']:.3f}/{r['gan']['sharpness']:.3f}")
    return table


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
