"""`reelmend restore` (and `resume`): plan once, run the chunks that are not done, stitch finished videos.

Running the same job again (same spec, hence same job id) or `resume` reads the manifest and redoes only
what is not done: chunks whose latest event is not `done` and that have failed fewer than --max-attempts
times, then the stitch of every video whose chunks are all done.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jobs.progress import JobStopped, Progress, error_line
from models.chain import check_weights
from models.geometry import chain_geometry, parse_chain
from pipeline import faults, lease, storage
from pipeline.config import JobSpec
from pipeline.manifest import ChunkState, EventWriter, Manifest, list_jobs
from pipeline.plan import failed_video_row, plan_video, video_id
from pipeline.probe import VideoInfo
from pipeline.schema import TASK_FIELDS
from pipeline.run import (Tries, check_resources, connect, decode_memory, frame_bytes, largest_node_memory, probe_all,
                          restore_dataset, stitch_all)

NO_EVENTS = ChunkState("pending")

# Chunks per Ray Data pass: bounds the driver's and Ray Data's bookkeeping for archives of any size.
WAVE = 2000
# The failures an outage causes: a read or a write of the store failing (decode, encode), a worker or node lost.
RETRY_BACKOFF_KINDS = {"decode", "encode", "lost"}


@dataclass
class VideoResult:
    video_id: str
    rel_path: str
    output_uri: str
    status: str  # done | failed | pending
    reason: str = ""  # why it failed; for a done video, what it could not restore as it was (concealed frames)
    frames_out: int = 0
    frames_concealed: int = 0


@dataclass
class JobResult:
    job_id: str
    manifest_uri: str
    videos: list[VideoResult] = field(default_factory=list)
    chunks_run: int = 0
    frames_in: int = 0
    seconds: float = 0.0
    planned: dict | None = None  # --plan-only: what the plan holds (`plan_summary`); nothing was run
    already_done: bool = False  # this run had nothing to do: no chunk to run, no video to stitch

    @property
    def exit_code(self) -> int:
        if self.planned is not None:  # planned: only inputs that cannot be restored count as failures
            return 3 if any(v.status == "failed" for v in self.videos) else 0
        return 0 if all(v.status == "done" for v in self.videos) else 3


class OutputsTaken(ValueError):
    """A new job would write outputs another job under the same DEST planned (a usage error: nothing is written)."""


def other_jobs_outputs(spec: JobSpec, job_id: str) -> dict[str, tuple[str, str]]:
    """Output URI -> (the other job under DEST that planned it, its source there if that job makes of a source
    what this one would, else ""). Two jobs making different outputs under one name would each overwrite the
    other's, and each manifest would call them its own; a job that differs from this one only in which files it
    selects (--include/--exclude) makes the same output of a source they share, which is no clash."""
    ours = _content(spec)
    taken: dict[str, tuple[str, str]] = {}
    for other in list_jobs(spec.dest):
        manifest = Manifest(spec.dest, other)
        if other == job_id or not manifest.has_plan():
            continue
        same = _content(manifest.read_spec()) == ours  # (src included: the same path is the same source)
        plan = manifest.read_plan().select(["output_uri", "chunk_index", "source_uri"]).to_pylist()
        for row in plan:
            if row["output_uri"] and row["chunk_index"] >= 0:  # (a probe failure writes nothing)
                taken.setdefault(row["output_uri"], (other, row["source_uri"] if same else ""))
    return taken


def _content(spec: JobSpec) -> dict:
    """What shapes a job's outputs beyond which files it takes."""
    return {k: v for k, v in spec.shaping().items() if k not in ("include", "exclude")}


