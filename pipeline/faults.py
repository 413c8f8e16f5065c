"""Fault injection for the fault-tolerance suite: inert unless the environment variable REELMEND_FAULTS names
a JSON file, which the Ray workers inherit from the process that started Ray.

The file holds a list of faults, each {"stage": "decode" | "restore" | "encode", "rel_path": ..., "chunk_index":
N, "kind": ..., "times": N}:

* kind "raise": the stage raises on that chunk, `times` times in all (every time when absent), which the
  stage records as the chunk's failure, as any real error would be;
* stage "driver", kind "raise": the driver raises as that chunk's result comes back, as a bug or a lost
  connection on the driver's side would (the job stops; `resume` continues it);
* kind "crash": the worker process exits at once on that chunk (a segfault, an OOM kill), `times` times;
* kind "memory": a memory limit, {"stage": "restore", "kind": "memory", "max_pixels": P}: every model forward
  over more than P input pixels (frames x height x width) raises torch.OutOfMemoryError, as a GPU or a
  container limit would; with "action": "crash", the process exits there instead, as when the kernel's (or
  Ray's) OOM killer ends it: no exception to catch.

Counts are kept in files beside the fault file, so they hold across worker processes and restarts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "REELMEND_FAULTS"


class InjectedFault(RuntimeError):
    """The error an injected "raise" fault throws."""


def _faults() -> list[dict[str, Any]]:
    path = os.environ.get(ENV)
    if not path or not os.path.exists(path):
        return []
    return json.loads(Path(path).read_text())


def _fire(index: int, fault: dict[str, Any]) -> bool:
    """Count one firing of fault `index`; False once it has fired `times` times."""
    if "times" not in fault:
        return True
    counter = Path(f"{os.environ[ENV]}.fired-{index}")
    with open(counter, "a") as f:  # O_APPEND: one byte per firing, race-free across processes
        f.write(".")
    return counter.stat().st_size <= int(fault["times"])


def maybe_fail(stage: str, row: dict[str, Any]) -> None:
    """Raise or exit here when a fault names this stage and chunk."""
    for i, fault in enumerate(_faults()):
        if (fault.get("stage") != stage or fault.get("kind") not in ("raise", "crash")
                or fault.get("chunk_index", row["chunk_index"]) != row["chunk_index"]
                or not str(row.get("source_uri", "")).endswith(fault.get("rel_path", ""))):
            continue
        if _fire(i, fault):
            if fault["kind"] == "crash":
                os._exit(70)
            raise InjectedFault(f"injected fault in {stage} of chunk {row['chunk_index']}")


def memory_limit() -> tuple[int, bool] | None:
    """The simulated model memory limit in input pixels per forward, and whether exceeding it kills the
    process, if one is set."""
    limits = sorted((int(f["max_pixels"]), f.get("action") == "crash") for f in _faults() if f.get("kind") == "memory")
    return limits[0] if limits else None


def limit_memory(chain, max_pixels: int, crash: bool = False) -> None:
    """Make every network of `chain` run out of memory on a forward over more than `max_pixels` input pixels
    (`crash`: the process dies there). The instance's forward is wrapped (not the module), so the chain still
    sees its own network classes."""
    import torch

    def limited(forward):
        def forward_within_limit(*inputs: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            pixels = x.numel() // x.shape[-3]  # (B, [T,] C, H, W): frames x height x width
            if pixels > max_pixels and crash:
                os._exit(137)  # what a SIGKILL from an OOM killer leaves as the exit status
            if pixels > max_pixels:
                raise torch.OutOfMemoryError(f"simulated: a forward over {pixels} pixels exceeds the "
                                             f"{max_pixels}-pixel limit")
            return forward(*inputs)
        return forward_within_limit

    for step in chain.steps:
        if step.net is not None:
            step.net.forward = limited(step.net.forward)
