"""`duetto report` on tiny trials: every row decodes through the serve code, intervals and paired tests
are present and coherent, raw outputs are written."""

from __future__ import annotations

import json

import pytest

from duetto.config import ConfigError, load_config
from duetto.serve.selection import choose
from duetto.trainers.inference import Candidate


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
        "ensemble.compare_k=[1, 2]",
        f"out={tmp_path / 'rep'}", "device=cpu", f"validation.train={unified_data[0]}", "validation.val_size=5",
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
    # greedy_candidate was chosen on the validation rows, fitted on both pools of their k + 1 candidates;
    # with it, each prompt's first candidate is the QLoRA trial's greedy answer (its own row)
    sel = report["selection"]
    assert set(sel["pools"]) == {"false", "true"} and sel["k"] == 3
    chosen_pool = sel["pools"][str(sel["greedy_candidate"]).lower()]
    assert chosen_pool["cv_rougeL"] >= max(p["cv_rougeL"] for p in sel["pools"].values())
    assert chosen_pool["chosen"] == sel["chosen"]
    if sel["greedy_candidate"]:
        assert all(r["ensemble_candidates"][0]["text"] == r["QLoRA"] for r in rows)
    # the mode and its weights were fitted on the 5 validation rows; the ensemble returns the candidate
    # that rule picks, recomputed here from the stored candidates (every feature stored for each)
    sel = report["selection"]
    assert sel["rows"] == 5 and sel["chosen"] in sel["modes"] and sel["source"].endswith("last 5")
    assert set(sel["modes"]) == {"reranker", "generator", "mix", "consensus", "pmi", "combined"}
    assert sel["modes"][sel["chosen"]]["cv_rougeL"] == max(f["cv_rougeL"] for f in sel["modes"].values())
    for r in rows:
        cands = [Candidate(**c) for c in r["ensemble_candidates"]]
        assert all(None not in (c.reranker_score, c.generator_logprob, c.prior_score, c.consensus) for c in cands)
        params = sel["params"]
        assert r["ensemble_chosen_index"] == choose(cands, sel["chosen"], params.get("weight", 0.5), params.get("weights"))
    md = (tmp_path / "rep" / "report.md").read_text()
    for heading in ("## Quality", "## Paired bootstrap tests", "## What these numbers support", "## Resources",
                    "## Examples", "## Set-up", "## How the ensemble chose among its candidates"):
        assert heading in md
    # the chosen rule's pick, re-scored from the stored candidates, is the ensemble row itself
    methods = report["selection_methods"]["methods"]
    returned = next(m for m in methods if m["name"].endswith("(what the ensemble returned)"))
    ens_name, ens = next((k, v) for k, v in systems.items() if k.startswith("Ensemble"))
    assert returned["mode"] == sel["chosen"] and f"mode {sel['chosen']}" in ens_name
    assert returned["rougeL"][0] == pytest.approx(ens["rougeL"][0]) and returned["bleu4"][0] == pytest.approx(ens["bleu4"][0])
    assert {m["mode"] for m in methods} >= {None, "reranker", "generator", "mix", "consensus", "pmi"}
    assert all(m["latency_ms"] > 0 for m in methods if m["mode"])
    # every paired test is read out in words, each with its own verdict
    reading = md.split("## What these numbers support")[1].split("## Resources")[0]
    resources = md.split("## Resources")[1].split("## Examples")[0]
    assert f"in this order: {', '.join(report['systems'])}" in resources  # the latency caveat names the order
    assert reading.count("\n- ") >= len(report["tests"])
    for t in report["tests"]:
        verdict = "beats" if t["low"] > 0 else "is worse than" if t["high"] < 0 else "no detectable difference"
        assert f"{t['b']} {verdict}" in reading or (verdict.startswith("no") and f"{t['b']} vs {t['a']}" in reading)
    # the returned mode on the first 1, 2 and all 3 candidates: all 3 is the ensemble row itself
    counts = {c["n"]: c for c in report["candidate_counts"]["counts"]}
    assert list(counts) == [1, 2, 3] and report["candidate_counts"]["mode"] == sel["chosen"]
    assert counts[3]["rougeL"][0] == pytest.approx(ens["rougeL"][0]) and counts[3]["bleu4"][0] == pytest.approx(ens["bleu4"][0])
    assert counts[1]["rougeL"][0] == pytest.approx(counts[1]["oracle_rougeL"][0])  # one candidate: nothing to choose
    assert all(c["latency_ms"] > 0 for c in counts.values()) and "## How many candidates" in md
    prov = report["provenance"]
    assert len(prov["data"]["test_sha256"]) == 64
    assert prov["trials"]["QLoRA"]["qlora.bits"] == 4 and prov["trials"]["GaLore"]["galore.rank"] == 8
    assert prov["trials"]["QLoRA"]["seed"] == prov["trials"]["GaLore"]["seed"]
    assert report["versions"]["rouge-score"][0].isdigit() and report["versions"]["sacrebleu"][0].isdigit()
    # `duetto serve run --ensemble-from` starts from the rule and sampling this report validated
    from duetto.serve import cli as serve_cli
    from duetto.cli import parse_args

    args = parse_args(["serve", "run", "--generator", "g", "--reranker", "r", "--ensemble-from",
                       str(tmp_path / "rep" / "report.json")])  # fmt: skip
    e = serve_cli.build_config(args).ensemble
    assert (e.mode, e.k, e.greedy_candidate, e.temperature, e.top_p, e.max_new_tokens) == (
        sel["chosen"], 3, sel["greedy_candidate"], cfg.ensemble.temperature, cfg.ensemble.top_p, 6)
    assert e.weight == sel["params"].get("weight", 0.5) and e.weights == (sel["params"].get("weights") or {})


