"""Communication: collectives not hidden behind compute, too many of them, or a rank others wait for."""

from __future__ import annotations

import statistics

from perfkit.analyzers.comms import pipeline_fill
from perfkit.analyzers.facts import TraceFacts
from perfkit.analyzers.metrics import Metrics
from perfkit.analyzers.rules import Diagnosis, Thresholds, rule
from perfkit.collectors.signals.gc import GcMetrics


@rule("exposed_communication", remedy="overlap", reads="trace", min_exposed_share=0.10)
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
    )


@rule(
    "small_ddp_buckets",
    remedy="bucket_size",
    reads="run",
    min_buckets=8,
    max_bucket_bytes=4 << 20,
    ideal_bucket_bytes=25 << 20,
)
def small_ddp_buckets(m: Metrics, t: Thresholds) -> Diagnosis | None:
    comm, steps = m.comms, m.steps
    if comm is None or steps is None:
        return None
    n, size = comm.ddp_buckets_per_step or 0, comm.ddp_bucket_bytes or 0
    if n <= t["min_buckets"] or size >= t["max_bucket_bytes"]:
        return None
    ideal = max(1, int(n * size / t["ideal_bucket_bytes"]) + 1)
    cap = m.config.get("overlap", {}).get("bucket_cap_mb")
    # The queue of tiny all-reduces still running after backward ended is what the step waits for;
    # with ``ideal`` large buckets about ideal/n of it would remain (bench/calibration.py: predicted
    # against measured on 2 CPU ranks). Overlapped communication is not counted. On NCCL the ends
    # are unknown (a call returns once queued): the buckets' GPU time, of which backward may hide a
    # part, bounds the saving from above.
    if comm.ddp_exposed_ms is not None or comm.ddp_gpu_ms is None:
        basis_ms = comm.ddp_exposed_ms or 0.0
        estimate = "the bucket all-reduces still running after backward ended (exposed), less the share that 25 MB buckets would leave"
        measured = {"exposed_after_backward_ms": round(basis_ms, 2)}
    else:
        basis_ms = comm.ddp_gpu_ms
        estimate = "the bucket all-reduces' GPU time a step, less the share that 25 MB buckets would leave: at most, since backward may hide part of it"
        measured = {"bucket_gpu_ms_per_step": round(basis_ms, 2)}
    return Diagnosis(
        title="Gradients all-reduced in many tiny buckets",
        saving_ms=basis_ms * (1 - ideal / n),
        estimate=estimate,
        evidence={
            "buckets_per_step": n,
            "bucket_kib": round(size / 1024, 1),
            **measured,
            "ideal_buckets": ideal,
            **({"bucket_cap_mb": cap} if cap is not None else {}),
            "told_by": "the DDP all-reduces perfkit recorded (their count and size a step)"
            + (", and the run's config (overlap.bucket_cap_mb)" if cap is not None else ""),
        },
    )


