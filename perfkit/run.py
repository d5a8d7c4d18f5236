"""The run directory: the one contract between collectors, analyzers and reports.

``RunLayout`` is the only place that spells a path inside a run directory; everything else asks it::

    <run>/manifest.json              schema version, command, config, world size, env, status, collectors
    <run>/train_log.jsonl            the bundled trainer's own log
    <run>/rank<N>/<table>.jsonl      one folder per rank, written only by that rank (perfkit.tables)
    <run>/rank<N>/<table>.w<pid>.jsonl   rows from that rank's DataLoader worker processes
    <run>/rank<N>/trace.json.gz      Kineto trace of the profiled window
    <run>/rank<N>/probe.json         what the rank's collectors did
    <run>/rank<N>/memory_snapshot.pickle, oom_snapshot.pickle   CUDA allocator history
    <run>/analysis.json              written by analyze
    <run>/report/index.html          written by report; report/compare.html by compare
    <run>/trace/merged.json.gz       written by export-trace

The manifest is always replaced atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from perfkit import __version__
from perfkit.errors import ConfigError, RunDirError
from perfkit.files import json_bytes, write_json_atomic
from perfkit.tables import loads

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ANALYSIS_NAME = "analysis.json"
PROBE_NAME = "probe.json"
SNAPSHOT_NAMES = ("memory_snapshot.pickle", "oom_snapshot.pickle")
Status = Literal["running", "complete", "failed", "interrupted", "hung"]
STATUSES: tuple[str, ...] = ("running", "complete", "failed", "interrupted", "hung")
_RANK_DIR = re.compile(r"^rank(0|[1-9]\d*)$")  # rank01 is not rank 1 a second time


class HasName(Protocol):
    @property
    def name(self) -> str: ...


class StudyLayout:
    """The folder of a ``perfkit sweep`` or ``perfkit optimize``: ``<kind>.json`` (the ledger, written
    even when interrupted), ``<kind>.html``, and for optimize the profiled ``baseline/`` and
    ``optimized/`` runs."""

    def __init__(self, root: Path | str, kind: Literal["sweep", "optimize"]) -> None:
        self.root = Path(root)
        self.kind = kind

    @property
    def results(self) -> Path:
        return self.root / f"{self.kind}.json"

    @property
    def page(self) -> Path:
        return self.root / f"{self.kind}.html"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline"

    @property
    def baseline_config(self) -> Path:
        return self.root / "baseline.toml"

    @property
    def optimized(self) -> Path:
        return self.root / "optimized"


class RunLayout:
    """Every path inside one run directory. Creates nothing: writers make their parents."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def analysis(self) -> Path:
        return self.root / ANALYSIS_NAME

    @property
    def report(self) -> Path:
        return self._own(self.root / "report" / "index.html")

    @property
    def compare_page(self) -> Path:
        return self._own(self.root / "report" / "compare.html")

    @property
    def merged_trace(self) -> Path:
        return self._own(self.root / "trace" / "merged.json.gz")

    def _own(self, path: Path) -> Path:
        """An output path in a folder of the run's own: a folder that is a link is refused, so that
        perfkit never writes through it to a place outside the run."""
        folder = path.parent
        if folder.is_symlink():
            raise RunDirError(
                f"{folder} is a link to {os.readlink(folder)}; perfkit writes only inside the run: "
                "remove the link, or write elsewhere with --out"
            )
        return path

    def rank_dir(self, rank: int) -> Path:
        return self.root / f"rank{rank}"

    def table(self, rank: int, table: HasName, worker_pid: int | None = None) -> Path:
        """A rank's table file; with ``worker_pid``, the file of one of its loader workers."""
        suffix = f".w{worker_pid}" if worker_pid is not None else ""
        return self.rank_dir(rank) / f"{table.name}{suffix}.jsonl"

    def table_files(self, rank: int, table: HasName) -> list[Path]:
        """The rank's file of that table and its workers' files, those that exist; under ``--watch``
        each one's rotated older part (``rotated``) before it."""
        d = self.rank_dir(rank)
        current = [d / f"{table.name}.jsonl", *d.glob(f"{table.name}.w*[0-9].jsonl")]
        return [p for c in sorted(current) for p in (self.rotated(c), c) if p.is_file()]

    @staticmethod
    def rotated(path: Path) -> Path:
        """A table file's older part under ``--watch``: the file is renamed to this when it reaches its
        share of the disk budget, replacing the part before (``perfkit.tables.RowWriter``)."""
        return path.with_name(path.name.removesuffix(".jsonl") + ".old.jsonl")

    def trace(self, rank: int) -> Path:
        return self.rank_dir(rank) / "trace.json.gz"

    def probe(self, rank: int) -> Path:
        return self.rank_dir(rank) / PROBE_NAME

    # ---- watch mode (perfkit profile --watch) ------------------------------------------------
    @property
    def watch_dir(self) -> Path:
        """The watcher's folder: anomalies, capture requests and their diagnoses, the live state."""
        return self.root / "watch"

    @property
    def anomalies(self) -> Path:
        """One JSON object per anomaly the watcher found (appended as they start)."""
        return self.watch_dir / "anomalies.jsonl"

    @property
    def watch_state(self) -> Path:
        """The watcher's view of the job, rewritten every poll (``perfkit top`` shows it)."""
        return self.watch_dir / "state.json"

    @property
    def capture_requests(self) -> Path:
        """A request per capture: every rank traces the same steps (``<id>.json``)."""
        return self.watch_dir / "requests"

    def capture_request(self, capture: str) -> Path:
        return self.capture_requests / f"{capture}.json"

    def capture_diagnosis(self, capture: str) -> Path:
        """What changed in that capture against the baseline capture."""
        return self.watch_dir / "captures" / f"{capture}.json"

    def capture_trace(self, rank: int, capture: str) -> Path:
        """A rank's Kineto trace of a capture (``baseline`` is captured early in every watched job)."""
        return self.rank_dir(rank) / "captures" / f"{capture}.json.gz"

    def capture_state(self, rank: int) -> Path:
        """What became of each capture on that rank (written, declined and why), rewritten as it
        changes."""
        return self.rank_dir(rank) / "captures.json"

    def capture_traces(self, capture: str) -> list[Path]:
        return [p for rank in self.ranks() if (p := self.capture_trace(rank, capture)).is_file()]

    def captures(self) -> list[str]:
        """The captures any rank wrote a trace of, by id."""
        return sorted(
            {
                p.name.removesuffix(".json.gz")
                for r in self.ranks()
                for p in self.rank_dir(r).glob("captures/*.json.gz")
            }
        )

    def hang_record(self, rank: int) -> Path:
        """Written by the rank's watchdog when nothing progressed for the hang timeout."""
        return self.rank_dir(rank) / "hang.json"

    def failure_record(self, rank: int) -> Path:
        """Written by the rank when an exception ended it."""
        return self.rank_dir(rank) / "failure.json"

    def fault_record(self, rank: int) -> Path:
        """Python's faulthandler output when a signal (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) killed
        the rank: every thread's stack at that moment. Removed at a clean stop when empty."""
        return self.rank_dir(rank) / "fault.txt"

    def hang_records(self) -> list[Path]:
        return [p for rank in self.ranks() if (p := self.hang_record(rank)).is_file()]

    def memory_snapshot(self, rank: int) -> Path:
        return self.rank_dir(rank) / SNAPSHOT_NAMES[0]

    def oom_snapshot(self, rank: int) -> Path:
        return self.rank_dir(rank) / SNAPSHOT_NAMES[1]

    def ranks(self) -> list[int]:
        """The ranks that wrote a folder, in order."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = _RANK_DIR.match(child.name)
            if m and child.is_dir():
                found.append(int(m.group(1)))
        return sorted(found)

    def traces(self) -> list[Path]:
        return [p for rank in self.ranks() if (p := self.trace(rank)).is_file()]

    def snapshots(self) -> list[Path]:
        return [
            p
            for rank in self.ranks()
            for name in SNAPSHOT_NAMES
            if (p := self.rank_dir(rank) / name).is_file()
        ]

    def is_run(self) -> bool:
        return self.manifest.is_file()


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
    model: dict[str, Any] = field(default_factory=dict)
    """What the workload said of itself through ``perfkit.describe()``: flops_per_token,
    parameters, layout (dp/tp/pp). The analyzers read these instead of any trainer's schema."""
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
    pid: int | None = None
    """The process that owns the run while it is running (perfkit profile, or the script)."""
    host: str = ""
    """The host of that process."""
    note: str = ""
    """What went wrong in recording the run, in one line (a full disk), when something did."""
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
        for key, kinds in _MANIFEST_TYPES.items():
            value = kwargs.get(key)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise RunDirError(f"{source}: {key} is {value!r}; the manifest is damaged")
        if not 1 <= kwargs["world_size"] <= MAX_WORLD or not all(
            isinstance(a, str) for a in kwargs["command"]
        ):
            raise RunDirError(f"{source}: world_size or command is impossible; the manifest is damaged")
        if not all(isinstance(s, dict) for s in (kwargs.get("collectors") or {}).values()):
            raise RunDirError(f"{source}: collectors is not a table of states; the manifest is damaged")
        if kwargs.get("status", "running") not in STATUSES:
            raise RunDirError(
                f"{source}: unknown status {kwargs['status']!r}; expected one of {', '.join(STATUSES)}"
            )
        kwargs["collectors"] = {
            name: CollectorState(**{k: v for k, v in state.items() if k in ("status", "reason")})
            for name, state in (kwargs.get("collectors") or {}).items()
        }
        return cls(**kwargs)


