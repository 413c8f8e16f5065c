"""The chain: weights loading (safetensors only), and frame semantics of each stage kind, without Ray."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from conftest import write_tiny_weights

from models.chain import check_weights, load_chain
from models.weights import WeightsError


def frames(n=6, h=12, w=16, seed=0, dtype=np.uint8):
    top = 255 if dtype == np.uint8 else 65535
    return np.random.default_rng(seed).integers(0, top + 1, (n, h, w, 3), dtype=dtype)


def test_identity_is_exact_for_8_and_16_bit():
    chain = load_chain("identity")
    for dtype in (np.uint8, np.uint16):
        x = frames(dtype=dtype)
        assert np.array_equal(chain.run(x), x)


def test_spatial_stages_keep_count_and_scale_size(tmp_path):
    write_tiny_weights(tmp_path, "denoise", perturb=0.05)
    write_tiny_weights(tmp_path, "sr4x", perturb=0.05)
    chain = load_chain("denoise,sr4x", str(tmp_path), batch_frames=4)
    out = chain.run(frames(n=5, h=9, w=13))  # odd sizes, a partial last batch
    assert out.shape == (5, 36, 52, 3) and out.dtype == np.uint8


def test_interp_frame_semantics(tmp_path):
    write_tiny_weights(tmp_path, "interp2x", perturb=0.05)
    x = frames(n=5)
    out = load_chain("interp2x", str(tmp_path), batch_frames=2).run(x)
    assert out.shape == (10, 12, 16, 3)
    assert np.array_equal(out[0::2], x)  # frame 2k is source frame k
    assert np.array_equal(out[-1], x[-1])  # the last is a copy


def test_window_stage_reads_neighbours(tmp_path):
    write_tiny_weights(tmp_path, "descratch", perturb=0.1)
    chain = load_chain("descratch", str(tmp_path))
    x = frames(n=5)
    y = x.copy()
    y[3] = 255 - y[3]  # change one frame: its neighbours' outputs change, a frame two away does not
    a, b = chain.run(x), chain.run(y)
    assert not np.array_equal(a[2], b[2]) and not np.array_equal(a[4], b[4])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_missing_weights_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(WeightsError, match="reelmend train sr2x"):
        check_weights("identity,sr2x:gan", str(tmp_path))
    check_weights("identity")  # no model, nothing to load


def test_exported_weights_replace_the_pair_whole(tmp_path):
    """Written under temporary names and moved into place (tensors first, card last): nothing else is left
    behind, and a second export replaces the pair, which loads (its card vouches for its tensors)."""
    write_tiny_weights(tmp_path, "denoise")
    write_tiny_weights(tmp_path, "denoise", perturb=0.1, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["denoise.json", "denoise.safetensors"]
    load_chain("denoise", str(tmp_path))


def test_pickled_or_mismatched_checkpoints_are_refused(tmp_path):
    write_tiny_weights(tmp_path, "denoise")
    # Replace the tensors by a pickle (what torch.save writes): loading must refuse it, never unpickle.
    payload = pickle.dumps({"weight": torch.zeros(3)})
    (tmp_path / "denoise.safetensors").write_bytes(payload)
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        load_chain("denoise", str(tmp_path))
    write_tiny_weights(tmp_path, "sr2x")
    (tmp_path / "sr4x.safetensors").write_bytes((tmp_path / "sr2x.safetensors").read_bytes())
    (tmp_path / "sr4x.json").write_text((tmp_path / "sr2x.json").read_text().replace('"scale": 2', '"scale": 4'))
    with pytest.raises(WeightsError, match="do not match"):
        load_chain("sr4x", str(tmp_path))


def test_weights_for_another_window_are_refused(tmp_path):
    """Weights of a net for another window (a single-frame one is what shipped before denoise and deblock read
    windows) cannot run in the stage: refused with what to do, not a shape error mid-job."""
    write_tiny_weights(tmp_path, "deblock", args={"in_frames": 1})  # a single-frame RestorerNet
    for ext in ("safetensors", "json"):
        (tmp_path / f"denoise.{ext}").write_bytes((tmp_path / f"deblock.{ext}").read_bytes())
    with pytest.raises(WeightsError, match="read 1 frame.*window of 9.*reelmend train denoise"):
        load_chain("denoise", str(tmp_path))
    with pytest.raises(WeightsError, match="read 1 frame.*window of 5.*reelmend train deblock"):
        load_chain("deblock", str(tmp_path))
    # the driver's check before any work starts builds every step as the actors will: it refuses them too
    with pytest.raises(WeightsError, match="read 1 frame"):
        check_weights("deblock", str(tmp_path))


def test_weights_of_another_scale_are_refused_before_work_starts(tmp_path):
    """sr2x's files renamed sr4x load into a 2x network: without a check every chunk would fail mid-job."""
    write_tiny_weights(tmp_path, "sr2x")
    for ext in ("safetensors", "json"):
        (tmp_path / f"sr4x.{ext}").write_bytes((tmp_path / f"sr2x.{ext}").read_bytes())
    with pytest.raises(WeightsError, match="upscale 2x, but the stage sr4x is 4x"):
        check_weights("sr4x", str(tmp_path))


