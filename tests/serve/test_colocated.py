"""`colocate: on`: one Models replica holds both models and answers the Ingress's generate and score
calls, with the same answers, batching and health report as the two deployments."""

from __future__ import annotations

import httpx
import pytest
import yaml

from duetto.config import ConfigError, from_dict
from duetto.serve.config import ServeConfig


@pytest.fixture(scope="module")
def served(qlora_trial, galore_trial, serve_app):
    from ray import serve

    from duetto.serve.app import free_port

    small = {"num_cpus": 0.25, "max_batch_size": 4, "batch_wait_timeout_s": 0.25}
    cfg = from_dict(ServeConfig, {
        "generator": str(qlora_trial), "reranker": str(galore_trial), "port": free_port(), "colocate": "on",
        "ensemble": {"k": 3, "max_new_tokens": 8}, "limits": {"max_context_tokens": 96},
        "generator_deployment": small, "reranker_deployment": small, "ingress_deployment": {"num_cpus": 0.25},
    })  # fmt: skip
    with serve_app(cfg) as url:
        yield url, serve.status()


def test_one_replica_holds_both_models_and_reports_each(served):
    url, status = served
    assert set(status.applications["duetto"].deployments) == {"Ingress", "Models"}
    body = httpx.get(url + "/healthz", timeout=60).json()
    assert body["status"] == "ready"
    gen, rer = body["generator"], body["reranker"]
    assert (gen["adapter"], gen["template"], gen["method"]) == (True, "study", "qlora")
    assert (rer["adapter"], rer["template"]) == (False, "chat")


def test_colocated_answers_are_the_models_own(served, galore_trial, load_lm):
    from duetto.trainers.inference import score_candidates

    url, _ = served
    body = {"instruction": "What is the capital of France?", "k": 4, "max_new_tokens": 6, "seed": 5}
    out = httpx.post(url + "/v1/generate", json=body, timeout=120).json()
    scores = [c["reranker_score"] for c in out["candidates"]]
    assert len(scores) == 4 and out["chosen_index"] == max(range(4), key=lambda i: (scores[i], -i))
    rer = load_lm(galore_trial)
    max_seq_len = yaml.safe_load((galore_trial / "config.yaml").read_text())["max_seq_len"]
    local = score_candidates(rer.model, rer.tokenizer, [(body["instruction"], "", c["text"]) for c in out["candidates"]],
                             template="chat", max_seq_len=max_seq_len)  # fmt: skip
    assert scores == pytest.approx(local, abs=1e-4)
    again = httpx.post(url + "/v1/generate", json=body, timeout=120).json()  # same seed: same candidates
    assert [c["text"] for c in again["candidates"]] == [c["text"] for c in out["candidates"]]
    greedy = httpx.post(url + "/v1/generate", json={"instruction": "Say hi.", "mode": "reranker-greedy",
                                                    "max_new_tokens": 4}, timeout=120).json()  # fmt: skip
    assert len(greedy["candidates"]) == 1 and greedy["batch"].keys() == {"reranker"}


def test_colocated_calls_still_batch(served, burst):
    url, _ = served
    batches = burst(url)
    assert max(b["generator"] for b in batches) >= 2 and max(b["reranker"] for b in batches) >= 2, batches


def test_colocated_resources_add_up_and_replica_counts_must_match():
    from duetto.serve.app import _colocated_options
    from duetto.serve.config import DeploymentOptions

    opts = _colocated_options(DeploymentOptions(num_cpus=1, num_gpus=0.5, max_ongoing_requests=64),
                              DeploymentOptions(num_cpus=0.5, num_gpus=0.5, max_ongoing_requests=32))  # fmt: skip
    assert opts["ray_actor_options"] == {"num_cpus": 1.5, "num_gpus": 1.0} and opts["max_ongoing_requests"] == 96
    whole = _colocated_options(DeploymentOptions(num_gpus=1, max_queued_requests=-1), DeploymentOptions(num_gpus=1))
    assert whole["ray_actor_options"]["num_gpus"] == 1.0 and whole["max_queued_requests"] == -1
    with pytest.raises(ConfigError, match="num_replicas must match"):
        from_dict(ServeConfig, {"colocate": "on", "generator_deployment": {"num_replicas": 2}})


def test_every_model_thread_gets_the_cuda_graph_trees_state():
    """A model thread other than the one that imported torch's CUDA-graph trees finds their per-thread
    state where older torch looks it up (an attribute of the module's thread-local), set up by the
    replica's thread initializer; without it a fresh thread has none."""
    import threading

    from torch._inductor import cudagraph_trees as trees

    from duetto.serve.replicas import cuda_graph_thread

    seen = []

    def model_thread():
        before = hasattr(trees.local, "tree_manager_containers")
        cuda_graph_thread()
        seen.append((before, hasattr(trees.local, "tree_manager_containers"), trees.get_obj(trees.local, "tree_manager_locks")))

    t = threading.Thread(target=model_thread)
    t.start()
    t.join()
    (before, after, locks), = seen
    assert not before and after and locks is not None
