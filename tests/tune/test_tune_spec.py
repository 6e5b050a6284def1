"""Sweep files: the shipped ones load, search spaces become one Tune space, bad files fail fast and say why."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from duetto.config import ConfigError
from duetto.tune.spec import check_resources, load_sweep, param_space, space_keys, total_trials, trial_config

REPO = Path(__file__).resolve().parents[2]

GOOD_SPACE = {
    "galore": {"learning_rate": {"loguniform": [1e-5, 1e-3]}, "rank": {"choice": [4, 8]}, "update_proj_gap": 4},
    "qlora": {"learning_rate": {"loguniform": [1e-5, 1e-3]}, "r": {"randint": [2, 9]}, "bits": {"choice": [4, 8]}},
}


def _sweep(write_yaml, sweep_data, **changes):
    train, test = sweep_data
    data = {
        "name": "t",
        "base": {"model": "tiny", "data": {"train": train, "test": test}, "max_steps": 12, "report_every_steps": 4,
                 "interim_eval_examples": 2},
        "methods": GOOD_SPACE,
        "num_samples": 3,
    }
    data.update(changes)
    return write_yaml(data)


@pytest.mark.parametrize("name", ["sweep_tiny.yaml", "sweep_study.yaml"])
def test_shipped_sweeps_load_and_cover_both_methods(monkeypatch, name):
    monkeypatch.chdir(REPO)  # their paths are relative to the repository root, like their first-line command
    first = (REPO / "configs" / name).read_text().splitlines()[0]
    assert first == f"# duetto sweep run configs/{name}"
    sweep = load_sweep(REPO / "configs" / name)
    assert set(sweep.methods) == {"galore", "qlora"}
    keys = space_keys(sweep)
    assert {"learning_rate", "galore.rank", "galore.update_proj_gap", "galore.scale"} <= set(keys["galore"])
    assert {"learning_rate", "qlora.r", "qlora.alpha", "qlora.bits"} <= set(keys["qlora"])
    assert total_trials(sweep) == 2 * sweep.num_samples


def test_study_sweep_shares_a_gpu_and_asha_sees_rougeL(monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(REPO / "configs" / "sweep_study.yaml")
    assert sweep.resources.gpus_per_trial == 0.25
    assert (sweep.metric, sweep.resolved_mode, sweep.scheduler.type) == ("rougeL", "max", "asha")
    # 4 trials fit one H200 at 0.25 GPU each (16 CPUs / 2.05 per trial would allow 7)
    assert check_resources(sweep, {"CPU": 16, "GPU": 1}, [{"CPU": 16, "GPU": 1}]) == 4


def test_space_samples_both_methods_in_one_grid_reproducibly(write_yaml, sweep_data):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep = load_sweep(_sweep(write_yaml, sweep_data))

    def sample():
        gen = BasicVariantGenerator(random_state=sweep.seed)
        gen.add_configurations({"x": {"run": "__fake", "config": param_space(sweep), "num_samples": 1}})
        out = []
        while (t := gen.next_trial()) is not None:
            out.append(t.config["trial"])
        return out

    from ray.tune import register_trainable

    register_trainable("__fake", lambda config: None)
    trials = sample()
    assert [t["method"] for t in trials] == ["galore"] * 3 + ["qlora"] * 3
    for t in trials:
        assert 1e-5 <= t["learning_rate"] <= 1e-3
        if t["method"] == "galore":
            assert t["galore.rank"] in (4, 8) and t["galore.update_proj_gap"] == 4 and "qlora.r" not in t
        else:
            assert 2 <= t["qlora.r"] <= 8 and t["qlora.bits"] in (4, 8) and "galore.rank" not in t
    assert len({t["learning_rate"] for t in trials}) == 6, "each trial draws its own value"
    assert sample() == trials, "the same seed samples the same trials"

    base = __import__("duetto.tune.spec", fromlist=["base_trial_dict"]).base_trial_dict(sweep)
    cfg = trial_config(base, trials[3], output_dir="/tmp/x")
    assert (cfg.method, cfg.qlora.r, cfg.learning_rate, cfg.output_dir) == ("qlora", trials[3]["qlora.r"], trials[3]["learning_rate"], "/tmp/x")


def test_per_method_sample_counts_and_grids_multiply(write_yaml, sweep_data):
    space = {"galore": {**GOOD_SPACE["galore"], "scale": {"grid": [0.25, 0.5]}}, "qlora": GOOD_SPACE["qlora"]}
    sweep = load_sweep(_sweep(write_yaml, sweep_data, methods=space, num_samples={"galore": 2, "qlora": 1}))
    assert total_trials(sweep) == 2 * 2 + 1


def test_resources_split_over_workers_into_the_trial(write_yaml, sweep_data):
    from duetto.tune.spec import base_trial_dict

    sweep = load_sweep(_sweep(write_yaml, sweep_data, resources={"gpus_per_trial": 0.5, "cpus_per_trial": 2,
                                                                  "workers_per_trial": 2}),
                       ["methods.galore.layerwise=false"])
    scaling = base_trial_dict(sweep)["scaling"]
    assert scaling == {**scaling, "num_workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0.25, "use_gpu": True}


BAD = [
    # (change to the sweep file, words the error must contain)
    ({"bogus": 1}, ["unknown key bogus"]),
    ({"methods": {}}, ["methods", "empty"]),
    ({"methods": {"galore": {}}}, ["methods.galore", "empty search space"]),
    ({"methods": {"lora": {"learning_rate": 1e-4}}}, ["methods.lora", "unknown method"]),
    ({"methods": {"galore": {"rnk": {"choice": [4]}}}}, ["methods.galore.rnk", "unknown key"]),
    ({"methods": {"galore": {"r": {"choice": [4]}}}}, ["methods.galore.r", "unknown key"]),
    ({"methods": {"galore": {"qlora.r": {"choice": [4]}}}}, ["methods.galore.qlora.r", "qlora"]),
    ({"methods": {"qlora": {"learning_rate": {"lognormal": [1, 2]}}}}, ["methods.qlora.learning_rate", "loguniform"]),
    ({"methods": {"qlora": {"learning_rate": {"loguniform": [1e-3, 1e-5]}}}}, ["methods.qlora.learning_rate", "low < high"]),
    ({"methods": {"qlora": {"learning_rate": {"loguniform": [0, 1e-3]}}}}, ["methods.qlora.learning_rate", "low > 0"]),
    ({"methods": {"qlora": {"learning_rate": {"choice": []}}}}, ["methods.qlora.learning_rate", "non-empty"]),
    # a float distribution on an integer field: found before any trial runs
    ({"methods": {"galore": {"rank": {"uniform": [4, 16]}}}}, ["methods.galore", "galore.rank", "integer"]),
    ({"methods": {"qlora": {"bits": {"choice": [4, 16]}}}}, ["methods.qlora", "qlora.bits", "16"]),
    ({"methods": {"qlora": {"learning_rate": {"choice": [1e-4, 0]}}}}, ["methods.qlora", "learning_rate", "> 0"]),
    ({"num_samples": 0}, ["num_samples", ">= 1"]),
    ({"num_samples": {"galore": 2}}, ["num_samples.qlora", "missing"]),
    ({"metric": "accuracy"}, ["metric", "rougeL"]),
    ({"metric": "eval_loss", "mode": "max"}, ["mode", "eval_loss", "lower"]),
    ({"resources": {"gpus_per_trial": 1.5}}, ["resources.gpus_per_trial", "whole"]),
    ({"resources": {"cpus_per_trial": 0}}, ["resources.cpus_per_trial", "> 0"]),
    ({"trial_config": "configs/nope.yaml"}, ["nope.yaml", "no such config file"]),
    ({"base": {"method": "galore"}}, ["base.method", "methods section"]),
    ({"base": {"max_step": 10}}, ["unknown key base.max_step"]),
]


@pytest.mark.parametrize("change,needles", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_sweep_files_name_the_problem(write_yaml, sweep_data, change, needles):
    path = _sweep(write_yaml, sweep_data, **change)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg


def test_asha_needs_a_metric_at_every_report_and_several_reports(write_yaml, sweep_data):
    train, test = sweep_data
    base = {"model": "tiny", "data": {"train": train, "test": test}, "max_steps": 12, "report_every_steps": 4}
    with pytest.raises(ConfigError, match="interim_eval_examples"):
        load_sweep(_sweep(write_yaml, sweep_data, base={**base, "interim_eval_examples": 0}))
    # eval_loss is in every report, so it needs no interim generation
    load_sweep(_sweep(write_yaml, sweep_data, base={**base, "interim_eval_examples": 0}, metric="eval_loss"))
    with pytest.raises(ConfigError, match="reports once"):
        load_sweep(_sweep(write_yaml, sweep_data, base={**base, "report_every_steps": 0}, metric="eval_loss"))
    # FIFO does not stop trials, so one report each is fine
    load_sweep(_sweep(write_yaml, sweep_data, base={**base, "report_every_steps": 0}, metric="eval_loss",
                      scheduler={"type": "fifo"}))


def test_layerwise_galore_over_two_workers_fails_before_ray(write_yaml, sweep_data):
    with pytest.raises(ConfigError, match="layer-wise GaLore"):
        load_sweep(_sweep(write_yaml, sweep_data, resources={"workers_per_trial": 2}))


@pytest.mark.parametrize(
    "resources,cluster,nodes,needle",
    [
        ({"gpus_per_trial": 0.25}, {"CPU": 2}, [{"CPU": 2}], "no GPUs"),
        ({"gpus_per_trial": 2, "workers_per_trial": 2}, {"CPU": 8, "GPU": 1}, [{"CPU": 8, "GPU": 1}], "has 1"),
        ({"cpus_per_trial": 4}, {"CPU": 2}, [{"CPU": 2}], "resources.cpus_per_trial"),
        # 3 CPUs exist in total, but no single node can hold one 3-CPU worker
        ({"cpus_per_trial": 3}, {"CPU": 4}, [{"CPU": 2}, {"CPU": 2}], "single node"),
    ],
)
def test_impossible_resources_fail_before_any_trial(write_yaml, sweep_data, resources, cluster, nodes, needle):
    sweep = load_sweep(_sweep(write_yaml, sweep_data, resources={"gpus_per_trial": 0, **resources}),
                       ["methods.galore.layerwise=false"])
    with pytest.raises(ConfigError, match=needle):
        check_resources(sweep, cluster, nodes)


def test_concurrency_follows_the_scarce_resource(write_yaml, sweep_data):
    sweep = load_sweep(_sweep(write_yaml, sweep_data, resources={"gpus_per_trial": 0.25, "cpus_per_trial": 1}))
    assert check_resources(sweep, {"CPU": 64, "GPU": 2}, [{"CPU": 64, "GPU": 2}]) == 8
    cpu = load_sweep(_sweep(write_yaml, sweep_data, resources={"gpus_per_trial": 0, "cpus_per_trial": 0.5}))
    assert check_resources(cpu, {"CPU": 2}, [{"CPU": 2}]) == math.floor(2 / 0.55)


def test_packing_auto_packs_each_method_that_can_on_a_gpu_and_nothing_on_cpu(write_yaml, sweep_data):
    from duetto.tune.spec import base_trial_dict, max_packs, resolve_packing

    path = _sweep(write_yaml, sweep_data, resources={"gpus_per_trial": 0.25, "cpus_per_trial": 1})
    gpu = {"GPU": 1, "CPU": 16}
    sweep = load_sweep(path)
    assert sweep.packing == "auto"
    base = base_trial_dict(sweep)
    assert resolve_packing(sweep, base, 0.25, gpu) == ("all", "")
    assert resolve_packing(sweep, base, 0.0, {"CPU": 16}) == ("off", "no GPU per trial")
    assert resolve_packing(load_sweep(path, ["packing=off"]), base, 0.25, gpu) == ("off", "")  # a set value stays
    assert resolve_packing(load_sweep(path, ["packing=qlora"]), base, 0.0, {"CPU": 16}) == ("qlora", "")
    two = load_sweep(path, ["resources.workers_per_trial=2", "resources.gpus_per_trial=1", "base.galore.layerwise=false"])
    assert resolve_packing(two, base_trial_dict(two), 0.5, gpu)[0] == "off"
    all_linear = load_sweep(path, ["base.qlora.target_modules=[all-linear]"])
    packing, why = resolve_packing(all_linear, base_trial_dict(all_linear), 0.25, gpu)
    assert packing == "galore" and "qlora: qlora.target_modules" in why
    accumulating = load_sweep(path, ["methods.galore.gradient_accumulation_steps={choice: [1, 2]}", "base.galore.layerwise=false"])
    packing, why = resolve_packing(accumulating, base_trial_dict(accumulating), 0.25, gpu)
    assert packing == "qlora" and "galore: gradient_accumulation_steps" in why


def test_packs_that_would_hold_the_whole_cluster_are_not_made(write_yaml, sweep_data):
    """A pack holds one trial's share until the sweep ends: the QLoRA trials' two bases (bits 4 and 8)
    and the GaLore stack at a whole GPU each would leave trials waiting forever on one GPU."""
    from duetto.tune.spec import base_trial_dict, max_packs, resolve_packing

    path = _sweep(write_yaml, sweep_data, resources={"gpus_per_trial": 1, "cpus_per_trial": 1})
    sweep = load_sweep(path)
    assert max_packs(sweep, "qlora") == 2 and max_packs(sweep, "galore") == 1  # r and rank are each trial's own
    packing, why = resolve_packing(sweep, base_trial_dict(sweep), 1.0, {"GPU": 1, "CPU": 16})
    assert packing == "off" and "3 pack(s) of 1 GPU need 3 GPUs, the cluster has 1" in why
    assert resolve_packing(sweep, base_trial_dict(sweep), 1.0, {"GPU": 4, "CPU": 16}) == ("all", "")
    with pytest.raises(ConfigError, match="packing: qlora: 2 pack.* and one unpacked trial need 3 GPUs"):
        resolve_packing(load_sweep(path, ["packing=qlora"]), base_trial_dict(sweep), 1.0, {"GPU": 2, "CPU": 16})
    with pytest.raises(ConfigError, match="need 3 CPUs, the cluster has 2"):  # on CPU the packs' CPUs count
        resolve_packing(load_sweep(path, ["packing=all"]), base_trial_dict(sweep), 0.0, {"CPU": 2})


def test_packed_qlora_trials_all_run_at_once_their_pack_decides_when_they_join(write_yaml, sweep_data):
    from duetto.tune.spec import concurrent_trials

    path = _sweep(write_yaml, sweep_data, resources={"gpus_per_trial": 0.25, "cpus_per_trial": 1})
    assert concurrent_trials(load_sweep(path), 4) == 4
    packed = load_sweep(path, ["packing=qlora"])
    assert concurrent_trials(packed, 4) == 4 + 3  # the GPU's four, and the three QLoRA clients
    assert concurrent_trials(load_sweep(path, ["packing=qlora", "max_concurrent_trials=2"]), 4) == 2
    from duetto.tune.spec import MAX_PACK_CLIENTS

    many = load_sweep(path, ["packing=qlora", "num_samples=500"])  # every pack client holds one actor thread
    assert concurrent_trials(many, 4) == 4 + MAX_PACK_CLIENTS
    grid = load_sweep(path, ["packing=qlora", "methods.qlora.r={grid: [2, 4]}"])
    assert concurrent_trials(grid, 4) == 4 + 6 and total_trials(grid) == 9
    both = load_sweep(path, ["packing=all"])  # GaLore's three pack too
    assert concurrent_trials(both, 4) == 4 + 6 and concurrent_trials(load_sweep(path, ["packing=galore"]), 4) == 4 + 3
    for key, value, needle in [("pack_size", -1, "pack_size"), ("pack_memory_fraction", 0, "pack_memory_fraction"),
                               ("pack_memory_fraction", 1.5, "pack_memory_fraction")]:  # fmt: skip
        with pytest.raises(ConfigError, match=needle):
            load_sweep(path, [f"{key}={value}"])


def test_cli_rejects_a_bad_sweep_with_exit_2_and_the_key(write_yaml, sweep_data, duetto_cli):
    path = _sweep(write_yaml, sweep_data, methods={"galore": {"rnk": {"choice": [4]}}})
    proc = duetto_cli("sweep", str(path), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "methods.galore.rnk" in proc.stderr and "unknown key" in proc.stderr
    proc = duetto_cli("sweep", str(_sweep(write_yaml, sweep_data)), "methods.qlora={}", timeout=120)
    assert proc.returncode == 2 and "methods.qlora: empty search space" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_cli_impossible_resources_fail_after_joining_ray(write_yaml, sweep_data, tiny_gemma_dir, duetto_cli):
    """Only the cluster knows its GPUs: the sweep starts Ray, finds none, and stops before any trial."""
    path = _sweep(write_yaml, sweep_data)
    path.write_text(path.read_text().replace("model: tiny", f"model: {tiny_gemma_dir}"))
    proc = duetto_cli("sweep", str(path), "resources.gpus_per_trial=0.25", f"storage_path={path.parent / 'out'}",
                      "--num-cpus", "2", "--num-gpus", "0", timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resources.gpus_per_trial" in proc.stderr and "no GPUs" in proc.stderr
    assert not list((path.parent / "out").glob("*_0000*")), "no trial may have started"


@pytest.mark.parametrize("row,needle", [
    ('{"instruction": "a"}', r"base.data.train: .*train.jsonl:1: missing field 'response'"),
    ("", r"base.data.train: .*train.jsonl has no rows to train on"),
])  # fmt: skip
def test_a_bad_data_file_fails_before_ray_as_a_single_trial_would(tmp_path, write_yaml, sweep_data, row, needle):
    from duetto.tune.sweep import prepare

    bad = tmp_path / "train.jsonl"
    bad.write_text(row + "\n" if row else "")
    sweep = load_sweep(_sweep(write_yaml, sweep_data), [f"base.data.train={bad}"])
    with pytest.raises(ConfigError, match=needle):
        prepare(sweep)
