"""The job lease on an object store (fsspec's memory filesystem stands in; the S3 suite runs it on S3)."""

from __future__ import annotations

import json
import time

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
