"""hang: a watchdog thread that notices when this rank stops moving, and says where it is stuck.

Progress is a step ending or a collective being entered or completed. When neither happened for
``--hang-timeout`` seconds, the rank writes ``hang.json`` into its folder: the Python stack of
every thread (file, line, function), the collectives it is in (per process group: sequence
number, op, bytes, dtype, how long it has waited), the last one completed, and the time since its
last step. ``perfkit profile`` sees the records, stops the job and marks the run hung; the analysis
matches the ranks' records by (group, sequence).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from perfkit.collectors.base import Collector, register

from perfkit.files import write_json_atomic

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe


def thread_stacks() -> list[dict[str, Any]]:
    """Every thread's stack, innermost frame last."""
    names = {t.ident: (t.name, t is threading.main_thread(), t.daemon) for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        name, main, daemon = names.get(ident, (f"thread {ident}", False, True))
        if name == "perfkit-hang-watchdog":
            continue
        frames = [
            {"file": f.filename, "line": f.lineno, "function": f.name} for f in traceback.extract_stack(frame)
        ]
        out.append({"name": name, "main": main, "daemon": daemon, "frames": frames})
    return sorted(out, key=lambda t: not t["main"])


@register
class HangCollector(Collector):
    name = "hang"

    def available(self, probe: Probe) -> str | None:
        return "off (--hang-timeout 0)" if not probe.options.hang_timeout else None

    def start(self, probe: Probe) -> None:
        self._stop = threading.Event()
        self._written = False
        self._thread = threading.Thread(
            target=self._watch, args=(probe,), name="perfkit-hang-watchdog", daemon=True
        )
        self._thread.start()

    def _sign_of_life(self, probe: Probe) -> tuple[int, int, int]:
        from perfkit.collectors.collectives import _recorder

        rec = _recorder[0]
        entered, completed = rec.progress() if rec is not None else (0, 0)
        return probe.step, entered, completed

    def _watch(self, probe: Probe) -> None:
        timeout = probe.options.hang_timeout
        last, since = self._sign_of_life(probe), time.monotonic()
        last_step_at = time.time()
        while not self._stop.wait(min(1.0, timeout / 4)):
            now = self._sign_of_life(probe)
            if now != last:
                if now[0] != last[0]:
                    last_step_at = time.time()
                last, since = now, time.monotonic()
                self._written = False  # moving again: a later stall gets a record of its own
                continue
            if not self._written and time.monotonic() - since >= timeout:
                self._written = True
                try:
                    self._write(probe, time.monotonic() - since, time.time() - last_step_at)
                except Exception as e:  # never take the training down
                    probe.disable(self, f"hang record failed: {type(e).__name__}: {e}")
                    return

    def _write(self, probe: Probe, stalled_s: float, since_step_s: float) -> None:
        from perfkit.collectors.collectives import _recorder

        rec = _recorder[0]
        record = {
            "rank": probe.rank,
            "world_size": probe.world_size,
            "time": time.time(),
            "stalled_s": round(stalled_s, 3),
            "step": probe.step,
            "since_step_s": round(since_step_s, 3),
            "collectives": rec.state() if rec is not None else None,
            "threads": thread_stacks(),
        }
        write_json_atomic(probe.layout.hang_record(probe.rank), record)

    def stop(self, probe: Probe) -> None:
        self._stop.set()
