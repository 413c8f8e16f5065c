"""What a long job shows while it runs: `restore`, `resume` and `train` report through one `Progress`.

Four modes, chosen on the command line:
  rich   a live bar on the terminal (stderr): done of total, rate, ETA, failures, with log lines above it;
  plain  log lines, plus a progress line at most every `every` seconds (for files and pipes);
  jsonl  one JSON object per line on stdout: `{"event": "progress", ...}`, `"log"`, `"video"`, `"summary"`,
         `"error"`: for CI and log collectors;
  quiet  nothing but errors and the final result.
The job code calls `log`, `start`, `update` and `event` and never knows which mode it talks to.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

from pipeline.text import printable

MODES = ("rich", "plain", "jsonl", "quiet")


def pick_mode(quiet: bool, jsonl: bool, console: Console) -> str:
    if quiet and jsonl:
        raise ValueError("--quiet and --jsonl exclude each other")
    return "jsonl" if jsonl else "quiet" if quiet else "rich" if console.is_terminal else "plain"


class Progress:
    def __init__(self, mode: str = "plain", *, log: Callable[[str], None] | None = None,
                 console: Console | None = None, stream: TextIO | None = None, every: float = 10.0):
        if mode not in MODES:
            raise ValueError(f"unknown progress mode {mode!r}; one of {', '.join(MODES)}")
        self.mode, self.every = mode, every
        self.console = console or Console(stderr=True, highlight=False, emoji=False)
        self._log = log or (lambda m: self.console.print(m, markup=False, soft_wrap=True))
        self.stream = stream or sys.stdout
        self.unit, self.total, self.done, self.fields, self.detail = "", 0, 0, {}, ""
        self._t0 = self._done0 = self._last_line = 0.0
        self._bar: RichProgress | None = None
        self._task = None

    # -- what the job calls ------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.mode == "jsonl":
            self.event("log", message=message)
        elif self.mode != "quiet":
            message = printable(message)  # a file's name in it may hold a newline or a terminal escape
            (self._bar.console.print(message, markup=False, soft_wrap=True) if self._bar else self._log(message))

    def start(self, description: str, total: int, done: int = 0, unit: str = "frames", detail: str = "",
              **fields) -> None:
        """Begin counting `unit`s; `fields` are extra figures (chunks, failures, losses) that `update` changes,
        shown beside the bar through the `detail` format string."""
        self.stop()
        self.unit, self.total, self.done, self.fields, self.detail = unit, total, done, dict(fields), detail
        self._t0, self._done0, self._last_line = time.monotonic(), done, time.monotonic()
        if self.mode == "rich":
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=16),
                TextColumn("{task.completed}/{task.total} " + unit), TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                console=self.console, transient=False, refresh_per_second=4)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=done, rate="", eta="",
                                            detail=self._detail())
        self._emit(force=True)

    def update(self, advance: int = 0, **fields) -> None:
        self.done += advance
        self.fields.update(fields)
        self._emit()

    def stop(self) -> None:
        if self.total or self.done:
            self._emit(force=True)
        if self._bar:
            self._bar.stop()
            self._bar = None

    def event(self, name: str, **fields) -> None:
        """A structured record: written in jsonl mode only (the other modes have their own words for it)."""
        if self.mode == "jsonl":
            self.stream.write(json.dumps({"event": name, "time": round(time.time(), 3), **fields}) + "\n")
            self.stream.flush()

    # -- figures -------------------------------------------------------------------------------------------

    def rate(self) -> float:
        """Units per second over this run (units done before it, e.g. by a run that was resumed, do not count)."""
        elapsed = time.monotonic() - self._t0
        return (self.done - self._done0) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else None

    def snapshot(self) -> dict:
        eta = self.eta()
        return {"unit": self.unit, "done": self.done, "total": self.total, "rate": round(self.rate(), 3),
                "eta_s": None if eta is None else round(eta, 1), **self.fields}

    def _detail(self) -> str:
        try:
            return self.detail.format(**self.fields)
        except (KeyError, ValueError):  # a figure not reported yet
            return ""

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.mode == "rich" and self._bar is not None:
            # The ETA from this run's whole rate, as the plain lines give it (rich's own estimate looks at the last
            # 30 s only, which on a slow job, one chunk in minutes, never holds an update to estimate from).
            self._bar.update(self._task, completed=self.done, total=self.total,
                             rate=f"{self.rate():.2f} {self.unit}/s", eta=f"ETA {_duration(self.eta())}",
                             detail=self._detail())
        elif self.mode in ("plain", "jsonl") and (force or now - self._last_line >= self.every):
            self._last_line = now
            if self.mode == "jsonl":
                self.event("progress", **self.snapshot())
            else:
                eta = self.eta()
                pct = 100 * self.done / self.total if self.total else 100.0
                self._log(f"{self.done}/{self.total} {self.unit} ({pct:.0f}%), {self.rate():.2f} {self.unit}/s, "
                          f"ETA {_duration(eta)}; {self._detail()}".rstrip("; "))


def _duration(seconds: float | None) -> str:
    if seconds is None or math.isinf(seconds):
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class JobStopped(RuntimeError):
    """A job stopped by an unexpected error once its work had begun (exit 1, not a usage error)."""


def error_line(err: BaseException) -> str:
    """One line for an unexpected error: its type and first line. An error Ray wrapped (a task's, an actor's,
    a training worker's) is shown as the error raised there: Ray's own text carries the remote traceback. Where
    the error reached is Ray's own (Ray Data's "UserCodeException: UDF failed to process a data block", whose
    cause stayed on the worker), the cause is the last exception line of that traceback."""
    outer = err
    while type(err).__module__.split(".")[0] == "ray" and (inner := getattr(err, "cause", None) or err.__cause__):
        err = inner
    if type(err).__module__.split(".")[0] == "ray" and (causes := _REMOTE_ERROR.findall(str(outer))):
        return causes[-1]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


# A traceback's exception line, "KeyError: 'x'" or "pkg.mod.SomeError: message", of an exception not Ray's own
_REMOTE_ERROR = re.compile(r"^(?!ray\.)(?!UserCodeException|RayTaskError)((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*"
                           r"(?:Error|Exception|Exit|Interrupt|Warning)\b(?:\(\w+\))?: .+)$", re.MULTILINE)


def raised_in_ray(err: BaseException) -> bool:
    """Whether Ray wrapped `err` around an error raised remotely (its class may then also be the remote one's)."""
    return type(err).__module__.split(".")[0] == "ray"
