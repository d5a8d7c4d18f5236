"""GPU kernel categories and tensor-core use, by kernel name (CUDA, ROCm and Triton names)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from perfkit.analyzers.trace import Trace, by_name

# First match wins; order matters (flash attention kernels are cutlass kernels too).
_CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("communication", re.compile(r"^(nccl|rccl|gloo)|ncclDevKernel|ncclKernel", re.I)),
    ("memory", re.compile(r"memcpy|memset|CatArrayBatchedCopy", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|_attn|mha_", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor_apply|sgd_|lamb_", re.I)),
    ("normalization", re.compile(r"layer_?norm|rms_?norm|batch_?norm|group_?norm|bn_(fw|bw)|welford", re.I)),
    (
        "gemm",
        re.compile(
            r"(?<!fb)gemm(?!_gpu)|cutlass|cublas|xmma|nvjet|wgmma|matmul|triton_tem_|_mm_|gemv|tensorop|Cijk_",
            re.I,
        ),
    ),
    ("softmax", re.compile(r"softmax", re.I)),
    ("reduction", re.compile(r"reduce|triton_(per|red)_|norm_kernel", re.I)),
    (
        "elementwise",
        re.compile(r"elementwise|vectorized|unrolled|triton_poi_|fill|copy|index|where|cast", re.I),
    ),
]
# cuBLAS/CUTLASS names of FP32 SIMT GEMMs (no tensor cores): sgemm, gemmSN, f32 gemv, *_f32f32_*.
_FP32_GEMM = re.compile(r"sgemm|gemmSN|gemv2?T?_kernel.*float|f32f32_f32|_s\d+x\d+_?(?!.*tf32)", re.I)
_TENSOR_CORE = re.compile(
    r"h\d{3,5}|s1688|s16816|bf16|f16|fp16|half|tf32|tensorop|xmma|wgmma|nvjet|hmma|triton_tem_", re.I
)


def category(name: str) -> str:
    for cat, pattern in _CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


def gemm_precision(name: str) -> str:
    """tensor-core (bf16/fp16/tf32) or fp32 (SIMT) for a GEMM kernel name."""
    if _TENSOR_CORE.search(name) and "sgemm" not in name.lower():
        return "tensor-core"
    if _FP32_GEMM.search(name):
        return "fp32"
    return "tensor-core" if "gemm" not in name.lower() else "fp32"


def classify(gpu: pd.DataFrame) -> pd.DataFrame:
    """Adds ``category`` and, for GEMMs, ``precision`` to GPU events (computed once per distinct name)."""
    cats = by_name(gpu["name"], category)
    memory = gpu["cat"].isin(("gpu_memcpy", "gpu_memset")).to_numpy()
    cats = np.where(memory, "memory", cats)
    precision = by_name(gpu["name"], gemm_precision)
    precision[cats != "gemm"] = None
    return gpu.assign(category=cats, precision=precision)


def kernel_table(trace: Trace, top: int = 15) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-category totals, top kernels by total time) for one rank."""
    gpu = trace.gpu
    if gpu.empty:
        empty = pd.DataFrame(columns=["category", "time_ns", "count", "share"])
        return empty, pd.DataFrame(
            columns=["name", "category", "precision", "count", "time_ns", "mean_ns", "share"]
        )
    total = gpu["dur"].sum()
    by_cat = gpu.groupby("category", observed=True)["dur"].agg(time_ns="sum", count="size").reset_index()
    by_cat["share"] = by_cat["time_ns"] / total
    per_name = (
        gpu.groupby("name", observed=True)
        .agg(
            category=("category", "first"),
            precision=("precision", "first"),
            count=("dur", "size"),
            time_ns=("dur", "sum"),
        )
        .reset_index()
    )
    per_name["name"] = per_name["name"].astype(str)
    per_name["mean_ns"] = per_name["time_ns"] / per_name["count"]
    per_name["share"] = per_name["time_ns"] / total
    return (
        by_cat.sort_values("time_ns", ascending=False, ignore_index=True),
        per_name.sort_values("time_ns", ascending=False, ignore_index=True).head(top),
    )
