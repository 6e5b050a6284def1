"""The report as Markdown: quality with intervals, paired tests and what they support, how the
ensemble chose, resources, examples and the set-up. Reads only the report dict `build_report` wrote.
"""

from __future__ import annotations

import json
from typing import Any


def fmt_ci(point: float, lo: float, hi: float, digits: int) -> str:
    return f"{point:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _sign(test: dict[str, Any]) -> int:
    """1 when a test's interval lies above 0 (B better), -1 below it (B worse), 0 when it includes 0."""
    return 1 if test["low"] > 0 else -1 if test["high"] < 0 else 0


def _reading(report: dict[str, Any]) -> list[str]:
    """Plain sentences on what the paired tests do and do not support, derived from them alone."""
    systems, tests = report["systems"], report["tests"]
    lines = []
    for t in tests:
        metric = {"bleu4": "BLEU-4", "rougeL": "ROUGE-L"}.get(t["metric"], t["metric"])
        span = f"Δ {t['delta']:+.3f}, 95% interval [{t['low']:+.3f}, {t['high']:+.3f}]"
        verdict = {1: f"**{t['b']} beats {t['a']} on {metric}** ({span}); the interval excludes 0.",
                   -1: f"**{t['b']} is worse than {t['a']} on {metric}** ({span}); the interval excludes 0.",
                   0: f"{t['b']} vs {t['a']} on {metric}: no detectable difference ({span}); the interval "
                      "includes 0, so this run does not support a ranking either way."}[_sign(t)]
        lines.append(f"- {verdict}")
    n = report["num_examples"]
    singles = [k for k in ("Baseline", "QLoRA", "GaLore") if k in systems]
    values = ", ".join(f"{k} {systems[k]['rougeL'][0]:.3f}" for k in singles)
    points = [systems[k]["rougeL"][0] for k in singles]
    strict = len(points) == 3 and points[0] < points[1] < points[2]
    lines += [
        f"- ROUGE-L points: {values} (the study: Baseline 0.15, QLoRA 0.16, GaLore 0.19). The study's order "
        f"Baseline < QLoRA < GaLore {'holds' if strict else 'does not hold'} in these point estimates; an order "
        "counts as a finding only where the paired interval above excludes 0.",
        f"- Each trained row is one training run (one seed), and every row is evaluated on one split of {n} "
        "examples: the intervals cover the choice of test examples, not run-to-run training noise.",
        f"- {len(tests)} tests at 95% each, without correction for multiple comparisons: expect about one in "
        "twenty intervals to exclude 0 by chance. The ensemble is tested against whichever single model "
        "scored higher ROUGE-L on these same examples.",
        "- The study's figures came from google/gemma-3-1b-it on its own 5k train / 2k test data: set the absolute "
        "numbers here beside them only where model, data and decoding match; the comparisons between rows "
        "do not depend on that.",
    ]
    return lines


