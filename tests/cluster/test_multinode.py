"""A sweep on a simulated multi-node cluster (ray.cluster_utils.Cluster: separate raylets on this machine).

Shape: a head with 1 CPU and three worker nodes with 2 CPUs each. A trial's worker asks for 1.5 CPU,
so it never fits on the head and two never share a node: trials must spread over the worker nodes,
and the third node is where a trial can move. Once both trials have reported a checkpoint, the node
of one trial's worker is removed; that trial must restart on another node from its checkpoint
(resumed_from_step > 0) and the sweep must still finish with every trial completed.

Which trial owns which actor comes from the GCS actor table: a Train worker is owned by its trial's
TrainController, the controller by the trial's Tune function actor, which Tune runs in a working
directory named after the trial.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

MAX_STEPS = 150
REPORT_EVERY = 10


def _sweep_yaml(tmp_path: Path, model_dir, data) -> Path:
    train, test = data
    cfg = {
        "name": "multinode",
        "base": {
            "model": str(model_dir),
            "data": {"train": train, "test": test},
            "max_seq_len": 48,
            "batch_size": 4,
            "max_steps": MAX_STEPS,
            "report_every_steps": REPORT_EVERY,
            "interim_eval_examples": 0,
            "logging_steps": REPORT_EVERY,
            "eval": {"num_examples": 2, "max_new_tokens": 4, "batch_size": 2, "loss_examples": 8},
            "qlora": {"r": 4, "alpha": 8},
        },
        "methods": {"qlora": {"learning_rate": {"choice": [1.0e-3, 3.0e-3]}}},
        "num_samples": 2,
        "metric": "eval_loss",
        "scheduler": {"type": "fifo"},  # nothing may be stopped early: every trial must run to the end
        "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1.5, "workers_per_trial": 1, "driver_cpus": 0.05},
        "max_concurrent_trials": 2,
        "failures": {"trial_retries": 1, "worker_retries": 2},
        "storage_path": str(tmp_path / "sweep"),
        "verbose": 0,
    }
    path = tmp_path / "sweep_multinode.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _actors() -> list[dict]:
    import ray._private.state

    return list(ray._private.state.actors().values())


def _trial_of(pid: int) -> str | None:
    """Trial name of a Tune function actor: Tune runs each trial in its own working dir named after it."""
    import psutil

    try:
        return Path(psutil.Process(pid).cwd()).name
    except psutil.Error:
        return None


def _placement(sweep_dir: Path) -> dict[str, dict]:
    """trial -> {"controller": port, "function_node": node, "workers": [(node, state), ...]} from the GCS."""
    actors = _actors()
    names = {a["Pid"]: _trial_of(a["Pid"]) for a in actors if a["ActorClassName"] == "ImplicitFunc" and a["State"] == "ALIVE"}
    functions = {a["Address"]["Port"]: a for a in actors if a["ActorClassName"] == "ImplicitFunc"}
    controllers = {a["Address"]["Port"]: a for a in actors if a["ActorClassName"] == "TrainController"}
    trials: dict[str, dict] = {}
    for port, ctl in controllers.items():
        fn = functions.get(ctl["OwnerAddress"]["Port"])
        name = names.get(fn["Pid"]) if fn else None
        if name is None or not (sweep_dir / name).is_dir():
            continue
        t = trials.setdefault(name, {"workers": []})
        t.update(controller=port, function_node=fn["Address"]["NodeID"], controller_node=ctl["Address"]["NodeID"])
        for w in actors:
            if w["ActorClassName"] == "RayTrainWorker" and w["OwnerAddress"]["Port"] == port:
                t["workers"].append((w["Address"]["NodeID"], w["State"]))
    return trials


def _checkpoints(trial_dir: Path) -> int:
    """Checkpoints Ray Train has registered for the trial (a checkpoint_* folder exists before that)."""
    try:
        snapshot = json.loads((trial_dir / "train" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or being written
        return 0
    return len(snapshot.get("checkpoint_results", []))




def test_sweep_spreads_over_nodes_and_survives_losing_one(tmp_path, tiny_gemma_dir, small_unified_data, monkeypatch,
                                                         free_ports):
    import ray
    from ray.cluster_utils import Cluster

    from duetto.tune.results import COMPLETED, write_report
    from duetto.tune.spec import load_sweep
    from duetto.tune.sweep import start_sweep

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sweep = load_sweep(_sweep_yaml(tmp_path, tiny_gemma_dir, small_unified_data))
    sweep_dir = sweep.sweep_dir()

    # Ray's helpers that look up "their" cluster without an address (Ray Train's PlacementGroupCleaner
    # asks the state API whether a controller died with its node) would otherwise pick any Ray on this
    # machine: fix the GCS port and hand every process of this cluster its address. The dashboard is
    # what serves that state API; without it the dead trial's placement group is never freed.
    gcs_port, dashboard_port = free_ports(2)
    address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    cluster = Cluster(initialize_head=True, head_node_args={
        "gcs_server_port": gcs_port, "num_cpus": 1, "resources": {"head": 1},
        "include_dashboard": True, "dashboard_port": dashboard_port})  # fmt: skip
    assert cluster.address == address
    workers = {}
    for name in ("a", "b", "c"):
        node = cluster.add_node(num_cpus=2, resources={f"node_{name}": 1})
        workers[node.node_id] = node
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    head_id = ray.get_runtime_context().get_node_id()

    seen: dict = {}
    worker_nodes: dict[str, set] = {}  # trial -> every node one of its Train workers ever ran on
    failure: list[BaseException] = []
    sweep_over = threading.Event()

    def watch_and_kill() -> None:
        """Record where each trial's workers run; once both trials train on separate worker nodes and
        both have a checkpoint, remove the node of one of them. Runs until the sweep is over."""
        try:
            while not sweep_over.wait(0.5):
                trials = _placement(sweep_dir)
                for t, p in trials.items():
                    worker_nodes.setdefault(t, set()).update(n for n, _ in p["workers"])
                if "victim" in seen:
                    continue
                alive = {t: [n for n, s in p["workers"] if s == "ALIVE"] for t, p in trials.items()}
                if len(alive) < 2 or not all(len(n) == 1 for n in alive.values()):
                    continue
                if not all(_checkpoints(sweep_dir / t) >= 1 for t in alive):
                    continue
                seen["before"] = {t: n[0] for t, n in alive.items()}
                seen["placement"] = trials
                # The node to remove: one holding a trial's worker (never the head, which the driver needs).
                victim_trial = sorted(alive)[0]
                seen["victim_trial"], seen["victim"] = victim_trial, alive[victim_trial][0]
                cluster.remove_node(workers[seen["victim"]])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            failure.append(e)

    watcher = threading.Thread(target=watch_and_kill, daemon=True)
    watcher.start()
    try:
        try:
            start_sweep(sweep)
        finally:
            sweep_over.set()
            watcher.join(timeout=120)
        summary = write_report(sweep_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not failure, failure
    assert "victim" in seen, "the sweep ended before a node could be removed mid-run"

    # 1. Trials spread: the two trials' workers ran at the same time on two different worker nodes.
    before = seen["before"]
    assert len(set(before.values())) == 2, before
    assert head_id not in before.values()

    # 2. The sweep finished: every trial completed (none failed, none left unfinished), best.json written.
    assert summary["statuses"] == {COMPLETED: 2}, summary["statuses"]
    assert (sweep_dir / "best.json").is_file()

    # 3. Exactly the trials that had an actor on the removed node restarted, from a checkpoint, elsewhere.
    victim = seen["victim"]
    hit = {t for t, p in seen["placement"].items()
           if victim in (p["function_node"], p["controller_node"], *(n for n, _ in p["workers"]))}  # fmt: skip
    assert seen["victim_trial"] in hit
    metrics = {t: json.loads((sweep_dir / t / "metrics.json").read_text()) for t in before}
    for trial, m in metrics.items():
        assert m["step"] == MAX_STEPS and m["done"] is True, (trial, m)
        if trial in hit:
            # Resumed from a reported checkpoint (a multiple of the report interval), not from step 0.
            assert m["resumed_from_step"] >= REPORT_EVERY and m["resumed_from_step"] % REPORT_EVERY == 0, (trial, m)
        else:
            assert m["resumed_from_step"] == 0, (trial, m)
    # The victim's trial ran on after the loss, on a worker node that is not the removed one.
    moved_to = worker_nodes[seen["victim_trial"]] - {victim}
    assert moved_to and head_id not in moved_to, (victim, worker_nodes)