class _Trap:
    """Unpickling this runs code (creates a file): the test proves loading never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    write_tiny_weights(tmp_path, "sr2x")
    marker = tmp_path / "pwned"
    (tmp_path / "sr2x.safetensors").write_bytes(pickle.dumps({"conv.weight": _Trap(marker)}))
    with pytest.raises(WeightsError, match="refuses pickled"):
        load_chain("sr2x", str(tmp_path))
    assert not marker.exists()


def test_a_tampered_or_unvouched_checkpoint_is_refused(tmp_path):
    write_tiny_weights(tmp_path, "sr2x", perturb=0.05)
    good = (tmp_path / "sr2x.safetensors").read_bytes()
    # still a well-formed safetensors file, one weight changed: only the card's sha256 can tell
    tampered = bytearray(good)
    tampered[-4:] = bytes(4)
    (tmp_path / "sr2x.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(WeightsError, match="does not match the sha256"):
        load_chain("sr2x", str(tmp_path))
    (tmp_path / "sr2x.safetensors").write_bytes(good)
    load_chain("sr2x", str(tmp_path))
    card = json.loads((tmp_path / "sr2x.json").read_text())
    del card["sha256"]
    (tmp_path / "sr2x.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="no sha256"):
        load_chain("sr2x", str(tmp_path))


def _real_frame(clips, n=2):
    from conftest import decode

    return np.ascontiguousarray(decode(clips / "bikes.mp4")[40:40 + n, :200, 100:420])  # 320x200, real detail


@pytest.mark.parametrize("stage", ["denoise", "sr2x", "interp2x"])
def test_tiled_inference_matches_whole_frame(tmp_path, clips, stage):
    from conftest import psnr

    # denoise's nine-frame head sums more perturbed taps: at 0.05 the tiny net drives a third of its pixels to 0
    # and magnifies the least difference in its input (39.2 dB here); at 0.03 it is a sane function (44.7 dB)
    write_tiny_weights(tmp_path, stage, perturb=0.03 if stage == "denoise" else 0.05)
    x = _real_frame(clips)
    whole = load_chain(stage, str(tmp_path)).run(x)
    # interp2x's block matching looks 16 pixels and an 11-pixel block around each pixel at quarter size: its
    # tiles need that context (at 64 pixels the tiled output agrees to 39 dB, at 128 to 50).
    tiled_chain = load_chain(stage, str(tmp_path), tile=128 if stage == "interp2x" else 64)
    tiled = tiled_chain.run(x)
    assert tiled.shape == whole.shape
    assert psnr(tiled, whole) > 40.0  # blended seams: far below what an eye sees
    # a hard-seamed tiling (no overlap) is measurably worse: the blend is doing the work
    tiled_chain.tile_overlap = 0
    if stage != "interp2x":
        assert psnr(tiled_chain.run(x), whole) < psnr(tiled, whole)


def test_tiling_kicks_in_only_when_a_frame_exceeds_the_budget(tmp_path):
    write_tiny_weights(tmp_path, "sr4x", perturb=0.05)
    chain = load_chain("sr4x", str(tmp_path))  # CPU: ~2 MP of output per forward
    assert chain._tile_for(200, 300, 4) is None  # 0.96 MP out: whole frames
    tile = chain._tile_for(360, 640, 4)  # 3.7 MP out: tiles whose output fits the budget
    assert tile is not None and (tile * 4) ** 2 <= 2e6
    chain = load_chain("sr4x", str(tmp_path), tile=64)  # an explicit tile (smaller tiles after an OOM)
    assert chain._tile_for(100, 100, 4) == 64 and chain._tile_for(50, 50, 4) is None


def test_a_stage_loads_its_alternative_architecture_and_refuses_others(tmp_path):
    from models.restorer_net import RestorerNet
    from models.rrdb_sr import RRDBNet
    from models.weights import save_weights

    args = {"scale": 2, "features": 8, "blocks": 1, "growth": 4}
    save_weights(RRDBNet(**args), str(tmp_path), "sr2x", "fidelity", args)  # the larger SR option for GPUs
    out = load_chain("sr2x", str(tmp_path)).run(frames(n=2, h=9, w=13))
    assert out.shape == (2, 18, 26, 3)
    save_weights(RestorerNet(features=8, blocks=1), str(tmp_path), "sr4x", "fidelity", {"features": 8, "blocks": 1})
    with pytest.raises(WeightsError, match="takes one of: CompactSR, RRDBNet"):
        load_chain("sr4x", str(tmp_path))
