"""The job lease: on local files, on an object store (fsspec's memory filesystem stands in), and the races that
S3's conditional writes close, on the test's S3 server."""

from __future__ import annotations

import contextlib
import json
import os
import time

import fsspec
import pytest

from pipeline import lease, storage


def test_object_store_lease_is_exclusive_released_and_expires(monkeypatch):
    root = f"memory://leases-{time.time_ns()}/_reelmend/job-a"
    with lease.hold(root):
        with pytest.raises(lease.LeaseHeld, match="already being run"):
            with lease.hold(root):
                pass
        assert storage.exists(f"{root}/lease")
    assert not storage.exists(f"{root}/lease")  # released at the end of the run

    # a driver that died holding the lease: once it has not been renewed for TTL seconds it is taken over
    dead = {"token": "dead", "host": "elsewhere", "pid": 1, "acquired_at": 0.0, "renewed_at": time.time()}
    storage.write_bytes(f"{root}/lease", json.dumps(dead).encode())
    with pytest.raises(lease.LeaseHeld, match="elsewhere"):
        with lease.hold(root):
            pass
    storage.write_bytes(f"{root}/lease", json.dumps({**dead, "renewed_at": time.time() - lease.TTL - 1}).encode())
    with lease.hold(root):
        assert json.loads(storage.read_bytes(f"{root}/lease"))["token"] != "dead"


def test_an_object_store_lease_of_a_process_of_this_machine_that_ended_is_taken_at_once():
    """A driver killed on this machine (SIGKILL: no release) and resumed right away: its lease has not lapsed,
    but its process is gone, which this machine can tell; a live holder, or one in another pid namespace
    (another container), keeps its lease until it lapses."""
    import subprocess
    import sys

    root = f"memory://leases-{time.time_ns()}/_reelmend/job-b"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True, timeout=60)
    holder = {"token": "killed", "host": "this", "pid": int(ended.stdout), "pids": lease._pid_space(),
              "acquired_at": time.time(), "renewed_at": time.time()}
    storage.write_bytes(f"{root}/lease", json.dumps(holder).encode())
    with lease.hold(root):
        assert json.loads(storage.read_bytes(f"{root}/lease"))["token"] != "killed"

    for alive in ({**holder, "pid": os.getpid()}, {**holder, "pids": "another-boot:1"}):
        storage.write_bytes(f"{root}/lease", json.dumps(alive).encode())
        with pytest.raises(lease.LeaseHeld, match="lapses at"):
            with lease.hold(root):
                pass


def test_local_lease_names_the_holder_and_frees_on_exit(tmp_path):
    root = str(tmp_path / "_reelmend" / "job-a")
    with lease.hold(root):
        with pytest.raises(lease.LeaseHeld, match=r"pid \d+"):
            with lease.hold(root):
                pass
    with lease.hold(root):  # the lock went with the first holder
        pass


def test_a_driver_whose_lease_was_taken_over_stops_at_its_next_check(monkeypatch):
    monkeypatch.setattr(lease, "TTL", 0.4)  # renewals every 0.1 s
    root = f"memory://leases-{time.time_ns()}/_reelmend/job-b"
    with lease.hold(root) as held:
        held.check()  # still ours
        other = {"token": "other", "host": "elsewhere", "pid": 2, "acquired_at": time.time(),
                 "renewed_at": time.time()}
        storage.write_bytes(f"{root}/lease", json.dumps(other).encode())  # taken over while we were away
        deadline = time.monotonic() + 5
        while not held.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(lease.LeaseLost, match="another run took over"):
            held.check()
    assert json.loads(storage.read_bytes(f"{root}/lease"))["token"] == "other"  # the new holder's stays


def test_a_driver_that_cannot_renew_stops_before_its_lease_can_expire(monkeypatch):
    """Storage unreachable for most of TTL: nobody has taken the job over yet, but anybody may, unseen; the
    driver stops at its next check rather than run on beside a new holder."""
    monkeypatch.setattr(lease, "TTL", 0.4)  # renewals every 0.1 s
    root = f"memory://leases-{time.time_ns()}/_reelmend/job-d"
    with lease.hold(root) as held:
        held.check()

        def unreachable(uri, me):
            raise OSError("connection refused")

        monkeypatch.setattr(lease, "_ours", unreachable)
        time.sleep(0.4)  # every renewal fails
        with pytest.raises(lease.LeaseLost, match="could not renew its lease on job job-d"):
            held.check()
        assert not held.lost.is_set()  # nobody took it over


@pytest.fixture
def s3_root(s3):
    bucket = f"leases-{time.time_ns()}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/_reelmend/job-c"


@pytest.fixture
def hosts(monkeypatch):
    """Each `lease.hold` from now on names its holder taker-a, taker-b, ... (all run in this one process)."""
    names = iter(["taker-a", "taker-b"])
    holder = lease._holder
    monkeypatch.setattr(lease, "_holder", lambda: {**holder(), "host": next(names)})


def test_of_two_drivers_taking_over_an_expired_lease_on_s3_exactly_one_wins(s3_root, hosts, monkeypatch):
    uri = f"{s3_root}/lease"
    dead = {"token": "dead", "host": "elsewhere", "pid": 1, "acquired_at": 0.0,
            "renewed_at": time.time() - lease.TTL - 1}
    storage.write_bytes(uri, json.dumps(dead).encode())
    read = storage.read_with_etag
    second = contextlib.ExitStack()
    held_by_b = []

    def a_reads_then_b_takes_over(u):
        found = read(u)  # A finds the dead driver's expired lease...
        monkeypatch.setattr(storage, "read_with_etag", read)
        held_by_b.append(second.enter_context(lease.hold(s3_root)))  # ...and B takes it over before A does
        return found

    monkeypatch.setattr(storage, "read_with_etag", a_reads_then_b_takes_over)
    with second:
        with pytest.raises(lease.LeaseHeld, match="already being run by taker-b"):
            with lease.hold(s3_root):
                pass
        assert json.loads(storage.read_bytes(uri))["host"] == "taker-b"  # A's takeover did not replace B's lease
        held_by_b[0].check()  # and B carries on
    assert not storage.exists(uri)  # B released it at its end


def test_a_renewal_after_a_takeover_on_s3_leaves_the_new_holder_and_stops_the_old(s3_root, hosts, monkeypatch):
    monkeypatch.setattr(lease, "TTL", 0.4)  # renewals every 0.1 s
    uri = f"{s3_root}/lease"
    replace = storage.replace_if_match
    second = contextlib.ExitStack()
    held_by_b = []

    def b_takes_over_first(u, data, etag):
        monkeypatch.setattr(storage, "replace_if_match", replace)
        time.sleep(lease.TTL + 0.1)  # A's renewal stalls (storage unreachable?) until its lease has expired...
        held_by_b.append(second.enter_context(lease.hold(s3_root)))  # ...B takes it over...
        return replace(u, data, etag)  # ...and then A's renewal arrives

    with second:
        with lease.hold(s3_root) as held_by_a:
            monkeypatch.setattr(storage, "replace_if_match", b_takes_over_first)
            deadline = time.monotonic() + 5
            while not held_by_a.lost.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(lease.LeaseLost, match="another run took over"):
                held_by_a.check()
            assert json.loads(storage.read_bytes(uri))["host"] == "taker-b"
        assert json.loads(storage.read_bytes(uri))["host"] == "taker-b"  # A's release left B's lease alone
        time.sleep(lease.TTL)  # B renews meanwhile, and still holds it
        held_by_b[0].check()
        assert json.loads(storage.read_bytes(uri))["host"] == "taker-b"
