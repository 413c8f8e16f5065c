"""The Ray side of a restoration job: connecting, probe tasks, the chunk dataset, stitch tasks."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import ray
from ray.data import ActorPoolStrategy

from models.geometry import chain_geometry, parse_chain
from pipeline import storage
from pipeline.config import JobSpec, ResourceSpec
from pipeline.probe import ProbeError, VideoInfo, probe
from pipeline.stages import PROCESS_RETRIES, RestoreStage, decode_chunk, encode_chunk, lost_reason
from pipeline.stitch import stitch_video


# What a Ray worker process holding Python, NumPy and FFmpeg's pipes uses before any frame (measured ~250 MB).
WORKER_BASE_BYTES = 256 * 2**20


def start_local(num_cpus: int | None = None) -> None:
    """Start a Ray instance on this machine for one job.

    Ray keeps idle worker processes only while there are fewer workers than CPUs, and kills the others after a
    second idle; a job's actors (the restore pool and Ray Data's own three) count, so on a small machine every
    decode and encode task would start a fresh Python process: 11% of a 2-core machine's CPU in `reelmend
    bench`. Idle workers are kept up to the CPUs plus room for those actors. (On a cluster the same setting is
    `ray start --system-config='{"num_workers_soft_limit": N}'`; nodes with many CPUs per actor need none.)"""
    cpus = num_cpus or os.cpu_count() or 1
    # address="local": a new instance even when a cluster started with `ray start` runs on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _system_config={"num_workers_soft_limit": cpus + 8})


def connect(address: str | None) -> None:
    """Join the cluster at `address` ('auto', 'ray://host:10001', a GCS address) or start a local instance.
    An already-connected process (a test session, a `ray job submit` entrypoint) keeps its connection."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None and "RAY_ADDRESS" not in os.environ:
            start_local()
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=code_env())
    # Ray Data's per-dataset lines ("execution finished in ...", "progress bars disabled") are noise in a CLI
    # that shows its own progress; its errors stay.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Ray Data's advice to tune `memory=` of its operators is for its developers; reelmend sizes them itself.
    ctx.issue_detectors_config.detectors = []


# Where the store is, from the driver's environment: not secret, and a worker elsewhere needs the same to reach it
# (without, a worker of a cluster the driver joined would read and write AWS itself instead of the store the driver
# listed). Credentials stay with each node's own environment or instance profile, or come as --storage-options.
STORE_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def code_env() -> dict | None:
    """The runtime environment that brings this driver's code to a cluster's workers: the project's packages
    (with the shipped weights), uploaded once per version and put first on the workers' import path, so the
    workers run exactly the driver's code whatever their image holds, and the store's `STORE_SETTINGS`. The
    cluster provides the dependencies (torch, FFmpeg: the image in infra/). None inside a `ray job submit`
    entrypoint, whose job's runtime environment (`--working-dir`, `--runtime-env-json`, or the image) already
    decides; REELMEND_SHIP_CODE=0 ships no code."""
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return None
    env: dict = {}
    if settings := {k: os.environ[k] for k in STORE_SETTINGS if os.environ.get(k)}:
        env["env_vars"] = settings
    if os.environ.get("REELMEND_SHIP_CODE") != "0":
        import jobs
        import models
        import pipeline

        # paths, not the modules: Ray Client (ray://) pickles the runtime environment
        env.update(py_modules=[os.path.dirname(p.__file__) for p in (pipeline, models, jobs)],
                   excludes=["__pycache__", "*.pyc"])
    return env or None


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def restore_gpus(res: ResourceSpec) -> float:
    """GPUs per restore actor: as asked, else one where the cluster has GPUs (and CPU torch where it has none)."""
    return res.restore_gpus if res.restore_gpus is not None else (1.0 if cluster_has_gpus() else 0.0)


# How long a job on a cluster it joined waits for the nodes it needs (an autoscaling cluster launching a GPU node
# takes minutes) before it is refused; a local instance cannot grow, and refuses at once.
NODE_WAIT_S = float(os.environ.get("REELMEND_NODE_WAIT_S", 600))


def check_resources(res: ResourceSpec, *, can_grow: bool, log: Callable[[str], None] = print) -> None:
    """Refuse, before any work, what no node could run: Ray would wait forever for a node offering it (a decode
    task of 64 CPUs, a GPU actor on a CPU-only cluster, more restore actors than fit). On a cluster that
    `can_grow` (one this job joined) the job first asks the autoscaler for such nodes and waits NODE_WAIT_S."""
    gpus = restore_gpus(res)
    cpu_side = res.cpu_task_resources()
    also = "/--cpu-resource" if cpu_side else ""
    needs = {f"--decode-cpus{also}": {"CPU": res.decode_cpus, **cpu_side},
             f"--encode-cpus{also}": {"CPU": res.encode_cpus, **cpu_side},
             "--restore-cpus/--restore-gpus": {"CPU": res.restore_cpus, "GPU": gpus}}
    problem = _unmet(res, needs)
    if problem and can_grow and NODE_WAIT_S > 0:
        from ray.autoscaler.sdk import request_resources

        log(f"{problem}; waiting up to {NODE_WAIT_S:.0f} s for the cluster to add nodes")
        bundles = [needs["--decode-cpus"], needs["--encode-cpus"],
                   *[needs["--restore-cpus/--restore-gpus"]] * res.restore_actors_min]
        request_resources(bundles=[{k: v for k, v in b.items() if v} for b in bundles])
        deadline = time.monotonic() + NODE_WAIT_S
        try:
            while problem and time.monotonic() < deadline:
                time.sleep(5)
                problem = _unmet(res, needs)
        finally:
            request_resources(bundles=[])  # from here the job's own tasks and actors hold what they need
    if problem:
        raise ValueError(f"{problem}; ask for less, or add a node that has it")


def _unmet(res: ResourceSpec, needs: dict[str, dict[str, float]]) -> str | None:
    """What no live node offers, in words, or None."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def fits(node: dict, need: dict) -> int:  # how many of `need` the node holds at once
        return int(min(node.get(k, 0.0) // v for k, v in need.items() if v))

    offered = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes) or "no live node"
    for flags, need in needs.items():
        if not any(fits(n, need) for n in nodes):
            asked = ", ".join(f"{v:g} {k}" for k, v in need.items() if v)
            return f"{flags}: no node of this cluster offers {asked} (its nodes: {offered})"
    actors = sum(fits(n, needs["--restore-cpus/--restore-gpus"]) for n in nodes)
    if actors < res.restore_actors_min:
        return (f"--actors: at least {res.restore_actors_min} restore actors asked for, but this cluster holds "
                f"{actors} at once (its nodes: {offered})")
    return None


def frame_bytes(task: dict) -> int:
    """The decoded frames of a chunk with its context (RGB, 16-bit above 8-bit sources)."""
    return ((task["decode_end"] - task["decode_start"]) * task["width"] * task["height"] * 3
            * (2 if task["bit_depth"] > 8 else 1))


def decode_memory(frame_bytes: int) -> int:
    """What a decode task declares: the worker, its frames and the copy on their way into the object store."""
    return WORKER_BASE_BYTES + 2 * frame_bytes


def largest_node_memory(cpus: float) -> float:
    """The most memory any live node that can run a task of `cpus` CPUs offers now. A task asking for more
    would wait forever (Ray Data does not fail it), so such chunks are failed up front instead. (On an
    autoscaling cluster whose large nodes are not up yet this is the memory of the nodes that are.)"""
    return max((n["Resources"].get("memory", 0.0) for n in ray.nodes()
                if n.get("Alive") and n["Resources"].get("CPU", 0.0) >= cpus), default=0.0)


# What a task whose process kept dying raises once its retries are spent (a crash, the memory monitor's kill).
DIED = (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)


@ray.remote(num_cpus=0)
class Tries:
    """How often each chunk has started in each stage during one pass, counted across processes. Ray runs the
    task of a process that died again, without limit in Ray Data (its default, which a node lost mid-job
    needs); a chunk that kills every worker it lands on would so hang the job. The stages ask here first and
    fail such a chunk as "lost" when it starts for the (PROCESS_RETRIES + 2)th time (`stages.lost_reason`);
    the job's --max-attempts then decide, as for any other failure."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def start(self, key: str) -> int:
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]


@ray.remote(num_cpus=0.5, max_retries=PROCESS_RETRIES)
def _probe_task(uri: str, storage_options: dict, fields: bool = False, version: str = "") -> VideoInfo | str:
    """A VideoInfo, or the one-line reason the file cannot be restored."""
    storage.configure(storage_options)
    try:
        with storage.ffmpeg_input(uri, version=version) as src:
            return probe(src, fields)
    except ProbeError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - storage or anything else: this input's failure, not the job's
        return f"cannot be read: {type(err).__name__}: {' '.join(str(err).split())}"


def probe_all(uris: list[str], storage_options: dict | None = None, resources: dict[str, float] | None = None,
              fields: bool = False, versions: list[str] | None = None) -> Iterator[tuple[str, VideoInfo | str]]:
    """Probe every input in parallel on the cluster; yields (uri, info or reason) in input order. `fields`:
    also read the first frames' field flags (`probe`). `versions` (the listing's): where FFmpeg reads local
    copies, the copy a node keeps of each version serves the decodes that follow."""
    options = ray.put(storage_options or {})
    task = _probe_task.options(resources=resources or {})
    refs = [task.remote(uri, options, fields, version) for uri, version in zip(uris, versions or [""] * len(uris))]
    for uri, ref in zip(uris, refs):
        try:
            yield uri, ray.get(ref)
        except DIED as err:  # its process died every time: this input's failure, not the job's (any other
            # Ray error, a cluster problem, stops the run before a plan is written: the next run probes again)
            yield uri, f"cannot be probed: {lost_reason('probe')} ({type(err).__name__})"


def restore_dataset(tasks: list[dict], spec: JobSpec, scale: int, temporal: int,
                    segments_root: str, tries: ray.actor.ActorHandle) -> ray.data.Dataset:
    """decode -> restore -> encode over the given chunk rows; each output row is a chunk's result (no frames).

    One chunk per block and per batch: chunks of different videos differ in size and bit depth, and a chunk
    (about 2 s of frames) is already a large unit of work."""
    res = spec.resources
    gpus = restore_gpus(res)
    # A decode task holds its frames, and FFmpeg's pipe buffer: declared so Ray never packs more decodes on a
    # node than its memory holds. (Declaring it also keeps decode out of the restore actors: Ray Data fuses a
    # task stage into the next actor stage when their resources are equal, which would serialise the two.)
    decode_bytes = max(frame_bytes(t) for t in tasks) * (2 if spec.double_rate else 1)  # (a frame per field)
    # Frames in flight are bounded by a few chunks per restore actor, not by the length of the archive: left
    # alone, Ray Data lets fast decoders run ahead into a large share of the object store.
    chunk_bytes = decode_bytes * (1 + scale * scale * temporal)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(256 * 2**20, 2 * chunk_bytes * (res.restore_actors_max + 2)))
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    # decode: CPU tasks, FFmpeg -> RGB frames of [decode_start, decode_end)
    options = spec.storage_options  # passed as arguments, never through environment variables Ray displays
    _, _, context = chain_geometry(parse_chain(spec.chain))
    ds = ds.map(decode_chunk, fn_kwargs={"storage_options": options, "tries": tries, "conceal": spec.conceal_damage,
                                         "deinterlace": spec.deinterlace, "double_rate": spec.double_rate,
                                         "context": context},
                num_cpus=res.decode_cpus,
                memory=decode_memory(decode_bytes), resources=res.cpu_task_resources())
    # restore: an actor pool that holds the chain (GPU when the cluster has one) -> the chunk's own frames
    ds = ds.map_batches(
        RestoreStage, fn_constructor_kwargs={"chain": spec.chain, "models": spec.models, "storage_options": options,
                                             "threads": max(1, int(res.restore_cpus)), "tries": tries},
        batch_size=1, batch_format="numpy", num_cpus=res.restore_cpus, num_gpus=gpus,
        compute=ActorPoolStrategy(min_size=res.restore_actors_min, max_size=res.restore_actors_max))
    # encode: CPU tasks, FFmpeg -> one video-only segment per chunk in the job area
    ds = ds.map(encode_chunk, fn_kwargs={"encode": spec.encode, "segments_root": segments_root,
                                         "storage_options": options, "temporal": temporal, "tries": tries},
                num_cpus=res.encode_cpus, resources=res.cpu_task_resources())
    return ds


@ray.remote(num_cpus=1, max_retries=PROCESS_RETRIES)
def _stitch_task(storage_options: dict, **kwargs) -> int | str:
    """The output's frame count, or the one-line reason the stitch failed."""
    storage.configure(storage_options)
    try:
        return stitch_video(**kwargs)
    except storage.SourceChanged as err:
        return f"source: {err}"
    except Exception as err:  # noqa: BLE001 - recorded in the manifest as this video's failure
        return " ".join(str(err).split()) or type(err).__name__


def stitch_all(jobs: dict[str, dict], storage_options: dict | None = None,
               resources: dict[str, float] | None = None) -> Iterator[tuple[str, int | str]]:
    """Stitch videos in parallel; yields (video_id, frames or reason) as each finishes."""
    options = ray.put(storage_options or {})
    task = _stitch_task.options(resources=resources or {})
    refs = {task.remote(options, **kwargs): vid for vid, kwargs in jobs.items()}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            yield refs[done[0]], ray.get(done[0])
        except DIED as err:  # its process died every time: this attempt's failure, not the job's
            yield refs[done[0]], f"{lost_reason('stitch')} ({type(err).__name__})"