def _refuse_taken(spec: JobSpec, clashes: dict[str, str]) -> None:
    """Raise OutputsTaken naming the other job(s), how their options differ, and the way out."""
    by_job: dict[str, list[str]] = {}
    for uri, other in clashes.items():
        by_job.setdefault(other, []).append(uri)
    other, uris = max(by_job.items(), key=lambda kv: len(kv[1]))
    stored = Manifest(spec.dest, other).read_spec()
    how = differences(stored.shaping(), spec.shaping())
    how = f"with other options ({how})" if how else "with the same options, under another --job-id"
    also = f" (and {len(by_job) - 1} other job(s))" if len(by_job) > 1 else ""
    name = uris[0].removeprefix(spec.dest.rstrip("/") + "/")
    raise OutputsTaken(
        f"job {other}{also} under {spec.dest} already writes {len(clashes)} of this job's outputs (e.g. {name}), "
        f"{how}: restore into another DEST, continue that job (`reelmend resume {spec.dest} "
        f"--job-id {other}`), or delete its folder {Manifest(spec.dest, other).root} to replace its outputs")


def make_plan(spec: JobSpec, job_id: str, manifest: Manifest, files: list[storage.Listed],
              log: Callable[[str], None], *, part: int = 0, replaced: frozenset[str] = frozenset(),
              taken: dict[str, str] | None = None, check: Callable[[], None] = lambda: None) -> None:
    """Probe every file on the cluster and write plan part `part` before any of its chunks runs: part 0 with
    job.json when the job is new, a later part for what a re-run found new or `replaced` (paths below SRC,
    planned anew under new video ids). `taken`: output URI -> the path below SRC of the input that has it.

    Outputs another job under DEST planned are not taken over: a new job whose inputs would write any is
    refused (OutputsTaken, before anything is written); a video a re-run found new fails alone instead."""
    log(f"probing {len(files)} file(s) under {spec.src}")
    _, _, context = chain_geometry(parse_chain(spec.chain))
    rows, failed = [], []
    outputs = dict(taken or {})
    others, clashes = other_jobs_outputs(spec, job_id), {}
    probed = probe_all([f.uri for f in files], spec.storage_options, spec.resources.cpu_task_resources(),
                       fields=spec.deinterlace, versions=[f.version for f in files])
    for (uri, rel, version), (_, info) in zip(files, probed):
        generation = part if rel in replaced else 0
        if isinstance(info, VideoInfo) and info.is_still:
            # a one-frame "restored video" (.mkv, a new name) of a poster is not what anyone asked for, and it
            # would take the name of a video with the same stem
            info = f"a still image ({info.codec}), not a video"
        if isinstance(info, VideoInfo):
            try:
                video_rows = plan_video(spec, job_id, uri, rel, info, context, version=version, generation=generation)
                # clip.mp4 and clip.mov both become clip.mkv in some modes: the second must not replace the first
                out = video_rows[0]["output_uri"]
                other = outputs.setdefault(out, rel)
                if other != rel:
                    raise ValueError(f"its output {out} is also the output of {other}; "
                                     "rename one of them or restore them into different DESTs")
                if out in others and others[out][1] != uri:  # (the same source, made the same way: no clash)
                    clashes[out] = others[out][0]
                    if part == 0:
                        continue  # (refused below, once every clash is known)
                    raise ValueError(f"its output {out} is also an output of job {others[out][0]} under "
                                     f"{spec.dest}; restore it into another DEST")
                rows += video_rows
                continue
            except ValueError as err:  # e.g. a key that would escape DEST, or a clashing output
                info = str(err)
        row = failed_video_row(job_id, uri, rel, info, spec.dest, version=version, generation=generation)
        rows.append(row)
        failed.append({"video_id": row["video_id"], "chunk_index": -1, "status": "failed", "attempt": 1,
                       "error_kind": "probe", "error_message": info})
    if clashes and part == 0:
        _refuse_taken(spec, clashes)
    check()  # (the lease: a run that lost it while probing writes nothing)
    if part == 0:
        manifest.write_spec(spec)
    manifest.add_plan_part(rows, part)
    mine = {r["output_uri"]: r["source_uri"] for r in rows if r["chunk_index"] >= 0}
    if part == 0 and (late := {o: j for o, (j, source) in other_jobs_outputs(spec, job_id).items()
                               if o in mine and source != mine[o]}):
        # another new job planned some of these outputs while this one probed (each job holds only its own
        # lease): this plan gives way, as may the other's, which sees this one the same way; nothing ran yet
        storage.remove(storage.join(manifest.root, "plan"))
        storage.remove(storage.join(manifest.root, "job.json"))
        _refuse_taken(spec, late)
    manifest.append_events(failed)


