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
    from duetto.workflows.report import ReportConfig, build_report

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
                    "## Examples", "## Set-up", "## How the ensemble chose among its candidates"):
        assert heading in md
    # the reranker's pick, re-scored from the stored candidates, is the ensemble row itself
    picks = report["ensemble_choices"]["rougeL"]
    ens = next(v for k, v in systems.items() if k.startswith("Ensemble"))
    assert picks["what the ensemble returned (mode reranker)"][0] == pytest.approx(ens["rougeL"][0])
    # every paired test is read out in words, each with its own verdict
    reading = md.split("## What these numbers support")[1].split("## Resources")[0]
    resources = md.split("## Resources")[1].split("## Examples")[0]
    assert f"in this order: {', '.join(report['systems'])}" in resources  # the latency caveat names the order
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
    from duetto.workflows.report import ReportConfig

    with pytest.raises(ConfigError, match="qlora / galore"):
        load_config(ReportConfig, None, ["qlora=x"])


def test_ensemble_choices_separate_sampling_from_reranking():
    """Two prompts, two candidates each: the reranker prefers the wrong one, the generator the right one."""
    from duetto.workflows.render import render_choices
    from duetto.workflows.report import ensemble_choices

    def cand(text, gen, rer):
        return {"text": text, "generator_logprob": gen, "reranker_score": rer}

    rows = [
        {"reference": "the cat sat on the mat", "ensemble_chosen_index": 1, "ensemble_candidates": [
            cand("the cat sat on the mat", -0.1, -2.0), cand("a dog ran far away", -3.0, -0.5)]},
        {"reference": "water boils at one hundred degrees", "ensemble_chosen_index": 1, "ensemble_candidates": [
            cand("boils at one hundred", -0.2, -1.0), cand("ice is cold", -2.0, -0.1)]},
    ]
    c = ensemble_choices(rows, mode="reranker", weight=0.5, n_resamples=50)
    r = {name.split(" (")[0]: ci[0] for name, ci in c["rougeL"].items()}
    assert r["what the ensemble returned"] == 0.0  # both wrong picks share no word with their reference
    assert "the reranker's pick" not in r  # the same as what was returned in mode reranker
    assert r["the generator's own pick"] == r["the best candidate against the reference"] > r["any one candidate"] > 0
    assert r["mode mix, weight 0.5"] == r["the generator's own pick"]  # (-0.1-2.0)/2 > (-3.0-0.5)/2, and so on
    assert [t["b"].split(" (")[0] for t in c["tests"]] == ["what the ensemble returned", "the generator's own pick",
                                                          "mode mix, weight 0.5"]
    assert "## How the ensemble chose among its candidates" in "\n".join(render_choices(c))
    # mode generator stores no reranker scores: the rows that need them are left out, not a crash
    for row in rows:
        row["ensemble_chosen_index"] = 0
        for cd in row["ensemble_candidates"]:
            cd["reranker_score"] = None
    r = {name.split(" (")[0]: ci[0] for name, ci in ensemble_choices(rows, mode="generator", n_resamples=50)["rougeL"].items()}
    assert set(r) == {"any one candidate", "what the ensemble returned", "the best candidate against the reference"}
    assert r["what the ensemble returned"] == r["the best candidate against the reference"]
    assert ensemble_choices([{"reference": "x", "ensemble_candidates": None}]) == {}
