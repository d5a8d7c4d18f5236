"""Put on PYTHONPATH by ``perfkit profile``: attaches perfkit's collectors to every rank process of
an unmodified training command, then runs any other sitecustomize the environment had."""

import os
import sys


def _perfkit_attach() -> None:
    if not os.environ.get("PERFKIT_RUN_DIR"):
        return
    try:
        from perfkit.collectors.inject import activate

        activate()
    except Exception as e:  # never stop the user's program
        print(
            f"perfkit: collectors not attached in pid {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr
        )


def _chain() -> None:
    """Import the sitecustomize this one shadows, if any."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec and spec.loader and spec.origin != os.path.abspath(__file__):
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_perfkit_attach()
_chain()