def render_selection(selection: dict, methods: dict) -> list[str]:
    """How the ensemble's rule was fixed (validation rows), then every rule on the test candidates."""
    L = ["## How the ensemble chose among its candidates", ""]
    if selection.get("modes"):
        L += [f"The rule and its weights were fixed on {selection['rows']} validation rows ({selection['source']}) "
              f"before any test row was decoded: each mode's weights maximise the mean ROUGE-L F of its picks "
              f"there; the mode with the best {selection['folds']}-fold cross-validated ROUGE-L F (weights fitted on "
              f"the other folds), **{selection['chosen']}**, is the ensemble's.", "",
              "| mode | weights | validation ROUGE-L F, fitted rows | cross-validated |", "|---|---|---|---|"]  # fmt: skip
        for mode, f in selection["modes"].items():
            w = f.get("weights") or ({"weight": f["weight"]} if "weight" in f else {})
            L.append(f"| {mode} | {', '.join(f'{k} {v:+g}' for k, v in w.items()) or '–'} | {f['mean_rougeL']:.3f} "
                     f"| {f['cv_rougeL']:.3f} |")  # fmt: skip
        L.append("")
        pools = selection.get("pools")
        if pools:
            L += [f"The validation rows also had the generator's greedy answer beside the samples, so the rule was "
                  f"fitted on both candidate pools: the k samples (mode {pools['false']['chosen']}, cross-validated "
                  f"ROUGE-L F {pools['false']['cv_rougeL']:.3f}) and the greedy answer with k - 1 samples (mode "
                  f"{pools['true']['chosen']}, {pools['true']['cv_rougeL']:.3f}). The test rows were decoded with "
                  f"`greedy_candidate: {str(selection['greedy_candidate']).lower()}`; the table above is that pool's.",
                  ""]  # fmt: skip
    else:
        L += [f"No validation rows were given (`validation.train`): the configured mode, {selection.get('chosen')}, "
              "was used, and the other modes below use their default weights.", ""]
    if not methods:
        return L
    L += [f"Every rule on the same candidates: {methods['num_examples']} test prompts, k={methods['k']} sampled "
          "candidates each, 95% bootstrap intervals. Model time is the decoding and scoring passes the rule needs, "
          "per request, amortised over the report's batches. A random pick's ROUGE-L is the mean over the k "
          "candidates; its BLEU-4 is the first sample's.", "",
          "| choice | ROUGE-L F (0-1) | BLEU-4 | model time (ms / request) |", "|---|---|---|---|"]  # fmt: skip
    for m in methods["methods"]:
        ms = f"{m['latency_ms']:.0f}" if m.get("latency_ms") is not None else "–"
        L.append(f"| {m['name']} | {fmt_ci(*m['rougeL'], 3)} | {fmt_ci(*m['bleu4'], 2)} | {ms} |")
    L += ["", "Paired tests (B − A on the same resampled examples):", ""]
    for t in methods["tests"]:
        verdict = {1: "better", -1: "worse", 0: "no detectable difference"}[_sign(t)]
        digits = 3 if t["metric"] == "rougeL" else 2
        L.append(f"- {t['b']} vs {t['a']}, {'ROUGE-L' if t['metric'] == 'rougeL' else 'BLEU-4'}: "
                 f"Δ {t['delta']:+.{digits}f} [{t['low']:+.{digits}f}, {t['high']:+.{digits}f}]: {verdict}")  # fmt: skip
    return L


def render_counts(counts: dict) -> list[str]:
    """The ensemble's mode on the first n of its candidates, for each n: quality, the oracle, the cost."""
    single = counts.get("best_single")
    L = ["## How many candidates", "",
         f"Mode {counts['mode']} choosing among the first n of the k={counts['k']} candidates sampled for each of "
         f"{counts['num_examples']} test prompts (the first n of k samples are n samples). Model time per request "
         "was timed with n candidates on one batch of prompts (all k: the whole run).", "",
         "| candidates | ROUGE-L F (0-1) | BLEU-4 | "
         + (f"Δ ROUGE-L vs {single} | Δ BLEU-4 vs {single} | " if single else "")
         + "random pick ROUGE-L | best candidate ROUGE-L (upper bound) | model time (ms / request) |",
         "|---|---|---|" + ("---|---|" if single else "") + "---|---|---|"]  # fmt: skip
    for c in counts["counts"]:
        cells = [str(c["n"]), fmt_ci(*c["rougeL"], 3), fmt_ci(*c["bleu4"], 2)]
        if single:
            for metric, digits in (("rougeL", 3), ("bleu4", 2)):
                t = c["vs_best_single"][metric]
                cells.append(f"{t['delta']:+.{digits}f} [{t['low']:+.{digits}f}, {t['high']:+.{digits}f}]")
        ms = f"{c['latency_ms']:.0f}" if c.get("latency_ms") is not None else "–"
        cells += [f"{c['random_rougeL']:.3f}", fmt_ci(*c["oracle_rougeL"], 3), ms]
        L.append("| " + " | ".join(cells) + " |")
    return L


