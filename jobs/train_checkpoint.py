"""Training state <-> a checkpoint directory, without pickle.

Tensors (networks, optimiser moments, the frozen fidelity generator) go into one safetensors file; everything
else (step, optimiser hyper-parameters, metrics, the spec) into JSON. Loading parses a JSON header and raw
bytes only, so a tampered checkpoint cannot run code. Ray Train moves the directory to storage
(`ray.train.report`); this module only reads and writes local directories.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

TENSORS, META = "state.safetensors", "state.json"


class CheckpointError(ValueError):
    """A checkpoint that is not one reelmend wrote, or was changed since: refused, never half-loaded."""


@dataclass
class TrainState:
    step: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def module(self, name: str) -> dict[str, torch.Tensor] | None:
        """The state dict saved for module `name`, or None when the checkpoint has none."""
        prefix = f"{name}."
        sd = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return sd or None

    def optimizer(self, name: str) -> dict[str, Any] | None:
        """The optimiser state dict saved as `name`, rebuilt from its tensors and JSON, or None."""
        groups = self.meta.get("optimizers", {}).get(name)
        if groups is None:
            return None
        prefix = f"{name}/"
        state: dict[int, dict[str, Any]] = {}
        for key, value in self.tensors.items():
            if key.startswith(prefix):
                index, item = key[len(prefix):].split("/", 1)
                state.setdefault(int(index), {})[item] = value
        for index, scalars in self.meta.get("optimizer_scalars", {}).get(name, {}).items():
            state.setdefault(int(index), {}).update(scalars)
        return {"state": state, "param_groups": groups}


def save(directory: Path, step: int, modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
         optimizers: dict[str, torch.optim.Optimizer], meta: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        sd = module if isinstance(module, dict) else module.state_dict()
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
    groups, scalars = {}, {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        groups[name] = sd["param_groups"]
        for index, state in sd["state"].items():
            for item, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{name}/{index}/{item}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(name, {}).setdefault(str(index), {})[item] = value
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / TENSORS))
    digest = hashlib.sha256((directory / TENSORS).read_bytes()).hexdigest()  # checked on load
    full = {**meta, "step": step, "optimizers": groups, "optimizer_scalars": scalars, "sha256": digest}
    (directory / META).write_text(json.dumps(full, indent=1, sort_keys=True, default=str))


def load(directory: Path) -> TrainState:
    try:
        meta = json.loads((directory / META).read_text())
        blob = (directory / TENSORS).read_bytes()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {directory} is incomplete or unreadable ({err}); "
                              "train into a new --out, with --init from exported weights") from err
    if "sha256" in meta and hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint {directory}: {TENSORS} does not match the sha256 in {META} (modified "
                              "or damaged after it was written); train into a new --out, with --init from exported weights")
    try:
        # safetensors parses a JSON header and raw tensor bytes only: a pickle cannot execute here.
        tensors = load_safetensors_bytes(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {directory}: {TENSORS} is not a valid safetensors file ({err}); "
                              "reelmend refuses pickled or damaged checkpoints") from err
    return TrainState(step=int(meta["step"]), tensors=tensors, meta=meta)
