"""One driver at a time per job: a lease in the job area, DEST/_reelmend/<job_id>/lease.

Two `resume` runs over the same DEST would run the same chunks twice and both clean the other's staging
files. The first to take the lease proceeds; the second stops at once with a message naming the holder.

* Local (and network-mounted) destinations: an exclusive `flock` on the lease file, held for the whole run.
  The kernel releases it when the process dies, however it dies, so a killed driver never blocks `resume`.
* Object stores: a lease object created only if absent (a conditional PUT, `If-None-Match: *`), renewed by a
  heartbeat thread every TTL/4 and deleted at the end. A lease not renewed for TTL seconds belongs to a dead
  driver and is taken over; a driver that finds its lease taken over stops at its next check (`Lease.check`,
  before each chunk result it would record and between waves). Expiry compares the holder's clock with the reader's, so clocks must agree to well under
  TTL (NTP does). A driver killed without releasing its lease blocks a new run for up to TTL seconds, except
  a new run on the same machine, which sees that the holder's process has ended and takes the lease at once.
  On S3, renewals and takeovers are conditional PUTs on the ETag last seen (`If-Match`): a renewal never
  overwrites a takeover, and of two drivers taking over the same expired lease exactly one wins. Other object
  stores (no ETag condition through fsspec) take over by delete-then-create and renew by read-then-write,
  which two drivers acting within the same moment can interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

from pipeline import storage

TTL = 60.0


class LeaseHeld(RuntimeError):
    """Another driver is running this job."""


class LeaseLost(RuntimeError):
    """This driver's lease expired and another driver took the job over."""


class Lease:
    """What `hold` yields: `check()` between units of work stops a driver whose lease was taken over."""

    def __init__(self, root: str):
        self.root = root
        self.lost = threading.Event()
        self.renewed: float | None = None  # object stores: monotonic time of the last write known to have landed

    def check(self) -> None:
        job = self.root.rsplit("/", 1)[-1]
        if self.lost.is_set():
            raise LeaseLost(f"another run took over job {job} after this run could not renew its lease for "
                            f"{TTL:.0f} s (storage unreachable?); this run stops, that one carries on")
        # Renewals failing for most of TTL (throttling, expired credentials, a paused driver): another run may take
        # the job over any moment without this one seeing it, so stop first.
        if self.renewed is not None and (stale := time.monotonic() - self.renewed) > 0.75 * TTL:
            raise LeaseLost(f"this run could not renew its lease on job {job} for {stale:.0f} s (storage "
                            "unreachable?), so another run may take the job over; this run stops, and `reelmend "
                            "resume` continues the job")


def _holder() -> dict:
    now = time.time()
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "pids": _pid_space(),
            "acquired_at": now, "renewed_at": now}


def _pid_space() -> str:
    """What makes a pid mean one process: this boot of this kernel, and this pid namespace (containers on one
    host each have their own). "" where it cannot be told."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f"{f.read().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _dead(holder: dict) -> bool:
    """Whether the holder is a process of this machine (same kernel boot and pid namespace) that has ended: its
    lease is then free at once, without waiting for it to expire (a driver killed a moment ago, resumed)."""
    if not holder.get("pids") or holder["pids"] != _pid_space():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError):
        return False
    return False


def _held_message(root: str, holder: dict) -> str:
    def utc(t: float) -> str:
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    message = (f"job {root.rsplit('/', 1)[-1]} is already being run by {holder.get('host', '?')} "
               f"(pid {holder.get('pid', '?')}, since {utc(holder.get('acquired_at', 0))} UTC); wait for that run "
               "to finish or stop it, then run `reelmend resume` again")
    if "renewed_at" in holder:  # an object store's lease: a dead run's lapses
        message += (f" (if that run is dead, its lease lapses at {utc(holder['renewed_at'] + TTL)} UTC, "
                    f"{TTL:.0f} s after its last renewal)")
    return message


@contextlib.contextmanager
def hold(root: str) -> Iterator[Lease]:
    """Hold the job's lease for the duration of the block; raises LeaseHeld when another run holds it."""
    uri = storage.join(root, "lease")
    lease = Lease(root)
    if storage.is_local(uri):
        with _hold_local(root, storage.fs_and_path(uri)[1]):
            yield lease
    else:
        with _hold_object(root, uri, lease):
            yield lease


@contextlib.contextmanager
def _hold_local(root: str, path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            raise LeaseHeld(_held_message(root, json.loads(text) if text.strip() else {})) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)  # who holds it, for the other run's message
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with the next run's flock)


@contextlib.contextmanager
def _hold_object(root: str, uri: str, lease: Lease) -> Iterator[None]:
    me = _holder()
    acquired = _acquire(root, uri, me)
    lease.renewed = time.monotonic()
    stop = threading.Event()

    def renew() -> None:
        etag = acquired
        while not stop.wait(TTL / 4):
            data = json.dumps({**me, "renewed_at": time.time()}).encode()
            try:
                if etag is not None:  # S3: only over our own last write, so a takeover since then is never lost
                    new = storage.replace_if_match(uri, data, etag)
                    # refused: taken over, or our own write landed and only its response was lost (and the retry
                    # then failed its condition), which our token in the object tells apart
                    ours, etag = (True, new) if new is not None else _ours(uri, me)
                else:
                    # No ETag condition (object stores other than S3): read, then write. A takeover between the
                    # two is overwritten here, and then finds its own lease gone at its next renewal, and stops.
                    ours, _ = _ours(uri, me)
                    if ours and not stop.is_set():
                        storage.write_bytes(uri, data)
            except Exception:  # noqa: BLE001 - a missed renewal is retried; TTL allows three
                continue
            if not ours:
                lease.lost.set()  # expired and taken over: the driver stops at its next check
                return
            lease.renewed = time.monotonic()

    thread = threading.Thread(target=renew, daemon=True, name="reelmend-lease")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if _ours(uri, me)[0]:
                storage.remove(uri)


def _acquire(root: str, uri: str, me: dict) -> str | None:
    """Create the lease object, or take over an expired one; the ETag of our write (None off S3)."""
    data = json.dumps(me).encode()
    while True:  # each pass after the first follows another driver's write, and a fresh lease ends the loop
        if storage.create_exclusive(uri, data):
            return storage.read_with_etag(uri)[1]
        try:
            raw, etag = storage.read_with_etag(uri)
        except FileNotFoundError:
            continue  # released between our create and this read: create it again
        holder = json.loads(raw)
        if holder.get("token") == me["token"]:
            return etag  # our own write, retried after its response was lost
        if time.time() - holder.get("renewed_at", 0) < TTL and not _dead(holder):
            raise LeaseHeld(_held_message(root, holder))
        # Expired, or its driver is a process of this machine that has ended: it died without releasing it.
        if etag is not None:
            # S3: replace exactly the expired version we read. Of two drivers taking it over at once one wins;
            # the other's PUT fails (412) and its next pass finds the winner's fresh lease.
            new = storage.replace_if_match(uri, data, etag)
            if new is not None:
                return new
        else:
            # No ETag condition (object stores other than S3): delete, then create. Two drivers can both find it
            # expired, and the second's delete removes the first's fresh lease; the first's next renewal then
            # finds the second's lease there, and the first stops.
            storage.remove(uri)


def _ours(uri: str, me: dict) -> tuple[bool, str | None]:
    """Whether the lease object holds our token, and its ETag (None off S3)."""
    raw, etag = storage.read_with_etag(uri)
    return json.loads(raw).get("token") == me["token"], etag
