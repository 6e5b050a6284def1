"""ServeConfig, the shipped serve configs, and `duetto serve` / `duetto serve bench` argument handling."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from duetto.config import ConfigError, load_config
from duetto.serve import cli
from duetto.serve.config import ServeConfig, check_serve_app_file

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _parse(argv: list[str]) -> argparse.Namespace:
    from duetto.cli import parse_args

    return parse_args(["serve", *argv])


@pytest.mark.parametrize("name", ["serve.yaml", "serve_tiny.yaml"])
def test_shipped_serve_configs_load(name):
    path = CONFIGS / name
    assert path.read_text().splitlines()[0] == f"# duetto serve run configs/{name}"
    cfg = load_config(ServeConfig, path)
    assert cfg.from_sweep and cfg.host == "127.0.0.1"


def test_serve_app_file_is_a_valid_ray_serve_config():
    path = CONFIGS / "serve_app.yaml"
    assert path.read_text().splitlines()[0] == "# serve run configs/serve_app.yaml"
    (cfg,) = check_serve_app_file(str(path))
    assert (
        cfg.generator_deployment.num_gpus == 0.5
        and cfg.from_sweep == load_config(ServeConfig, CONFIGS / "serve.yaml").from_sweep
    )


def test_serve_app_file_errors_name_the_key(tmp_path):
    data = yaml.safe_load((CONFIGS / "serve_app.yaml").read_text())
    data["applications"][0]["args"]["ensemble"]["k"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"applications\[0\].args: ensemble.k"):
        check_serve_app_file(str(bad))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["generator_deployment.max_batch_size=16", "generator_deployment.max_ongoing_requests=8"],
            "max_ongoing_requests: 8 is below",
        ),
        (["ensemble.k=20"], "ensemble.k: 20 is above limits.max_k"),
        (["ensemble.weight=1.5"], "ensemble.weight"),
        (["quantize=3"], "quantize"),
        (["reranker_deployment.max_queued_requests=0"], "reranker_deployment.max_queued_requests"),
        (["generator_template=alpaca"], "generator_template"),
        (["port=70000"], "port"),
        (["ensemble.temperture=1"], "unknown key ensemble.temperture"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ServeConfig, None, overrides)


def test_flags_override_yaml(tmp_path):
    args = _parse([str(CONFIGS / "serve.yaml"), "--generator", "g/dir", "--reranker", "r", "--k", "2", "--mode", "mix",
                   "--weight", "0.25", "--port", "9001", "--api-key", "0123", "--set", "limits.max_k=8"])  # fmt: skip
    cfg = cli.build_config(args)
    assert (cfg.generator, cfg.reranker, cfg.ensemble.k, cfg.ensemble.mode) == ("g/dir", "r", 2, "mix")
    assert cfg.ensemble.weight == 0.25 and cfg.port == 9001 and cfg.limits.max_k == 8
    assert cfg.api_key == "0123"  # a string flag stays a string (YAML would read 0123 as a number)
    assert cfg.generator_deployment.num_gpus == 0.5  # the rest of the YAML is kept


def test_print_config_masks_the_key(capsys):
    assert cli.run(_parse(["--generator", "g", "--reranker", "r", "--api-key", "secret", "--print-config"])) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["api_key"] == "***" and out["generator"] == "g"


def test_serve_fails_before_ray_on_missing_models(tmp_path, capsys):
    with pytest.raises(ConfigError, match="generator: name a trained model"):
        cli.run(_parse(["--reranker", "r"]))
    with pytest.raises(ConfigError, match=r"generator: .*no such directory"):
        cli.run(_parse(["--generator", str(tmp_path / "nope"), "--reranker", str(tmp_path)]))
    with pytest.raises(ConfigError, match="best.json: no such file"):
        cli.run(_parse(["--from-sweep", str(tmp_path)]))


def test_from_sweep_fills_only_what_is_not_named(tmp_path, qlora_trial, galore_trial):
    from duetto.serve.app import resolve_sources

    (tmp_path / "best.json").write_text(
        json.dumps({"galore": {"trial_dir": str(galore_trial)}, "qlora": {"trial_dir": str(qlora_trial)}})
    )
    cfg = resolve_sources(load_config(ServeConfig, None, [f"from_sweep={tmp_path}"]))
    assert (cfg.generator, cfg.reranker) == (str(qlora_trial), str(galore_trial))
    cfg = resolve_sources(load_config(ServeConfig, None, [f"from_sweep={tmp_path}", f"reranker={qlora_trial}"]))
    assert cfg.reranker == str(qlora_trial)


def test_bench_and_serve_options_do_not_mix(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["bench", "--port", "9000"])
    assert e.value.code == 2 and "unrecognized arguments: --port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _parse(["--generator", "g", "--reranker", "r", "--concurrency", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --concurrency" in capsys.readouterr().err


def test_run_is_the_default_action_and_flags_come_from_the_config_class(capsys):
    old, new = _parse(["--generator", "g", "--k", "3"]), _parse(["run", "--generator", "g", "--k", "3"])
    assert vars(old) == vars(new) and old.serve_action == "run"
    assert _parse(["bench"]).serve_action == "bench"
    with pytest.raises(SystemExit):
        _parse(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # the help of --k is ServeConfig's field docstring and its default, not a hand-written copy
    assert "Candidates sampled per request when the request does not say" in text and "(default: 4)" in text


def test_bench_refuses_non_loopback_and_unbounded_runs(capsys):
    assert cli.run(_parse(["bench", "--url", "http://192.0.2.1:8000", "--duration", "1"])) == 2
    assert "non-loopback" in capsys.readouterr().err
    assert cli.run(_parse(["bench", "--duration", "0"])) == 2
    assert "--duration" in capsys.readouterr().err
    assert cli.run(_parse(["bench", "--concurrency", "1000", "--duration", "1"])) == 2
    assert "--concurrency" in capsys.readouterr().err


def _report(tmp_path, selection, name="report.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"config": {"max_new_tokens": 48, "ensemble": {"k": 8, "temperature": 0.7, "top_p": 0.9}},
                                "selection": selection}))  # fmt: skip
    return str(path)


def test_ensemble_from_a_report_takes_its_validated_rule_and_sampling(tmp_path):
    fitted = {"modes": {"combined": {}}, "chosen": "combined", "greedy_candidate": True,
              "params": {"weights": {"consensus": 0.5, "generator": 2.0}}}  # fmt: skip
    report = _report(tmp_path, fitted)
    e = cli.build_config(_parse(["run", "--generator", "g", "--reranker", "r", "--ensemble-from", report])).ensemble
    assert (e.mode, e.k, e.greedy_candidate, e.temperature, e.top_p, e.max_new_tokens) == ("combined", 8, True, 0.7, 0.9, 48)
    assert e.weights == {"consensus": 0.5, "generator": 2.0}
    # named flags, then --set, still override the report, and the YAML is overridden by it
    yaml_file = tmp_path / "serve.yaml"
    yaml_file.write_text("generator: g\nreranker: r\nensemble:\n  mode: generator\n  k: 2\n")
    e = cli.build_config(_parse(["run", str(yaml_file), "--ensemble-from", report, "--k", "4",
                                 "--set", "ensemble.temperature=0.5"])).ensemble  # fmt: skip
    assert (e.mode, e.k, e.temperature) == ("combined", 4, 0.5)
    mix = _report(tmp_path, {"modes": {"mix": {}}, "chosen": "mix", "params": {"weight": 0.3}}, "mix.json")
    e = cli.build_config(_parse(["run", "--generator", "g", "--reranker", "r", "--ensemble-from", mix])).ensemble
    assert (e.mode, e.weight, e.greedy_candidate) == ("mix", 0.3, False)


@pytest.mark.parametrize("content,match", [
    (None, "no such report"),
    ("{not json", "not JSON"),
    (json.dumps({"config": {}}), "no `selection` section"),
    (json.dumps({"config": {"ensemble": {"k": 4, "temperature": 0.7, "top_p": 0.95}},
                 "selection": {"fitted_on": None, "chosen": "reranker"}}), "selection: the mode was configured \\(reranker\\), not fitted"),
    (json.dumps({"config": {"ensemble": {"k": 4}}, "selection": {"modes": {}, "chosen": "consensus"}}),
     "config.ensemble.temperature: missing"),
])  # fmt: skip
def test_ensemble_from_refuses_what_is_not_a_validated_report(tmp_path, content, match):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    args = _parse(["run", "--generator", "g", "--reranker", "r", "--ensemble-from", str(path)])
    with pytest.raises(ConfigError, match=f"--ensemble-from: {path}: {match}"):
        cli.build_config(args)
