"""The optimizer: configurations measured side by side (``trials``), ``sweep`` over parallel layouts,
``optimize`` (a run's findings turned into trials), and ``remedies``, the registry that maps a
finding's remedy id to the change it proposes, for the bundled trainer and for any script.

Importing this package imports nothing else: ``remedies`` is torch- and trainer-free, so the report
and the CLI summary read it without starting the trainer.
"""
