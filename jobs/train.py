"""`reelmend train STAGE`: distributed adversarial training of one stage on Ray Train, then export.

    OUT/checkpoints/train-<stage>/step-*/   Ray Train's checkpoints (safetensors + JSON, never pickle)
    OUT/<stage>.safetensors + .json         the fidelity weights and their model card
    OUT/<stage>-gan.safetensors + .json     the GAN fine-tuned weights and their card

OUT is then a weights folder: `reelmend restore ... --models OUT`. A worker that dies is replaced and the group
restarts from the last checkpoint (FailureConfig); a stopped run continues with `--resume`, which Ray Train V2
does by finding the run's checkpoint state under the same storage path and name.
"""

from __future__ import annotations

import datetime
import json
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from ray.util.queue import Queue
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs import train_checkpoint, train_data
from jobs.progress import Progress
from jobs.train_config import TrainSpec
from jobs.train_loop import build_generator, train_loop
from models.chain import STAGES
from models.weights import load_state, save_weights
from pipeline import storage
from pipeline.config import VERSION
from pipeline.run import connect

# What decides the networks a checkpoint holds; a resumed run must agree on it.
SHAPING = ("stage", "arch_name", "generator_args", "d_features")


@dataclass
class TrainResult:
    out: str
    weights: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def continue_architecture(spec: TrainSpec, init_card: dict) -> TrainSpec:
    """--init DIR continues DIR's network: its architecture and arguments, where --arch and --arch-args do not
    say otherwise, except what the stage fixes (its window, its scale), which a narrower net is grown to."""
    if spec.arch not in (None, init_card.get("arch")):
        return spec  # another architecture: loading the weights into it fails with the reason
    fixed = STAGES[spec.stage].default_args
    args = {k: v for k, v in init_card.get("args", {}).items() if k not in fixed}
    return spec.model_copy(update={"arch": init_card.get("arch"), "arch_args": {**args, **spec.arch_args}})


def run_training(spec: TrainSpec, address: str | None = None, log: Callable[[str], None] = print,
                 progress: Progress | None = None) -> TrainResult:
    t0 = time.time()
    progress = progress or Progress("plain", log=log)
    log = progress.log
    run_name = f"train-{spec.stage}"
    storage.configure(spec.storage_options)
    storage.check_folder(spec.out, "--out")
    checkpoints = storage.join(spec.out, "checkpoints")
    if spec.init:  # a missing or bad --init fails here, not minutes later in every worker
        spec = continue_architecture(spec, load_state(spec.init, spec.stage, "fidelity")[1])
    check_resume(spec, checkpoints, run_name)
    sources = train_data.list_sources(spec.data)  # a wrong --data fails here, before Ray starts or OUT is written
    write_run_spec(spec, checkpoints, run_name)
    connect(address)

    start = latest_step(storage.join(checkpoints, run_name)) if spec.resume else 0
    dataset, val, provenance = train_data.build(spec, log, first_step=start, sources=sources)
    cpus = worker_cpus(spec)
    threads = max(1, int(cpus))
    storage_path, storage_fs = ray_storage(checkpoints)
    # rank 0 puts its latest losses here about once a second; no CPU of its own, so it never waits for one
    updates = Queue(maxsize=64, actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(), "val": [ray.put(val)], "threads": threads,
                           "progress": updates},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if spec.gpu else {})}),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints)),
        datasets={"train": dataset},
    )
    log(f"training {spec.stage} ({spec.arch_name}) on {spec.workers} worker(s) x {cpus:g} CPU"
        f"{' + 1 GPU' if spec.gpu else ''}: {spec.steps} fidelity + {spec.gan_steps} GAN steps, "
        f"checkpoints in {checkpoints}/{run_name}")
    with watch_progress(storage.join(checkpoints, run_name), spec, progress, updates, start):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training of {spec.stage} produced no checkpoint")
    with result.checkpoint.as_directory() as path:
        state = train_checkpoint.load(Path(path))
    if state.step < spec.total_steps:
        raise RuntimeError(f"training stopped at step {state.step} of {spec.total_steps}; "
                           f"`reelmend train ... --resume` continues it")
    weights = export(spec, state, provenance, time.time() - t0)
    return TrainResult(out=spec.out, weights=weights, metrics=result.metrics or {}, seconds=time.time() - t0)


