"""Files written whole: through a temporary file and an atomic rename, so a reader never sees half
of one. Torch-free and free of the run model: the run model, the collectors, the reports and the
bundled trainer write with these.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename,
    so a reader never sees half a file (and a concurrent writer of the same content is harmless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_bytes(obj: Any) -> bytes:
    """A JSON record as perfkit writes every one: indented, keys sorted, anything else as text."""
    return (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_atomic(path, json_bytes(obj))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
