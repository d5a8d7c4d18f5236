"""Analyzers: from a run directory, a trace or a folder of traces to typed metrics (``metrics``, the
schema of analysis.json) and ranked findings (``rules``, registered by family).

``analyze.analyze(path)`` is the front door; ``trace`` decodes Kineto traces, ``facts`` computes what
the rules share, ``runtables`` the per-rank tables' metrics. Torch-free and trainer-free: what an
analysis needs of a run is in its manifest. Installed as ``perfkit.analyzers``.
"""