@rule("pipeline_bubble", remedy="pipeline_microbatches", reads="run", min_bubble_share=0.10)
def pipeline_bubble(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """Every pipeline rank idles while the pipeline fills and drains: (pp - 1) / v microbatch slots of
    m + (pp - 1) / v. More microbatches (or two stages a rank) shrink that share. Told by the run's
    configuration (pp, microbatches, schedule); the saving scales the measured forward + backward,
    less what each microbatch more costs where the trainer measured it (``perfkit.trainer.costs``:
    its schedule's machinery and sends a stage, its ops' dispatch a block and the ends, and under
    GPipe a receive more posted late, ``gpipe_late_receives``): on 2 CPU
    ranks at tiny-cpu 2.3 ms a microbatch, so 8 microbatches in place of 2 cost 14 ms more than the
    5 the bubble gave back (measured 42 ms a step against 28), and no finding is made."""
    par = m.config.get("parallel", {})
    pp = int(par.get("pp") or 1)
    if pp <= 1 or m.steps is None:
        return None
    v = 2 if par.get("pp_schedule") == "interleaved-1f1b" else 1
    mb = int(par.get("microbatches") or pp * v)
    fill = pipeline_fill(pp, mb, v)
    share = 1 - 1 / fill
    if share < t["min_bubble_share"]:
        return None
    compute_ms = m.steps.step_time_ms * (
        m.steps.phase_share.get("forward", 0.0) + m.steps.phase_share.get("backward", 0.0)
    )
    better = pipeline_fill(pp, 4 * mb, v)  # the largest change the remedy tries
    saving = compute_ms * (1 - better / fill)
    estimate = (
        f"forward + backward × (1 - fill with {4 * mb} microbatches / fill with {mb}); "
        "assumes a microbatch's time scales with its size"
    )
    costs = m.model.get("layout_costs") or {}
    per_stage, dispatch = costs.get("pipeline_microbatch_s"), costs.get("chunk_overhead_s")
    measured: dict[str, float] = {}
    if isinstance(per_stage, int | float):
        blocks = int(m.config.get("model", {}).get("n_layers") or pp) // pp
        # a stage's schedule a microbatch, each of the rank's stages; half a measured chunk a unit
        # (a block, the ends) a microbatch, as the layout model charges it
        extra_ms = 1e3 * (per_stage * v + (dispatch or 0.0) / 2 * (blocks + 1))
        late, copy = costs.get("pipeline_gpipe_extra_s"), costs.get("pipeline_gpipe_microbatches")
        if (
            par.get("pp_schedule") == "gpipe"
            and isinstance(late, int | float)
            and isinstance(copy, int | float)
        ):
            extra_ms += 1e3 * late / max(1.0, copy - 1)  # a receive more posted late
        saving -= extra_ms * 3 * mb
        estimate += f", less {extra_ms:.2f} ms each microbatch more costs (measured after the run's steps)"
        measured["extra_ms_per_microbatch"] = round(extra_ms, 3)
        if saving <= 0:  # more microbatches would cost more than the bubble gives back
            return None
    return Diagnosis(
        title="Pipeline ranks idle while the pipeline fills and drains",
        saving_ms=saving,
        estimate=estimate,
        evidence={
            "pp": pp,
            "microbatches": mb,
            "pp_schedule": par.get("pp_schedule", "1f1b"),
            "bubble_pct": round(100 * share, 1),
            **measured,
            "told_by": "the run's config (parallel.pp, parallel.microbatches, parallel.pp_schedule)"
            + (" and what the trainer measured a microbatch costs" if measured else ""),
        },
    )


@rule("gpipe_late_receives", remedy="pipeline_1f1b", reads="run", min_saving_ms=0.5)
def gpipe_late_receives(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """A GPipe pipeline whose copy, measured after the run's steps, took longer under GPipe than
    under 1F1B (``perfkit.trainer.costs.pipeline_costs``: a block a rank over every rank, the same
    microbatches under each). GPipe's first stage runs ahead with its sends unwaited, so each
    forward's receive is posted after its send while the sender computes, and on gloo that post
    blocks (2 CPU cores: 0.1 ms most times, 2-6 ms one time in three); 1F1B waits on each batch
    first. Tiny-cpu's pp2 with 8 microbatches took 42.4 ms a step under GPipe, 37.7 under 1F1B.
    The saving is the copy's excess a microbatch, at its count, times this run's microbatches but
    the first. No finding without the measurement, or where the copy measured none."""
    par = m.config.get("parallel", {})
    pp = int(par.get("pp") or 1)
    costs = m.model.get("layout_costs") or {}
    extra, copy = costs.get("pipeline_gpipe_extra_s"), costs.get("pipeline_gpipe_microbatches")
    if pp <= 1 or par.get("pp_schedule") != "gpipe" or not isinstance(extra, int | float) or extra <= 0:
        return None
    if (
        not isinstance(copy, int | float) or copy < 2
    ):  # the copy's microbatches: each forward but the first late
        return None
    copy = int(copy)
    mb = int(par.get("microbatches") or pp)
    saving = 1e3 * extra * (mb - 1) / (copy - 1)
    if saving < t["min_saving_ms"]:
        return None
    return Diagnosis(
        title="GPipe's receives wait for their busy senders: 1F1B's would not",
        saving_ms=saving,
        estimate=f"GPipe's step over 1F1B's on a one-block copy with {copy} microbatches, "
        f"a microbatch's share of it times this run's {mb} less the first",
        evidence={
            "pp": pp,
            "microbatches": mb,
            "copy_gpipe_over_1f1b_ms": round(1e3 * extra, 3),
            "copy_microbatches": copy,
            "told_by": "the run's config (parallel.pp_schedule) and the pipelined copy the trainer "
            "measured under both schedules after its steps",
        },
    )


@rule("straggler", remedy="straggler", reads="run")
def straggler(m: Metrics, t: Thresholds) -> Diagnosis | None:
    st = m.stragglers
    if st is None or not st.slow:
        return None
    ranks = {r.rank: r for r in st.ranks}
    worst = max(st.slow, key=lambda k: ranks[k].busy_ms)
    fastest = st.fastest_peer_ms(worst)  # of its pipeline stage, in a pipeline
    # Python's collector pausing the rank is a cause the gc rule names: said here with its share
    gc = m.signals.get("gc")
    paused = {r.rank: r.pause_ms_per_step for r in gc.ranks} if isinstance(gc, GcMetrics) else {}
    extra = ranks[worst].busy_ms - fastest
    because = (
        f"; {paused[worst]:.0f} ms of its {extra:.0f} ms extra a step is Python's garbage collector (gc_pauses)"
        if paused.get(worst, 0.0) >= 0.25 * extra > 0
        else ""
    )
    return Diagnosis(
        title=f"Rank {worst} is a straggler: the others wait for it in every collective{because}",
        saving_ms=ranks[worst].busy_ms - fastest,
        estimate="its busy time beyond the fastest rank's" + (" of its pipeline stage" if st.stages else ""),
        evidence={
            "ranks": [
                {
                    "rank": k,
                    "busy_ms": round(ranks[k].busy_ms, 2),
                    "score": round(ranks[k].score, 3),
                    "busiest_in_share_of_steps": round(ranks[k].slowest_share or 0.0, 2),
                    "extra_ms": round(ranks[k].extra_ms or 0.0, 2),
                    **(
                        {"runq_wait_ms": round(ranks[k].runq_wait_ms or 0.0, 2)}
                        if ranks[k].runq_wait_ms
                        else {}
                    ),
                    **({"gc_pause_ms": round(paused[k], 2)} if paused.get(k) else {}),
                }
                for k in st.slow
            ],
            "fastest_busy_ms": round(fastest, 2),
            # how busy the host was: a straggler named on a loaded host is read with that in mind
            **({"host_busy_share": round(st.host_busy, 2)} if st.host_busy is not None else {}),
        },
        ranks=list(st.slow),
    )


@rule("late_rank", remedy="straggler", reads="run", needs_steps=False)
def late_rank(m: Metrics, t: Thresholds) -> Diagnosis | None:
    sp = m.rank_spread
    if sp is None or not sp.late:
        return None
    ranks = {r.rank: r for r in sp.ranks}
    worst = max(sp.late, key=lambda k: ranks[k].peer_comm_ms - ranks[k].comm_ms)
    return Diagnosis(
        title=f"The other ranks wait for rank {worst} in their collectives (its GPU computes as fast; "
        "it starts late)",
        saving_ms=ranks[worst].peer_comm_ms - ranks[worst].comm_ms,
        estimate="how much longer its peers' communication kernels run than its own (median): the wait",
        evidence={
            "ranks": [
                {
                    "rank": k,
                    "comm_ms": round(ranks[k].comm_ms, 2),
                    "peers_median_comm_ms": round(ranks[k].peer_comm_ms, 2),
                    "idle_ms": round(ranks[k].idle_ms, 2),
                }
                for k in sp.late
            ],
            "median_idle_ms": round(statistics.median(r.idle_ms for r in sp.ranks), 2),
        },
        ranks=list(sp.late),
    )


@rule("slow_link", remedy="slow_link", reads="run", needs_steps=False)
def slow_link(m: Metrics, t: Thresholds) -> Diagnosis | None:
    sp = m.rank_spread
    if sp is None or not sp.slow_groups:
        return None
    worst = sp.slow_groups[0]
    saving = max((g.call_ms - g.typical_ms) * g.calls_per_step for g in sp.slow_groups)
    where = (
        f"rank {', '.join(map(str, sp.slow_link))}, the one rank they share"
        if sp.slow_link
        else f"group {worst.name}"
    )
    return Diagnosis(
        title=f"Collectives of {len(sp.slow_groups)} process group(s) run "
        f"{worst.call_ms / worst.typical_ms:.1f}x slower than their peers: a slow link at {where}",
        saving_ms=saving,
        estimate="the slowest group's collectives at the typical group's time per call",
        evidence={
            "groups": [
                {
                    "group": g.name,
                    "ranks": g.ranks,
                    "call_ms": round(g.call_ms, 3),
                    "typical_ms": round(g.typical_ms, 3),
                }
                for g in sp.slow_groups[:8]
            ],
            "shared_ranks": sp.slow_link,
        },
        ranks=sp.slow_link or sorted({r for g in sp.slow_groups for r in g.ranks or []}),
    )


@rule(
    "small_blocking_collectives",
    remedy="fewer_small_collectives",
    reads="run",
    max_bytes=64 << 10,
    min_share=0.03,
)
def small_blocking_collectives(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """Small collectives the host blocks in every step, outside the gradient reduction: a framework's
    logging gathers, a loss or token-count all-reduce. Each one holds every rank until the last
    arrives; their time is the step's."""
    if m.comms is None or m.steps is None:
        return None
    small = [c for c in m.comms.callers if c["blocking"] and c["bytes"] <= t["max_bytes"]]
    blocked = sum(c["ms_per_step"] for c in small)
    if not small or blocked < t["min_share"] * m.steps.step_time_ms:
        return None
    transfer = sum(c["transfer_ms_per_step"] for c in small)
    return Diagnosis(
        title=f"{sum(c['calls_per_step'] for c in small):.0f} small blocking collective(s) a step outside the "
        f"gradient reduction hold the host {blocked:.1f} ms a step",
        # Without the calls, a rank ahead of the others no longer waits for them there; it may still
        # wait at the next collective (the gradient all-reduce). The saving counts the transfer
        # (from the last rank's arrival) and half the wait.
        saving_ms=transfer + 0.5 * (blocked - transfer),
        estimate="the calls' transfer time and half their wait for the last rank (the rest may move to "
        "the next collective)",
        evidence={
            "blocked_ms_per_step": round(blocked, 2),
            "transfer_ms_per_step": round(transfer, 2),
            "callers": [
                {
                    "caller": c["caller"],
                    "op": c["op"],
                    "calls_per_step": round(c["calls_per_step"], 2),
                    "bytes": int(c["bytes"]),
                    "ms_per_step": round(c["ms_per_step"], 2),
                }
                for c in small
            ],
            "told_by": "the collectives perfkit recorded, by the caller that made them",
        },
    )


@rule("ddp_find_unused_parameters", remedy="no_find_unused_parameters", reads="run", needs_steps=False)
def ddp_find_unused_parameters(m: Metrics, t: Thresholds) -> Diagnosis | None:
    """DDP built with find_unused_parameters=True walks the autograd graph after every forward, and
    every parameter was used: the walk finds nothing."""
    ddp = m.model.get("ddp") if isinstance(m.model, dict) else None
    if not isinstance(ddp, dict) or not ddp.get("find_unused_parameters") or ddp.get("static_graph"):
        return None
    if ddp.get("unused_parameters") not in (0, None):
        return None  # some are unused: the flag is needed (static_graph=True is the other way)
    search_ms = float(ddp.get("unused_search_ms") or 0.0)
    steps = m.steps.steps if m.steps is not None else 0
    forwards = (ddp.get("unused_search_calls") or 0) / steps if steps else 1.0
    return Diagnosis(
        title="DDP searches the autograd graph for unused parameters every forward, and finds none",
        saving_ms=search_ms * max(1.0, forwards),
        estimate="the time DDP's graph search took after each forward (timed by perfkit), times the "
        "forwards a step",
        evidence={
            "find_unused_parameters": True,
            "unused_parameters": ddp.get("unused_parameters"),
            "parameters": ddp.get("parameters"),
            "search_ms_per_forward": round(search_ms, 3),
            "told_by": "the DDP constructor's flags and a walk of the first forwards' autograd graph",
        },
    )
