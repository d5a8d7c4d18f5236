"""The trainer's configuration: loading, overrides, and every invalid layout's message."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from perfkit.cli import cli
from perfkit.errors import ConfigError
from perfkit.trainer.config import load_config, named_configs, resolve_layout


def test_shipped_configs_load_and_validate() -> None:
    assert {"tiny-cpu", "gpt2-small-gpu"} <= set(named_configs())
    tiny = load_config("tiny-cpu")
    assert tiny.device == "cpu" and tiny.model.d_model == 48
    gpu = load_config("gpt2-small-gpu")
    assert gpu.kernels.precision == "bf16" and gpu.kernels.compile and gpu.kernels.optimizer_impl == "fused"
    resolve_layout(gpu, 8)


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "tiny-cpu",
        [
            "parallel.tp=2",
            "optimizer.lr=1e-3",
            "kernels.compile=true",
            "kernels.attention=eager",
            "data.path=x.u16",
        ],
    )
    assert cfg.parallel.tp == 2 and cfg.optimizer.lr == 1e-3 and cfg.kernels.compile is True
    assert cfg.kernels.attention == "eager" and cfg.data.path == "x.u16"


def test_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("steps = 3\n[parallel]\npp = 2\npp_schedule = 'gpipe'\n")
    cfg = load_config(str(path), ["steps=4"])
    assert (cfg.steps, cfg.parallel.pp, cfg.parallel.pp_schedule) == (4, 2, "gpipe")


@pytest.mark.parametrize(
    ("world", "sets", "dp", "microbatches", "local_batch"),
    [
        (1, [], 1, 1, 16),
        (4, [], 4, 1, 4),
        (4, ["parallel.tp=2"], 2, 1, 8),
        (8, ["parallel.tp=2", "parallel.pp=2"], 2, 2, 8),
        (4, ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b"], 2, 4, 8),
        (2, ["data.grad_accum=4"], 2, 4, 8),
        (2, ["parallel.pp=2", "parallel.microbatches=8"], 1, 8, 16),
    ],
)
def test_layout_resolution(world: int, sets: list[str], dp: int, microbatches: int, local_batch: int) -> None:
    layout = resolve_layout(load_config("tiny-cpu", sets), world)
    assert (layout.dp, layout.microbatches, layout.local_batch) == (dp, microbatches, local_batch)


INVALID = [
    (2, ["overlap.bucket_cap_mb=nan"], "overlap.bucket_cap_mb='nan' is not a finite number"),
    (2, ["overlap.bucket_cap_mb=inf"], "overlap.bucket_cap_mb='inf' is not a finite number"),
    (2, ["overlap.bucket_cap_mb=-1"], "overlap.bucket_cap_mb=-1.0 must be above 0"),
    (2, ["parallel.tp=3"], "parallel.tp=3 does not divide model.n_heads=4; choose 1, 2 or 4"),
    (
        4,
        ["parallel.dp=2", "parallel.tp=1"],
        "parallel.dp=2 × tp=1 × pp=1 = 2 does not match the world size 4",
    ),
    (3, ["parallel.tp=2"], "world size 3 is not divisible by tp×pp=2"),
    (8, ["parallel.pp=8"], "parallel.pp=8 needs 8 pipeline stages but model.n_layers=4"),
    (4, ["parallel.pp=4", "parallel.pp_schedule=interleaved-1f1b"], "needs 8 pipeline stages"),
    (
        2,
        ["parallel.pp=2", "parallel.microbatches=1"],
        "parallel.microbatches=1 is fewer than the 2 pipeline stages",
    ),
    (2, ["parallel.zero=1", "parallel.tp=2"], "parallel.zero=1 (ZeroRedundancyOptimizer) cannot shard"),
    (
        1,
        ["parallel.sequence_parallel=true"],
        "parallel.sequence_parallel=true shards over the tensor-parallel",
    ),
    (
        2,
        ["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=63"],
        "parallel.sequence_parallel needs model.seq_len=63 divisible by parallel.tp=2",
    ),
    (2, ["parallel.zero=4"], "parallel.zero=4 is not a ZeRO stage"),
    (2, ["parallel.pp=2", "model.tie_embeddings=true"], "set model.tie_embeddings=false"),
    (2, ["parallel.pp=2", "data.grad_accum=2"], "use parallel.microbatches"),
    (2, ["data.global_batch=15"], "data.global_batch=15 is not divisible by dp=2"),
    (2, ["model.n_heads=5"], "model.n_heads=5 does not divide model.d_model=48"),
    (2, ["steps=0"], "steps=0 must be at least 1"),
    (2, ["parallel.tpp=2"], "unknown key 'parallel.tpp'; did you mean tp?"),
    (2, ["paralel.tp=2"], "unknown key 'paralel.tp'"),
    (2, ["parallel=2"], "parallel is a section"),
    (2, ["steps.x=2"], "steps is a value, not a section"),
    (2, ["parallel.tp=two"], "parallel.tp='two' is not an integer"),
    (2, ["kernels.compile=maybe"], "is not a boolean"),
    (2, ["kernels.attention=flash"], "choose one of eager, sdpa"),
    (2, ["parallel.tp"], "is not KEY=VALUE"),
]


@pytest.mark.parametrize(("nproc", "sets", "message"), INVALID)
def test_invalid_config_one_line_exit_2(nproc: int, sets: list[str], message: str) -> None:
    args = ["train", "--nproc", str(nproc)]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("no-such-config", "unknown config 'no-such-config'; choose one of gpt2-small-gpu, tiny-cpu"),
        ("missing.toml", "config file missing.toml does not exist"),
    ],
)
def test_unknown_config(config: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_bad_toml(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(str(tmp_path / "bad.toml"))
    (tmp_path / "bad2.toml").write_text("[model]\nwidth = 3")
    with pytest.raises(ConfigError, match="unknown key 'model.width'"):
        load_config(str(tmp_path / "bad2.toml"))


def test_cuda_without_gpu_is_refused_before_start() -> None:
    result = CliRunner().invoke(
        cli, ["train", "--config", "gpt2-small-gpu"], env={"CUDA_VISIBLE_DEVICES": ""}
    )
    assert result.exit_code == 2
    assert "no NVIDIA GPU is visible; use --set device=cpu" in result.output
