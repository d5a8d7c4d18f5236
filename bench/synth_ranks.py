"""An N-rank job made from one real Kineto trace, to test and bench the analysis at 8 to 1024 ranks.

    python bench/synth_ranks.py --ranks 256 --out /tmp/job --straggler 17 --slow-gpu 99 --slow-link 200
    python bench/synth_ranks.py --ranks 1024 --out /tmp/job1024 --scale     # then time the analysis

Each rank gets its own ``distributedInfo`` (rank, world size), a clock offset
(``baseTimeNanoseconds``) and jitter on its kernels' durations (compute +-1%, collectives +-2%;
later GPU work moves with them). Planted per-rank effects, each with its real signature:

- ``--straggler R``: rank R's host starts its work late (``--straggler-ms`` per step, spread over
  its collectives): its GPU idles before each collective, and every other rank waits that long
  inside the collective (their communication kernels run longer).
- ``--slow-gpu R``: rank R's compute kernels run ``--slow-gpu-factor`` times longer; the others
  wait inside the next collective for the compute it added.
- ``--slow-link R``: the collectives are given two kinds of process groups, as a tp x dp layout
  has (groups of 8 consecutive ranks, and groups of the ranks 8 apart), alternately; every
  collective of the two groups that contain R runs ``--slow-link-factor`` times longer, on all
  their members (a ring is as slow as its slowest link).

``--scale`` times ``perfkit analyze`` on the job in a fresh process and prints the wall time and
the peak memory of all its processes (main and workers), per rank too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "hta" / "tests" / "data"
DEFAULT = SHARED / "df_index_resolver" / "df_index_resolver.json.gz"
GROUP = 8  # ranks per "tp" group; "dp" groups are the ranks GROUP apart

_GPU = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass
class Plan:
    ranks: int
    straggler: int | None = None
    straggler_ms: float = 20.0
    slow_gpu: int | None = None
    slow_gpu_factor: float = 1.3
    slow_link: int | None = None
    slow_link_factor: float = 1.6
    spread: float = 0.0
    """How much identical GPUs differ: each rank's compute scaled by a normal draw of this sigma
    (clipped at 2 sigma), beside the per-kernel jitter; 0.03 is a realistic fleet."""
    seed: int = 0

    @property
    def groups(self) -> bool:
        return self.slow_link is not None


def _load(source: Path) -> dict[str, Any]:
    with gzip.open(source) if source.suffix == ".gz" else open(source, "rb") as f:
        return orjson.loads(f.read())


def _is_comm(e: dict[str, Any]) -> bool:
    return e.get("cat") == "kernel" and "nccl" in str(e.get("name", "")).lower()


def _groups(rank: int, world: int) -> dict[str, list[int]]:
    tp0 = rank - rank % GROUP
    return {
        f"tp{rank // GROUP}": list(range(tp0, min(world, tp0 + GROUP))),
        f"dp{rank % GROUP}": list(range(rank % GROUP, world, GROUP)),
    }


def _extra_compute(doc: dict[str, Any], factor: float) -> np.ndarray:
    """The compute time a slower GPU adds before each collective (us): what the others wait."""
    gpu = sorted(
        (e for e in doc["traceEvents"] if e.get("cat") in _GPU and "dur" in e), key=lambda e: e["ts"]
    )
    out, acc = [], 0.0
    for e in gpu:
        if _is_comm(e):
            out.append(acc)
            acc = 0.0
        else:
            acc += e["dur"] * (factor - 1)
    return np.asarray(out)


def _rank_gpu(
    gpu: list[dict[str, Any]], steps: int, rank: int, plan: Plan, waits: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    """Rank ``rank``'s GPU events (``gpu``: the source's, in start order): jitter, planted effects,
    later work moved with them."""
    rng = random.Random(plan.seed * 100003 + rank)
    own = 1 + max(-2 * plan.spread, min(2 * plan.spread, rng.gauss(0, plan.spread))) if plan.spread else 1.0
    n_comm = sum(1 for e in gpu if _is_comm(e))
    lag_us = plan.straggler_ms * 1e3 * steps / max(1, n_comm)
    mine = _groups(rank, plan.ranks)
    slow = set(_groups(plan.slow_link, plan.ranks)) if plan.slow_link is not None else set()
    out = []
    shift, k = 0.0, 0
    for source in gpu:
        e = dict(source)
        dur = float(e["dur"])
        if _is_comm(e):
            before = 0.0
            if plan.straggler is not None:
                if rank == plan.straggler:
                    before = lag_us  # its host is late: its GPU idles, it waits for nobody
                else:
                    dur += lag_us
            if plan.slow_gpu is not None and rank != plan.slow_gpu:
                dur += float(waits["slow_gpu"][k]) if k < len(waits["slow_gpu"]) else 0.0
            if plan.groups:
                name = sorted(mine)[k % 2]  # alternately the tp and the dp group
                ranks = mine[name]
                if name in slow:
                    dur *= plan.slow_link_factor
                args = dict(e.get("args", {}))
                args.update(
                    {
                        "Collective name": "allreduce",
                        "Group size": len(ranks),
                        "Process Group Name": name,
                        "Process Group Ranks": str(ranks),
                    }
                )
                e["args"] = args
            dur *= 1 + rng.gauss(0, 0.02)
            shift += before
            k += 1
        else:
            scale = (plan.slow_gpu_factor if rank == plan.slow_gpu else 1.0) * own
            dur = dur * scale * (1 + rng.gauss(0, 0.01))
        e["ts"] = e["ts"] + shift
        shift += dur - float(source["dur"])
        e["dur"] = dur
        out.append(e)
    return out


@dataclass
class _Source:
    """The source trace split once: its top-level fields, its GPU events (which each rank changes)
    and the gzip member of every other event (which all ranks share as written)."""

    head: dict[str, Any]
    gpu: list[dict[str, Any]]
    steps: int
    shared_gz: bytes


def _split(doc: dict[str, Any]) -> _Source:
    events = doc["traceEvents"]
    is_gpu = [e.get("cat") in _GPU and "dur" in e and "ts" in e for e in events]
    gpu = sorted((e for e, g in zip(events, is_gpu, strict=True) if g), key=lambda e: e["ts"])
    shared = [e for e, g in zip(events, is_gpu, strict=True) if not g]
    if not gpu or not shared:
        sys.exit("the source trace needs GPU events (kernels, NCCL among them) and CPU events")
    steps = max(1, sum(1 for e in shared if str(e.get("name", "")).startswith("ProfilerStep")))
    head = {k: v for k, v in doc.items() if k != "traceEvents"}
    return _Source(
        head, gpu, steps, gzip.compress(b"," + orjson.dumps(shared)[1:-1] + b"]}", compresslevel=1)
    )


_SOURCE: list[_Source] = []


def _write(args: tuple[int, Plan, dict[str, np.ndarray], Path]) -> int:
    """One rank's file: a gzip member of its own (its distributedInfo, clock offset and GPU events),
    then the shared member of the other events; readers go through every member, as gzip does."""
    rank, plan, waits, out = args
    src = _SOURCE[0]
    rng = random.Random(plan.seed * 7919 + rank)
    head = dict(src.head)
    info = dict(head.get("distributedInfo") or {"backend": "nccl"})
    info.update(rank=rank, world_size=plan.ranks)
    head["distributedInfo"] = info
    head["baseTimeNanoseconds"] = int(head.get("baseTimeNanoseconds", 0)) + rng.randrange(0, 50_000_000)
    own = (
        orjson.dumps(head)[:-1]
        + b',"traceEvents":'
        + orjson.dumps(_rank_gpu(src.gpu, src.steps, rank, plan, waits))[:-1]
    )
    path = out / f"rank{rank}.trace.json.gz"
    with open(path, "wb") as f:
        f.write(gzip.compress(own, compresslevel=1))
        f.write(src.shared_gz)
    return len(own)


def _init(source: _Source) -> None:
    _SOURCE[:] = [source]


def synthesize(source: Path, out: Path, plan: Plan, jobs: int | None = None) -> list[Path]:
    """Write ``plan.ranks`` traces made from ``source`` into ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    doc = _load(source)
    waits = {
        "slow_gpu": _extra_compute(doc, plan.slow_gpu_factor) if plan.slow_gpu is not None else np.zeros(0)
    }
    split = _split(doc)
    del doc
    work = [(r, plan, waits, out) for r in range(plan.ranks)]
    if (jobs or os.cpu_count() or 1) > 1 and plan.ranks > 16:
        with ProcessPoolExecutor(jobs, initializer=_init, initargs=(split,)) as pool:
            list(pool.map(_write, work, chunksize=8))
    else:
        _init(split)
        for w in work:
            _write(w)
    return [out / f"rank{r}.trace.json.gz" for r in range(plan.ranks)]


