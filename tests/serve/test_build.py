"""Building the Serve app without starting it: builder args -> ServeConfig, and GPU shares by default."""

from __future__ import annotations

import pytest

from duetto.config import ConfigError
from duetto.serve.app import cluster_gpus, resolve_gpus
from duetto.serve.config import ServeConfig, config_from_args


def test_builder_args_layer_yaml_sections_dotted_keys_and_overrides(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("generator: g\nensemble: {k: 5, mode: mix}\nlimits: {max_k: 8}\n")
    cfg = config_from_args({
        "config": str(path),
        "ensemble": {"k": 6},  # a section merges into the YAML's
        "limits.max_new_tokens": "100",  # `serve run IMPORT_PATH a.b=v` passes text: parsed like --set
        "api_key": "0123",  # other values are set as given
        "overrides": ["ensemble.weight=0.25"],
    })  # fmt: skip
    assert (cfg.generator, cfg.ensemble.k, cfg.ensemble.mode, cfg.ensemble.weight) == ("g", 6, "mix", 0.25)
    assert (cfg.limits.max_k, cfg.limits.max_new_tokens, cfg.api_key) == (8, 100, "0123")
    with pytest.raises(ConfigError, match="ensemble.mode"):
        config_from_args({"ensemble": {"mode": "best"}})


@pytest.mark.parametrize("gpus,share", [(0, 0.0), (0.5, 0.0), (1, 0.5), (8, 0.5)])
def test_model_replicas_get_a_gpu_share_when_the_cluster_has_a_gpu(gpus, share):
    cfg = ServeConfig()
    assert cfg.generator_deployment.num_gpus is None  # auto
    cfg.reranker_deployment.num_gpus = 0.25  # a value given is kept
    resolve_gpus(cfg, gpus)
    assert (cfg.generator_deployment.num_gpus, cfg.reranker_deployment.num_gpus) == (share, 0.25)


def test_cluster_gpus_reads_the_connected_cluster(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    assert cluster_gpus() == 2.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert cluster_gpus() == 0.0


def test_the_built_app_asks_for_the_resolved_gpus(monkeypatch, qlora_trial, galore_trial):
    import ray

    from duetto.serve.app import app_from_config

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    app = app_from_config(ServeConfig(generator=str(qlora_trial), reranker=str(galore_trial)))
    generator, reranker = app._bound_deployment.init_args[:2]  # the Ingress is bound to both
    for bound in (generator, reranker):
        assert bound._bound_deployment.ray_actor_options["num_gpus"] == 0.5


@pytest.mark.gpu
def test_serve_defaults_to_the_gpu_on_a_gpu_machine(free_ports, qlora_trial, galore_trial):
    """The real thing: a Ray with a GPU, the default config, both models load on CUDA."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import httpx
    import ray
    from ray import serve

    from duetto.ray_connect import init_local
    from duetto.serve.app import start

    init_local(include_dashboard=False)
    try:
        url = start(ServeConfig(generator=str(qlora_trial), reranker=str(galore_trial), port=free_ports(1)[0]))
        health = httpx.get(f"{url}/healthz", timeout=60).json()
        assert health["generator"]["device"] == health["reranker"]["device"] == "cuda"
    finally:
        serve.shutdown()
        ray.shutdown()
