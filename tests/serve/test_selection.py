"""Selection modes: consensus, pmi and combined pick what their rule says (and not what the plain
reranker picks where they should differ); weights are fitted on held-out rows."""

from __future__ import annotations

import pytest

from duetto.serve.selection import check_mode, choose, consensus_scores, fit_modes, scores
from duetto.trainers.inference import Candidate


def test_consensus_picks_the_candidate_closest_to_the_others():
    texts = ["the cat sat on the mat", "a cat sat on the mat today", "the cat was on the mat",
             "stock prices rose sharply in march"]  # fmt: skip
    cons = consensus_scores(texts)
    assert len(cons) == 4 and cons[3] < min(cons[:3]) and all(0.0 <= c <= 1.0 for c in cons)
    assert consensus_scores(["alone"]) == [0.0]
    # the reranker prefers the outlier; consensus does not
    cands = [Candidate(t, reranker_score=r, consensus=c) for t, r, c in zip(texts, [-2.0, -2.5, -2.2, -0.5], cons)]
    assert choose(cands, "reranker") == 3
    assert choose(cands, "consensus") == max(range(3), key=lambda i: cons[i])


def test_pmi_discounts_answers_any_prompt_makes_likely():
    bland = Candidate("I'm sorry, I cannot help.", reranker_score=-0.8, prior_score=-0.9)
    specific = Candidate("Paris is the capital of France.", reranker_score=-1.2, prior_score=-3.5)
    cands = [bland, specific]
    assert choose(cands, "reranker") == 0
    assert choose(cands, "pmi", 1.0) == 1  # -1.2 + 3.5 beats -0.8 + 0.9
    assert choose(cands, "pmi", 0.0) == 0  # weight 0 is the plain reranker
    assert scores(cands, "pmi", 0.5) == pytest.approx([-0.8 + 0.45, -1.2 + 1.75])


def test_combined_weighs_standardised_features():
    cands = [Candidate("a", reranker_score=-1.0, generator_logprob=-3.0, consensus=0.10),
             Candidate("b", reranker_score=-1.1, generator_logprob=-1.0, consensus=0.40),
             Candidate("c", reranker_score=-2.0, generator_logprob=-2.0, consensus=0.35)]  # fmt: skip
    assert choose(cands, "combined", weights={"reranker": 1.0}) == choose(cands, "reranker") == 0
    assert choose(cands, "combined", weights={"reranker": 1.0, "consensus": 1.0}) == 1
    # standardising makes a feature's scale irrelevant: x100 on one weight is the same as on all
    assert scores(cands, "combined", weights={"consensus": 3.0}) == pytest.approx(
        [3 * s for s in scores(cands, "combined", weights={"consensus": 1.0})])
    with pytest.raises(ValueError, match="unknown feature 'length'"):
        check_mode("combined", {"length": 1.0})
    with pytest.raises(ValueError, match="non-zero weight"):
        choose(cands, "combined", weights={"reranker": 0.0})
    with pytest.raises(ValueError, match="no prior score"):
        choose(cands, "pmi", 1.0)


def test_fit_modes_finds_the_rule_that_matches_the_references():
    # utility follows consensus on every row; the reranker prefers candidate 0, which is always worst
    rows, utilities = [], []
    for i in range(6):
        cons = [0.1, 0.3 + 0.01 * i, 0.2]
        rows.append([Candidate(str(j), reranker_score=[-0.5, -1.5, -1.0][j], generator_logprob=[-1.0, -1.2, -0.9][j],
                               prior_score=[-0.6, -3.0, -2.0][j], consensus=cons[j]) for j in range(3)])  # fmt: skip
        utilities.append([0.1, 0.5, 0.3])
    fitted = fit_modes(rows, utilities)
    assert set(fitted) == {"reranker", "generator", "mix", "consensus", "pmi", "combined"}
    assert fitted["reranker"]["mean_rougeL"] == pytest.approx(0.1)
    assert fitted["consensus"]["mean_rougeL"] == pytest.approx(0.5)
    assert fitted["combined"]["mean_rougeL"] == pytest.approx(0.5)
    # pmi: reranker - w * prior prefers candidate 1 once w is large enough; the smallest such w is kept
    assert fitted["pmi"]["mean_rougeL"] == pytest.approx(0.5) and 0.4 <= fitted["pmi"]["weight"] <= 0.5
    # a feature the candidates lack leaves its modes out
    bare = [[Candidate(c.text, reranker_score=c.reranker_score) for c in cs] for cs in rows]
    assert set(fit_modes(bare, utilities)) == {"reranker", "combined"}


