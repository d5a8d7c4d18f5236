"""The rule and remedy registries: every remedy's trainer change is a real, valid config key; every
rule names a known remedy and fires on the input it is written for."""

from __future__ import annotations

import pkgutil

import pytest
from perfkit.analyzers import remedies
from perfkit.analyzers import rules as rules_package
from perfkit.analyzers.rules import RULES

from perfkit.errors import ConfigError
from perfkit.trainer.config import load_config


@pytest.mark.parametrize("remedy", list(remedies.REMEDIES.values()), ids=lambda r: r.id)
def test_every_trainer_change_exists_and_validates(remedy: remedies.Remedy) -> None:
    """load_config raises on an unknown key or a value of the wrong type: a remedy whose key drifted
    from the trainer's configuration fails here, not in perfkit optimize."""
    cfg = load_config("tiny-cpu", remedy.overrides())
    for key, value in remedy.trainer.items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert obj == value, key
    assert remedy.description and (remedy.script or not remedy.trainer), remedy.id


_FAMILIES = {m.name for m in pkgutil.iter_modules(rules_package.__path__)}


def test_every_rule_is_registered_once_with_a_family() -> None:
    """Every module of analyzers/rules is a family of rules (loaded, each registering at least one)."""
    assert {r.family for r in RULES} == _FAMILIES
    seen = set()
    for r in RULES:
        assert (r.id, r.reads) not in seen
        seen.add((r.id, r.reads))
        assert r.family == r.fn.__module__.rsplit(".", 1)[-1] and r.family in _FAMILIES, r.family
        assert all(isinstance(v, int | float) for v in r.thresholds.values())


def test_unknown_remedy_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown remedy 'warp'; known: .*compile"):
        remedies.get("warp")


def test_no_activation_checkpointing_undoes_the_memory_remedy() -> None:
    """Two remedies that move the same switch in opposite directions, each valid on its own."""
    on, off = remedies.get("activation_checkpointing"), remedies.get("no_activation_checkpointing")
    assert load_config("tiny-cpu", on.overrides()).kernels.activation_checkpointing is True
    assert (
        load_config("tiny-cpu", [*on.overrides(), *off.overrides()]).kernels.activation_checkpointing is False
    )
    assert "torch.utils.checkpoint" in off.script


def test_a_change_is_tried_only_where_it_acts() -> None:
    """FSDP prefetch does nothing under DDP and bucket sizes nothing under FSDP: the optimizer does
    not spend runs measuring them there."""
    ddp = load_config("tiny-cpu", []).to_dict()
    fsdp = load_config("tiny-cpu", ["parallel.zero=3"]).to_dict()
    assert remedies.acts_in(["overlap.bucket_cap_mb=25"], ddp)
    assert not remedies.acts_in(["overlap.bucket_cap_mb=25"], fsdp)
    assert remedies.acts_in(["overlap.fsdp_prefetch=1"], fsdp)
    assert not remedies.acts_in(["overlap.fsdp_prefetch=1"], ddp)
    assert not remedies.acts_in(["parallel.pp_schedule=gpipe"], ddp)
    assert remedies.acts_in(["kernels.attention=sdpa"], ddp)


def test_the_fused_optimizer_fix_names_the_scripts_own_class() -> None:
    """A script that builds SGD is told SGD(fused=True), not AdamW's; a class with no fused kernel is
    told its foreach one, or AdamW's fused one where it has neither."""
    fused = remedies.get("fused_optimizer")
    at = {"at": "train.py:43 <module>"}
    sgd = {**at, "type": "SGD", "module": "torch.optim.sgd", "can_fuse": True, "can_foreach": True}
    assert fused.script_for(sgd) == "torch.optim.SGD(model.parameters(), ..., fused=True)"
    rms = {**at, "type": "RMSprop", "module": "torch.optim.rmsprop", "can_fuse": False, "can_foreach": True}
    assert fused.script_for(rms).startswith("torch.optim.RMSprop(model.parameters(), ..., foreach=True)")
    lion = {
        **at,
        "type": "Lion",
        "module": "lion_pytorch.lion_pytorch",
        "can_fuse": False,
        "can_foreach": False,
    }
    assert fused.script_for(lion).startswith("torch.optim.AdamW(model.parameters(), ..., fused=True)")
    assert "in place of Lion" in fused.script_for(lion)
    # a run recorded before the site said what its class takes: torch.optim's fused classes known
    assert fused.script_for({**at, "type": "Adagrad", "module": "torch.optim.adagrad"}).endswith(
        "fused=True)"
    )
    assert fused.script_for(None) == fused.script == fused.script_for(at)


def test_more_workers_for_a_script_that_has_some() -> None:
    more = remedies.get("more_workers")
    assert more.script_for({"at": "x.py:1", "num_workers": 0}) == more.script
    assert more.script_for({"at": "x.py:1", "num_workers": 8}).startswith(
        "DataLoader(..., num_workers=16 (it has 8)"
    )
