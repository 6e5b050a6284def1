"""ServeConfig: what `duetto serve` needs, as typed dataclasses (the docstrings are the help text).

The same tree is the `args` of the Ray Serve app builder (`duetto.serve.app:build_app`), so a
`serve run`/`serve deploy` config file and `duetto serve CONFIG.yaml` accept the same keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from duetto.config import ConfigError
from duetto.serve.selection import Mode, check_mode


def _check_queue_bound(n: int) -> None:
    if n < -1 or n == 0:
        raise ValueError("max_queued_requests: must be >= 1 (or -1 = unbounded, which can hang under overload)")


@dataclass
class EnsembleOptions:
    k: int = 4
    """Candidates sampled per request when the request does not say (`k`, or OpenAI `n`)."""
    mode: Mode = "reranker"
    """reranker = the candidate the reranker likes best (mean token log-prob); mix = (1-weight)*reranker +
    weight*generator log-prob; generator = the generator's own best log-prob; consensus = the candidate
    closest to the others (mean ROUGE-L F, no reranker call); pmi = reranker - weight*prior (the
    reranker's log-prob of the answer after an empty instruction: penalises bland answers); combined =
    the features weighted by `weights`; reranker-greedy = the reranker model answers alone (docs/serve.md)."""
    weight: float = 0.5
    """mix: the generator log-prob's weight (0 = reranker only); pmi: the prior's weight (1 = pointwise mutual information)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Mode combined: weight of each feature (reranker, generator, prior, consensus), standardised over a
    request's candidates; `duetto report` fits them on validation rows and prints them."""
    max_new_tokens: int = 64
    """Default generation budget per candidate."""
    temperature: float = 0.8
    """Default sampling temperature (0 = greedy: one candidate whatever k says)."""
    top_p: float = 0.95
    """Default nucleus-sampling mass."""
    greedy_candidate: bool = False
    """Default of the request field: the first of the k candidates is the generator's greedy answer
    (the others are sampled), so a mode can keep the greedy answer unless the samples agree on better."""

    # Nested validate() raises ValueError: from_dict prefixes it with the section's dotted key.
    def validate(self) -> None:
        if self.k < 1:
            raise ValueError("k: must be >= 1")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError("weight: must be in [0, 1]")
        if self.weights or self.mode == "combined":
            check_mode("combined", self.weights)
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens: must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature: must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p: must be in (0, 1]")


@dataclass
class Limits:
    max_k: int = 16
    """Largest k (or n) a request may ask for; more is a 422 naming the field."""
    max_new_tokens: int = 512
    """Largest max_new_tokens (or max_tokens) a request may ask for."""
    max_context_tokens: int = 0
    """Prompt + max_new_tokens must fit in this many tokens (0 = the smaller model's context length)."""
    max_body_bytes: int = 1_000_000
    """Request bodies larger than this are refused with 413 before they are parsed."""

    def validate(self) -> None:
        if self.max_k < 1 or self.max_new_tokens < 1:
            raise ValueError("max_k / max_new_tokens: must be >= 1")
        if self.max_context_tokens < 0 or self.max_body_bytes < 1:
            raise ValueError("max_context_tokens must be >= 0 and max_body_bytes >= 1")


@dataclass
class DecodingOptions:
    static_cache: Literal["auto", "on", "off"] = "auto"
    """Decode and score on static shapes: a preallocated KV cache per (rows, length) bucket and padded
    scoring forwards, compiled once and replayed as CUDA graphs. auto = on for plain weights on GPU (bitsandbytes' 4/8-bit layers do not
    compile; CPU does not compile), off = transformers' dynamic cache."""
    whole_steps: Literal["auto", "on", "off"] = "auto"
    """With static shapes, decode each step (forward, sampling, stop checks) as one compiled graph
    (trainers/decode_steps.py) instead of transformers' ``generate``, which compiles the forward alone.
    auto = off (``generate`` on the static cache), on = whole steps. A model whose generation config adds processors of
    its own (repetition penalty, suppressed ids) always decodes with ``generate``."""
    row_buckets: list[int] = field(default_factory=lambda: [4, 16, 64, 128])
    """Candidate rows per generate call are padded up to one of these (more than the largest run in chunks of it)."""
    length_buckets: list[int] = field(default_factory=lambda: [256, 640])
    """KV cache lengths: a call takes the shortest that holds its longest prompt + max_new_tokens; longer calls
    decode with the dynamic cache. Every rows x length pair compiles at start-up (warm-up)."""
    score_rows: int = 128
    """Scored (prompt, candidate) rows per reranker forward (on static shapes: at most row_buckets' largest,
    each forward padded up to a row bucket)."""
    score_length_buckets: list[int] = field(default_factory=lambda: [128, 256, 640])
    """Scoring on static shapes: a forward's tokens are padded up to the shortest of these that holds its
    longest (prompt, candidate) pair (longer: eager). Warm-up compiles those up to the model's max_seq_len."""

    def validate(self) -> None:
        if not self.row_buckets or min(self.row_buckets) < 1:
            raise ValueError("row_buckets: give at least one size >= 1")
        if not self.length_buckets or min(self.length_buckets) < 16:
            raise ValueError("length_buckets: give at least one length, each >= 16")
        if self.score_rows < 1:
            raise ValueError("score_rows: must be >= 1")
        if not self.score_length_buckets or min(self.score_length_buckets) < 16:
            raise ValueError("score_length_buckets: give at least one length, each >= 16")


@dataclass
class DeploymentOptions:
    num_replicas: int = 1
    """Replicas of this deployment."""
    num_cpus: float = 0.5
    """CPUs reserved per replica. Fractions matter: on 2 cores the Ray default of 1 never schedules three deployments."""
    num_gpus: float | None = None
    """GPUs per replica; empty = auto: 0.5 when the Ray cluster has a GPU (the generator and the reranker
    share one), else 0. >0 also puts the model on CUDA."""
    max_ongoing_requests: int = 64
    """Requests one replica holds at once (>= max_batch_size so a full batch can form; 2 x max_batch_size lets
    the next full batch gather at the replica while one runs, instead of trickling in as slots free up)."""
    max_queued_requests: int = 128
    """Requests waiting for a replica beyond that; more are refused with 503 (back-pressure), never left to hang."""
    max_batch_size: int = 32
    """@serve.batch: most concurrent requests merged into one model call (k candidates each: keep
    max_batch_size x k within decoding.row_buckets' largest, or the call runs in chunks)."""
    batch_wait_timeout_s: float = 0.01
    """@serve.batch: how long the first request waits for others to join its batch."""

    def validate(self) -> None:
        if self.num_replicas < 1:
            raise ValueError("num_replicas: must be >= 1")
        if self.num_cpus < 0 or (self.num_gpus or 0) < 0:
            raise ValueError("num_cpus / num_gpus: must be >= 0")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size: must be >= 1")
        if self.max_ongoing_requests < self.max_batch_size:
            message = f"max_ongoing_requests: {self.max_ongoing_requests} is below max_batch_size {self.max_batch_size}"
            raise ValueError(f"{message}, so a full batch could never form")
        _check_queue_bound(self.max_queued_requests)
        if self.batch_wait_timeout_s < 0:
            raise ValueError("batch_wait_timeout_s: must be >= 0")


@dataclass
class IngressOptions:
    """The FastAPI ingress only parses, counts tokens and awaits handles: little CPU, many requests in flight."""

    num_replicas: int = 1
    """Ingress replicas."""
    num_cpus: float = 0.25
    """CPUs reserved per ingress replica."""
    max_ongoing_requests: int = 128
    """Requests one ingress replica holds at once (each mostly awaits the model deployments)."""
    max_queued_requests: int = 256
    """Requests waiting for an ingress replica beyond that; more get 503 from the proxy."""

    def validate(self) -> None:
        if self.num_replicas < 1 or self.max_ongoing_requests < 1:
            raise ValueError("num_replicas / max_ongoing_requests: must be >= 1")
        if self.num_cpus < 0:
            raise ValueError("num_cpus: must be >= 0")
        _check_queue_bound(self.max_queued_requests)


@dataclass
class ServeConfig:
    generator: str = ""
    """What `duetto train` saved for the generator (a trial dir, its model/ dir, a PEFT adapter dir) or any HF model dir/id."""
    reranker: str = ""
    """The reranker: a trial dir (the GaLore full model), a model/ dir, or any HF causal LM dir/id."""
    from_sweep: str = ""
    """A sweep dir with best.json: its best QLoRA trial becomes the generator and its best GaLore trial the reranker (unless named above)."""
    generator_template: str = ""
    """Prompt template of the generator (study|chat); empty = the trial's config.yaml, else chat if the tokenizer has one."""
    reranker_template: str = ""
    """Prompt template of the reranker (study|chat); empty = its trial's config.yaml, else chat if the tokenizer has one."""
    quantize: str = "auto"
    """Base weights under a PEFT adapter: auto = the trial's qlora.bits on GPU, un-quantized on CPU (int8 on CPU is slow)."""
    adapter: Literal["auto", "merge", "keep"] = "auto"
    """A PEFT adapter: merge = fold it into the base (a quantized base is dequantized first, so the weights are
    what it trained against) and serve plain bf16 weights, which decode fastest; keep = the adapter on the
    quantized base (least memory); auto = merge unless the merged weights would take over half the free GPU memory."""
    engine: str = "hf"
    """Inference engine of both models (serve/engine.py ENGINES): hf = transformers."""
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights dtype: auto = bfloat16 on GPU, float32 on CPU (Gemma 3 overflows in fp16, so it is not offered)."""
    allow_pickle_weights: bool = False
    """Also load model folders whose weights are pickles only (pytorch_model.bin, adapter_model.bin): unpickling
    can run arbitrary code, so only for checkpoints you trust. Off: safetensors only."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; 0.0.0.0 exposes it to the network (set an API key then)."""
    port: int = 8000
    """HTTP port."""
    route_prefix: str = "/"
    """URL prefix of the app."""
    app_name: str = "duetto"
    """Ray Serve application name."""
    model_name: str = "duetto-ensemble"
    """The id GET /v1/models lists and OpenAI-style requests may name."""
    api_key: str = ""
    """Bearer token checked on every route but /healthz (empty = read api_key_env; both empty = no auth)."""
    api_key_env: str = "DUETTO_API_KEY"
    """Environment variable holding the bearer token when api_key is empty (keeps secrets out of YAML)."""
    request_timeout_s: float = 120.0
    """End-to-end HTTP timeout of the Serve proxy (a request past it gets 408 instead of hanging)."""
    ensemble: EnsembleOptions = field(default_factory=EnsembleOptions)
    limits: Limits = field(default_factory=Limits)
    colocate: Literal["on", "off"] = "off"
    """on = both models in one replica (deployment Models: the two deployments' CPUs and GPUs added up, each
    model on its own thread, batching from its own *_deployment section; num_replicas must match): one process
    on the GPU instead of two taking turns on it. off = a Generator and a Reranker deployment."""
    generator_deployment: DeploymentOptions = field(default_factory=DeploymentOptions)
    reranker_deployment: DeploymentOptions = field(default_factory=DeploymentOptions)
    ingress_deployment: IngressOptions = field(default_factory=IngressOptions)

    def validate(self) -> None:
        for name, template in (("generator_template", self.generator_template),
                               ("reranker_template", self.reranker_template)):  # fmt: skip
            if template not in ("", "study", "chat"):
                raise ConfigError(f"{name}: must be study, chat or empty, got {template!r}")
        if self.quantize not in ("auto", "none", "8", "4"):
            raise ConfigError(f"quantize: must be auto, none, 8 or 4, got {self.quantize!r}")
        from duetto.serve.engine import ENGINES

        if self.engine not in ENGINES:
            raise ConfigError(f"engine: must be one of {', '.join(sorted(ENGINES))}, got {self.engine!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"route_prefix: must start with '/', got {self.route_prefix!r}")
        ens, lim = self.ensemble, self.limits
        for key, value, limit in (("k", ens.k, lim.max_k), ("max_new_tokens", ens.max_new_tokens, lim.max_new_tokens)):
            if value > limit:
                raise ConfigError(f"ensemble.{key}: {value} is above limits.max_{key} {limit}")
        if self.request_timeout_s <= 0:
            raise ConfigError("request_timeout_s: must be > 0")
        if self.colocate == "on" and self.generator_deployment.num_replicas != self.reranker_deployment.num_replicas:
            raise ConfigError(
                "colocate: on puts both models in each replica, so generator_deployment.num_replicas and "
                f"reranker_deployment.num_replicas must match ({self.generator_deployment.num_replicas} vs "
                f"{self.reranker_deployment.num_replicas})"
            )

    def require_models(self) -> None:
        """Called before launching (not at load time, so shipped YAMLs validate without trained models)."""
        for name in ("generator", "reranker"):
            if not getattr(self, name) and not self.from_sweep:
                raise ConfigError(f"{name}: name a trained model (or from_sweep: a sweep dir)")

    def resolved_api_key(self) -> str:
        import os

        return self.api_key or (os.environ.get(self.api_key_env, "") if self.api_key_env else "")


def config_from_args(args: dict[str, Any] | None) -> ServeConfig:
    """Serve app builder args -> ServeConfig: ``config`` names a YAML to start from, ``overrides`` is a
    list of ``key=value``; every other key is a ServeConfig field (sections as mappings, or dotted keys)."""
    from duetto.config import load_config

    args = dict(args or {})
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", None) or [])
    # `serve run duetto.serve.app:build_app a.b=v` passes text: a dotted key's string value is parsed
    # like a --set override; every other value is set as given (a YAML `api_key: "0123"` stays text).
    text = {key: v for key, v in args.items() if "." in key and isinstance(v, str)}
    flags = {key: v for key, v in args.items() if key not in text}
    return load_config(ServeConfig, path, [f"{key}={v}" for key, v in text.items()] + overrides, flags=flags)


def check_serve_app_file(path: str) -> list[ServeConfig]:
    """Validate a Ray Serve config file (`serve run`/`serve deploy`/RayService) that runs our builder:
    Ray's own schema for the file, then each duetto application's ``args`` as a ServeConfig."""
    from ray.serve.schema import ServeDeploySchema

    from duetto.config import read_yaml

    data = read_yaml(path)
    try:
        schema = ServeDeploySchema.model_validate(data)
    except Exception as e:
        raise ConfigError(f"{path}: not a valid Ray Serve config file: {e}") from None
    configs = []
    for i, app in enumerate(schema.applications):
        if not app.import_path.startswith("duetto.serve.app:"):
            continue
        try:
            configs.append(config_from_args(app.args))
        except ConfigError as e:
            raise ConfigError(f"{Path(path)}: applications[{i}].args: {e}") from None
    if not configs:
        raise ConfigError(f"{path}: no application imports duetto.serve.app:build_app")
    return configs


def ensemble_from_report(report_path: str | Path) -> dict[str, Any]:
    """The ensemble settings a ``duetto report`` fixed on its validation rows, as dotted config keys
    (``ensemble.mode``, ``.weight`` / ``.weights``, ``.greedy_candidate``, and the sampling its candidates
    were drawn with: ``.k``, ``.temperature``, ``.top_p``, ``.max_new_tokens``): what `duetto serve run
    --ensemble-from REPORT.json` starts from. A report without a validation fit is refused, since its
    mode was configured, not chosen."""
    path = Path(report_path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such report (the report.json `duetto report` wrote)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    selection = report.get("selection") if isinstance(report, dict) else None
    if not isinstance(selection, dict) or "chosen" not in selection:
        raise ConfigError(f"{path}: no `selection` section: not a report.json of `duetto report`")
    if "modes" not in selection:
        raise ConfigError(f"{path}: selection: the mode was configured ({selection['chosen']}), not fitted on "
                         "validation rows (`validation.train` was not set); set ensemble.mode yourself")  # fmt: skip
    config = report.get("config") or {}
    sampling = config.get("ensemble") or {}
    for key, kind in (("k", int), ("temperature", (int, float)), ("top_p", (int, float))):
        if not isinstance(sampling.get(key), kind):
            raise ConfigError(f"{path}: config.ensemble.{key}: missing; the report's sampling settings are needed")
    params = selection.get("params") or {}
    # the rule was fitted on candidates drawn this way: the same count, temperature, top-p and length
    keys: dict[str, Any] = {"ensemble.mode": selection["chosen"], "ensemble.k": sampling["k"],
                            "ensemble.temperature": sampling["temperature"], "ensemble.top_p": sampling["top_p"],
                            "ensemble.greedy_candidate": bool(selection.get("greedy_candidate", False))}  # fmt: skip
    if isinstance(config.get("max_new_tokens"), int):
        keys["ensemble.max_new_tokens"] = config["max_new_tokens"]
    if "weight" in params:
        keys["ensemble.weight"] = params["weight"]
    if params.get("weights"):
        keys["ensemble.weights"] = dict(params["weights"])
    return keys