def test_report_config_needs_both_trials():
    from duetto.workflows.report import ReportConfig

    with pytest.raises(ConfigError, match="qlora / galore"):
        load_config(ReportConfig, None, ["qlora=x"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["ensemble.mode=combined"], "non-zero weight"),
    (["ensemble.weights={length: 1.0}"], "unknown feature 'length'"),
    (["ensemble.weight=3"], r"ensemble.weight: must be in \[0, 1\]"),
    (["ensemble.mode=reranker-greedy", "validation.train=t.jsonl"], "samples none"),
    (["ensemble.compare_k=[8]"], r"compare_k: each count must be in 1..ensemble.k \(4\)"),
])  # fmt: skip
def test_report_config_checks_the_selection_rule_before_decoding(overrides, message):
    from duetto.workflows.report import ReportConfig

    with pytest.raises(ConfigError, match=message):
        load_config(ReportConfig, None, ["qlora=q", "galore=g", *overrides])


def test_selection_table_separates_sampling_from_reranking():
    """Two prompts, two candidates each: the reranker prefers the wrong one, the generator the right one."""
    from duetto.workflows.render import render_selection
    from duetto.workflows.selection_report import ORACLE, RANDOM_PICK, selection_table

    def cand(text, gen, rer):
        return {"text": text, "generator_logprob": gen, "reranker_score": rer}

    def table(rows, returned):
        modes = {"reranker": {}, "generator": {}, "mix": {"weight": 0.5}, "pmi": {"weight": 1.0}}
        single = ("QLoRA", ["the cat sat", "water boils"])
        return selection_table(rows, modes=modes, returned_mode=returned, best_single=single, n_resamples=50,
                               per_request_ms={"generate": 10.0, "score": 2.0})  # fmt: skip

    rows = [
        {"reference": "the cat sat on the mat", "ensemble_chosen_index": 1, "ensemble_candidates": [
            cand("the cat sat on the mat", -0.1, -2.0), cand("a dog ran far away", -3.0, -0.5)]},
        {"reference": "water boils at one hundred degrees", "ensemble_chosen_index": 1, "ensemble_candidates": [
            cand("boils at one hundred", -0.2, -1.0), cand("ice is cold", -2.0, -0.1)]},
    ]
    c = table(rows, "reranker")
    r = {m["name"].split(",")[0].replace(" (what the ensemble returned)", ""): m["rougeL"][0] for m in c["methods"]}
    assert r["mode reranker"] == 0.0  # both wrong picks share no word with their reference
    assert r["mode generator"] == r[ORACLE] > r[RANDOM_PICK] > 0
    assert r["mode mix"] == r["mode generator"]  # (-0.1-2.0)/2 > (-3.0-0.5)/2, and so on
    assert "mode pmi" not in r and "mode consensus" not in r  # no prior stored; consensus not asked for
    assert c["features"] == ["reranker", "generator", "consensus"]  # consensus comes from the texts alone
    latency = {m["mode"]: m.get("latency_ms") for m in c["methods"] if m["mode"]}
    assert latency == {"reranker": 12.0, "generator": 10.0, "mix": 12.0}
    tested = {(t["a"], t["b"].split(",")[0].split(" (")[0], t["metric"]) for t in c["tests"]}
    assert ("QLoRA", "mode generator", "bleu4") in tested and (RANDOM_PICK, "mode mix", "rougeL") in tested
    assert "## How the ensemble chose among its candidates" in "\n".join(render_selection({"chosen": "reranker"}, c))
    # mode generator stores no reranker scores: the modes that need them are left out, not a crash
    for row in rows:
        for cd in row["ensemble_candidates"]:
            cd["reranker_score"] = None
    modes = {m["mode"] for m in table(rows, "generator")["methods"]}
    assert modes == {None, "generator"}
    assert selection_table([{"reference": "x", "ensemble_candidates": None}], modes={}, returned_mode="reranker") == {}