MAX_WORLD = 1 << 20
"""More ranks than any job runs: a larger world size in a file is damage (a manifest's 10^12 had
grown the analysis to 11 GB building the set of expected ranks)."""

_MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "command": list,
    "world_size": int,
    "config": dict,
    "env": dict,
    "model": dict,
    "status": str,
    "start": (int, float),
    "end": (int, float),
    "exit_code": int,
    "collectors": dict,
    "pid": int,
    "host": str,
    "note": str,
}


class Run:
    """A run directory on disk and its manifest."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.layout = RunLayout(path)

    @property
    def manifest_path(self) -> Path:
        return self.layout.manifest

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
        rank_folders_ok: bool = False,
    ) -> Run:
        """Make a new run directory and write its manifest with status ``running``.

        Refuses a folder that already holds a run, so no collected data is ever overwritten, and one
        that holds an earlier run's rank folders (``rank_folders_ok``: the other ranks of this very
        run may have made theirs first, as under ``perfkit.profile(out=...)`` on several ranks).
        """
        path = Path(path)
        layout = RunLayout(path)
        if layout.is_run():
            raise RunDirError(f"{path} already holds a run; choose another --out or remove it first")
        if layout.ranks() and not rank_folders_ok:
            # An earlier run's rank folders without its manifest (interrupted, or the manifest
            # removed): a new run there would read their hang records and add their rows to its own.
            raise RunDirError(
                f"{path} holds rank folders of an earlier run (rank{layout.ranks()[0]}/, no manifest.json); "
                "choose another --out or remove them first"
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".perfkit-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RunDirError(
                f"cannot write the run directory {path} ({e.strerror}); choose a writable place with --out"
            ) from None
        manifest = Manifest(
            name=name or path.name,
            command=list(command),
            world_size=world_size,
            config=config or {},
            env=env or {},
            pid=os.getpid(),
            host=socket.gethostname(),
        )
        run = cls(path, manifest)
        # Claimed atomically: a hard link fails where the manifest exists, so of two runs started
        # into one folder at once exactly one gets it (a check, then a write, let both through).
        tmp = write_json_atomic(path / f".{MANIFEST_NAME}.{os.getpid()}.new", manifest.to_json())
        try:
            os.link(tmp, run.manifest_path)
        except FileExistsError:
            raise RunDirError(
                f"{path} already holds a run; choose another --out or remove it first"
            ) from None
        except OSError as e:
            raise RunDirError(
                f"cannot write the run directory {path} ({e.strerror}); choose a writable place with --out"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
        return run

    def trainer_config(self, use: str) -> dict[str, Any]:
        """The bundled trainer's configuration this run trained with (``TrainConfig.to_dict()``); a
        run of any other script has none: one line that says so, then ``use`` (what to do instead)."""
        if not self.manifest.config:
            raise ConfigError(
                f"{self.path} is not a run of the bundled trainer (its manifest has no trainer config); {use}"
            )
        return self.manifest.config

    @classmethod
    def open(cls, path: Path | str) -> Run:
        """Load a run directory, checking that its manifest exists, parses and is of a known schema."""
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"{path}: no such run directory")
        manifest_path = RunLayout(path).manifest
        if not manifest_path.is_file():
            raise RunDirError(f"{manifest_path} is missing: {path} is not a perfkit run directory")
        try:
            data = loads(manifest_path.read_text())
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
        """Record the end of the run. On a full disk, perfkit's own temporary files go and the
        manifest is rewritten in place (its old blocks are freed first), saying so in ``note``."""
        self.manifest.status = status
        self.manifest.end = time.time()
        self.manifest.exit_code = exit_code
        try:
            self.save()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.manifest.note = (
                self.manifest.note or f"the disk filled up ({e.strerror}); the tables may stop early"
            )
            for tmp in self.path.rglob(".*.tmp*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            try:
                self.manifest_path.write_bytes(json_bytes(self.manifest.to_json()))
            except OSError:
                raise RunDirError(
                    f"the disk under {self.path} is full: its manifest could not be written; free space, "
                    "then perfkit analyze reads what the ranks wrote"
                ) from None

    def set_collector(self, name: str, status: Literal["ok", "disabled", "failed"], reason: str = "") -> None:
        self.manifest.collectors[name] = CollectorState(status=status, reason=reason)
        self.save()

    def ranks(self) -> list[int]:
        """The ranks that wrote a folder, in order."""
        return self.layout.ranks()

    def abandoned(self) -> bool:
        """Status ``running`` but its owner process on this host is gone (it was killed): the run
        will never finish and is to be read as failed."""
        m = self.manifest
        if m.status != "running" or m.pid is None or m.host != socket.gethostname():
            return False
        try:
            os.kill(m.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def rank_reports(self) -> dict[int, dict[str, Any]]:
        """Each rank's ``probe.json`` (what its collectors did), those that can be read."""
        reports = {}
        for rank in self.ranks():
            try:
                data = loads(self.layout.probe(rank).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                reports[rank] = data
        return reports

    def merge_rank_reports(self) -> None:
        """Fold each rank's collector status, world size, environment and workload description into
        the manifest: a collector failed on any rank is failed (naming the rank), disabled on all is
        disabled, else ok; a table a rank could not write (a full disk) goes into ``note``. In memory:
        ``finish`` writes it."""
        reports = self.rank_reports()
        m = self.manifest
        # A rank that failed before its first step wrote no report, only its failure record.
        failed_sizes = [_world_size_of(self.layout.failure_record(rank)) for rank in self.ranks()]
        m.world_size = max([m.world_size, *(r.get("world_size", 1) for r in reports.values()), *failed_sizes])
        if not reports:
            return
        first = reports.get(0) or reports[min(reports)]
        if first.get("env"):
            m.env.update(first["env"])
        if first.get("model"):
            m.model.update(first["model"])
        names = sorted({n for r in reports.values() for n in r.get("collectors", {})})
        for name in names:
            states = {
                rank: r["collectors"][name] for rank, r in reports.items() if name in r.get("collectors", {})
            }
            failed = [(rank, s) for rank, s in states.items() if s["status"] == "failed"]
            disabled = [s for s in states.values() if s["status"] == "disabled"]
            if failed:
                rank, state = failed[0]
                m.collectors[name] = CollectorState(status="failed", reason=f"rank {rank}: {state['reason']}")
            elif len(disabled) == len(states):
                m.collectors[name] = CollectorState(status="disabled", reason=disabled[0]["reason"])
            else:  # with what an ok collector said of itself (where the trace was written)
                reason = next((s["reason"] for s in states.values() if s.get("reason")), "")
                m.collectors[name] = CollectorState(status="ok", reason=str(reason))
        unwritten = [
            f"rank {rank}: {'; '.join(map(str, r['write_errors']))}"
            for rank, r in reports.items()
            if isinstance(r.get("write_errors"), list)
        ]
        if unwritten:
            more = f" and {len(unwritten) - 1} more rank(s)" if len(unwritten) > 1 else ""
            m.note = f"tables could not be written ({unwritten[0]}{more})"


def _world_size_of(record: Path) -> int:
    """The world size a rank's failure record names (1 when it has none or cannot be read)."""
    try:
        size = loads(record.read_text()).get("world_size", 1)
    except (OSError, ValueError, AttributeError):
        return 1
    return size if isinstance(size, int) and 0 < size <= MAX_WORLD else 1


def default_run_path(name: str, root: Path | str = "runs") -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<name>``, with a numeric suffix if that already exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{stamp}-{name}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate
