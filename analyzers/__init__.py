"""Analyzers: stateless functions from a loaded run's tables to metrics and findings.

Not built yet: see the analyzers issue. Installed as ``perfkit.analyzers``.
"""