def plan_changes(spec: JobSpec, job_id: str, manifest: Manifest, files: list[storage.Listed],
                 log: Callable[[str], None], check: Callable[[], None] = lambda: None) -> None:
    """A re-run `restore` of a planned job: plan the files SRC gained since, and those replaced since (a new
    size or version tag), each anew. The old chunks of a replaced file no longer count and their segments go;
    its output is replaced when it is restored again (one whose output name changes, e.g. to .mkv, leaves the old
    output beside the new). Files gone from SRC keep their rows (done ones are done; unfinished ones fail with
    "the source is gone"). Rows planned before sources had versions (empty) are never taken as replaced."""
    plan = manifest.read_plan()
    columns = [c for c in ("rel_path", "source_version", "video_id", "output_uri", "chunk_index")
               if c in plan.column_names]
    planned = {r["rel_path"]: r for r in plan.select(columns).to_pylist()}
    new = [f for f in files if f.rel not in planned]
    replaced = [f for f in files if f.rel in planned and planned[f.rel].get("source_version")
                and planned[f.rel]["source_version"] != f.version]
    if not new and not replaced:
        return
    log(f"{len(new)} new and {len(replaced)} replaced file(s) under {spec.src} since the job was planned")
    taken = {r["output_uri"]: rel for rel, r in planned.items() if r["chunk_index"] >= 0}  # (not a probe failure's)
    make_plan(spec, job_id, manifest, new + replaced, log, part=len(manifest.plan_parts()),
              replaced=frozenset(f.rel for f in replaced), taken=taken, check=check)
    for f in replaced:
        with contextlib.suppress(OSError):  # a leftover segment costs space, not correctness
            storage.remove(storage.join(manifest.segments_root, planned[f.rel]["video_id"]))


def run_job(spec: JobSpec, *, address: str | None = None, log: Callable[[str], None] = print,
            progress: Progress | None = None, relist: bool = True, plan_only: bool = False) -> JobResult:
    """Run (or resume) the job; `progress` shows it live (default: `log` lines with a count every 10 s).
    `relist`: a planned job also plans what SRC gained or replaced since (`restore`; `resume` does not).
    `plan_only`: plan (probe every new input, write the plan) and stop before any chunk runs."""
    started = time.monotonic()
    progress = progress or Progress("plain", log=log)
    if address and address.startswith("ray://"):
        return _run_job_on_cluster(spec, address, progress, relist, plan_only)
    storage.configure(spec.storage_options)
    # a missing or bad checkpoint fails before any work starts (a bucket's transient errors are retried)
    storage.retrying(check_weights)(spec.chain, spec.models)
    job_id = spec.resolved_job_id()
    storage.check_folder(spec.dest, "DEST")
    manifest = Manifest(spec.dest, job_id)
    files = None
    if not manifest.has_plan():  # a new job: a wrong SRC or DEST fails here, before anything is written to DEST
        spec.check_apart()
        files = _inputs(spec)
    elif relist:  # a planned job run again by `restore`: what SRC gained or replaced since is planned too
        try:
            files = [f for f in storage.list_files(spec.src) if spec.selects(f.rel)]
        except storage.SourceMissing:
            progress.log(f"{spec.src} does not exist (any more): nothing new to plan; finishing what is planned")
    connect(address)
    # what no node can run would wait forever; a cluster this job joined may add such nodes
    check_resources(spec.resources, can_grow=address is not None or "RAY_ADDRESS" in os.environ, log=progress.log)
    with lease.hold(manifest.root) as held:  # one driver per job: a second `resume` stops here with LeaseHeld
        try:
            spec = _agree_with_stored(spec, manifest)
            try:
                result = _run_job(spec, job_id, manifest, progress, held, files, plan_only)
            except (lease.LeaseLost, KeyboardInterrupt, OutputsTaken):
                raise
            except Exception as err:  # whatever it is, it is no longer a problem of the command line
                raise JobStopped(f"job {job_id} stopped: {error_line(err)}; `reelmend resume {spec.dest}` "
                                 "continues it") from err
        finally:
            progress.stop()
    result.seconds = time.monotonic() - started
    return result


