"""Imports every collector module so each registers itself by name."""

from perfkit.collectors import comms, io, kernels, memory, nvml, steps

__all__ = ["comms", "io", "kernels", "memory", "nvml", "steps"]
