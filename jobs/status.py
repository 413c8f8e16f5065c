"""`reelmend status`: a per-video summary of a job, read from its manifest alone (no Ray needed)."""

from __future__ import annotations

import json
from collections import Counter

from jobs.restore import summarize
from pipeline.manifest import Manifest, list_jobs


def pick_job(dest: str, job_id: str | None) -> str:
    """The job to act on: the given id, or the only job under DEST (the newest when there are several)."""
    jobs = list_jobs(dest)
    if job_id:
        if job_id not in jobs:
            raise FileNotFoundError(f"no job {job_id} under {dest} (jobs there: {', '.join(jobs) or 'none'})")
        return job_id
    if not jobs:
        raise FileNotFoundError(f"no reelmend job under {dest} (no {dest}/_reelmend/ folder)")
    if len(jobs) == 1:
        return jobs[0]
    return max(jobs, key=lambda j: _last_event(dest, j))


def _last_event(dest: str, job_id: str) -> float:
    events = Manifest(dest, job_id).read_events()
    times = [t.timestamp() for t in events.column("finished_at").to_pylist() if t is not None]
    return max(times, default=0.0)


def job_status(dest: str, job_id: str | None) -> dict:
    job_id = pick_job(dest, job_id)
    manifest = Manifest(dest, job_id)
    spec = manifest.read_spec()
    plan = manifest.read_plan().to_pylist()
    states = manifest.chunk_states()
    videos = summarize(manifest, plan, spec.max_attempts)
    chunks: dict[str, Counter] = {}
    source: dict[str, dict] = {}
    for row in plan:
        if row["chunk_index"] >= 0:
            s = states.get((row["video_id"], row["chunk_index"]))
            chunks.setdefault(row["video_id"], Counter())[s.status if s else "pending"] += 1
            if row["video_id"] not in source:
                info = json.loads(row["probe_json"])
                source[row["video_id"]] = {"frames_in": int(row["n_frames"]), "duration_s": round(info["duration"], 3)}
    compute = _compute_seconds(manifest)
    return {
        "job_id": job_id,
        "manifest": manifest.root,
        "chain": ",".join(spec.chain),
        "videos": [
            {"video_id": v.video_id, "path": v.rel_path, "output": v.output_uri, "status": v.status,
             "reason": " ".join(v.reason.split()), "frames_out": v.frames_out,  # one line, whatever FFmpeg said
             "frames_concealed": v.frames_concealed,
             "frames_in": source.get(v.video_id, {}).get("frames_in", 0),
             "duration_s": source.get(v.video_id, {}).get("duration_s", 0.0),
             "compute_s": round(compute.get(v.video_id, 0.0), 2),
             "chunks": {k: chunks.get(v.video_id, Counter())[k] for k in ("done", "failed", "running", "pending")}}
            for v in videos
        ],
        "counts": dict(Counter(v.status for v in videos)),
    }


def failed_first(videos: list[dict]) -> list[dict]:
    """`job_status` videos, failed first, then pending, then done (each in plan order): what a reader of a long
    list needs first."""
    order = {"failed": 0, "pending": 1, "done": 2}
    return sorted(videos, key=lambda v: order.get(v["status"], 1))


def _compute_seconds(manifest: Manifest) -> dict[str, float]:
    """Per video, the seconds its finished chunks took from decode to encode (all attempts)."""
    events = manifest.read_events().to_pylist()
    total: dict[str, float] = {}
    for e in events:
        if e["chunk_index"] >= 0 and e["status"] in ("done", "failed") and e["started_at"] and e["finished_at"]:
            total[e["video_id"]] = total.get(e["video_id"], 0.0) + (e["finished_at"] - e["started_at"]).total_seconds()
    return total