def _inputs(spec: JobSpec) -> list[storage.Listed]:
    """The files under SRC that the job takes (FileNotFoundError: none)."""
    files = storage.list_files(spec.src)
    if not files:
        raise FileNotFoundError(f"no files under {spec.src}")
    chosen = [f for f in files if spec.selects(f.rel)]
    if not chosen:
        raise FileNotFoundError(f"none of the {len(files)} file(s) under {spec.src} matches --include "
                                f"{' '.join(spec.include) or '(all)'} without matching --exclude "
                                f"{' '.join(spec.exclude) or '(none)'}")
    return chosen


def _run_job_on_cluster(spec: JobSpec, address: str, progress: Progress, relist: bool,
                        plan_only: bool) -> JobResult:
    """Ray Client (`--address ray://head:10001`, from a machine outside the cluster): Ray Data cannot drive a
    job through the client, so the job's driver runs on the cluster's head node as a task, and its progress
    comes back here through a queue. Paths are the cluster's: SRC and DEST are buckets, or shared folders.
    Errors come back as raised there (a usage error is still exit 2); interrupting this stops that driver."""
    from ray.util.queue import Empty, Queue

    connect(address)
    calls = Queue()
    ref = _drive_on_cluster.options(resources={"node:__internal_head__": 0.001}).remote(spec, calls, relist, plan_only)
    try:
        while True:
            done, _ = ray.wait([ref], timeout=0.5)
            while True:
                try:
                    name, args, kwargs = calls.get_nowait()
                except Empty:
                    break
                getattr(progress, name)(*args, **kwargs)
            if done:
                break
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            raise (err.cause or err) from None
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise
    finally:
        progress.stop()


class _Relay(Progress):
    """The progress of a driver running on the cluster: kept there (the job reads its figures) and forwarded,
    call by call, to the client's own Progress, which shows it in the mode the user chose."""

    def __init__(self, calls) -> None:
        super().__init__("quiet")
        self.calls = calls

    def log(self, message: str) -> None:
        self.calls.put(("log", (message,), {}))

    def start(self, *args, **kwargs) -> None:
        super().start(*args, **kwargs)
        self.calls.put(("start", args, kwargs))

    def update(self, advance: int = 0, **fields) -> None:
        super().update(advance, **fields)
        self.calls.put(("update", (advance,), fields))

    def event(self, name: str, **fields) -> None:
        self.calls.put(("event", (name,), fields))


@ray.remote(num_cpus=0, max_retries=0)
def _drive_on_cluster(spec: JobSpec, calls, relist: bool, plan_only: bool) -> JobResult:
    # (already connected: the cluster it runs on)
    return run_job(spec, address="auto", progress=_Relay(calls), relist=relist, plan_only=plan_only)


def _agree_with_stored(spec: JobSpec, manifest: Manifest) -> JobSpec:
    """A run of a job already planned: its options must be those it was planned with (ValueError: a usage
    error, before any work). `--max-attempts` may change, and is then stored, so `status` counts the same way."""
    if not manifest.has_plan():
        return spec
    stored = manifest.read_spec()
    if stored.shaping() != spec.shaping():
        raise ValueError(f"job {manifest.job_id} under {spec.dest} was planned with other options "
                         f"({differences(stored.shaping(), spec.shaping())}); use another --job-id or the same "
                         "options")
    if "max_attempts" not in spec.model_fields_set:  # a re-run `restore` keeps the budget a resume set
        return spec.model_copy(update={"max_attempts": stored.max_attempts})
    if spec.max_attempts != stored.max_attempts:
        manifest.write_spec(spec)
    return spec


def differences(planned: dict, given: dict, within: str = "") -> str:
    """What differs between two specs' shaping dicts, as "crf: 18 planned, 20 given" (nested: "encode.crf")."""
    out = []
    for key in sorted(set(planned) | set(given)):
        a, b = planned.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [differences(a, b, f"{within}{key}.")] if a != b else []
        elif a != b:
            out.append(f"{within}{key}: {a!r} planned, {b!r} given")
    return "; ".join(out)