def render_markdown(report: dict, rows: list[dict], systems: dict[str, dict]) -> str:
    L = ["# Study reproduction: Baseline vs QLoRA vs GaLore vs the ensemble", ""]
    L += [f"Command: `{report['command']}`", "",
          f"Test examples: {report['num_examples']} (one fixed split; the same prompts and decoding for every row; "
          "single models greedy, the ensemble samples k and re-ranks). Intervals: 95% percentile bootstrap over "
          f"examples ({report['config']['bootstrap']} resamples).", ""]
    L += ["## Quality", "", "| system | BLEU-4 (sacrebleu, 0-100) | ROUGE-L F (0-1) |", "|---|---|---|",
          "| *study: Baseline / QLoRA / GaLore* | *1.63 / 1.68 / 1.75* | *0.15 / 0.16 / 0.19* |"]
    for name, s in report["systems"].items():
        L.append(f"| {name} | {fmt_ci(*s['bleu4'], 2)} | {fmt_ci(*s['rougeL'], 3)} |")
    L += ["", "## Paired bootstrap tests (B − A on the same resampled examples)", "",
          "| A | B | metric | Δ | 95% interval | p(B not better) | reading |", "|---|---|---|---|---|---|---|"]
    for t in report["tests"]:
        reading = {1: "B better (interval above 0)", -1: "B worse (interval below 0)",
                   0: "no detectable difference (interval includes 0)"}[_sign(t)]
        L.append(f"| {t['a']} | {t['b']} | {t['metric']} | {t['delta']:+.3f} | [{t['low']:+.3f}, {t['high']:+.3f}] "
                 f"| {t['p_not_better']:.3f} | {reading} |")
    L += ["", "## What these numbers support", "", *_reading(report)]
    if report.get("selection"):
        L += ["", *render_selection(report["selection"], report.get("selection_methods") or {})]
    if report.get("candidate_counts"):
        L += ["", *render_counts(report["candidate_counts"])]
    L += ["", "## Resources", "", "| system | peak train memory (GiB) | trainable params | trained tokens/s | "
          "train time (s, optimizer steps) | generation latency (ms / example) |", "|---|---|---|---|---|---|"]
    for name, s in report["systems"].items():
        r = report["resources"].get(name, {})
        mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "–"
        tp = f"{r['trainable_params']:,}" if r.get("trainable_params") else "–"
        tps = f"{r['tokens_per_second']:.0f}" if r.get("tokens_per_second") else "–"
        wall = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "–"
        L.append(f"| {name} | {mem} | {tp} | {tps} | {wall} | {s['latency_s'] * 1000:.0f} |")
    # measured on an H200: the first generate at each new batch shape costs ~3 s more (generate_diag.py),
    # so the system decoded first carries those one-time costs for the ones after it
    L += ["", f"Generation latency is one decoding pass over all {report['num_examples']} rows divided by their "
          f"number, in this order: {', '.join(report['systems'])}. On a GPU the first system decoded also pays "
          "the process's one-time cost of each new batch shape, so read its latency as an upper bound."]
    L += ["", "## Examples", ""]
    names = list(systems)
    L += ["| instruction | reference | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]

    def cell(t: str) -> str:
        t = " ".join(t.split())
        return (t[:160] + "…" if len(t) > 160 else t).replace("|", "\\|")

    for i in range(min(5, len(rows))):
        r = rows[i]
        instr = r["instruction"] + (f" — {r['input']}" if r.get("input") else "")
        L.append(f"| {cell(instr)} | {cell(r['response'])} | " + " | ".join(cell(systems[n]['texts'][i]) for n in names) + " |")
    L += ["", "## Set-up", "", "```json", json.dumps({"config": report["config"], **report["provenance"],
                                                    "versions": report["versions"]}, indent=2), "```", ""]
    return "\n".join(L)

