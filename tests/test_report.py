"""`duetto report` on tiny trials: every row decodes through the serve code, intervals and paired tests
are present and coherent, raw outputs are written."""

from __future__ import annotations

import json

import pytest

from duetto.config import ConfigError, load_config


@pytest.fixture(scope="module")
def tiny_trials(tmp_path_factory, tiny_gemma_dir, unified_data):
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.trial import run_trial

    root = tmp_path_factory.mktemp("trials")
    train, test = unified_data
    out = {}
    for method in ("qlora", "galore"):
        cfg = load_config(TrialConfig, None, [
            f"method={method}", f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}",
            f"output_dir={root / method}", "max_steps=4", "max_seq_len=64", "batch_size=4", "learning_rate=3e-3",
            "scaling.num_workers=0", "eval.num_examples=2", "eval.max_new_tokens=4", "eval.loss_examples=8",
            "interim_eval_examples=0", "galore.rank=8", "qlora.bits=4",
        ])
        run_trial(cfg)
        out[method] = str(root / method)
    return out


def test_report_has_all_rows_intervals_and_outputs(tmp_path, tiny_gemma_dir, unified_data, tiny_trials):
    from duetto.report import ReportConfig, build_report

    cfg = load_config(ReportConfig, None, [
        f"baseline={tiny_gemma_dir}", f"qlora={tiny_trials['qlora']}", f"galore={tiny_trials['galore']}",
        f"test={unified_data[1]}", "num_examples=6", "max_new_tokens=6", "bootstrap=40", "ensemble.k=3",
        f"out={tmp_path / 'rep'}", "device=cpu",
    ])
    report = build_report(cfg, command="pytest")
    systems = report["systems"]
    assert list(systems)[:3] == ["Baseline", "QLoRA", "GaLore"] and any(k.startswith("Ensemble") for k in systems)
    for s in systems.values():
        for metric in ("bleu4", "rougeL"):
            point, lo, hi = s[metric]
            assert lo <= point + 1e-9 and point <= hi + 1e-9
    assert {(t["a"], t["metric"]) for t in report["tests"]} >= {("Baseline", "bleu4"), ("Baseline", "rougeL")}
    assert report["resources"]["QLoRA"]["method"] == "qlora"
    rows = [json.loads(line) for line in (tmp_path / "rep" / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert all(len(r["ensemble_candidates"]) == 3 for r in rows)
    for r in rows:  # the ensemble returns one of its own candidates, the one the reranker scored best
        cands = r["ensemble_candidates"]
        best = max(range(3), key=lambda i: cands[i]["reranker_score"])
        assert r["ensemble_chosen_index"] == best
    md = (tmp_path / "rep" / "report.md").read_text()
    for heading in ("## Quality", "## Paired bootstrap tests", "## What these numbers support", "## Resources",
                    "## Examples", "## Set-up"):
        assert heading in md
    # every paired test is read out in words, each with its own verdict
    reading = md.split("## What these numbers support")[1].split("## Resources")[0]
    assert reading.count("\n- ") >= len(report["tests"])
    for t in report["tests"]:
        verdict = "beats" if t["low"] > 0 else "is worse than" if t["high"] < 0 else "no detectable difference"
        assert f"{t['b']} {verdict}" in reading or (verdict.startswith("no") and f"{t['b']} vs {t['a']}" in reading)
    prov = report["provenance"]
    assert len(prov["data"]["test_sha256"]) == 64
    assert prov["trials"]["QLoRA"]["qlora.bits"] == 4 and prov["trials"]["GaLore"]["galore.rank"] == 8
    assert prov["trials"]["QLoRA"]["seed"] == prov["trials"]["GaLore"]["seed"]
    assert report["versions"]["rouge-score"][0].isdigit() and report["versions"]["sacrebleu"][0].isdigit()


def test_report_config_needs_both_trials():
    from duetto.report import ReportConfig

    with pytest.raises(ConfigError, match="qlora / galore"):
        load_config(ReportConfig, None, ["qlora=x"])
