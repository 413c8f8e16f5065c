"""`reelmend bench quality`: the shipped stages against FFmpeg's classical filters, on clean footage.

For every task below the clean clips are degraded the way the task names (Gaussian noise, x264 CRF 37, a
bicubic downscale, dropped frames, film damage), written losslessly, restored by a real `reelmend restore
--lossless` job (a child process, exactly what a user runs) with the fidelity and the GAN flavour, and
compared with the clean frames. The same degraded frames go through FFmpeg's filters for that damage at
every setting of a small grid; a stage's margin is over the best of them, chosen on the same clips (an
upper bound for the filters: a user cannot tune per clip).

Metrics, averaged over frames:
* PSNR over RGB; Y-PSNR (BT.601 luma, `scale` pixels shaved at the borders) for super-resolution, as the SR
  literature reports it; interp2x compares only the frames it made (the odd ones).
* Sharpness: gradient energy (mean squared luma difference to the right and below neighbours) of the output
  over that of the clean frames. 1.0 is the clean footage's; blurry restorations fall below it. The GAN
  flavour exists to raise it while staying within 1.5 dB of the fidelity flavour's PSNR. Where the damage is
  local (film damage), only pixels the damage left untouched (and 2 pixels clear of it) count: a scratch left
  behind adds gradient energy, so over all pixels the measure would favour the restoration that removes less.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from models import degrade
from models.weights import SHIPPED, read_card, stem
from pipeline import ffmpeg, storage
from pipeline.probe import probe

SEED = 2026


@dataclass(frozen=True)
class Task:
    """One line of the table: a damage, the stage that repairs it, the filters a user would reach for."""

    name: str
    stage: str
    damage: Callable[[np.ndarray, np.random.Generator], np.ndarray]  # clean (T,H,W,3) uint8 -> input
    baselines: dict[str, str]  # label -> FFmpeg filter graph over the input ("" = the input untouched)
    bar: float  # dB over the best baseline the fidelity flavour must reach (0: strictly above)
    scale: int = 1
    interp: bool = False
    sharpness_off_damage: bool = False  # local damage: sharpness over the pixels the damage did not touch
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def y_psnr(self) -> bool:
        return self.scale > 1


def _noise(sigma: float):
    return lambda clip, rng: degrade.gaussian_noise(clip, sigma, False, rng)


def _film_damage(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    clip = degrade.scratches(clip, 3, rng)
    clip = degrade.dust(clip, 12, rng)
    return degrade.blotches(clip, 2, rng)


def _lanczos(scale: int) -> dict[str, str]:
    # The range is stated on both sides: a scale filter left to its defaults converts the full-range frames
    # filter_frames hands it to limited range, a contrast error that cost lanczos ~5 dB (found by the tests).
    return {f"lanczos a={a}": f"scale=iw*{scale}:ih*{scale}:flags=lanczos:param0={a}:in_range=full:out_range=full"
            for a in (3, 4)}


def _denoisers(hqdn3d: tuple[int, ...], nlmeans: tuple[int, ...]) -> dict[str, str]:
    # Grids that bracket each filter's best strength for the noise level (the best must not sit on an edge).
    return {**{f"hqdn3d {v}": f"hqdn3d={v}" for v in hqdn3d}, **{f"nlmeans s={v}": f"nlmeans=s={v}" for v in nlmeans}}


TASKS: tuple[Task, ...] = (
    Task("denoise σ=15", "denoise", _noise(15), _denoisers((16, 32, 48), (7, 9, 12)), bar=1.0),
    Task("denoise σ=25", "denoise", _noise(25), _denoisers((32, 48, 64), (9, 12, 15)), bar=1.0),
    Task("deblock x264 CRF 37", "deblock", lambda clip, rng: ffmpeg.codec_roundtrip(clip, "h264", 37),
         {"input": "", "deblock weak": "deblock=filter=weak:block=8", "deblock strong": "deblock=filter=strong:block=8",
          **_denoisers((2, 4, 8), (2, 3, 5, 7))}, bar=0.5),
    Task("descratch film damage", "descratch", _film_damage,
         {"input": "", "tmedian r=1": "tmedian=radius=1", "tmedian r=2": "tmedian=radius=2"}, bar=0.0,
         sharpness_off_damage=True),
    Task("sr2x bicubic ÷2", "sr2x", lambda clip, rng: degrade.bicubic_downscale(clip, 2), _lanczos(2), bar=1.0,
         scale=2),
    Task("sr4x bicubic ÷4", "sr4x", lambda clip, rng: degrade.bicubic_downscale(clip, 4), _lanczos(4), bar=0.7,
         scale=4),
    Task("interp2x every other frame dropped", "interp2x", lambda clip, rng: clip[0::2].copy(),
         {"minterpolate mci obmc": "minterpolate=fps={fps}:mi_mode=mci",
          "minterpolate mci aobmc vsbmc": "minterpolate=fps={fps}:mi_mode=mci:mc_mode=aobmc:vsbmc=1",
          "minterpolate blend": "minterpolate=fps={fps}:mi_mode=blend"}, bar=0.0, interp=True),
)


def padded_for(graph: str, clip: np.ndarray) -> np.ndarray:
    """The clip as a temporal filter must be fed for output frame k to be its estimate of frame k: tmedian's
    first output is the median of frames 0..2r (so r copies of the first frame go before), and temporal
    filters hold back their last frames at the end of the stream (copies of the last frame go after)."""
    lead = int(graph.split("tmedian=radius=")[1].split(":")[0]) if "tmedian=radius=" in graph else 0
    return np.concatenate([*[clip[:1]] * lead, clip, *[clip[-1:]] * 4])


# -- metrics ------------------------------------------------------------------------------------------------

def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma on the 16..235 scale, as the SR literature's Y-PSNR (MATLAB rgb2ycbcr)."""
    x = frames.astype(np.float64) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def psnr_per_frame(out: np.ndarray, ref: np.ndarray, y_only: bool, shave: int) -> np.ndarray:
    if y_only:
        a, b = luma(out), luma(ref)
    else:
        a, b = out.astype(np.float64), ref.astype(np.float64)
    if shave:
        a, b = a[:, shave:-shave, shave:-shave], b[:, shave:-shave, shave:-shave]
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return np.minimum(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10)), 100.0)  # identical frames: 100 dB


