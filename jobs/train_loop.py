"""The per-worker training loop of `reelmend train` (runs inside Ray Train's TorchTrainer, one copy per worker).

Reads top to bottom: build the networks, restore the latest checkpoint, wrap for DDP, then step: the fidelity
phase (pixel loss) and after it the GAN phase, fine-tuning the fidelity weights. Every `checkpoint_every` steps
rank 0 validates, and all ranks report (Ray Train's barrier), rank 0 with a checkpoint.

Two DDP pitfalls of GANs, and how this loop avoids them:
* Spectral norm keeps power-iteration vectors in buffers; DDP's default re-broadcast of buffers before every
  forward modifies them in place, which breaks a backward through two discriminator passes ("variable needed
  for gradient computation has been modified by an inplace operation", pytorch/pytorch#31010 and BasicSR's
  DDP notes). The discriminators are wrapped with `forward_sync_buffers=False`: buffers are synced once when
  DDP wraps them, and after that the power iteration is a function of weights DDP keeps identical, so they
  stay equal without per-forward broadcasts (and each discriminator step makes one forward of real and fake).
* During the generator step the discriminators are only a loss function: they are called unwrapped (no DDP
  reducer waiting for gradients that will never come), in eval mode (no power-iteration update) and with
  frozen parameters (no wasted discriminator gradients). Their own step sees real and fake in one forward.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

from jobs import train_checkpoint
from jobs.train_config import TrainSpec
from models import losses
from models.chain import STAGES, StageInfo
from models.restorer_net import RestorerNet, grow
from models.temporal_disc import TemporalDiscriminator
from models.unet_disc import UNetDiscriminatorSN
from models.weights import load_state


def train_loop(config: dict) -> None:
    spec = TrainSpec.model_validate(config["spec"])
    info = STAGES[spec.stage]
    val = ray.get(config["val"][0])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(spec.seed)  # identical initial weights (and spectral-norm vectors) on every rank

    # -- networks and optimisers -----------------------------------------------------------------------
    g = build_generator(spec)
    d = UNetDiscriminatorSN(in_ch=3, features=spec.d_features)
    dt = TemporalDiscriminator(frames=3, features=spec.d_features)
    start, fidelity_sd, meta = 0, None, {"history": [], "fidelity_metrics": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            state = train_checkpoint.load(Path(path))
        start, meta = state.step, state.meta
        meta["resumed_from"] = [*meta.get("resumed_from", []), start]  # after a failure or --resume
        g.load_state_dict(state.module("g"))
        d.load_state_dict(state.module("d"))
        dt.load_state_dict(state.module("dt"))
        fidelity_sd = state.module("g_fidelity")
    elif spec.init:
        init = load_state(spec.init, spec.stage, "fidelity")[0]
        if isinstance(g, RestorerNet):  # a narrower window or shallower body starts this one (restorer_net.grow)
            init = grow(init, g.in_frames, len(g.body) // 2)
        g.load_state_dict(init)
        fidelity_sd = {k: v.clone() for k, v in g.state_dict().items()} if spec.steps == 0 else None
    if start >= spec.steps and spec.gan_steps and fidelity_sd is None:
        if start > spec.steps:
            raise ValueError(f"the checkpoint at step {start} is past the fidelity phase (--steps {spec.steps}) "
                             "but holds no fidelity snapshot; resume with the --steps of the original run")
        # A fidelity-only run resumed with a GAN phase: the weights as they are now ship as fidelity.
        fidelity_sd = {k: v.clone() for k, v in g.state_dict().items()}
        meta["fidelity_metrics"] = meta["history"][-1] if meta["history"] else None
    # Networks on their device before the optimisers load state: Adam's moments follow the parameters' device
    # at load time, and prepare_model's own move would leave them behind on the CPU.
    g, d, dt = g.to(device), d.to(device), dt.to(device)
    opt_g = generator_optimizer(g, spec, gan=start >= spec.steps)
    opt_d = torch.optim.Adam([*d.parameters(), *dt.parameters()], lr=spec.d_lr, betas=(0.9, 0.99))
    if checkpoint:
        if state.meta.get("opt_g_phase") == phase_of(start, spec):  # not at the phase switch
            load_optimizer(opt_g, state.optimizer("opt_g"))
        load_optimizer(opt_d, state.optimizer("opt_d"))
        del state
    g = ray.train.torch.prepare_model(g)
    d = ray.train.torch.prepare_model(d, parallel_strategy_kwargs={"forward_sync_buffers": False})
    dt = ray.train.torch.prepare_model(dt, parallel_strategy_kwargs={"forward_sync_buffers": False})

    # -- steps -----------------------------------------------------------------------------------------
    batches = endless(ray.train.get_dataset_shard("train"), spec.batch, device)
    tell = progress_teller(config.get("progress") if rank == 0 else None)
    sums: dict[str, list[float]] = {}  # metric -> [sum, count]: warm-up steps report no generator losses
    counted, t0 = 0, time.perf_counter()
    for step in range(start, spec.total_steps):
        if spec.fail_at_step == step and start == 0 and rank == world - 1:
            # Fault drill: this worker process dies and Ray Train restarts the group from the last checkpoint.
            # The controller collects reports when it polls the workers (every 2 s, RAY_TRAIN_HEALTH_CHECK_
            # INTERVAL_S); a checkpoint reported less than a poll before a crash is lost with it, so the drill
            # waits out one poll to make the restart point deterministic.
            time.sleep(5)
            os._exit(1)
        lq, hq = next(batches)
        if step < spec.steps:
            for group in opt_g.param_groups:
                group["lr"] = spec.fidelity_lr(step)
            metrics = fidelity_step(g, opt_g, lq, hq, spec, info)
        else:
            metrics = gan_step(g, d, dt, opt_g, opt_d, lq, hq, spec, info,
                               train_g=step >= spec.steps + spec.d_warmup)
        for k, v in metrics.items():
            total = sums.setdefault(k, [0.0, 0])
            total[0], total[1] = total[0] + v, total[1] + 1
        counted += 1

        done = step + 1
        tell({"step": done, "phase": phase_of(step, spec), **metrics}, last_step=done == spec.total_steps)
        if done % spec.checkpoint_every and done not in (spec.steps, spec.total_steps):
            continue
        elapsed = time.perf_counter() - t0
        report = {"step": done, "phase": phase_of(step, spec),
                  **{k: v / n for k, (v, n) in sums.items()}, "steps_per_s": counted / elapsed}
        sums, counted = {}, 0
        if rank == 0:
            report.update(validate(unwrap(g), info, val, device))
            meta["history"].append(report)
            if done == spec.steps and spec.gan_steps:
                # The fidelity phase is over: its weights ship as the default flavour; the GAN phase
                # fine-tunes a copy of them.
                fidelity_sd = {k: v.detach().cpu().clone() for k, v in unwrap(g).state_dict().items()}
                meta["fidelity_metrics"] = report
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()),
                  flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                modules = {"g": unwrap(g), "d": unwrap(d), "dt": unwrap(dt)}
                if fidelity_sd is not None:
                    modules["g_fidelity"] = fidelity_sd
                train_checkpoint.save(Path(tmp), done, modules, {"opt_g": opt_g, "opt_d": opt_d},
                                      {**meta, "spec": spec.model_dump(), "opt_g_phase": phase_of(step, spec)})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=f"step-{done:07d}")
        if done == spec.steps:
            opt_g = generator_optimizer(unwrap(g), spec, gan=True)  # a fresh, slower optimiser for the GAN phase
        t0 = time.perf_counter()


def progress_teller(queue, every: float = 1.0):
    """What rank 0 tells the driver's progress display: the latest step's losses, at most once a second (a
    queue actor's call costs a round trip; the loop must not wait on a display)."""
    last = [0.0]

    def tell(report: dict, last_step: bool = False) -> None:
        now = time.monotonic()
        if queue is None or (now - last[0] < every and not last_step):
            return
        last[0] = now
        try:
            queue.put_nowait(report)
        except Exception:  # noqa: BLE001 - a full or lost queue costs the display an update, never the run
            pass

    return tell


# -- the two kinds of step ----------------------------------------------------------------------------------


def fidelity_step(g, opt_g, lq, hq, spec: TrainSpec, info: StageInfo) -> dict[str, float]:
    """Pixel loss only: the generator learns the restoration that minimises expected error (PSNR)."""
    out = generate(g, info, lq)
    loss = spec.loss.w_pixel * pixel_loss(spec, out, targets(info, hq))
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    return {"loss_pixel": loss.item()}


def gan_step(g, d, dt, opt_g, opt_d, lq, hq, spec: TrainSpec, info: StageInfo,
             train_g: bool = True) -> dict[str, float]:
    """One adversarial step: generator update, then discriminator update (DESIGN.md: one explicit function)."""
    w, kind = spec.loss, spec.loss.adversarial
    view = losses.detail_view if w.d_view == "detail" else (lambda x: x)
    with torch.set_grad_enabled(train_g):
        out = generate(g, info, lq)
    real = targets(info, hq)
    real_stack, fake_stack = temporal_stacks(info, lq, hq, out)
    temporal_d = w.w_temporal_adversarial > 0  # 0 turns the temporal discriminator off, its features included
    # --d-region undamaged: the per-frame discriminator is judged, and judges, only where the damage left the
    # frame alone (the same pixels of the restored and the clean frame)
    region = (losses.undamaged(targets(info, lq).flatten(0, 1), real.flatten(0, 1))
              if w.d_region == "undamaged" else None)
    metrics = {}

    # 1. generator: pixel + feature matching + adversarial (per frame and temporal) + temporal consistency
    #    (skipped while the discriminators warm up: --d-warmup)
    if train_g:
        with frozen(unwrap(d), unwrap(dt)) as (d_eval, dt_eval):
            with torch.no_grad():
                real_logits, real_feats = d_eval(view(real.flatten(0, 1)))
            fake_logits, fake_feats = d_eval(view(out.flatten(0, 1)))
            loss_feature = losses.feature_matching(real_feats, fake_feats)
            loss_adv = losses.g_loss(kind, real_logits, fake_logits, region)
            loss_tadv = out.new_zeros(())
            if temporal_d:
                with torch.no_grad():
                    real_tlogits, real_tfeats = dt_eval(view(real_stack))
                fake_tlogits, fake_tfeats = dt_eval(view(fake_stack))
                loss_feature = loss_feature + losses.feature_matching(real_tfeats, fake_tfeats)
                loss_tadv = losses.g_loss(kind, real_tlogits, fake_tlogits)
        loss_pixel = pixel_loss(spec, out, losses.unsharp(real, w.sharpen_target))
        loss_temporal = losses.temporal_consistency(fake_stack, real_stack)
        loss_g = (w.w_pixel * loss_pixel + w.w_feature * loss_feature + w.w_adversarial * loss_adv
                  + w.w_temporal_adversarial * loss_tadv + w.w_temporal * loss_temporal)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        metrics = {"loss_pixel": loss_pixel.item(), "loss_feature": loss_feature.item(),
                   "loss_adv": loss_adv.item(), "loss_temporal_adv": loss_tadv.item(),
                   "loss_temporal": loss_temporal.item()}

    # 2. discriminators: real and fake (detached) in one forward each, through DDP
    logits, _ = d(view(torch.cat((real.flatten(0, 1), out.detach().flatten(0, 1)))))
    loss_d = losses.d_loss(kind, *logits.chunk(2), weight=region)
    if temporal_d:
        tlogits, _ = dt(view(torch.cat((real_stack, fake_stack.detach()))))
        loss_d = loss_d + losses.d_loss(kind, *tlogits.chunk(2))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    return {**metrics, "loss_d": loss_d.item()}


# -- what a stage's generator does to a training clip ------------------------------------------------------


def generate(g: nn.Module, info: StageInfo, lq: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, h, w) degraded clip -> (B, T_out, 3, H, W) restored frames, the stage's frame semantics:
    interpolation makes the middle of frames 0 and 2; a windowed stage restores each frame that has its full
    window; the others restore every frame on its own."""
    b, t, c, h, w = lq.shape
    if info.is_interp:
        return g(lq[:, 0], lq[:, 2]).unsqueeze(1)
    r = info.radius
    if r:
        windows = torch.stack([lq[:, i:i + 2 * r + 1] for i in range(t - 2 * r)], dim=1)
        out = g(windows.flatten(0, 1))
    elif isinstance(unwrap(g), RestorerNet):
        out = g(lq.reshape(b * t, 1, c, h, w))
    else:
        out = g(lq.reshape(b * t, c, h, w))
    return out.reshape(b, -1, *out.shape[1:])


def targets(info: StageInfo, hq: torch.Tensor) -> torch.Tensor:
    if info.is_interp:
        return hq[:, 1:2]
    r = info.radius
    return hq[:, r:hq.shape[1] - r] if r else hq


def temporal_stacks(info: StageInfo, lq, hq, out) -> tuple[torch.Tensor, torch.Tensor]:
    """Three-frame stacks for the temporal discriminator and loss: (real, fake).

    For interpolation both stacks keep the frames it was made from as they are (as the restored video does), so
    the only difference the discriminator can see is the made frame."""
    if info.is_interp:
        ends = lq[:, :1], lq[:, 2:]
        return torch.cat((ends[0], hq[:, 1:2], ends[1]), dim=1), torch.cat((ends[0], out, ends[1]), dim=1)
    return targets(info, hq), out


def baseline(info: StageInfo, lq: torch.Tensor) -> torch.Tensor:
    """What a user gets without the model: the degraded frames, bicubic upscaling, or the frame average."""
    if info.is_interp:
        return ((lq[:, 0] + lq[:, 2]) / 2).unsqueeze(1)
    frames = targets(info, lq)
    if info.scale == 1:
        return frames
    b, t = frames.shape[:2]
    up = F.interpolate(frames.flatten(0, 1), scale_factor=info.scale, mode="bicubic", align_corners=False)
    return up.reshape(b, t, *up.shape[1:])


@torch.no_grad()
def validate(g: nn.Module, info: StageInfo, val: dict[str, np.ndarray], device: torch.device) -> dict[str, float]:
    """PSNR (RGB, 8-bit) of the generator and of the baseline on the held-out pairs."""
    g.eval()
    mse, mse_base = [], []
    for i in range(0, len(val["lq"]), 8):
        lq, hq = (to_tensor(torch.from_numpy(val[k][i:i + 8]), device) for k in ("lq", "hq"))
        real = quantize(targets(info, hq))
        mse.append(((quantize(generate(g, info, lq)) - real) ** 2).flatten(1).mean(1))
        mse_base.append(((quantize(baseline(info, lq)) - real) ** 2).flatten(1).mean(1))
    g.train()

    def psnr(m: list[torch.Tensor]) -> float:
        return float((10 * torch.log10(1.0 / torch.cat(m).clamp_min(1e-10))).mean())

    return {"val_psnr": psnr(mse), "val_psnr_baseline": psnr(mse_base)}


# -- plumbing -------------------------------------------------------------------------------------------------


def phase_of(step: int, spec: TrainSpec) -> str:
    """The phase a (0-based) step belongs to."""
    return "fidelity" if step < spec.steps else "gan"


def build_generator(spec: TrainSpec) -> nn.Module:
    return STAGES[spec.stage].archs[spec.arch_name](**spec.generator_args)


def generator_optimizer(g: nn.Module, spec: TrainSpec, gan: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(g.parameters(), lr=spec.gan_lr if gan else spec.lr, betas=(0.9, 0.99))


def load_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Restore moments and step counts, but keep this run's learning rates: a resumed run may set new ones."""
    lrs = [group["lr"] for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr


def pixel_loss(spec: TrainSpec, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return {"charbonnier": losses.charbonnier, "l1": losses.l1, "l2": losses.l2}[spec.loss.pixel](out, target)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def frozen(*nets: nn.Module):
    """Discriminators as a fixed loss function: eval mode, no parameter gradients; restored afterwards."""
    for net in nets:
        net.eval().requires_grad_(False)
    try:
        yield nets
    finally:
        for net in nets:
            net.train().requires_grad_(True)


def to_tensor(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, T, 3, H, W) in [0, 1] on `device`."""
    return x.to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255.0)


def quantize(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round() / 255


def endless(shard, batch: int, device: torch.device):
    """Batches of (lq, hq) from the dataset shard. The stream holds exactly the samples the remaining steps
    need, split equally between ranks; a worker group restarted from a checkpoint mid-run starts the stream
    again from the top, so it sees more than the remaining steps need and the loop simply stops early."""
    while True:
        got = False
        for b in shard.iter_torch_batches(batch_size=batch, drop_last=True):
            got = True
            yield to_tensor(b["lq"], device), to_tensor(b["hq"], device)
        if not got:
            raise RuntimeError("the training data stream is empty")

