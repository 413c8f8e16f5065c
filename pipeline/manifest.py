"""The job's manifest under DEST/_reelmend/<job_id>/: job.json, plan/ and events/ (DESIGN.md).

Every file is written once and never rewritten (events are appended as new part files), so pyarrow, DuckDB
or pandas read a consistent table at any moment, and a crash loses at most the commit in flight.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from pipeline import storage
from pipeline.config import VERSION, JobSpec
from pipeline.lease import LeaseLost
from pipeline.schema import EVENTS, PLAN
from pipeline.text import one_line


@dataclass(frozen=True)
class ChunkState:
    status: str  # pending | running | done | failed
    failures: int = 0
    error_kind: str = ""
    error_message: str = ""
    frames_out: int = 0
    segment_uri: str = ""
    frames_concealed: int = 0


def job_root(dest: str, job_id: str) -> str:
    return storage.join(dest, storage.JOB_AREA, job_id)


def list_jobs(dest: str) -> list[str]:
    """Jobs under DEST that got as far as writing their spec (a run that failed before planning leaves only
    its lease)."""
    area = storage.join(dest, storage.JOB_AREA)
    return [name for name in storage.ls(area)
            if not name.startswith(".") and storage.exists(storage.join(area, name, "job.json"))]


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _utc(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=timezone.utc)


class Manifest:
    def __init__(self, dest: str, job_id: str):
        self.dest = dest
        self.job_id = job_id
        self.root = job_root(dest, job_id)
        self.segments_root = storage.join(self.root, "segments")
        # chunk_states' fold of the event parts read so far (see there)
        self._states: dict[tuple[str, int], ChunkState] = {}
        self._folded: set[str] = set()
        self._last_folded = ""

    # -- job.json and plan/ (written once) --------------------------------------------------------------

    def has_plan(self) -> bool:
        return storage.exists(storage.join(self.root, "plan", "part-00000.parquet"))

    def write_spec(self, spec: JobSpec) -> None:
        storage.write_bytes(storage.join(self.root, "job.json"), spec.model_dump_json(indent=2).encode())

    def read_spec(self) -> JobSpec:
        uri = storage.join(self.root, "job.json")
        if not storage.exists(uri):
            raise FileNotFoundError(f"no job {self.job_id} under {self.dest} ({uri} is missing)")
        try:
            return JobSpec.model_validate_json(storage.read_bytes(uri))
        except ValidationError as err:  # edited by hand, or written by another version
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in err.errors())
            raise ValueError(f"{uri} is not a job spec reelmend {VERSION} can read ({one_line(problems)}): undo "
                             "the edit, or use the reelmend that wrote it") from err

    def write_plan(self, rows: list[dict]) -> None:
        """The first plan part: every file SRC held when the job was planned."""
        self.add_plan_part(rows, 0)

    def plan_parts(self) -> list[str]:
        folder = storage.join(self.root, "plan")
        return sorted(n for n in storage.ls(folder) if n.startswith("part-") and n.endswith(".parquet"))

    def add_plan_part(self, rows: list[dict], index: int) -> None:
        """Plan part `index` (0: the first plan; later ones: files a re-run `restore` found new or replaced)."""
        rows = [{**r, "error": one_line(r["error"])} if r.get("error") else r for r in rows]
        table = pa.Table.from_pylist(rows, schema=PLAN)
        storage.write_bytes(storage.join(self.root, "plan", f"part-{index:05d}.parquet"), _parquet_bytes(table))

    def read_plan(self) -> pa.Table:
        """The plan: the rows of each source from the latest part that plans it (a source replaced after it was
        planned is planned again, under a new video id, and its old rows no longer count)."""
        names = self.plan_parts()
        blobs = storage.read_many([storage.join(self.root, "plan", n) for n in names])
        tables = [pq.read_table(io.BytesIO(b)) for b in blobs]
        if len(tables) <= 1:
            return tables[0] if tables else PLAN.empty_table()
        kept, seen = [], pa.array([], pa.string())
        for table in reversed(tables):  # latest first: a rel_path a later part plans is dropped from earlier ones
            kept.append(table.filter(pc.invert(pc.is_in(table["rel_path"], value_set=seen))))
            seen = pa.concat_arrays([seen, pc.unique(table["rel_path"])])
        return pa.concat_tables(reversed(kept), promote_options="default")

    # -- events/ (append-only) --------------------------------------------------------------------------

    def append_events(self, events: Iterable[dict], name: str | None = None) -> None:
        """Commit `events` as one part file: a new one, or `name` (written again, it replaces what it held: a
        commit retried after a write that landed but reported an error records nothing twice)."""
        rows = [{**{column: None for column in EVENTS.names}, **e} for e in events]
        if not rows:
            return
        for row in rows:
            row["error_message"] = one_line(row["error_message"]) if row["error_message"] else row["error_message"]
            row["started_at"] = _utc(row["started_at"]) if isinstance(row["started_at"], float) else row["started_at"]
            row["finished_at"] = _utc(row["finished_at"]) if isinstance(row["finished_at"], float) else row["finished_at"]
        table = pa.Table.from_pylist(rows, schema=EVENTS)
        storage.write_bytes(storage.join(self.root, "events", name or new_part_name()), _parquet_bytes(table))

    def _event_parts(self) -> list[str]:
        """Names of the committed event parts, in commit order (their names sort by commit time)."""
        folder = storage.join(self.root, "events")
        return sorted(n for n in storage.ls(folder) if n.startswith("part-") and n.endswith(".parquet"))

    def _read_parts(self, names: list[str]) -> list[pa.Table]:
        blobs = storage.read_many([storage.join(self.root, "events", n) for n in names])
        return [pq.read_table(io.BytesIO(b)) for b in blobs]

    def read_events(self) -> pa.Table:
        tables = self._read_parts(self._event_parts())
        # (parts written before a column was added lack it: null there)
        return pa.concat_tables(tables, promote_options="default") if tables else EVENTS.empty_table()

    def chunk_states(self) -> dict[tuple[str, int], ChunkState]:
        """The latest state of every (video_id, chunk_index) that has events, with its failure count.

        Folded incrementally: the driver asks at every wave, and re-reading every part each time would cost a
        long job time quadratic in its length (52 us an event from local disk), so only the parts committed
        since the last call are read. A new part that sorts before one already folded (a clock stepped back)
        makes it fold them all again, so the states are always those of the parts in name order (the order of
        their writers' clocks), as any other reader sees them."""
        parts = self._event_parts()
        new = [n for n in parts if n not in self._folded]
        if new and new[0] < self._last_folded:
            self._states, self._folded, new = {}, set(), parts
        for name, table in zip(new, self._read_parts(new)):
            for e in table.to_pylist():
                key = (e["video_id"], e["chunk_index"])
                prev = self._states.get(key)
                failures = (prev.failures if prev else 0) + (e["status"] == "failed")
                self._states[key] = ChunkState(e["status"], failures, e["error_kind"] or "", e["error_message"] or "",
                                               e["frames_out"] or 0, e["segment_uri"] or "",
                                               e.get("frames_concealed") or 0)
            self._folded.add(name)
            self._last_folded = max(self._last_folded, name)
        return dict(self._states)


def new_part_name() -> str:
    """Sortable names: the order of event part files is the order of commits."""
    return f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


class EventWriter:
    """Buffers events and commits them as one part file about every `interval` seconds, so a job over a million
    chunks writes a bounded number of parts while results stream back.

    A context manager: a background thread commits what is buffered every `interval` even while no result
    comes (a slow chunk after a burst of fast ones), and leaving the block commits the rest. Before every commit
    `check()` runs (the job's lease check): a run whose lease was taken over raises there and records nothing
    more, since the run that took over owns the job's events; its buffer is dropped."""

    def __init__(self, manifest: Manifest, interval: float = 1.0, check: Callable[[], None] = lambda: None):
        self.manifest = manifest
        self.interval = interval
        self.check = check
        self.buffer: list[dict] = []
        self.retry_name: str | None = None  # the part name of a commit that failed
        self.lock = threading.Lock()  # one commit at a time
        self.guard = threading.Lock()  # the buffer itself: adding never waits for a commit
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True, name="reelmend-events")

    def __enter__(self) -> EventWriter:
        self.thread.start()
        return self

    def __exit__(self, kind, err, tb) -> None:
        self.stop.set()
        self.thread.join()
        if kind is not None and issubclass(kind, LeaseLost):
            self.buffer = []
            return
        self.flush()

    def add(self, event: dict) -> None:
        with self.guard:
            self.buffer.append({"finished_at": time.time(), **event})

    def _tick(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.flush()
            except LeaseLost:
                return  # the driver stops at its own next check
            except Exception:  # noqa: BLE001 - storage trouble: the events stay buffered for the next commit
                continue

    def flush(self) -> None:
        with self.lock:
            with self.guard:
                events, self.buffer = self.buffer, []
            if not events:
                return
            # A commit that failed may still have landed (its write reported an error after all): the next try writes
            # the same part again, with what came since, so nothing is recorded twice.
            name, self.retry_name = self.retry_name or new_part_name(), None
            try:
                self.check()
                self.manifest.append_events(events, name)
            except LeaseLost:
                raise
            except BaseException:
                with self.guard:
                    self.buffer[:0] = events  # not committed: kept, in order, for the next try
                self.retry_name = name
                raise