def gradient_energy(frames: np.ndarray, keep: np.ndarray | None = None) -> float:
    """Mean squared luma step to the right and below neighbours; with `keep` (T, H, W bool), over the pairs
    of pixels both kept."""
    y = luma(frames)
    dx, dy = (y[:, :, 1:] - y[:, :, :-1]) ** 2, (y[:, 1:] - y[:, :-1]) ** 2
    if keep is None:
        return float(dx.mean() + dy.mean())
    return float(dx[keep[:, :, 1:] & keep[:, :, :-1]].mean() + dy[keep[:, 1:] & keep[:, :-1]].mean())


def undamaged(damaged: np.ndarray, clean: np.ndarray, margin: int = 2) -> np.ndarray:
    """(T, H, W) bool: pixels where `damaged` equals `clean` and no changed pixel lies within `margin` (a
    square neighbourhood), so the soft edges of the damage and of its repair are left out."""
    hit = np.any(damaged != clean, axis=-1)
    padded = np.pad(hit, ((0, 0), (margin, margin), (margin, margin)))
    near = np.zeros_like(hit)
    h, w = hit.shape[1:]
    for dy in range(2 * margin + 1):
        for dx in range(2 * margin + 1):
            near |= padded[:, dy:dy + h, dx:dx + w]
    return ~near


# -- clean footage ------------------------------------------------------------------------------------------

def load_clean(uri: str, frames: int, clean_scale: float, max_clips: int) -> list[tuple[str, np.ndarray, Fraction]]:
    """`frames` frames from the middle of each video under `uri` (openings are often fades or titles),
    area-downscaled by `clean_scale` (archive H.264
    sources carry their own blocking; averaging pixels removes most of it, so the reference is clean), cropped
    to a multiple of 8."""
    clips = []
    for full, rel, _ in storage.list_files(uri)[:max_clips]:
        with storage.ffmpeg_input(full) as src:
            info = probe(src)
            n = min(frames, info.n_frames)
            seek = (info.n_frames - n) // 2 * info.fps_den / info.fps_num
            raw = ffmpeg.decode_frames(src, stream_index=info.stream_index, seek=seek, n_frames=n,
                                       width=info.width, height=info.height, high_depth=False, matrix="bt709",
                                       full_range=None)
        h, w = round(info.height * clean_scale), round(info.width * clean_scale)
        clip = raw if (h, w) == raw.shape[1:3] else degrade.resize(raw, h, w, "area")
        clips.append((Path(rel).stem, degrade.crop_to_multiple(clip, 8), Fraction(info.fps_num, info.fps_den)))
    if not clips:
        raise ValueError(f"no videos under {uri}")
    return clips


# -- the real restore ---------------------------------------------------------------------------------------

