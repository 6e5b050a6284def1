"""Packed QLoRA trials under a real Ray Tune run (tune/packing.py): each configuration is its own
Tune trial with its own reports, trains in one pack with the others, and ends as it would alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _base(tiny_gemma_dir, unified_data, tmp_path, interim: int = 0) -> dict:
    from duetto.config import load_config, to_dict
    from duetto.trainers.config import TrialConfig

    train, test = unified_data
    cfg = load_config(TrialConfig, None, [
        f"model={tiny_gemma_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
        "batch_size=4", "max_steps=6", "logging_steps=1", "report_every_steps=2", f"interim_eval_examples={interim}",
        "eval.num_examples=2", "eval.max_new_tokens=4", "eval.loss_examples=8", "qlora.dropout=0.0",
        f"output_dir={tmp_path / 'base'}"])  # fmt: skip
    return to_dict(cfg)


def _tune_in_one_pack(base: dict, grid: list[dict], tmp_path, stop=None, trainable=None, retries: int = 0):
    """Run ``grid`` as Tune trials that are thin clients of one pack actor; (results, trials still attached)."""
    import ray
    from ray import tune

    from duetto.ray_connect import init_local
    from duetto.tune.packing import ACTOR_NAME, PackActor, leave_pack_callback, packed_trial

    ray.shutdown()
    init_local(num_cpus=4, include_dashboard=False)
    try:
        actor = PackActor.options(name=ACTOR_NAME, num_cpus=1).remote("cpu")
        trial = tune.with_parameters(trainable or packed_trial, base=base, sweep_dir=str(tmp_path / "sweep"),
                                     actor_name=ACTOR_NAME)  # fmt: skip
        results = tune.Tuner(
            tune.with_resources(trial, {"cpu": 0.5}), param_space={"trial": tune.grid_search(grid)},
            tune_config=tune.TuneConfig(metric="eval_loss", mode="min"),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), stop=stop,
                                      failure_config=tune.FailureConfig(max_failures=retries),
                                      callbacks=[leave_pack_callback(ACTOR_NAME)]),
        ).fit()  # fmt: skip
        return results, ray.get(actor.attached.remote())
    finally:
        ray.shutdown()


def test_packed_tune_trials_report_and_end_as_they_would_alone(tmp_path, tiny_gemma_dir, unified_data):
    from duetto.trainers.packed_run import train_packed
    from duetto.tune.spec import trial_config

    base = _base(tiny_gemma_dir, unified_data, tmp_path, interim=2)
    grid = [{"method": "qlora", "seed": 1, "learning_rate": 3e-3, "qlora.r": 8},
            {"method": "qlora", "seed": 7, "learning_rate": 1e-3, "qlora.r": 4}]  # fmt: skip
    want = train_packed([trial_config(base, g, output_dir=str(tmp_path / f"ref{i}")) for i, g in enumerate(grid)],
                        torch.device("cpu"))  # fmt: skip
    results, attached = _tune_in_one_pack(base, grid, tmp_path)
    assert not results.errors
    got = {r.config["trial"]["seed"]: r for r in results}
    for g, w in zip(grid, want):
        r = got[g["seed"]]
        assert r.metrics["eval_loss"] == pytest.approx(w["eval_loss"], rel=1e-4)
        frame = r.metrics_dataframe
        assert list(frame["step"]) == [2, 4, 6]  # interim reports at 2 and 4, the final one at 6
        # interim reports carry what a trial alone reports there (BLEU/ROUGE on 2 rows: ASHA can rank on them)
        assert frame["rougeL"].notna().all() and frame["eval_loss"].notna().all() and frame["train_loss"].notna().all()
    assert attached == []


def test_a_trial_tune_stops_leaves_the_pack_and_the_others_run_on(tmp_path, tiny_gemma_dir, unified_data):
    from duetto.trainers.packed_run import train_packed
    from duetto.tune.spec import trial_config

    base = _base(tiny_gemma_dir, unified_data, tmp_path)
    grid = [{"method": "qlora", "seed": 1, "learning_rate": 3e-3}, {"method": "qlora", "seed": 7, "learning_rate": 1e-3}]
    (want,) = train_packed([trial_config(base, grid[0], output_dir=str(tmp_path / "ref"))], torch.device("cpu"))

    def stop(trial_id, result):  # as ASHA would: seed 7 is cut at its first report
        return result["config"]["trial"]["seed"] == 7 and result["step"] >= 2

    results, attached = _tune_in_one_pack(base, grid, tmp_path, stop=stop)
    assert not results.errors
    got = {r.config["trial"]["seed"]: r for r in results}
    assert got[7].metrics["step"] == 2 and "bleu4" not in got[7].metrics  # stopped at its first report
    assert got[1].metrics["step"] == 6
    assert got[1].metrics["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)  # as if alone
    assert attached == []


def test_a_restarted_packed_trial_goes_on_from_its_last_checkpoint(tmp_path, tiny_gemma_dir, unified_data):
    from duetto.trainers.packed_run import train_packed
    from duetto.tune.spec import trial_config

    # defined here, not at module level: Ray ships it by value (the test module does not import on a worker)
    def _fails_once_after_its_first_checkpoint(config, **kwargs):
        """packed_trial, whose first attempt dies right after its first checkpointed report (as a trial
        whose process is lost would); Tune then restarts it from that checkpoint."""
        from ray import tune

        from duetto.tune.packing import packed_trial

        if tune.get_checkpoint() is None:
            real = tune.report

            def report_then_die(metrics, checkpoint=None):
                real(metrics, checkpoint=checkpoint)
                if checkpoint is not None:
                    raise RuntimeError("the trial's process died")

            tune.report = report_then_die
            try:
                return packed_trial(config, **kwargs)
            finally:
                tune.report = real
        return packed_trial(config, **kwargs)

    base = _base(tiny_gemma_dir, unified_data, tmp_path)
    grid = [{"method": "qlora", "seed": 1, "learning_rate": 3e-3, "qlora.r": 8}]
    (want,) = train_packed([trial_config(base, grid[0], output_dir=str(tmp_path / "ref"))], torch.device("cpu"))
    results, attached = _tune_in_one_pack(base, grid, tmp_path, trainable=_fails_once_after_its_first_checkpoint,
                                          retries=1)  # fmt: skip
    assert not results.errors
    (r,) = results
    assert r.metrics["step"] == 6 and r.metrics["resumed_from_step"] == 2  # went on from its report at step 2
    assert r.metrics["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)
    assert [x for _, x in r.metrics["train_loss_curve"]] == pytest.approx([x for _, x in want["train_loss_curve"]], rel=1e-4)
    assert r.checkpoint is not None  # each interim report carried one
    assert attached == []


@pytest.mark.parametrize("method, packing, searched, packed_as, output", [
    ("qlora", "qlora", {"r": {"choice": [4, 8]}}, "packed", "adapter_config.json"),
    ("galore", "all", {"rank": {"choice": [4, 8]}}, "stacked", "model.safetensors"),
])
def test_duetto_sweep_packs_trials(method, packing, searched, packed_as, output, tmp_path, tiny_gemma_dir, unified_data):
    """`duetto sweep` with packing: every packed trial (QLoRA on one base, GaLore on stacked weights) is
    a Tune trial with a result row, ASHA cuts the learners that barely move, the finished ones leave
    model/ and metrics.json as alone."""
    import csv

    import ray
    import yaml

    from duetto.config import load_config
    from duetto.tune.packing import pack_actors
    from duetto.tune.spec import SweepConfig
    from duetto.tune.sweep import start_sweep

    sweep = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "sweep_tiny.yaml").read_text())
    sweep["base"]["model"] = str(tiny_gemma_dir)
    sweep["base"]["data"].update(train=unified_data[0], test=unified_data[1], val_size=8)
    sweep["storage_path"] = str(tmp_path / "sweeps")
    sweep["methods"] = {method: {"learning_rate": {"grid": [3e-2, 1e-8, 1e-8]}, **searched}}
    sweep["num_samples"] = 1
    sweep["packing"] = packing
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep))
    ray.shutdown()
    try:
        sweep_dir = start_sweep(load_config(SweepConfig, path), num_cpus=4)
        assert pack_actors() == []  # the sweep ended its pack
        from duetto.tune.results import write_report

        write_report(sweep_dir)  # as `duetto sweep` does when the run ends
    finally:
        ray.shutdown()
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["method"] == method for r in rows)
    assert {r["status"] for r in rows} <= {"completed", "stopped early"}
    done = [r for r in rows if r["status"] == "completed"]
    assert done
    for r in done:
        metrics = json.loads((Path(r["trial_dir"]) / "metrics.json").read_text())
        assert metrics["fast_path"].startswith(packed_as) and metrics["step"] == 12
        assert (Path(metrics["model_dir"]) / output).is_file()
        assert float(r["eval_loss"]) == pytest.approx(metrics["eval_loss"])
    assert json.loads((sweep_dir / "best.json").read_text())[method]["model_dir"]
