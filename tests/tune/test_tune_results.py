"""Pure pieces of the sweep: per-method ASHA, best-trial choice, the Pareto front, the Markdown/CSV tables."""

from __future__ import annotations

import csv
import math

import pytest

from duetto.tune.results import COMPLETED, ERROR, STOPPED, _split_note, best_per_method, pareto_front, write_csv


def _trial(trial_id: str, method: str):
    from ray.tune.experiment import Trial

    return Trial("__fake", config={"trial": {"method": method}}, trial_id=trial_id, stub=True)


def _feed(scheduler, trials_and_losses):
    """Report ``(trial, eval_loss)`` at iteration 1 in order; return the scheduler's decisions."""
    return [scheduler.on_trial_result(None, t, {"training_iteration": 1, "eval_loss": v}) for t, v in trials_and_losses]


def test_per_method_asha_compares_a_trial_only_with_its_own_method():
    from duetto.tune.scheduler import PerMethodScheduler, make_asha

    g1, g2, q1, q2 = _trial("g1", "galore"), _trial("g2", "galore"), _trial("q1", "qlora"), _trial("q2", "qlora")
    # QLoRA's losses are all worse than GaLore's: a shared ASHA cuts the QLoRA trials for being QLoRA.
    order = [(g1, 1.0), (g2, 1.2), (q1, 3.0), (q2, 2.9)]

    per_method = PerMethodScheduler(grace_period=1, reduction_factor=2)
    assert per_method.set_search_properties("eval_loss", "min")
    for t, _ in order:
        per_method.on_trial_add(None, t)
    assert _feed(per_method, order) == ["CONTINUE", "STOP", "CONTINUE", "CONTINUE"]

    shared = make_asha(1, 2)
    shared.set_search_properties("eval_loss", "min")
    for t, _ in order:
        shared.on_trial_add(None, t)
    assert _feed(shared, order) == ["CONTINUE", "STOP", "STOP", "STOP"]


def test_per_method_asha_takes_metric_only_once():
    from duetto.tune.scheduler import PerMethodScheduler

    s = PerMethodScheduler(grace_period=1, reduction_factor=2)
    assert s.set_search_properties("rougeL", "max")
    assert not s.set_search_properties("eval_loss", "min")  # Tune then reports the conflict itself


def _row(trial, method, status, **metrics):
    return {"trial": trial, "method": method, "status": status, **metrics}


def test_best_per_method_only_counts_completed_trials_with_a_score():
    rows = [
        _row("g1", "galore", COMPLETED, rougeL=0.30, eval_loss=1.9),
        _row("g2", "galore", STOPPED, rougeL=0.90, eval_loss=1.0),  # interim score on 16 rows; no model saved
        _row("g3", "galore", COMPLETED, rougeL=0.35, eval_loss=2.1),
        _row("q1", "qlora", ERROR, rougeL=None, eval_loss=None),
        _row("q2", "qlora", COMPLETED, rougeL=math.nan, eval_loss=2.5),
        _row("q3", "qlora", COMPLETED, rougeL=0.20, eval_loss=2.4),
    ]
    assert {m: r["trial"] for m, r in best_per_method(rows, "rougeL", "max").items()} == {"galore": "g3", "qlora": "q3"}
    assert {m: r["trial"] for m, r in best_per_method(rows, "eval_loss", "min").items()} == {"galore": "g1", "qlora": "q3"}
    assert best_per_method([r for r in rows if r["method"] == "qlora" and r["status"] != COMPLETED], "rougeL", "max") == {}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_pareto_front_keeps_only_undominated_points(mode):
    points = [(1.0, 0.30), (2.0, 0.25), (2.0, 0.40), (3.0, 0.35), (4.0, 0.50), (0.5, 0.10)]
    front = pareto_front(points, mode)
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    for m, q in points:
        dominated = any(m2 <= m and better(q2, q) or m2 < m and q2 == q for m2, q2 in points)
        assert ((m, q) in front) == (not dominated), (m, q, front)
    assert [p[0] for p in front] == sorted(p[0] for p in front)


def test_csv_has_every_column_of_every_row(tmp_path):
    rows = [
        {"trial": "g1", "method": "galore", "galore.rank": 8, "rougeL": 0.3, "status": COMPLETED},
        {"trial": "q1", "method": "qlora", "qlora.r": 4, "rougeL": None, "status": ERROR},
    ]
    write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["trial"] for r in back] == ["g1", "q1"]
    assert back[0]["galore.rank"] == "8" and back[0]["qlora.r"] == ""
    assert back[1]["qlora.r"] == "4" and back[1]["rougeL"] == ""


def test_results_say_which_split_chose_the_trials():
    assert "validation split" in _split_note([{"eval_split": "validation"}, {"eval_split": ""}])
    assert "**test** split" in _split_note([{"eval_split": "test"}]) and "val_size" in _split_note([{"eval_split": "test"}])
    assert _split_note([{"eval_split": "test"}, {"eval_split": "validation"}]) == " on the test / validation splits"
    assert _split_note([{}]) == ""
