"""Collectors: one Probe per rank drives one collector per signal (``signals/``: steps, kernels,
comms, memory, io, nvml) and writes the rank's tables into the run directory.

Entry points: ``api`` (``perfkit.profile``, ``step``, ``phase``, ``attach``, ``describe``), ``inject``
and ``site/`` (unmodified scripts under ``perfkit profile``), ``options`` (every collector option,
its default and its environment variable). Installed as ``perfkit.collectors``; never imports the
analyzers or the reports.
"""