def write_lossless(frames: np.ndarray, path: Path, fps: Fraction) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = ffmpeg.encode_args(codec="h264", crf=0, preset="medium", lossless=True, depth=8, chroma="444",
                               odd_size=False)
    ffmpeg.encode_segment(frames, str(path), fps=fps, codec_args=codec, matrix="bt709", full_range=None,
                          colour_tags={})


def restore(src: Path, dest: Path, chain: str, models: str | None, address: str | None,
            log: Callable[[str], None]) -> float:
    """`reelmend restore SRC DEST --chain CHAIN --lossless` in a child process; returns its wall seconds."""
    args = [str(Path(sys.executable).with_name("reelmend")), "restore", str(src), str(dest), "--chain", chain,
            "--lossless"]
    if models:
        args += ["--models", models]
    if address:
        args += ["--address", address]
    log(f"  {' '.join(args[1:])}")
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"restore --chain {chain} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    return time.monotonic() - started


def read_output(path: Path, n: int, h: int, w: int) -> np.ndarray:
    return ffmpeg.decode_frames(str(path), stream_index=0, seek=None, n_frames=n, width=w, height=h,
                                high_depth=False, matrix="bt709", full_range=None)


# -- one task -----------------------------------------------------------------------------------------------

def run_task(task: Task, clips: list, work: Path, models: str | None, address: str | None,
             log: Callable[[str], None]) -> dict:
    """Degrade, run the filters' grid and both flavours of the stage (in `work`, a folder of this task's own)."""
    rng = np.random.default_rng(SEED)
    inputs, refs, keep = {}, {}, {}
    for name, clean, fps in clips:
        if task.interp and len(clean) % 2 == 0:
            clean = clean[:-1]  # odd length: every dropped frame lies between two kept ones
        inputs[name] = (task.damage(clean, rng), fps / 2 if task.interp else fps)
        refs[name] = clean
        keep[name] = undamaged(inputs[name][0], clean) if task.sharpness_off_damage else None
        write_lossless(inputs[name][0], work / "in" / f"{name}.mkv", inputs[name][1])

    def compare(outputs: dict[str, np.ndarray]) -> dict:
        scores, energy, clean_energy = [], [], []
        for name, out in outputs.items():
            ref, mask = refs[name], keep[name]
            if task.interp:  # only the frames it made: 2k+1 between kept frames k and k+1
                out, ref = out[1:len(ref) - 1:2], ref[1:len(ref) - 1:2]
            scores.append(psnr_per_frame(out, ref, task.y_psnr, task.scale if task.y_psnr else 0))
            energy.append(gradient_energy(out, mask))
            clean_energy.append(gradient_energy(ref, mask))
        return {"psnr": round(float(np.concatenate(scores).mean()), 3),
                "sharpness": round(float(np.mean(energy) / np.mean(clean_energy)), 4)}

    result = {"task": task.name, "stage": task.stage, "metric": "Y-PSNR" if task.y_psnr else "PSNR",
              "bar_db": task.bar, "baselines": {}, "seconds": {}}
    for label, graph in task.baselines.items():
        outputs = {}
        for name, (lq, fps) in inputs.items():
            ref = refs[name]
            if not graph:
                outputs[name] = lq  # the input as it is: what doing nothing scores
                continue
            g = graph.format(fps=f"{fps.numerator * 2}/{fps.denominator}")
            feed = padded_for(g, lq)
            outputs[name] = ffmpeg.filter_frames(feed, g, fps=fps, out_frames=len(ref), out_width=ref.shape[2],
                                                 out_height=ref.shape[1])
        result["baselines"][label] = compare(outputs)
    for flavour in ("fidelity", "gan"):
        chain = task.stage if flavour == "fidelity" else f"{task.stage}:gan"
        dest = work / flavour
        result["seconds"][flavour] = round(restore(work / "in", dest, chain, models, address, log), 1)
        outputs = {}
        for name, (lq, _) in inputs.items():
            ref = refs[name]
            n = len(lq) * 2 if task.interp else len(ref)
            outputs[name] = read_output(dest / f"{name}.mkv", n, ref.shape[1], ref.shape[2])
        result[flavour] = compare(outputs)
    best_label = max(result["baselines"], key=lambda k: result["baselines"][k]["psnr"])
    best = result["baselines"][best_label]["psnr"]
    result["best_baseline"] = {"name": best_label, **result["baselines"][best_label]}
    result["margin_db"] = round(result["fidelity"]["psnr"] - best, 3)
    result["meets_bar"] = result["margin_db"] >= task.bar if task.bar > 0 else result["margin_db"] > 0
    result["gan_minus_fidelity_db"] = round(result["gan"]["psnr"] - result["fidelity"]["psnr"], 3)
    result["gan_sharper"] = result["gan"]["sharpness"] > result["fidelity"]["sharpness"]
    result["gan_ok"] = result["gan_sharper"] and result["gan_minus_fidelity_db"] >= -1.5
    return result


