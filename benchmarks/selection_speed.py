"""How long the ensemble's CPU-side selection work takes: ours beside rouge-score's and a per-candidate fit.

On the stored candidates of a `duetto report` (`outputs.jsonl`), one process, one machine:

- consensus: every candidate's mean ROUGE-L F against the request's other candidates (what
  `ensemble.mode: consensus` computes for each request on the ingress, and the report for every row);
  anchor: `rouge_score.RougeScorer.score` for every pair;
- utilities: every candidate's ROUGE-L F against its reference (what the report fits and scores the
  modes with); anchor: `RougeScorer.score` per candidate;
- fit: `serve.selection.fit_modes` on those rows (every mode's weights, 1,295 weightings for
  `combined`); anchor: `choose` applied to each row at each grid point;
- validation_fit: all of the above as `duetto report` runs it on validation rows (the candidates
  read as the greedy answer and k - 1 samples: two pools, in-sample and 5-fold fits); anchor: the
  same code with the three anchors patched in.

Each pair must give equal results (checked); the table shows the seconds and the ratio.

    python benchmarks/selection_speed.py docs/results/study_validated/outputs.jsonl --rows 137 \
        --out benchmarks/results/selection_speed_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import time
from datetime import date
from pathlib import Path


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def anchor_consensus(scorer, texts):
    """Consensus with rouge-score's ``score`` for every pair (the rule before its fast path)."""
    n = len(texts)
    if n < 2:
        return [0.0] * n
    sim = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        sim[i][j] = sim[j][i] = scorer.score(texts[i], texts[j])["rougeL"].fmeasure
    return [sum(row) / (n - 1) for row in sim]


def anchor_fit(candidates, utilities):
    """``fit_modes`` by applying ``choose`` to every row at every grid point (the rule it must equal)."""
    from duetto.serve.selection import (COMBINED_GRID, FEATURES, FITTED_MODES, MODE_FEATURES, WEIGHT_GRID, choose,
                                        has_features)  # fmt: skip

    def mean_pick(mode, weight=0.5, weights=None):
        picks = [u[choose(cs, mode, weight, weights)] for cs, u in zip(candidates, utilities)]
        return sum(picks) / len(picks)

    out = {}
    for mode in FITTED_MODES:
        if mode == "combined":
            names = [f for f in FEATURES if has_features(candidates, [f])]
            best = None
            for ws in itertools.product(COMBINED_GRID, repeat=len(names)):
                if any(ws):
                    value = mean_pick(mode, weights=dict(zip(names, ws)))
                    if best is None or value > best[0]:
                        best = (value, dict(zip(names, ws)))
            if best is not None:
                out[mode] = {"weights": {f: w for f, w in best[1].items() if w}, "mean_rougeL": best[0]}
        elif has_features(candidates, MODE_FEATURES[mode]):
            if mode in ("mix", "pmi"):
                value, weight = max(((mean_pick(mode, w), w) for w in WEIGHT_GRID), key=lambda t: (t[0], -t[1]))
                out[mode] = {"weight": weight, "mean_rougeL": value}
            else:
                out[mode] = {"mean_rougeL": mean_pick(mode)}
    return out


def validation_fit(rows):
    """What `duetto report` does with its validation rows: the stored candidates read as the greedy
    answer and k - 1 samples, every mode fitted on both pools with 5-fold cross-validation."""
    from duetto.workflows.selection_report import fit_selection_and_greedy

    rows = [{**r, "ensemble_candidates": [{k: v for k, v in c.items() if k != "consensus"}
                                          for c in r["ensemble_candidates"]]} for r in rows]  # fmt: skip
    return fit_selection_and_greedy(rows, len(rows[0]["ensemble_candidates"]) - 1)


@contextlib.contextmanager
def anchors_in_place(scorer):
    """The report's selection code with the anchors instead of the fast paths."""
    from unittest import mock

    def rouge(preds, refs):
        return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]

    with mock.patch("duetto.workflows.selection_report.fit_modes", lambda c, u, modes=None: anchor_fit(c, u)), \
            mock.patch("duetto.workflows.selection_report.consensus_scores", lambda t: anchor_consensus(scorer, t)), \
            mock.patch("duetto.trainers.evaluate.rouge_l_scores", rouge):  # fmt: skip
        yield


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outputs", help="a report's outputs.jsonl (rows with ensemble_candidates)")
    ap.add_argument("--rows", type=int, default=0, help="first N rows (0 = all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from rouge_score import rouge_scorer

    from duetto.serve.selection import consensus_scores, fit_modes
    from duetto.trainers.evaluate import rouge_l_scores
    from duetto.trainers.inference import Candidate

    rows = [json.loads(line) for line in Path(args.outputs).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[: args.rows or None]
    texts = [[c["text"] for c in r["ensemble_candidates"]] for r in rows]
    refs = [r["reference"] for r in rows]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    ours_cons, t_ours_cons = _timed(lambda: [consensus_scores(t) for t in texts])
    anchor_cons, t_anchor_cons = _timed(lambda: [anchor_consensus(scorer, t) for t in texts])
    flat_preds = [x for t in texts for x in t]
    flat_refs = [ref for ref, t in zip(refs, texts) for _ in t]
    ours_util, t_ours_util = _timed(lambda: rouge_l_scores(flat_preds, flat_refs))
    anchor_util, t_anchor_util = _timed(lambda: [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(flat_preds, flat_refs)])
    it = iter(ours_util)
    util = [[next(it) for _ in t] for t in texts]
    cands = [[Candidate(c["text"], c["generator_logprob"], reranker_score=c["reranker_score"],
                        prior_score=c["prior_score"], consensus=s) for c, s in zip(r["ensemble_candidates"], cs)]
             for r, cs in zip(rows, ours_cons)]  # fmt: skip
    ours_fit, t_ours_fit = _timed(lambda: fit_modes(cands, util))
    anchor_fitted, t_anchor_fit = _timed(lambda: anchor_fit(cands, util))

    ours_val, t_ours_val = _timed(lambda: validation_fit(rows))
    with anchors_in_place(scorer):
        anchor_val, t_anchor_val = _timed(lambda: validation_fit(rows))

    parts = [("consensus", t_ours_cons, t_anchor_cons, ours_cons == anchor_cons),
             ("utilities", t_ours_util, t_anchor_util, ours_util == anchor_util),
             ("fit", t_ours_fit, t_anchor_fit, ours_fit == anchor_fitted),
             ("validation_fit", t_ours_val, t_anchor_val, ours_val == anchor_val)]  # fmt: skip
    k = len(texts[0]) if texts else 0
    print(f"{len(rows)} rows x {k} candidates from {args.outputs}")
    print(f"{'part':15} {'ours s':>8} {'anchor s':>9} {'ratio':>7}  equal")
    for name, ours, anchor, equal in parts:
        print(f"{name:15} {ours:8.3f} {anchor:9.3f} {anchor / ours:7.1f}  {equal}")
    result = {
        "rows": [{"part": n, "seconds": o, "anchor_seconds": a, "ratio": a / o, "equal": e} for n, o, a, e in parts],
        "source": args.outputs, "num_rows": len(rows), "candidates": k,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(), "date": date.today().isoformat(),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not all(e for *_, e in parts):
        raise SystemExit("a fast path differs from its anchor")


if __name__ == "__main__":
    main()
