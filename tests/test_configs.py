"""Every YAML shipped under configs/ starts with the command that runs it, and loads through that
command's own config class (so a renamed key or a wrong type in a shipped file fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from duetto.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _load(command: str, path: Path):
    from duetto.config import load_config

    if command == "train":
        from duetto.trainers.config import TrialConfig

        return load_config(TrialConfig, path)
    if command in ("sweep", "demo"):
        from duetto.tune.spec import load_sweep

        return load_sweep(path)
    if command == "data":
        from duetto.data.unify import DataConfig

        return load_config(DataConfig, path)
    if command == "report":
        from duetto.workflows.report import ReportConfig

        return load_config(ReportConfig, path)
    if command == "serve":
        from duetto.serve.config import ServeConfig

        return load_config(ServeConfig, path)
    raise AssertionError(f"{path.name}: no loader for `duetto {command}`")


def test_there_are_configs():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_names_its_command_and_loads(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name}: the first line must be the command that runs it"
    words = first[2:].split()
    if words[:2] in (["serve", "run"], ["serve", "deploy"]):  # a Ray Serve config file
        from ray.serve.schema import ServeDeploySchema

        from duetto.serve.config import config_from_args

        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        for app in schema.applications:
            assert app.import_path == "duetto.serve.app:build_app"
            config_from_args(dict(app.args))
        return
    assert words[0] == "duetto" and words[1] in COMMANDS, f"{path.name}: {first!r} is not a duetto command"
    from duetto.cli import parse_args

    parse_args(words[1:])  # the header is a command line the parser accepts, in its current spelling
    if path.name in words:
        assert f"configs/{path.name}" in first
    _load(words[1], path)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.read_text().startswith(("# duetto sweep", "# duetto demo"))],
                         ids=lambda p: p.name)
def test_shipped_sweeps_choose_on_validation_rows(path):
    """A sweep that picks its best trials on test.jsonl leaves the report no unseen split."""
    from duetto.tune.spec import base_trial_dict, load_sweep

    assert base_trial_dict(load_sweep(path))["data"]["val_size"] > 0, f"{path.name}: set base.data.val_size"
