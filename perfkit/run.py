"""The run directory: the one contract between collectors, analyzers and reports.

Layout (see shared/design/architecture.md)::

    <run>/manifest.json      schema version, command, config, world size, env, status, collectors
    <run>/rank<N>/...        one folder per rank, written only by that rank
    <run>/analysis.json      written by analyze
    <run>/report/index.html  written by report

The manifest is always replaced atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from perfkit import __version__
from perfkit.errors import RunDirError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
Status = Literal["running", "complete", "failed", "interrupted"]
STATUSES: tuple[str, ...] = ("running", "complete", "failed", "interrupted")
_RANK_DIR = re.compile(r"^rank(\d+)$")


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


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass(kw_only=True)
class CollectorState:
    """What happened to one collector in this run."""

    status: Literal["ok", "disabled", "failed"]
    """ok: ran to the end; disabled: not available here (e.g. no NVML); failed: stopped by an error."""
    reason: str = ""
    """Why it is not ok, in one line."""


@dataclass(kw_only=True)
class Manifest:
    """The self-description of a run; ``manifest.json`` holds it as JSON."""

    name: str
    """Short name of the run (the folder's name by default)."""
    command: list[str]
    """The command that was run, as argv."""
    world_size: int
    """Number of ranks."""
    config: dict[str, Any] = field(default_factory=dict)
    """The trainer's resolved configuration, when the run is of the bundled trainer."""
    env: dict[str, Any] = field(default_factory=dict)
    """Versions and hardware: torch, CUDA, NCCL, GPU model and its peak FLOP/s."""
    status: Status = "running"
    """running, complete, failed or interrupted."""
    start: float = field(default_factory=time.time)
    """Start time, seconds since the epoch."""
    end: float | None = None
    """End time, seconds since the epoch; None while running."""
    exit_code: int | None = None
    """Exit code of the command, once it ended."""
    collectors: dict[str, CollectorState] = field(default_factory=dict)
    """Each collector by name and what happened to it."""
    schema_version: int = SCHEMA_VERSION
    perfkit_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name in ("name", "command", "world_size") and f.name not in data
        ]
        if missing:
            raise RunDirError(
                f"{source}: manifest lacks {', '.join(missing)}; the file is damaged or not a perfkit manifest"
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("status", "running") not in STATUSES:
            raise RunDirError(
                f"{source}: unknown status {kwargs['status']!r}; expected one of {', '.join(STATUSES)}"
            )
        kwargs["collectors"] = {
            name: CollectorState(**{k: v for k, v in state.items() if k in ("status", "reason")})
            for name, state in (kwargs.get("collectors") or {}).items()
        }
        return cls(**kwargs)


class Run:
    """A run directory on disk and its manifest."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @classmethod
    def create(
        cls,
        path: Path | str,
        *,
        command: list[str],
        world_size: int,
        config: dict[str, Any] | None = None,
        env: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> Run:
        """Make a new run directory and write its manifest with status ``running``.

        Refuses a folder that already holds a run, so no collected data is ever overwritten.
        """
        path = Path(path)
        if (path / MANIFEST_NAME).exists():
            raise RunDirError(f"{path} already holds a run; choose another --out or remove it first")
        path.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(
            name=name or path.name,
            command=list(command),
            world_size=world_size,
            config=config or {},
            env=env or {},
        )
        run = cls(path, manifest)
        run.save()
        return run

    @classmethod
    def open(cls, path: Path | str) -> Run:
        """Load a run directory, checking that its manifest exists, parses and is of a known schema."""
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"{path}: no such run directory")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise RunDirError(f"{manifest_path} is missing: {path} is not a perfkit run directory")
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunDirError(f"{manifest_path} cannot be read ({e}); the file is damaged") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{manifest_path} is not a JSON object; the file is damaged")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise RunDirError(f"{manifest_path} has no schema_version; it was not written by perfkit")
        if version > SCHEMA_VERSION:
            raise RunDirError(
                f"{manifest_path} has schema version {version}, newer than this perfkit reads "
                f"({SCHEMA_VERSION}); upgrade perfkit (pip install -U perfkit)"
            )
        return cls(path, Manifest.from_json(data, manifest_path))

    def save(self) -> None:
        write_json_atomic(self.manifest_path, self.manifest.to_json())

    def finish(self, status: Status, exit_code: int | None = None) -> None:
        """Record the end of the run."""
        self.manifest.status = status
        self.manifest.end = time.time()
        self.manifest.exit_code = exit_code
        self.save()

    def set_collector(self, name: str, status: Literal["ok", "disabled", "failed"], reason: str = "") -> None:
        self.manifest.collectors[name] = CollectorState(status=status, reason=reason)
        self.save()

    def rank_dir(self, rank: int) -> Path:
        """The folder of one rank, created if needed."""
        d = self.path / f"rank{rank}"
        d.mkdir(exist_ok=True)
        return d

    def ranks(self) -> list[int]:
        """The ranks that wrote a folder, in order."""
        found = []
        for child in self.path.iterdir():
            m = _RANK_DIR.match(child.name)
            if m and child.is_dir():
                found.append(int(m.group(1)))
        return sorted(found)


def default_run_path(name: str, root: Path | str = "runs") -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<name>``, with a numeric suffix if that already exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{name}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate
