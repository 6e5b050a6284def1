"""Build and start the Ray Serve app: Generator and Reranker deployments (or, with ``colocate: on``, one
Models deployment holding both) behind the FastAPI Ingress.

``build_app`` is the import path a Serve config file names (``duetto.serve.app:build_app``);
``app_from_config`` and ``start`` are what `duetto serve` and the tests use. The deployments live in
serve/replicas.py, the ingress in serve/ingress.py, the HTTP layer in serve/api.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray import serve

from duetto.config import to_dict
from duetto.serve.config import DeploymentOptions, ServeConfig, config_from_args
from duetto.serve.ingress import Ingress
from duetto.serve.replicas import Generator, Models, Reranker

log = logging.getLogger("duetto.serve")

#: GPU share of each model replica when num_gpus is left to auto and the cluster has a GPU: the
#: generator and the reranker fit on one GPU together.
AUTO_GPU_SHARE = 0.5


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster; before Ray is connected (`serve run IMPORT_PATH` builds the
    app first, then starts or joins the Ray of this machine), the GPUs this machine shows torch."""
    import ray

    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    import torch

    return float(torch.cuda.device_count())


def resolve_gpus(cfg: ServeConfig, gpus: float) -> ServeConfig:
    """Fill each model deployment's num_gpus left to auto (None): a GPU share when ``gpus`` >= 1, else 0."""
    for name in ("generator_deployment", "reranker_deployment"):
        opts: DeploymentOptions = getattr(cfg, name)
        if opts.num_gpus is None:
            opts.num_gpus = AUTO_GPU_SHARE if gpus >= 1 else 0.0
            log.info("%s.num_gpus = %s (auto: the Ray cluster has %s GPUs)", name, opts.num_gpus, gpus)
    return cfg


def _deploy_options(o: DeploymentOptions) -> dict:
    return {
        "num_replicas": o.num_replicas,
        "ray_actor_options": {"num_cpus": o.num_cpus, "num_gpus": o.num_gpus},
        "max_ongoing_requests": o.max_ongoing_requests,
        "max_queued_requests": o.max_queued_requests,
    }


def _colocated_options(gen: DeploymentOptions, rer: DeploymentOptions) -> dict:
    """The Models deployment: what the two deployments would take, added up (each request makes a call
    of each kind to it)."""
    queued = -1 if -1 in (gen.max_queued_requests, rer.max_queued_requests) else gen.max_queued_requests + rer.max_queued_requests
    return {
        "num_replicas": gen.num_replicas,
        # both models run on the replica's first GPU: more than one is never used
        "ray_actor_options": {"num_cpus": gen.num_cpus + rer.num_cpus,
                              "num_gpus": min(1.0, (gen.num_gpus or 0) + (rer.num_gpus or 0))},
        "max_ongoing_requests": gen.max_ongoing_requests + rer.max_ongoing_requests,
        "max_queued_requests": queued,  # -1: no bound on either side, none here
    }


def resolve_sources(cfg: ServeConfig) -> ServeConfig:
    """Fill generator/reranker from ``from_sweep`` where not named; check both are given."""
    from duetto.config import ConfigError
    from duetto.serve.loading import inspect_saved, models_from_sweep, require_safe_weights

    if cfg.from_sweep:
        gen, rer = models_from_sweep(cfg.from_sweep)
        cfg.generator = cfg.generator or gen
        cfg.reranker = cfg.reranker or rer
    cfg.require_models()
    # a missing or pickle-only dir fails here, naming the key, before Ray starts
    for name in ("generator", "reranker"):
        try:
            require_safe_weights(inspect_saved(getattr(cfg, name)), cfg.allow_pickle_weights)
        except Exception as e:
            raise ConfigError(f"{name}: {e}") from None
    return cfg


def model_settings(cfg: ServeConfig, source: str, template: str, warm_decoding: bool, warm_scoring: bool) -> dict:
    """What a model replica loads and how (serve/replicas.py _ModelReplica)."""
    return {"source": source, "template": template, "quantize": cfg.quantize, "adapter": cfg.adapter,
            "dtype": cfg.dtype, "context_cap": cfg.limits.max_context_tokens, "allow_pickle": cfg.allow_pickle_weights,
            "engine": cfg.engine, "decoding": to_dict(cfg.decoding), "warm_decoding": warm_decoding,
            "warm_scoring": warm_scoring}  # fmt: skip


def app_from_config(cfg: ServeConfig):
    """The bound Serve application (nothing starts until serve.run)."""
    cfg = resolve_gpus(resolve_sources(cfg), cluster_gpus())
    # Absolute paths: replicas may start in another working directory (e.g. `serve deploy`).
    for name in ("generator", "reranker"):
        p = Path(getattr(cfg, name)).expanduser()
        if p.exists():
            setattr(cfg, name, str(p.resolve()))
    gen_opts, rer_opts = cfg.generator_deployment, cfg.reranker_deployment
    # the generator only samples, it never scores; the reranker decodes only in mode reranker-greedy:
    # no replica waits for compiling a path it never runs
    models = {"generator": model_settings(cfg, cfg.generator, cfg.generator_template, True, False),
              "reranker": model_settings(cfg, cfg.reranker, cfg.reranker_template,
                                         cfg.ensemble.mode == "reranker-greedy", True)}  # fmt: skip
    options = {"generator": to_dict(gen_opts), "reranker": to_dict(rer_opts)}
    if cfg.colocate == "on":  # one deployment answers both kinds of call
        generator = reranker = Models.options(**_colocated_options(gen_opts, rer_opts)).bind(models, options)
    else:
        generator = Generator.options(**_deploy_options(gen_opts)).bind({"generator": models["generator"]}, options)
        reranker = Reranker.options(**_deploy_options(rer_opts)).bind({"reranker": models["reranker"]}, options)
    ing = cfg.ingress_deployment
    return Ingress.options(
        num_replicas=ing.num_replicas,
        ray_actor_options={"num_cpus": ing.num_cpus},
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
    ).bind(generator, reranker, to_dict(cfg))


def build_app(args: dict | None = None):
    """Application builder for Serve config files: ``import_path: duetto.serve.app:build_app``."""
    return app_from_config(config_from_args(args))


def http_options(cfg: ServeConfig) -> dict:
    return {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s}


def free_port() -> int:
    """A TCP port of this machine that nothing listens on now (for an app started here)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cfg: ServeConfig) -> str:
    """Run the app on the connected Ray (serve.run returns once every replica has loaded its model);
    returns the base URL."""
    serve.start(http_options=http_options(cfg))
    serve.run(app_from_config(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
