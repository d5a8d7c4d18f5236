"""Plain-data inputs for the analyzers' tests: Kineto traces, allocator snapshots and metrics that
make a rule fire (or not), where no real capture exists."""

from __future__ import annotations

from typing import Any


def step_loop_trace(sleep_ms: float, sync: bool = True) -> dict[str, Any]:
    """A Kineto trace as plain data of a 5-step GPU loop whose batches are built by user code: each
    step ends with ``.item()`` (a sync), then the CPU runs ``sleep_ms`` of Python outside any profiled
    op, makes the batch (``aten::randint``), copies it to the device and launches 10 ms of kernels."""
    events, t, corr = [], 1_000.0, 1  # microseconds

    def x(cat, name, ts, dur, **args):  # noqa: E306
        events.append(
            {
                "ph": "X",
                "cat": cat,
                "name": name,
                "pid": 1 if cat not in ("kernel", "gpu_memcpy") else 0,
                "tid": 1 if cat not in ("kernel", "gpu_memcpy") else 7,
                "ts": ts,
                "dur": dur,
                "args": args,
            }
        )

    for step in range(5):
        step_start = t
        t += sleep_ms * 1e3  # Python outside any op: no event
        x("cpu_op", "aten::randint", t, 200)
        t += 200
        x("cpu_op", "aten::to", t, 60)
        x("cuda_runtime", "cudaMemcpyAsync", t + 5, 40, correlation=corr)
        x("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", t + 50, 100, correlation=corr, stream=7)
        corr += 1
        t += 60
        gpu_t = t + 100
        for _k in range(10):  # 10 kernels of 1 ms, launched 10 us apart
            x("cuda_runtime", "cudaLaunchKernel", t, 8, correlation=corr)
            x("kernel", "ampere_sgemm_128x64_nn", max(gpu_t, t + 20), 1_000, correlation=corr, stream=7)
            gpu_t = max(gpu_t, t + 20) + 1_000
            corr += 1
            t += 10
        if sync:
            x("cpu_op", "aten::item", t, gpu_t - t + 30)
            x("cuda_runtime", "cudaStreamSynchronize", t + 5, gpu_t - t + 20)
        t = gpu_t + 40
        x("user_annotation", f"ProfilerStep#{step}", step_start, t - step_start)
    return {"traceEvents": events, "deviceProperties": [{"name": "NVIDIA H100 80GB HBM3"}]}


def snapshot(
    *, split: int, flushes: int, expandable: bool = False, empty_cache: bool = False
) -> dict[str, Any]:
    """A CUDA allocator snapshot as plain data: one 4 GiB segment with a live block and ``split``
    bytes of free blocks inside it; a history with ``flushes`` segment frees."""
    gib = 2**30
    frames = [{"name": "forward", "filename": "train.py", "line": 42}]
    blocks = [
        {
            "address": 1,
            "size": 4 * gib - split,
            "requested_size": 4 * gib - split,
            "state": "active_allocated",
            "frames": frames,
        },
        {"address": 2, "size": split, "requested_size": 0, "state": "inactive", "frames": []},
    ]
    free_frames = (
        [{"name": "empty_cache", "filename": "torch/cuda/memory.py", "line": 1}] if empty_cache else []
    )
    history = [{"action": "segment_alloc", "addr": 0, "size": 4 * gib, "frames": frames}]
    history += [
        {"action": "segment_free", "addr": 9, "size": gib, "frames": free_frames} for _ in range(flushes)
    ]
    return {
        "segments": [{"address": 0, "total_size": 4 * gib, "is_expandable": expandable, "blocks": blocks}],
        "device_traces": [history],
        "allocator_settings": {"expandable_segments": expandable},
    }
