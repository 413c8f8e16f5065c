"""Weights I/O: safetensors tensors plus a JSON model card, never a pickle.

A weights folder (the shipped `models/weights/`, or one `reelmend train --out` wrote) holds, per stage and
flavour, `<stage>.safetensors` + `<stage>.json` (fidelity) and `<stage>-gan.safetensors` + `<stage>-gan.json`.
The card names the architecture class and its constructor arguments, so a tiny test config and the shipped
default load through the same path.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

SHIPPED = Path(__file__).parent / "weights"


class WeightsError(RuntimeError):
    """A weights file is missing, not safetensors, or does not match its card."""


def stem(stage: str, flavour: str) -> str:
    return stage if flavour == "fidelity" else f"{stage}-{flavour}"


def save_weights(net: torch.nn.Module, folder: str, stage: str, flavour: str, args: dict[str, Any],
                 card: dict[str, Any] | None = None) -> str:
    """Write `net`'s state dict and its card to `folder` (any fsspec URI). Returns the weights URI."""
    name = stem(stage, flavour)
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    full_card = {
        "stage": stage,
        "flavour": flavour,
        "arch": type(net).__name__,
        "args": args,
        "parameters": sum(p.numel() for p in net.parameters()),
        **(card or {}),
    }
    blob = save_safetensors_bytes(tensors, metadata={"arch": full_card["arch"]})
    full_card["sha256"] = hashlib.sha256(blob).hexdigest()  # checked on load: a modified file is refused
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    # Both files are written under temporary names, then moved into place back to back (tensors, then card): a
    # failed write leaves the previous pair as it was, and a reader never sees half a file. (A reader between
    # the two moves sees new tensors with the old card: refused by the sha256 check, never loaded wrong.)
    card_text = json.dumps(full_card, indent=2, sort_keys=True).encode()
    moves = [(f"{root}/.{name}.{uuid.uuid4().hex[:8]}.tmp", final, data)
             for final, data in ((f"{root}/{name}.safetensors", blob), (f"{root}/{name}.json", card_text))]
    try:
        for tmp, _, data in moves:
            fs.pipe_file(tmp, data)
        for tmp, final, _ in moves:
            fs.mv(tmp, final)
    finally:
        for tmp, _, _ in moves:
            if fs.exists(tmp):
                fs.rm(tmp)
    return f"{folder.rstrip('/')}/{name}.safetensors"


def read_card(folder: str, stage: str, flavour: str) -> dict[str, Any] | None:
    fs, root = fsspec.core.url_to_fs(folder)
    path = f"{root}/{stem(stage, flavour)}.json"
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def load_state(folder: str, stage: str, flavour: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a stage's tensors and card. Raises WeightsError with what to do when either is missing or bad."""
    name = stem(stage, flavour)
    card = read_card(folder, stage, flavour)
    fs, root = fsspec.core.url_to_fs(folder)
    path = f"{root}/{name}.safetensors"
    if card is None or not fs.exists(path):
        spec = stage if flavour == "fidelity" else f"{stage}:{flavour}"
        raise WeightsError(
            f"no weights for stage '{spec}' in {folder} (expected {name}.safetensors and {name}.json); "
            f"train them with `reelmend train {stage} --out DIR` and pass that DIR (`--models DIR` to restore, "
            f"`--init DIR` to train from), or use a stage that has weights (`reelmend models`)")
    with fs.open(path, "rb") as f:
        blob = f.read()
    try:
        # safetensors parses a JSON header and raw tensor bytes only: a pickle cannot execute here.
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{folder}/{name}.safetensors is not a valid safetensors file ({err}); "
                           "reelmend refuses pickled or damaged checkpoints") from err
    if "sha256" not in card:
        raise WeightsError(f"{folder}/{name}.json has no sha256 of its weights; reelmend loads only weights "
                           "whose card vouches for them (retrain with `reelmend train`)")
    if hashlib.sha256(blob).hexdigest() != card["sha256"]:
        raise WeightsError(f"{folder}/{name}.safetensors does not match the sha256 in its card: the file was "
                           "modified or damaged after it was written; restore it or retrain")
    return tensors, card