def bench_quality(clean: str, json_out: str | None, *, models: str | None = None, frames: int = 25,
                  clean_scale: float = 0.5, max_clips: int = 8, stages: list[str] | None = None,
                  update_cards: bool = False, address: str | None = None, log: Callable[[str], None] = print) -> dict:
    folder = models or str(SHIPPED)
    tasks = [t for t in TASKS if stages is None or t.stage in stages]
    missing = sorted({f"{t.stage} ({flavour})" for t in tasks for flavour in ("fidelity", "gan")
                      if read_card(folder, t.stage, flavour) is None})
    if missing:
        raise ValueError(f"no weights in {folder} for {', '.join(missing)}: train them (reelmend train) or "
                         "pass --models DIR")
    started = time.monotonic()
    clips = load_clean(clean, frames, clean_scale, max_clips)
    log(f"{len(clips)} clean clip(s): " + ", ".join(f"{n} {c.shape[2]}x{c.shape[1]}x{len(c)}" for n, c, _ in clips))
    results = []
    with tempfile.TemporaryDirectory(prefix="reelmend-quality-") as tmp:
        for i, task in enumerate(tasks):
            log(f"{task.name}:")
            results.append(run_task(task, clips, Path(tmp) / f"task-{i}", models, address, log))
            r = results[-1]
            log(f"  fidelity {r['fidelity']['psnr']:.2f} dB, gan {r['gan']['psnr']:.2f} dB, best filter "
                f"{r['best_baseline']['name']} {r['best_baseline']['psnr']:.2f} dB: margin {r['margin_db']:+.2f} dB")
    report = {"clean": clean, "clips": [{"name": n, "width": int(c.shape[2]), "height": int(c.shape[1]),
                                         "frames": len(c)} for n, c, _ in clips],
              "clean_scale": clean_scale, "models": folder, "seed": SEED, "tasks": results,
              "all_bars_met": all(r["meets_bar"] for r in results),
              "all_gan_ok": all(r["gan_ok"] for r in results),
              "seconds": round(time.monotonic() - started, 1)}
    if update_cards:
        write_to_cards(folder, results, report)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def markdown_table(report: dict) -> str:
    """The report as the README shows it: one row per task, the margin over the best filter against the bar."""
    rows = ["| task | metric | best FFmpeg filter (its best setting) | fidelity | margin (bar) | `:gan` "
            "| sharpness fidelity / `:gan` (clean = 1) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["tasks"]:
        bar = f"≥ {r['bar_db']:+.1f}" if r["bar_db"] else "> 0"
        verdict = "met" if r["meets_bar"] else "**not met**"
        gan = f"{r['gan']['psnr']:.2f} dB ({r['gan_minus_fidelity_db']:+.2f})"
        rows.append(f"| {r['task']} | {r['metric']} | {r['best_baseline']['name']}: {r['best_baseline']['psnr']:.2f} dB "
                    f"| {r['fidelity']['psnr']:.2f} dB | {r['margin_db']:+.2f} dB ({bar}: {verdict}) | {gan} "
                    f"| {r['fidelity']['sharpness']:.3f} / {r['gan']['sharpness']:.3f} |")
    return "\n".join(rows)


def write_to_cards(folder: str, results: list[dict], report: dict) -> None:
    """Record each task's figures in the cards of the weights it measured (local weights folders only)."""
    for flavour in ("fidelity", "gan"):
        for stage in {r["stage"] for r in results}:
            path = Path(folder) / f"{stem(stage, flavour)}.json"
            card = json.loads(path.read_text())
            card["bench_quality"] = {
                "command": "reelmend bench quality --clean CLEAN --json OUT",
                "clean_clips": [c["name"] for c in report["clips"]], "clean_scale": report["clean_scale"],
                "tasks": [{"task": r["task"], "metric": r["metric"], "psnr": r[flavour]["psnr"],
                           "sharpness": r[flavour]["sharpness"], "best_filter": r["best_baseline"],
                           "margin_db": round(r[flavour]["psnr"] - r["best_baseline"]["psnr"], 3)}
                          for r in results if r["stage"] == stage]}
            path.write_text(json.dumps(card, indent=2, sort_keys=True))
