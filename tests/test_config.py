"""The one config system: YAML + dotted overrides -> typed dataclasses, with errors naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from duetto.config import ConfigError, format_help, load_config, parse_override


@dataclass
class Inner:
    rank: int = 8
    """Rank of something."""
    names: list[str] = field(default_factory=lambda: ["a"])
    """Some names."""


@dataclass
class Outer:
    lr: float = 1e-3
    """Learning rate."""
    mode: Literal["x", "y"] = "x"
    """Mode."""
    flag: bool = False
    """A switch."""
    limit: int | None = None
    """Optional limit."""
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 2e-5\ninner:\n  rank: 4\n")
    cfg = load_config(Outer, p, ["inner.names=[q_proj, v_proj]", "flag=true", "mode=y", "limit=3"])
    assert cfg.lr == 2e-5 and isinstance(cfg.lr, float)  # YAML 1.1 would leave "2e-5" a string
    assert cfg.inner.rank == 4 and cfg.inner.names == ["q_proj", "v_proj"]
    assert cfg.flag is True and cfg.mode == "y" and cfg.limit == 3


@pytest.mark.parametrize(
    "override,needle",
    [
        ("inner.rnk=3", "unknown key inner.rnk"),
        ("lr=fast", "lr: expected a number"),
        ("inner.rank=1.5", "inner.rank: expected an integer"),
        ("flag=maybe", "flag: expected true/false"),
        ("mode=z", "mode: must be one of"),
        ("inner=3", "inner: expected a mapping"),
        ("novalue", "expected key=value"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(Outer, None, [override])


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Outer, p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Outer, tmp_path / "missing.yaml")
    p.write_text("extra: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key extra"):
        load_config(Outer, p)


def test_docstrings_are_the_help():
    text = format_help(Outer)
    assert "inner.rank" in text and "Rank of something." in text and "Learning rate." in text


def test_parse_override_values():
    assert parse_override("a.b=1e-5") == (["a", "b"], 1e-5)
    assert parse_override("model=google/gemma-3-1b-it") == (["model"], "google/gemma-3-1b-it")
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])


def test_load_config_layers_yaml_then_flags_then_overrides(tmp_path):
    """One order everywhere: defaults < YAML < named flags < dotted overrides; flag strings stay strings."""
    import argparse

    from duetto.config import add_config_flags, config_flags, load_config
    from duetto.serve.config import ServeConfig

    path = tmp_path / "s.yaml"
    path.write_text("port: 9001\nensemble:\n  k: 2\n  mode: mix\n")
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ServeConfig, ["port", "api_key", ("k", "ensemble.k")])
    args = parser.parse_args(["--port", "9002", "--api-key", "0123"])
    assert config_flags(args) == {"port": 9002, "api_key": "0123"}  # --k not given: not a layer
    cfg = load_config(ServeConfig, path, ["ensemble.k=5"], flags=config_flags(args))
    assert (cfg.port, cfg.api_key, cfg.ensemble.k, cfg.ensemble.mode) == (9002, "0123", 5, "mix")
    cfg = load_config(ServeConfig, path, ["port=9003"], flags=config_flags(args))
    assert cfg.port == 9003
    with pytest.raises(ConfigError, match=rf"{path}: unknown key ensemble.kk"):
        load_config(ServeConfig, path, flags={"ensemble.kk": 1})


def test_flatten_is_the_inverse_of_nest():
    from duetto.config import flatten, nest

    nested = {"method": "galore", "galore": {"rank": 8, "target_modules": ["mlp"]}, "data": {"train": "t"}, "extra": {}}
    assert flatten(nested) == {"method": "galore", "galore.rank": 8, "galore.target_modules": ["mlp"],
                               "data.train": "t", "extra": {}}  # fmt: skip
    assert nest(flatten(nested)) == nested


@dataclass
class Switches:
    cache: Literal["auto", "on", "off"] = "auto"
    mode: Literal["x", "y"] = "x"


def test_yaml_booleans_become_the_on_off_words_a_choice_spells(tmp_path):
    """YAML 1.1 reads `off` and `on` as booleans; a choice that spells them gets the word back."""
    p = tmp_path / "s.yaml"
    p.write_text("cache: off\n")
    assert load_config(Switches, p, []).cache == "off"
    assert load_config(Switches, None, ["cache=on"]).cache == "on"
    assert load_config(Switches, None, ["cache=off"]).cache == "off"
    with pytest.raises(ConfigError, match="mode: must be one of 'x', 'y', got True"):
        load_config(Switches, None, ["mode=yes"])  # no such word among the choices: still an error