def measure(job: Path, out: Path) -> dict[str, Any]:
    """``perfkit analyze`` on the job in a fresh process: wall time and the summed peak RSS of all
    its processes, sampled from /proc every 50 ms (RUSAGE_CHILDREN gives only the largest one)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "perfkit", "analyze", str(job), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0, peak = time.perf_counter(), 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    return {"rc": proc.returncode, "seconds": wall, "peak_mib": peak / 2**20, "stderr": stderr[-2000:]}


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every process below it."""
    kids: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            kids.setdefault(int(fields[1]), []).append(int(d.name))
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(kids.get(p, []))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT, help="a real Kineto trace with NCCL kernels")
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--straggler", type=int)
    ap.add_argument("--straggler-ms", type=float, default=20.0)
    ap.add_argument("--slow-gpu", type=int)
    ap.add_argument("--slow-gpu-factor", type=float, default=1.3)
    ap.add_argument("--slow-link", type=int)
    ap.add_argument("--slow-link-factor", type=float, default=1.6)
    ap.add_argument("--spread", type=float, default=0.0, help="how much the GPUs differ (sigma, e.g. 0.03)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", action="store_true", help="then time perfkit analyze on the job")
    a = ap.parse_args()
    plan = Plan(
        ranks=a.ranks,
        straggler=a.straggler,
        straggler_ms=a.straggler_ms,
        slow_gpu=a.slow_gpu,
        slow_gpu_factor=a.slow_gpu_factor,
        slow_link=a.slow_link,
        slow_link_factor=a.slow_link_factor,
        spread=a.spread,
        seed=a.seed,
    )
    for r in (a.straggler, a.slow_gpu, a.slow_link):
        if r is not None and not 0 <= r < a.ranks:
            sys.exit(f"rank {r} is not in 0..{a.ranks - 1}")
    t0 = time.perf_counter()
    paths = synthesize(a.source, a.out, plan)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} ranks to {a.out} ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    if a.scale:
        r = measure(a.out, a.out.parent / (a.out.name + "-analysis"))
        if r["rc"] != 0:
            sys.exit(f"perfkit analyze failed:\n{r['stderr']}")
        print(
            f"perfkit analyze, {a.ranks} ranks: {r['seconds']:.1f} s ({r['seconds'] / a.ranks * 1e3:.0f} ms a rank), "
            f"peak memory of all its processes {r['peak_mib']:.0f} MiB"
        )
        print(json.dumps({"ranks": a.ranks, **{k: r[k] for k in ("seconds", "peak_mib")}}))


if __name__ == "__main__":
    main()
