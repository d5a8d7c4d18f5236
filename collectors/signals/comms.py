"""comms: every collective and point-to-point op a rank issues, on every step (op, group, bytes,
start and end, the caller, whether the host blocked), recorded by the hooks in
``perfkit.collectors.collectives``, which import torch only when a rank starts this collector."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from perfkit.collectors.base import Collector, register

from perfkit.tables import COMMS

if TYPE_CHECKING:
    from perfkit.collectors.probe import Probe


@register
class CommsCollector(Collector):
    name = "comms"
    tables = (COMMS,)

    def start(self, probe: Probe) -> None:
        from perfkit.collectors import collectives as c

        c.patch_all()
        c._recorder[0] = c._Recorder(probe, self)

    def step_end(self, probe: Probe, step: int) -> None:
        from perfkit.collectors.collectives import _recorder

        rec = _recorder[0]
        if rec is not None and rec.on_gpu:
            rec.resolve_gpu()

    def state(self) -> dict[str, Any]:
        """The collectives this rank is in and has completed (probe.json, at every write): what a rank
        that crashed or was stopped was waiting on."""
        from perfkit.collectors.collectives import _recorder

        rec = _recorder[0]
        return {"collectives": dict(rec.state())} if rec is not None else {}

    def stop(self, probe: Probe) -> None:
        from perfkit.collectors.collectives import _recorder, ddp_summary

        rec = _recorder[0]
        if rec is not None:
            rec.resolve_gpu(force=True)
        _recorder[0] = None
        found = ddp_summary()
        if found and isinstance(probe.description.get("ddp"), dict):
            probe.describe(ddp={**probe.description["ddp"], **found})
