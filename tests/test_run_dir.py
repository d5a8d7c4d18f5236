import json
from pathlib import Path

import pytest
from helpers import run_perfkit

from perfkit.errors import RunDirError
from perfkit.run import MANIFEST_NAME, SCHEMA_VERSION, Run, default_run_path


def test_create_open_roundtrip(tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", command=["train"], world_size=2, config={"steps": 3})
    run.layout.rank_dir(1).mkdir()
    run.layout.rank_dir(0).mkdir()
    (run.path / "rank10").mkdir()
    (run.path / "rankX").mkdir()
    (run.path / "rank01").mkdir()  # not rank 1 a second time
    run.set_collector("nvml", "disabled", "no NVIDIA driver")
    run.finish("complete", 0)
    again = Run.open(tmp_path / "r")
    assert again.manifest.status == "complete"
    assert again.manifest.world_size == 2
    assert again.manifest.config == {"steps": 3}
    assert again.manifest.collectors["nvml"].reason == "no NVIDIA driver"
    assert again.manifest.end is not None and again.manifest.end >= again.manifest.start
    assert again.ranks() == [0, 1, 10]


def test_create_refuses_existing_run(tmp_path: Path) -> None:
    Run.create(tmp_path, command=["x"], world_size=1)
    with pytest.raises(RunDirError, match="already holds a run"):
        Run.create(tmp_path, command=["y"], world_size=1)


def test_create_refuses_an_earlier_runs_rank_folders(tmp_path: Path) -> None:
    """Rank folders left without a manifest: an old hang.json there had stopped a healthy job as hung,
    and old tables added to the new run's steps."""
    (tmp_path / "rank0").mkdir()
    (tmp_path / "rank0" / "hang.json").write_text("{}")
    with pytest.raises(RunDirError, match="holds rank folders of an earlier run"):
        Run.create(tmp_path, command=["x"], world_size=1)


def test_runs_started_together_into_one_folder_get_it_once(tmp_path: Path) -> None:
    """Two processes creating a run in one folder at once: exactly one gets it (check-then-write had
    let both through in 18 of 20 trials)."""
    import subprocess
    import sys

    code = (
        "import sys, time\nfrom perfkit.run import Run\nfrom perfkit.errors import RunDirError\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "try:\n    Run.create(sys.argv[1], command=['x'], world_size=1); print('won')\n"
        "except RunDirError:\n    print('refused')\n"
    )
    for trial in range(5):
        out = tmp_path / f"t{trial}"
        import time

        at = str(time.time() + 1.5)
        procs = [
            subprocess.Popen([sys.executable, "-c", code, str(out), at], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert said == ["refused", "won"], said
        assert [p.name for p in out.iterdir()] == [MANIFEST_NAME]  # no claim files left


def test_manifest_write_is_atomic(tmp_path: Path) -> None:
    run = Run.create(tmp_path, command=["x"], world_size=1)
    for i in range(20):
        run.manifest.config = {"i": i}
        run.save()
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temporary files left
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["config"] == {"i": 19}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "manifest.json is missing"),
        ("{not json", "cannot be read"),
        ("[1, 2]", "not a JSON object"),
        ('{"name": "x"}', "no schema_version"),
        (json.dumps({"schema_version": SCHEMA_VERSION + 1, "name": "x"}), "newer than this perfkit reads"),
        (json.dumps({"schema_version": SCHEMA_VERSION, "name": "x"}), "lacks command, world_size"),
        (
            json.dumps({"schema_version": 1, "name": "x", "command": [], "world_size": 1, "status": "odd"}),
            "unknown status",
        ),
    ],
)
def test_open_bad_manifest_names_the_file(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(RunDirError, match=message) as info:
        Run.open(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


def test_open_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="no such run directory"):
        Run.open(tmp_path / "nope")


def test_default_run_path_is_unique(tmp_path: Path) -> None:
    first = default_run_path("demo", tmp_path)
    first.mkdir()
    second = default_run_path("demo", tmp_path)
    assert second != first and second.name.startswith(first.name)


def test_an_impossible_world_size_is_damage_not_memory(tmp_path: Path) -> None:
    """A manifest's world_size of 10^12 had grown the analysis to 11 GB (the set of expected ranks)."""
    Run.create(tmp_path, command=["x"], world_size=1)
    m = json.loads((tmp_path / MANIFEST_NAME).read_text())
    m["world_size"] = 10**12
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(RunDirError, match="world_size or command is impossible"):
        Run.open(tmp_path)


@pytest.mark.parametrize(("folder", "command"), [("report", "report"), ("trace", "export-trace")])
def test_an_output_folder_that_is_a_link_is_not_written_through(
    tmp_path: Path, folder: str, command: str
) -> None:
    run = Run.create(tmp_path / "run", command=["x"], world_size=1)
    (run.path / "rank0").mkdir()
    (run.path / "rank0" / "steps.jsonl").write_text(
        '{"step": 1, "start_ns": 1, "end_ns": 9, "step_time_s": 0.1}\n'
    )
    run.finish("complete", 0)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run.path / folder).symlink_to(outside)
    r = run_perfkit(command, str(run.path))
    assert (
        r.returncode == 1 and "perfkit writes only inside the run" in r.stderr and "Traceback" not in r.stderr
    )
    assert not list(outside.iterdir())