def _run_job(spec: JobSpec, job_id: str, manifest: Manifest, progress: Progress, held: lease.Lease,
             files: list[storage.Listed] | None, plan_only: bool = False) -> JobResult:
    log = progress.log
    if manifest.has_plan():
        log(f"resuming job {job_id}")
        if files is not None:
            plan_changes(spec, job_id, manifest, files, log, check=held.check)
    else:
        if files is None:  # the plan another run was making when this one looked is gone (that run failed)
            files = _inputs(spec)
        make_plan(spec, job_id, manifest, files, log, check=held.check)
    plan = manifest.read_plan().to_pylist()
    result = JobResult(job_id, manifest.root)
    scale, temporal, _ = chain_geometry(parse_chain(spec.chain))
    if plan_only:
        result.videos = summarize(manifest, plan, spec.max_attempts)
        failed = {v.video_id for v in result.videos if v.status == "failed"}
        result.planned = plan_summary(plan, manifest.chunk_states(), scale, temporal, failed,
                                      lambda row: _fields_per_frame(spec, row))
        return result
    storage.clean_staging(manifest.root)  # leftovers of a run that was killed (the lease keeps runs apart)
    stitched_before = {vid for (vid, idx), s in manifest.chunk_states().items() if idx < 0 and s.status == "done"}
    result.chunks_run, result.frames_in = _run_chunks(spec, manifest, plan, scale, temporal, progress, held)
    held.check()
    _stitch_ready(spec, manifest, plan, temporal, log, held)
    result.videos = summarize(manifest, plan, spec.max_attempts)
    result.already_done = not result.chunks_run and all(v.video_id in stitched_before for v in result.videos
                                                         if v.status == "done")
    return result


def plan_summary(plan: list[dict], states: dict, scale: int, temporal: int, failed: set[str],
                 per_frame: Callable[[dict], int] = lambda row: 1) -> dict:
    """What is left to do in a plan: videos, chunks, source frames and seconds, the largest output frame.
    `failed`: the videos that cannot be restored (a probe failure, or attempts used up); `per_frame`: frames
    made of each source frame of a row's video before the chain (`_fields_per_frame`)."""
    finished = failed | {vid for (vid, idx), s in states.items() if idx < 0 and s.status == "done"}
    todo = [r for r in plan if r["chunk_index"] >= 0 and r["video_id"] not in finished
            and states.get((r["video_id"], r["chunk_index"]), NO_EVENTS).status != "done"]
    videos = {r["video_id"]: r for r in todo}
    made = {vid: per_frame(r) for vid, r in videos.items()}  # (one probe to read per video, not per chunk)
    return {
        "videos": len(videos),
        "chunks": len(todo),
        "frames": sum(map(_own_frames, todo)),
        "seconds": round(sum(_own_frames(r) * r["fps_den"] / r["fps_num"] for r in todo), 3),
        "output_frames": sum(_own_frames(r) * made[r["video_id"]] for r in todo) * temporal,
        "largest_output": max(((r["width"] * scale, r["height"] * scale) for r in videos.values()),
                              key=lambda wh: wh[0] * wh[1], default=(0, 0)),
        "cannot_restore": len(failed),
    }


def _runnable(plan: list[dict], manifest: Manifest, max_attempts: int) -> list[dict]:
    states = manifest.chunk_states()
    exhausted = {vid for (vid, _), s in states.items() if s.status == "failed" and s.failures >= max_attempts}
    todo = []
    for row in plan:
        key = (row["video_id"], row["chunk_index"])
        if row["chunk_index"] < 0 or row["video_id"] in exhausted:
            continue
        if states.get((row["video_id"], -1), NO_EVENTS).status == "done":
            continue  # already stitched
        state = states.get(key)
        if state is None or state.status != "done":
            todo.append({**row, "attempt": (state.failures if state else 0) + 1})
    return todo


def _run_chunks(spec: JobSpec, manifest: Manifest, plan: list[dict], scale: int, temporal: int,
                progress: Progress, held: lease.Lease) -> tuple[int, int]:
    log = progress.log
    chunks = frames = 0
    failing = _start_progress(progress, plan, manifest)
    while todo := _runnable(plan, manifest, spec.max_attempts):
        held.check()
        wave, too_big = _fit_memory(todo[:WAVE], manifest, spec.resources.decode_cpus)
        if too_big:
            log(f"{too_big} chunk(s) need more memory than any node has; failed (see `reelmend status`)")
        if not wave:
            continue
        if delay := retry_delay(wave, manifest.chunk_states()):
            log(f"waiting {delay:.0f} s before retrying {len(wave)} chunk(s) that failed reading, writing or with "
                "their worker (an outage of the store or of a node may pass)")
            time.sleep(delay)
            held.check()
        log(f"restoring {len(wave)} chunk(s) of {len(todo)} pending")
        manifest.append_events({"video_id": t["video_id"], "chunk_index": t["chunk_index"], "status": "running",
                                "attempt": t["attempt"], "started_at": time.time()} for t in wave)
        # (a column an older plan part lacks is missing, or null where parts were joined: "")
        tasks = [{k: "" if t.get(k) is None else t[k] for k in (*TASK_FIELDS, "attempt")} for t in wave]
        # on the driver's node, which lives as long as the job does (a worker node may be lost mid-pass)
        tries = Tries.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)).remote()
        # Whatever happens, results already back are committed (within about a second, and when the block is
        # left), except by a run whose lease was taken over.
        try:
            with EventWriter(manifest, check=held.check) as writer:
                for row in restore_dataset(tasks, spec, scale, temporal, manifest.segments_root, tries).iter_rows():
                    # A run that lost its lease records nothing more: the run that took over owns the job's events
                    # (the check reads two fields; a wave can outlast the lease's TTL).
                    held.check()
                    faults.maybe_fail("driver", row)
                    ok = not row["error_kind"]
                    concealed = int(row.get("frames_concealed") or 0) if ok else 0
                    kind, message = row["error_kind"] or None, row["error_message"] or None
                    if concealed:  # done, with a note of what it could not decode
                        kind, message = "concealed", concealed_note(concealed, row["concealed_at"])
                    writer.add({"video_id": row["video_id"], "chunk_index": int(row["chunk_index"]),
                                "status": "done" if ok else "failed", "attempt": int(row["attempt"]),
                                "error_kind": kind, "error_message": message, "frames_concealed": concealed,
                                "started_at": float(row["started_at"]), "frames_in": int(row["frames_in"]),
                                "frames_out": int(row["frames_out"]), "segment_uri": row["segment_uri"] or None,
                                "worker": row["worker"]})
                    chunks += 1
                    frames += int(row["frames_in"]) if ok else 0
                    key = (row["video_id"], int(row["chunk_index"]))
                    (failing.discard if ok else failing.add)(key)
                    progress.update(advance=_own_frames(row) if ok else 0,
                                    chunks_done=progress.fields["chunks_done"] + ok, failures=len(failing))
                    progress.event("chunk", video_id=row["video_id"], chunk_index=key[1],
                                   status="done" if ok else "failed", attempt=int(row["attempt"]),
                                   frames=int(row["frames_in"]),
                                   error=None if ok else f"{row['error_kind']}: {row['error_message']}")
                    if not ok:
                        log(f"chunk {row['chunk_index']} of {row['video_id']} failed "
                            f"(attempt {row['attempt']}): {row['error_kind']}: {row['error_message']}")
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone with what is being raised
                ray.kill(tries)
    return chunks, frames


def _fields_per_frame(spec: JobSpec, row: dict) -> int:
    """Frames made of each source frame of the row's video before the chain (2: an interlaced one, double rate)."""
    return spec.fields_per_frame(VideoInfo.model_validate_json(row["probe_json"]).parity) if spec.double_rate else 1


def retry_delay(wave: list[dict], states: dict) -> float:
    """Seconds to wait before a wave of retries only, all of chunks that failed as an outage would fail them
    (`RETRY_BACKOFF_KINDS`): 5 s before second attempts, doubling with each attempt, up to a minute. A wave with
    fresh chunks in it starts at once (its retries then come after a whole wave's work), and so do retries of
    failures that waiting does not mend (a model's error, a source that changed)."""
    if not wave or any(t["attempt"] == 1 for t in wave):
        return 0.0
    if any(states.get((t["video_id"], t["chunk_index"]), NO_EVENTS).error_kind not in RETRY_BACKOFF_KINDS
           for t in wave):
        return 0.0
    return min(60.0, 5.0 * 2 ** (min(t["attempt"] for t in wave) - 2))


def concealed_note(count: int, at: str) -> str:
    """What a done chunk's event says of its concealed frames (`at`: their source frame indices)."""
    if len(at) > 1500:
        at = at[:at.rfind(",", 0, 1500)] + ", ..."
    return f"{count} source frame(s) could not be decoded and repeat a neighbour: frame(s) {at}"


def _own_frames(row: dict) -> int:
    """A chunk's own source frames (without the context frames it decoded), the unit progress counts."""
    return int(row["frame_end"]) - int(row["frame_start"])


def _start_progress(progress: Progress, plan: list[dict], manifest: Manifest) -> set[tuple[str, int]]:
    """Start counting source frames and chunks over the whole job (those done by earlier runs included);
    returns the chunks failing now, which this run may yet retry."""
    states = manifest.chunk_states()
    rows = [r for r in plan if r["chunk_index"] >= 0]
    stitched = {vid for (vid, idx), s in states.items() if idx < 0 and s.status == "done"}
    done = [r for r in rows if r["video_id"] in stitched
            or states.get((r["video_id"], r["chunk_index"]), NO_EVENTS).status == "done"]
    planned = {r["video_id"] for r in plan}  # (not the generations a replaced source superseded)
    failing = {k for k, s in states.items() if s.status == "failed" and k[0] in planned}
    progress.start("restoring", total=sum(map(_own_frames, rows)), done=sum(map(_own_frames, done)), unit="frames",
                   detail="chunks {chunks_done}/{chunks_total}, {failures} failed",
                   chunks_done=len(done), chunks_total=len(rows), failures=len(failing))
    return failing


def _fit_memory(wave: list[dict], manifest: Manifest, decode_cpus: float = 1.0) -> tuple[list[dict], int]:
    """The chunks whose decode fits in the largest node's memory; the others are failed here with the reason
    (Ray would otherwise wait forever for a node that can hold them)."""
    limit = largest_node_memory(decode_cpus)
    fits, events = [], []
    for t in wave:
        need = decode_memory(frame_bytes(t))
        if need <= limit:
            fits.append(t)
        else:
            events.append({"video_id": t["video_id"], "chunk_index": t["chunk_index"], "status": "failed",
                           "attempt": t["attempt"], "error_kind": "resources", "finished_at": time.time(),
                           "error_message": f"decoding this chunk needs {need / 2**30:.1f} GiB, more than any "
                                            f"node offers ({limit / 2**30:.1f} GiB); use a smaller --chunk-frames "
                                            f"or larger nodes"})
    manifest.append_events(events)
    return fits, len(events)


