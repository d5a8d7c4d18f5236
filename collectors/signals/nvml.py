"""nvml: a background sampler of the rank's GPU: utilization, clocks, memory, power, temperature,
PCIe throughput. Timestamps are wall-clock ns, the clock of every other collector.

Disabled (and recorded so in the manifest) where NVML or a GPU is missing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from perfkit.collectors.base import Collector, register

from perfkit.tables import NVML

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe

CSV_COLUMNS = (
    "t_ns",
    "gpu_util",
    "mem_util",
    "mem_used_mb",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "power_w",
    "temp_c",
)


def sample(nvml: Any, handle: Any, gpu: int) -> dict[str, Any]:
    """One sample of every counter; a counter the GPU does not offer is left out."""
    row: dict[str, Any] = {"t_ns": time.time_ns(), "gpu": gpu}
    util = nvml.nvmlDeviceGetUtilizationRates(handle)
    row["gpu_util"], row["mem_util"] = float(util.gpu), float(util.memory)
    row["mem_used_mb"] = nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    row["sm_clock_mhz"] = float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
    row["mem_clock_mhz"] = float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM))
    row["power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
    row["temp_c"] = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
    for key, counter in (
        ("pcie_tx_kbs", "NVML_PCIE_UTIL_TX_BYTES"),
        ("pcie_rx_kbs", "NVML_PCIE_UTIL_RX_BYTES"),
    ):
        try:
            row[key] = float(nvml.nvmlDeviceGetPcieThroughput(handle, getattr(nvml, counter)))
        except Exception:  # not offered on this GPU
            pass
    return row


def read_samples(path: Path) -> pd.DataFrame:
    """NVML samples from our ``nvml.jsonl`` or from a CSV with the fixture's columns."""
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        missing = [c for c in CSV_COLUMNS if c not in frame.columns]
        if missing:
            from perfkit.errors import RunDirError

            raise RunDirError(f"{path}: NVML CSV lacks columns {', '.join(missing)}")
        if "gpu" not in frame.columns:
            frame.insert(1, "gpu", 0)
        return frame.astype({"t_ns": "int64"})
    from perfkit.tables import read_table

    frame, _ = read_table(path, NVML)
    return frame


@register
class NvmlCollector(Collector):
    name = "nvml"
    tables = (NVML,)

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._nvml: Any = None
        self._handle: Any = None
        self._gpu = 0

    def available(self, probe: Probe) -> str | None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:
            return f"NVML unavailable ({type(e).__name__}: {e}); no NVIDIA driver or GPU here"
        import torch

        if pynvml.nvmlDeviceGetCount() == 0:
            return "NVML found no GPU"
        self._nvml = pynvml
        self._gpu = probe.local_rank if torch.cuda.is_available() else 0
        uuid = None
        if torch.cuda.is_available() and probe.local_rank < torch.cuda.device_count():
            uuid = getattr(torch.cuda.get_device_properties(probe.local_rank), "uuid", None)
        try:  # under CUDA_VISIBLE_DEVICES, CUDA's index is not NVML's: match by UUID
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid else None
        except Exception:
            self._handle = None
        if self._handle is None:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(min(self._gpu, pynvml.nvmlDeviceGetCount() - 1))
        return None

    def start(self, probe: Probe) -> None:
        writer = probe.writer(NVML)
        period = 1.0 / max(0.1, probe.options.nvml_hz)
        sample(self._nvml, self._handle, self._gpu)  # fail here, in start, rather than in the thread

        def loop() -> None:
            flush_at = time.monotonic() + 1.0
            while not self._stop.wait(period):
                try:
                    writer.add(sample(self._nvml, self._handle, self._gpu))
                    if time.monotonic() >= flush_at:  # also flushed at every step end
                        writer.flush()
                        flush_at = time.monotonic() + 1.0
                except Exception as e:
                    probe.disable(self, f"sampling failed: {type(e).__name__}: {e}")
                    return

        self._thread = threading.Thread(target=loop, name="perfkit-nvml", daemon=True)
        self._thread.start()

    def stop(self, probe: Probe) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