def _anchors():
    """benchmarks/selection_speed.py, whose anchors are the reference rules the fast paths must equal."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "selection_speed.py"
    spec = importlib.util.spec_from_file_location("selection_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_modes_equals_choosing_candidate_by_candidate(seed):
    """The array fit returns exactly the weights and means of ``choose`` applied to every candidate of
    every row at every grid point, ties included (scores drawn from a few values tie often), with
    rows of different candidate counts."""
    import random

    rnd = random.Random(seed)
    rows, utilities = [], []
    for i in range(25):
        k = rnd.choice([1, 3, 4, 5])
        rows.append([Candidate(f"{i}-{j}", reranker_score=rnd.choice([-1.0, -1.5, -2.0]),
                               generator_logprob=rnd.choice([-0.5, -1.0, -1.25]),
                               prior_score=rnd.choice([-1.0, -3.0]), consensus=rnd.choice([0.1, 0.2, 0.2, 0.4]))
                     for j in range(k)])  # fmt: skip
        utilities.append([rnd.random() for _ in range(k)])
    rows[0][0].reranker_score = float("-inf")  # an answer with no scored token
    rows[1][-1].reranker_score = float("-inf")
    rows[2][0].generator_logprob = float("nan")
    assert fit_modes(rows, utilities) == _anchors().anchor_fit(rows, utilities)
    bare = [[Candidate(c.text, reranker_score=c.reranker_score, consensus=c.consensus) for c in cs] for cs in rows]
    assert fit_modes(bare, utilities) == _anchors().anchor_fit(bare, utilities)
    # a NaN in a row whose utilities run past its candidates picks among the candidates only
    ragged = [[Candidate("a", reranker_score=-1.0), Candidate("b", reranker_score=float("nan"))],
              [Candidate(t, reranker_score=-1.0) for t in "cde"]]  # fmt: skip
    assert fit_modes(ragged, [[0.1, 0.05, 0.9], [0.3, 0.2, 0.2]], ["reranker"]) == {"reranker": {"mean_rougeL": 0.2}}
    with pytest.raises(ValueError, match="no candidates"):
        fit_modes([[]], [[]])


def test_consensus_equals_rouge_score_on_every_pair():
    """Consensus equals rouge-score's own ROUGE-L F per pair, averaged."""
    import random

    from rouge_score import rouge_scorer

    anchors = _anchors()
    rnd = random.Random(0)
    vocab = "the cats sat running on mats, a dog ran far. Ran RUNS 3 x-y".split()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for _ in range(40):
        texts = [" ".join(rnd.choice(vocab) for _ in range(rnd.randint(0, 30))) for _ in range(rnd.randint(1, 6))]
        assert consensus_scores(texts) == anchors.anchor_consensus(scorer, texts)


def test_the_default_mode_is_chosen_on_rows_its_weights_never_saw():
    """On scores unrelated to the references every rule is worth the same; fitted in-sample, combined's
    many weight settings look better, cross-validated they do not, and the simple rule is kept."""
    import random

    from duetto.workflows.selection_report import cross_validated, fit_selection

    rnd = random.Random(0)
    words = "the a cat dog sat ran mat far on in".split()
    rows = []
    for _ in range(60):
        cands = [{"text": " ".join(rnd.choices(words, k=6)), "reranker_score": rnd.gauss(-2, 0.3),
                  "generator_logprob": rnd.gauss(-1.5, 0.3), "prior_score": rnd.gauss(-3, 0.5)} for _ in range(4)]
        rows.append({"reference": " ".join(rnd.choices(words, k=6)), "ensemble_candidates": cands})
    sel = fit_selection(rows)
    modes = sel["modes"]
    assert modes["combined"]["mean_rougeL"] > modes["reranker"]["mean_rougeL"] + 0.02  # fitted on these rows
    assert modes["combined"]["cv_rougeL"] < modes["combined"]["mean_rougeL"] - 0.02  # not on unseen ones
    assert sel["folds"] == 5 and sel["chosen"] == max(modes, key=lambda m: modes[m]["cv_rougeL"])
    assert cross_validated([], []) == {}
