"""The optimizer: configurations measured side by side (``trials``), ``sweep`` over parallel layouts,
and ``optimize`` (a run's findings turned into trials, each applying the trainer change of the
finding's remedy in ``perfkit.analyzers.remedies``).

Importing this package imports nothing else.
"""
