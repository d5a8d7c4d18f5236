"""Communication: collectives not hidden behind compute, too many of them, or a rank others wait for."""

from __future__ import annotations

from perfkit.analyzers.facts import TraceFacts
from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule


@rule("exposed_communication", reads="trace", min_exposed_share=0.10)
def exposed_communication(f: TraceFacts, t: Thresholds) -> Diagnosis | None:
    span, exposed = f.breakdown.get("span_ns", 0), f.exposed.get("exposed_ns", 0)
    if not span or exposed <= t["min_exposed_share"] * span:
        return None
    return Diagnosis(
        title="Communication not overlapped with compute",
        saving_ms=exposed / (f.gpu_steps * 1e6),
        estimate="communication kernel time with no compute kernel running beside it",
        evidence={
            "overlap_pct": round(f.exposed["overlap_pct"], 1),
            "exposed_pct_of_span": round(100 * exposed / span, 1),
        },
        remedy="overlap",
    )


@rule("small_ddp_buckets", reads="run", min_buckets=8, max_bucket_bytes=4 << 20, ideal_bucket_bytes=25 << 20)
def small_ddp_buckets(m: Metrics, t: Thresholds) -> Diagnosis | None:
    comm, steps = m.comms, m.steps
    if comm is None or steps is None:
        return None
    n, size = comm.ddp_buckets_per_step or 0, comm.ddp_bucket_bytes or 0
    if n <= t["min_buckets"] or size >= t["max_bucket_bytes"]:
        return None
    ideal = max(1, int(n * size / t["ideal_bucket_bytes"]) + 1)
    exposed_ms = comm.ddp_exposed_ms or 0.0
    # The queue of tiny all-reduces still running after backward ended is what the step waits for;
    # with ``ideal`` large buckets about ideal/n of it would remain (bench/calibration.py: predicted
    # against measured on 2 CPU ranks). Overlapped communication is not counted.
    return Diagnosis(
        title="Gradients all-reduced in many tiny buckets",
        saving_ms=exposed_ms * (1 - ideal / n),
        estimate="the bucket all-reduces still running after backward ended (exposed), less the "
        "share that 25 MB buckets would leave",
        evidence={
            "buckets_per_step": n,
            "bucket_kib": round(size / 1024, 1),
            "exposed_after_backward_ms": round(exposed_ms, 2),
            "ideal_buckets": ideal,
        },
        remedy="bucket_size",
    )


@rule("straggler", reads="run")
def straggler(m: Metrics, t: Thresholds) -> Diagnosis | None:
    st = m.stragglers
    if st is None or not st.slow:
        return None
    ranks = {r.rank: r for r in st.ranks}
    fastest = min(r.busy_ms for r in st.ranks)
    worst = max(st.slow, key=lambda k: ranks[k].busy_ms)
    return Diagnosis(
        title=f"Rank {worst} is a straggler: the others wait for it in every collective",
        saving_ms=ranks[worst].busy_ms - fastest,
        estimate="its busy time beyond the fastest rank's",
        evidence={
            "ranks": [
                {"rank": k, "busy_ms": round(ranks[k].busy_ms, 2), "score": round(ranks[k].score, 3)}
                for k in st.slow
            ],
            "fastest_busy_ms": round(fastest, 2),
        },
        remedy="straggler",
        ranks=list(st.slow),
    )
