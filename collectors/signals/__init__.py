"""One module per signal, each defining one registered Collector whose ``name`` is the module's name.

The set of collectors is the set of modules here: ``perfkit.collectors.base.known()`` lists them
without importing torch, and ``load(name)`` imports one when a rank starts it.
"""