def test_count_table_scores_the_mode_on_the_first_n_candidates():
    """Consensus among the first 2 of 3 candidates is a tie (the first wins), among all 3 the two
    look-alikes win: the table recomputes it for each n, and the oracle never falls as n grows."""
    from duetto.workflows.render import render_counts
    from duetto.workflows.selection_report import count_table

    def cand(text):
        return {"text": text, "generator_logprob": -1.0, "reranker_score": -1.0}

    rows = [{"reference": "gamma delta epsilon", "ensemble_candidates": [
        cand("alpha beta"), cand("gamma delta epsilon"), cand("gamma delta zeta")]}] * 3
    t = count_table(rows, mode="consensus", params={}, counts=[1, 2, 5], best_single=("QLoRA", ["alpha beta"] * 3),
                    per_request_ms={1: {"generate": 5.0, "consensus": 1.0}, 3: {"generate": 9.0, "consensus": 2.0}},
                    n_resamples=30)  # fmt: skip
    by_n = {c["n"]: c for c in t["counts"]}
    assert list(by_n) == [1, 2, 3] and t["k"] == 3  # 5 is more than the rows hold; k is always there
    assert by_n[1]["rougeL"][0] == by_n[2]["rougeL"][0] == 0.0  # "alpha beta": the first, on a tie
    assert by_n[3]["rougeL"][0] == 1.0  # the look-alike that is the reference
    assert by_n[1]["oracle_rougeL"][0] <= by_n[2]["oracle_rougeL"][0] <= by_n[3]["oracle_rougeL"][0] == 1.0
    assert by_n[3]["vs_best_single"]["rougeL"]["delta"] == pytest.approx(1.0)
    assert (by_n[1]["latency_ms"], by_n[2]["latency_ms"], by_n[3]["latency_ms"]) == (6.0, None, 11.0)
    md = "\n".join(render_counts(t))
    assert "## How many candidates" in md and md.count("\n| ") == 4  # header + 3 counts
    # a row without candidates is left out, and so is the single model's answer to it
    gap = count_table([{"reference": "x y", "ensemble_candidates": None}, *rows], mode="consensus", params={},
                      counts=[], best_single=("QLoRA", ["x y"] + ["alpha beta"] * 3), n_resamples=30)  # fmt: skip
    assert gap["num_examples"] == 3 and gap["counts"][-1]["vs_best_single"]["rougeL"]["delta"] == pytest.approx(1.0)


@pytest.mark.parametrize("greedy_is_right", [True, False])
def test_greedy_candidate_is_chosen_on_the_pool_whose_rule_validates_better(greedy_is_right):
    """Rows of k + 1 = 3 candidates (the greedy answer, then 2 samples): the True pool keeps the greedy
    answer and the first sample, the False pool both samples; consensus is recomputed in each pool.
    Where the greedy answer is the reference, the True pool wins; where a sample is, the False pool."""
    from duetto.workflows.selection_report import fit_selection_and_greedy, greedy_pools

    def cand(text, g):
        return {"text": text, "generator_logprob": g, "reranker_score": g, "prior_score": g, "consensus": 9.0}

    right, wrong = "gamma delta epsilon", "alpha beta"
    greedy, sample = (right, wrong) if greedy_is_right else (wrong, right)
    rows = [{"reference": right, "ensemble_candidates": [cand(greedy, -1.0), cand(sample, -2.0), cand(sample, -2.0)]}
            for _ in range(6)]  # fmt: skip
    pools = greedy_pools(rows, 2)
    assert [c["text"] for c in pools[True][0]["ensemble_candidates"]] == [greedy, sample]
    assert [c["text"] for c in pools[False][0]["ensemble_candidates"]] == [sample, sample]
    assert all("consensus" not in c for pool in pools.values() for c in pool[0]["ensemble_candidates"])
    fit = fit_selection_and_greedy(rows, 2)
    assert fit["greedy_candidate"] is greedy_is_right and fit["k"] == 2
    assert fit["pools"][str(greedy_is_right).lower()]["cv_rougeL"] == pytest.approx(1.0)
    if greedy_is_right:  # two wrong samples: no rule finds the reference
        assert fit["pools"]["false"]["cv_rougeL"] == pytest.approx(0.0)


def test_report_decodes_with_the_configured_greedy_candidate(tmp_path, tiny_gemma_dir, unified_data, tiny_trials):
    """Without the validation choice, ensemble.greedy_candidate decides: each prompt's first candidate
    is the QLoRA trial's greedy answer, the QLoRA row itself."""
    from duetto.workflows.report import ReportConfig, build_report

    cfg = load_config(ReportConfig, None, [
        f"baseline={tiny_gemma_dir}", f"qlora={tiny_trials['qlora']}", f"galore={tiny_trials['galore']}",
        f"test={unified_data[1]}", "num_examples=3", "max_new_tokens=6", "bootstrap=20", "ensemble.k=3",
        "ensemble.greedy_candidate=true", f"out={tmp_path / 'rep'}", "device=cpu",
    ])  # fmt: skip
    report = build_report(cfg, command="pytest")
    rows = [json.loads(line) for line in (tmp_path / "rep" / "outputs.jsonl").read_text().splitlines()]
    assert all(len(r["ensemble_candidates"]) == 3 and r["ensemble_candidates"][0]["text"] == r["QLoRA"] for r in rows)
    assert any(name.startswith("Ensemble (QLoRA top-3, greedy first") for name in report["systems"])
