import dataclasses

import pytest
import torch

import memsave
from memsave.config import DEFAULT_RECIPE, FAMILY_CONFIGS, PASS_FAMILIES, Config, RecomputeConfig, describe_options


def test_default_recipe_is_what_the_readme_says():
    config = Config.from_options(None)
    assert config.recompute == RecomputeConfig(policy="min-cut")
    assert config.codegen == "inductor"
    assert config.enabled_families() == ["recompute"]
    assert DEFAULT_RECIPE == {"recompute": "min-cut", "codegen": "inductor"}


def test_every_family_has_an_option_key():
    valid = set(Config.__dataclass_fields__)
    assert set(PASS_FAMILIES) <= valid
    assert {"codegen", "debug_dir"} <= valid


@pytest.mark.parametrize(
    "value, expected",
    [
        ("min-cut", RecomputeConfig("min-cut")),
        ({"policy": "none"}, RecomputeConfig("none")),
        (RecomputeConfig("none"), RecomputeConfig("none")),
        ("none", None),
        (None, None),
        (False, None),
    ],
)
def test_family_values_parse(value, expected):
    assert Config.from_options({"recompute": value}).recompute == expected


def test_unknown_option_key_names_key_and_valid_keys():
    with pytest.raises(ValueError, match=r"unknown memsave option 'quantise'.*'quantize'"):
        Config.from_options({"quantise": "int8"})


def test_bad_family_value_names_choices():
    with pytest.raises(ValueError, match=r"options\['recompute'\]: unknown value 'checkpoint'; valid choices: 'none', 'min-cut'"):
        Config.from_options({"recompute": "checkpoint"})
    with pytest.raises(ValueError, match=r"options\['recompute'\]: unknown key 'fraction'; valid keys: 'budget', 'policy'"):
        Config.from_options({"recompute": {"fraction": 0.5}})
    with pytest.raises(ValueError, match=r"options\['recompute'\]\['policy'\]: invalid value 'all'"):
        RecomputeConfig(policy="all")
    with pytest.raises(ValueError, match=r"expected a string, a dict"):
        Config.from_options({"recompute": 3})


@pytest.mark.parametrize("family", PASS_FAMILIES)
def test_every_family_turns_off_with_none_and_names_its_choices_for_an_unknown_value(family):
    assert getattr(Config.from_options({family: "none"}), family) is None
    cls = FAMILY_CONFIGS[family]
    with pytest.raises(ValueError, match=rf"options\['{family}'\]: unknown value 'something'; valid choices: 'none'.* or a dict with keys") as info:
        Config.from_options({family: "something"})
    for field in dataclasses.fields(cls):
        assert repr(field.name) in str(info.value)


def test_codegen_and_debug_validation(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"options\['codegen'\]: invalid value 'tvm'; valid choices: 'inductor', 'fx'"):
        Config.from_options({"codegen": "tvm"})
    with pytest.raises(ValueError, match=r"options\['debug'\]"):
        Config.from_options({"debug": "yes"})
    config = Config.from_options({"debug_dir": tmp_path})
    assert config.debug and config.debug_dir == str(tmp_path)
    monkeypatch.setenv("MEMSAVE_DEBUG_DIR", str(tmp_path / "env"))
    assert Config.from_options({}).debug_dir == str(tmp_path / "env")
    assert Config.from_options({"debug_dir": str(tmp_path)}).debug_dir == str(tmp_path)


def test_config_is_hashable_and_round_trips_through_options():
    config = Config.from_options({"recompute": "none", "codegen": "fx"})
    assert hash(config) == hash(Config.from_options(config.as_options()))
    assert Config.from_options(config) is config


def test_bad_options_raise_valueerror_through_torch_compile():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="memsave", options={"recompute": "checkpoint"})
    with pytest.raises(ValueError, match="valid choices"):
        compiled(torch.randn(2, 4))
    with pytest.raises(ValueError, match="not mode="):
        torch.compile(model, backend="memsave", mode="max-autotune")(torch.randn(2, 4))


def test_options_table_covers_every_key():
    keys = [row[0] for row in describe_options()]
    assert keys == [*PASS_FAMILIES, "budget", "kv_cache", "codegen", "debug_dir", "debug"]
    assert memsave.Config is Config