def _stitch_ready(spec: JobSpec, manifest: Manifest, plan: list[dict], temporal: int,
                  log: Callable[[str], None], held: lease.Lease) -> None:
    for round_ in range(spec.max_attempts):
        states = manifest.chunk_states()
        videos: dict[str, list[dict]] = {}
        for row in plan:
            if row["chunk_index"] >= 0:
                videos.setdefault(row["video_id"], []).append(row)
        jobs, undecodable = {}, []
        for vid, rows in videos.items():
            video_state = states.get((vid, -1))
            if video_state and (video_state.status == "done" or _given_up(video_state, spec.max_attempts)):
                continue
            rows.sort(key=lambda r: r["chunk_index"])
            chunk_states = [states.get((vid, r["chunk_index"]), NO_EVENTS) for r in rows]
            if any(s.status != "done" for s in chunk_states):
                continue
            first = rows[0]
            concealed = sum(s.frames_concealed for s in chunk_states)
            if 2 * concealed > first["n_frames"]:  # what is left is not the video: concealing stops here
                undecodable.append({"video_id": vid, "chunk_index": -1, "status": "failed", "attempt": 1,
                                    "error_kind": "undecodable", "finished_at": time.time(),
                                    "error_message": f"{concealed} of its {first['n_frames']} frames could not be "
                                                     "decoded: too few are left to restore the video from"})
                continue
            jobs[vid] = {"source_uri": first["source_uri"], "source_version": first.get("source_version") or "",
                         "output_uri": first["output_uri"],
                         "out_format": first["out_format"], "probe_json": first["probe_json"],
                         "segments": [s.segment_uri for s in chunk_states],
                         # a variable-rate video's segments each last exactly their chunk's span of the source
                         "durations": ([json.loads(r["chunk_times"])[-1] for r in rows]
                                       if all(r.get("chunk_times") for r in rows) else None),
                         "expected_frames": first["n_frames"] * temporal * _fields_per_frame(spec, first),
                         "staging_near": manifest.root,
                         "deinterlaced": spec.deinterlace}
        if undecodable:
            held.check()
            manifest.append_events(undecodable)
            for event in undecodable:  # its segments will never be stitched
                with contextlib.suppress(OSError):
                    storage.remove(storage.join(manifest.segments_root, event["video_id"]))
        if not jobs:
            return
        log(f"stitching {len(jobs)} video(s)")
        failures = {vid: states.get((vid, -1), NO_EVENTS).failures for vid in jobs}
        events = []
        for vid, outcome in stitch_all(jobs, spec.storage_options, spec.resources.cpu_task_resources()):
            ok = isinstance(outcome, int)
            kind, message = "stitch", outcome
            if not ok and outcome.startswith("source: "):  # the source changed: not the stitch's failure
                kind, message = "source", outcome.removeprefix("source: ")
            events.append({"video_id": vid, "chunk_index": -1, "status": "done" if ok else "failed",
                           "attempt": failures[vid] + 1, "error_kind": None if ok else kind,
                           "error_message": None if ok else message, "frames_out": outcome if ok else None,
                           "segment_uri": jobs[vid]["output_uri"] if ok else None, "finished_at": time.time()})
            if not ok:
                log(f"stitching {jobs[vid]['output_uri']} failed: {outcome}")
        held.check()  # a run whose lease was taken over while it stitched records nothing
        manifest.append_events(events)
        if round_ + 1 < spec.max_attempts and any(e["status"] == "failed" for e in events):
            time.sleep(2.0 * 2 ** round_)  # a store that is down for a while gets a while before the next try
        for event in events:  # the segments are no longer needed once the output is published and recorded
            if event["status"] == "done":
                for uri in jobs[event["video_id"]]["segments"]:
                    try:
                        storage.remove(uri)
                    except OSError as err:  # a leftover segment costs space, not correctness
                        log(f"could not remove {uri}: {err}")


def _given_up(state: ChunkState, max_attempts: int) -> bool:
    """A video-level failure that is final: its stitch failed every attempt, or too little of it decodes."""
    return state.status == "failed" and (state.failures >= max_attempts or state.error_kind == "undecodable")


def summarize(manifest: Manifest, plan: list[dict], max_attempts: int) -> list[VideoResult]:
    """Per video: done (stitched), failed (with the reason) or pending, from the plan and the events."""
    states = manifest.chunk_states()
    out: dict[str, VideoResult] = {}
    for row in plan:
        vid = row["video_id"]
        v = out.setdefault(vid, VideoResult(vid, row["rel_path"], row["output_uri"], "pending"))
        if row["chunk_index"] < 0:
            v.status, v.reason = "failed", row["error"] or "cannot be restored"
            continue
        s = states.get((vid, row["chunk_index"]))
        if s and s.status == "done":
            v.frames_concealed += s.frames_concealed
        if s and s.status == "failed" and s.failures >= max_attempts and v.status != "failed":
            v.status, v.reason = "failed", f"chunk {row['chunk_index']}: {s.error_kind}: {s.error_message}"
    for v in out.values():
        s = states.get((v.video_id, -1))
        if v.status != "failed" and s:
            if s.status == "done":
                v.status, v.frames_out = "done", s.frames_out
                if v.frames_concealed:
                    v.reason = f"{v.frames_concealed} frame(s) concealed: the source's could not be decoded"
            elif _given_up(s, max_attempts):
                v.status, v.reason = "failed", f"{s.error_kind}: {s.error_message}"
    return list(out.values())
