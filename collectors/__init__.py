"""Collectors: one module per signal (steps, kernels, comms, memory, io, nvml), one Probe per rank.

Not built yet: see the collectors issue. Installed as ``perfkit.collectors``.
"""
