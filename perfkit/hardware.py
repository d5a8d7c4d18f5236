"""What is known of GPU models, by name: peak dense bf16/fp16 tensor FLOP/s and NVLink bandwidth.

From the vendors' data sheets (SXM parts, dense, no sparsity). A measured ceiling is better where
one exists: the H100 fixture measured 779 TFLOP/s on a bf16 8192³ matmul against the 989 listed.
"""

from __future__ import annotations

# name fragment -> (peak bf16 TFLOP/s, NVLink GB/s per GPU, both directions)
GPUS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 900.0),
    "H100": (989.0, 900.0),
    "A100": (312.0, 600.0),
    "L40S": (362.0, 0.0),
    "A10": (125.0, 0.0),
    "V100": (125.0, 300.0),
}


def _lookup(name: str) -> tuple[float, float] | None:
    for key, value in GPUS.items():
        if key in name:
            return value
    return None


def gpu_peak_tflops(name: str) -> float | None:
    found = _lookup(name)
    return found[0] if found else None


def nvlink_gbps(name: str) -> float | None:
    found = _lookup(name)
    return found[1] if found and found[1] else None


def mfu(
    flops_per_token: float, tokens_per_s: float, peak_tflops_per_gpu: float | None, gpus: int
) -> float | None:
    """Model FLOPs utilization of a job: its model FLOP/s over the peak of all its GPUs, so a
    figure per GPU whatever the world size (as Megatron and nanoGPT report it). One formula for the
    trainer's log and the analysis: they had differed by the number of GPUs."""
    if not peak_tflops_per_gpu or gpus < 1:
        return None
    return flops_per_token * tokens_per_s / (peak_tflops_per_gpu * 1e12 * gpus)
