"""Attach collectors to an unmodified script: called from the injected sitecustomize.

Only training processes attach: not torchrun's launcher, perfkit's own CLI, multiprocessing
children (DataLoader workers started by spawn) or torch's compile workers. The Probe starts at
the first step the hooks see, so a helper process that never trains writes nothing.
"""

from __future__ import annotations

import os
import sys


def _is_training_process(argv: list[str]) -> bool:
    args = argv[1:]
    if "-m" in args:
        module = args[args.index("-m") + 1] if args.index("-m") + 1 < len(args) else ""
        return not (module.startswith("torch") or module == "perfkit" or module.startswith("perfkit.cli"))
    if "-c" in args:
        code = args[args.index("-c") + 1] if args.index("-c") + 1 < len(args) else ""
        return "multiprocessing" not in code
    if any(a.startswith("--multiprocessing-fork") for a in args):
        return False
    script = os.path.basename(args[0]) if args else ""
    return script not in ("torchrun", "perfkit", "pip")


def activate() -> None:
    if not _is_training_process(list(getattr(sys, "orig_argv", sys.argv))):
        return
    from perfkit.collectors.probe import probe_from_env

    probe = probe_from_env()
    if probe is None:
        return
    probe.install_excepthook()  # before the script's own start-up, which may fail
    if "comms" in probe.options.collect:
        from perfkit.collectors.collectives import patch_all

        patch_all()  # before the script builds DDP: its comm hook goes in at the first forward
    from perfkit.collectors import sites

    sites.install(probe)  # where the script builds its DataLoader and optimizer, for its fixes
    from perfkit.collectors.auto import install

    if not probe.manual:
        probe.auto = install(probe)