@contextmanager
def watch_progress(run_dir: str, spec: TrainSpec, progress: Progress, updates: Queue, start: int,
                   every: float = 2.0):
    """Show the run live: steps done, steps/s, ETA and the latest losses from rank 0's updates, and a log line
    with each new checkpoint's metrics (losses, validation PSNR). Both come through Ray (a queue actor, the
    checkpoint storage), so this works wherever the cluster runs and keeps the workers' logs out of the
    user's terminal."""
    stop = threading.Event()
    seen = set(checkpoint_names(run_dir))
    log = progress.log
    progress.start(f"training {spec.stage}", total=spec.total_steps, done=start, unit="steps",
                   detail="{phase}, {loss}", phase="fidelity" if start < spec.steps else "gan", loss="starting")

    def drain() -> None:
        try:
            latest = updates.get_nowait_batch(updates.qsize())[-1:]
        except Exception:  # noqa: BLE001 - nothing new, or the queue is gone with the run
            latest = []
        for m in latest:  # the pixel loss is the one comparable across both phases
            loss = (f"pixel loss {m['loss_pixel']:.4f}" if "loss_pixel" in m  # --d-warmup: only D trains
                    else f"discriminator warm-up, its loss {m['loss_d']:.3f}")
            progress.update(advance=m["step"] - progress.done, phase=m["phase"], loss=loss)
            progress.event("step", **m)

    def poll() -> None:
        while not stop.wait(every):
            drain()
            for name in sorted(set(checkpoint_names(run_dir)) - seen):
                state_uri = storage.join(run_dir, name, train_checkpoint.META)
                try:
                    history = json.loads(storage.read_bytes(state_uri)).get("history", [])
                except (OSError, ValueError):
                    continue  # still being written: next poll
                seen.add(name)
                if history:
                    log(format_metrics(history[-1], spec))
                    progress.event("checkpoint", **history[-1])

    thread = threading.Thread(target=poll, name="train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drain()
        progress.stop()


def format_metrics(m: dict, spec: TrainSpec) -> str:
    losses = " ".join(f"{k.removeprefix('loss_')}={v:.4f}" for k, v in m.items() if k.startswith("loss_"))
    return (f"step {m['step']}/{spec.total_steps} ({m['phase']}): {losses}; validation PSNR {m['val_psnr']:.2f} dB "
            f"(baseline {m['val_psnr_baseline']:.2f}); {m['steps_per_s']:.2f} steps/s")


def checkpoint_names(run_dir: str) -> list[str]:
    return [n for n in storage.ls(run_dir) if n.startswith("step-")]


def latest_step(run_dir: str) -> int:
    return max((int(n.removeprefix("step-")) for n in checkpoint_names(run_dir)), default=0)


def shaping(spec: TrainSpec) -> dict:
    return {"stage": spec.stage, "arch_name": spec.arch_name, "generator_args": spec.generator_args,
            "d_features": spec.d_features}


def check_resume(spec: TrainSpec, checkpoints: str, run_name: str) -> None:
    """A new run must not mix with an old one in OUT; a resumed run must train the same networks."""
    spec_uri = storage.join(checkpoints, f"{run_name}.json")
    if checkpoint_names(storage.join(checkpoints, run_name)):
        if not spec.resume:
            raise ValueError(f"{spec.out} already holds a training run of {spec.stage}; pass --resume to "
                             f"continue it, or choose another --out")
        previous = json.loads(storage.read_bytes(spec_uri)) if storage.exists(spec_uri) else {}
        changed = [k for k in SHAPING if k in previous and previous[k] != shaping(spec)[k]]
        if changed:
            raise ValueError(f"--resume with different {', '.join(changed)} than the run in {spec.out} "
                             f"({', '.join(f'{k}={previous[k]!r}' for k in changed)})")
    elif spec.resume:
        raise ValueError(f"nothing to resume: {spec.out} holds no training run of {spec.stage}")


def write_run_spec(spec: TrainSpec, checkpoints: str, run_name: str) -> None:
    """What shapes the run's networks, beside its checkpoints, for a later --resume to compare (`check_resume`)."""
    storage.write_bytes(storage.join(checkpoints, f"{run_name}.json"), json.dumps(shaping(spec), indent=1).encode())


def worker_cpus(spec: TrainSpec) -> float:
    """CPUs per training worker: by default one each (Ray Train's default), or an equal share of what is left
    after one CPU for the data pipeline when the cluster is smaller than that. The data pipeline degrades samples
    while the workers step; with no CPU left for it, Ray Data would wait forever behind the workers'
    reservations."""
    if spec.worker_cpus is not None:
        return spec.worker_cpus
    if spec.gpu:
        return 1.0
    total = ray.cluster_resources().get("CPU", 1.0)
    share = (total - 1.0) / spec.workers
    return 1.0 if share >= 1 else max(0.25, round(share, 2))


def ray_storage(uri: str):
    """Ray Train's (storage_path, storage_filesystem) for any fsspec URI: local paths as absolute paths,
    others through pyarrow's wrapper of the fsspec filesystem (so `AWS_ENDPOINT_URL` etc. apply as for data)."""
    fs, path = storage.fs_and_path(uri)
    if storage.is_local(uri):
        Path(path).mkdir(parents=True, exist_ok=True)
        return str(Path(path).resolve()), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path, PyFileSystem(FSSpecHandler(fs))


def export(spec: TrainSpec, state: train_checkpoint.TrainState, provenance: dict, seconds: float) -> list[str]:
    """Write the fidelity and GAN weights of the finished run with their model cards into OUT."""
    history = state.meta.get("history", [])
    steps_per_s = [h["steps_per_s"] for h in history if "steps_per_s" in h]
    common = {
        "command": spec.command or f"reelmend train {spec.stage}",
        "data": provenance,
        "training": {"workers": spec.workers, "gpu": spec.gpu, "device": device_name(spec),
                     "steps": spec.steps, "gan_steps": spec.gan_steps, "d_warmup": spec.d_warmup,
                     "lr": spec.lr, "gan_lr": spec.gan_lr, "d_lr": spec.d_lr, "batch_per_worker": spec.batch,
                     "patch": spec.patch, "clip_frames": spec.clip_frames, "loss": spec.loss.model_dump(),
                     "seed": spec.seed, "init": spec.init, "seconds": round(seconds, 1),
                     "steps_per_s": round(sum(steps_per_s) / len(steps_per_s), 4) if steps_per_s else None},
        "reelmend": VERSION,
        "date": datetime.date.today().isoformat(),
    }
    written = []
    flavours = []
    if spec.steps:
        sd = state.module("g_fidelity") if spec.gan_steps else state.module("g")
        flavours.append(("fidelity", sd, state.meta.get("fidelity_metrics") or (history[-1] if history else {})))
    if spec.gan_steps:
        flavours.append(("gan", state.module("g"), history[-1] if history else {}))
    for flavour, sd, metrics in flavours:
        net = build_generator(spec)
        net.load_state_dict(sd)
        fps = cpu_fps(net, spec)
        card = {**common, "metrics": {k: v for k, v in (metrics or {}).items()
                                      if k.startswith(("val_", "loss_", "step"))},
                "cpu_fps_640x360": fps, "cpu_fps_640x360_estimated": fps < 0.2}
        written.append(save_weights(net, spec.out, spec.stage, flavour, spec.generator_args, card))
    return written


def device_name(spec: TrainSpec) -> str:
    if spec.gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


@torch.inference_mode()
def cpu_fps(net: torch.nn.Module, spec: TrainSpec) -> float:
    """Frames per second of the network alone on this machine's CPU at 640x360 input (the card's figure).

    Timed on a 160x90 frame first: a network too slow to time at full size in a few seconds (RRDBNet on a CPU
    takes minutes a frame) reports that figure scaled by the pixel count (its convolutions are linear in it),
    which `cpu_fps_640x360_estimated` in the card then says."""
    small = 1.0 / _seconds_per_frame(net, spec, 90, 160) / 16
    if small < 0.2:
        return round(small, 3)
    return round(1.0 / _seconds_per_frame(net, spec, 360, 640), 2)


def _seconds_per_frame(net: torch.nn.Module, spec: TrainSpec, height: int, width: int) -> float:
    info = STAGES[spec.stage]
    net = net.eval()
    frame = torch.rand(1, 3, height, width)
    if info.is_interp:
        inputs = (frame, frame)
    elif info.radius or spec.arch_name == "RestorerNet":
        inputs = (frame.unsqueeze(1).expand(1, 2 * info.radius + 1, 3, height, width).contiguous(),)
    else:
        inputs = (frame,)
    net(*inputs)  # warm-up
    t = time.perf_counter()
    net(*inputs)
    return time.perf_counter() - t
