"""nvml: a background sampler of the rank's GPU: utilization, clocks, memory, power, temperature,
PCIe throughput. Timestamps are wall-clock ns, the clock of every other collector.

Disabled (and recorded so in the manifest) where NVML or a GPU is missing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

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


def _health(nvml: Any, handle: Any, events: Any) -> dict[str, Any]:
    """The health counters of ``NVML``'s table, those the GPU and driver offer."""
    row: dict[str, Any] = {}
    probes = {
        "throttle_reasons": lambda: int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)),
        "ecc_uncorrected": lambda: int(
            nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
            )
        ),
        "pcie_replay": lambda: int(nvml.nvmlDeviceGetPcieReplayCounter(handle)),
    }
    for key, read in probes.items():
        try:
            row[key] = read()
        except Exception:  # not offered here (no ECC on this GPU, an old driver)
            pass
    replays = 0
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            replays += int(
                nvml.nvmlDeviceGetNvLinkErrorCounter(handle, link, nvml.NVML_NVLINK_ERROR_DL_REPLAY)
            )
        except Exception:
            continue
        row["nvlink_replay"] = replays
    if events is not None:
        try:
            data = nvml.nvmlEventSetWait_v2(events, 0)
            row["xid"] = int(data.eventData)
        except Exception:  # NVML_ERROR_TIMEOUT: no event since the sample before
            row["xid"] = 0
    return row


def xid_events(nvml: Any, handle: Any) -> Any:
    """An NVML event set for the GPU's XID errors, or None where the driver does not offer one."""
    try:
        events = nvml.nvmlEventSetCreate()
        nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
        return events
    except Exception:
        return None


def sample(nvml: Any, handle: Any, gpu: int, events: Any = None) -> dict[str, Any]:
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
    row.update(_health(nvml, handle, events))
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


# NVML's clocks-event reasons that mean the GPU was slowed against the work's wish (nvml.h).
THROTTLES = {
    0x4: "software power cap",
    0x8: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
}


def gpu_health(
    rows: Iterable[dict[str, Any]], before: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """GPU health events in NVML samples of one GPU (in time order): what slowed or broke it, each
    once, with the first sample's time. ``before``: the counters of the previous call's last sample
    (updated in place), so a counter that grew between calls counts."""
    before = before if before is not None else {}
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        reasons = int(row.get("throttle_reasons") or 0)
        for bit, what in THROTTLES.items():
            if reasons & bit and what not in found:
                found[what] = {
                    "event": what,
                    "t_ns": row.get("t_ns"),
                    "detail": f"clocks-event reasons 0x{reasons:x}",
                }
        xid = row.get("xid")
        if xid:
            found.setdefault(
                f"xid {xid}",
                {"event": f"XID {xid} error", "t_ns": row.get("t_ns"), "detail": "driver-reported GPU error"},
            )
        for counter, what in (
            ("ecc_uncorrected", "uncorrectable ECC errors"),
            ("nvlink_replay", "NVLink replays"),
            ("pcie_replay", "PCIe replays"),
        ):
            value = row.get(counter)
            if value is None:
                continue
            prior = before.get(counter)
            if prior is not None and value > prior and what not in found:
                found[what] = {"event": what, "t_ns": row.get("t_ns"), "detail": f"{prior:g} -> {value:g}"}
            before[counter] = value
    return list(found.values())


@dataclass(kw_only=True)
class NvmlHealth:
    events: list[dict[str, Any]] = field(default_factory=list)
    """Each GPU health event once per rank and GPU: ``rank``, ``gpu``, ``event``, ``detail``, ``t_ns``
    of its first sample, ``samples`` (how many samples showed it)."""
    samples: int = 0


@register
class NvmlCollector(Collector):
    name = "nvml"
    tables = (NVML,)

    @classmethod
    def fold(cls, frames: Mapping[str, pd.DataFrame], steps: pd.DataFrame) -> NvmlHealth | None:
        rows = frames.get("nvml")
        if rows is None or rows.empty:
            return None
        out = NvmlHealth(samples=len(rows))
        for (rank, gpu), g in rows.sort_values("t_ns").groupby(["rank", "gpu"]):
            records = [{str(k): v for k, v in row.items()} for row in g.to_dict("records")]
            for event in gpu_health(records):
                reasons = g["throttle_reasons"].fillna(0).astype(int) if "throttle_reasons" in g else None
                bit = next((b for b, w in THROTTLES.items() if w == event["event"]), None)
                seen = int(((reasons & bit) != 0).sum()) if bit is not None and reasons is not None else 1
                out.events.append(
                    {"rank": int(cast(Any, rank)), "gpu": int(cast(Any, gpu)), **event, "samples": seen}
                )
        return out

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
        events = xid_events(self._nvml, self._handle)

        def loop() -> None:
            flush_at = time.monotonic() + 1.0
            while not self._stop.wait(period):
                try:
                    writer.add(sample(self._nvml, self._handle, self._gpu, events))
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
