"""The model deployments: Generator samples candidates, Reranker scores them (or answers greedily);
Models holds both in one replica (``colocate: on``) and answers both kinds of call.

Each replica loads its model(s) once into an engine (serve/engine.py) and warms them up before Serve
counts it ready; the batched methods (``@serve.batch``) merge every batch that queued while the model
was busy into one call (serve/merge.py).
"""

# No `from __future__ import annotations`: Ray ships these classes to their replicas, where string
# annotations would have to be resolved again.
import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ray import serve

from duetto.serve.merge import PARK_SLOTS

log = logging.getLogger("duetto.serve")


def _drop_parked_batches_warning(record: logging.LogRecord) -> bool:
    """Drops Ray's warning that max_batch_size x max_concurrent_batches exceeds max_ongoing_requests."""
    msg = record.getMessage()
    return not ("max_concurrent_batches" in msg and "max_ongoing_requests" in msg)


#: Set in a request dict whose caller has gone (see _ModelReplica._batched).
_CLIENT_GONE = "_duetto_client_gone"


def cuda_graph_thread() -> None:
    """Give this thread the per-thread state of torch's CUDA-graph trees (compiled static shapes replay
    through them). torch 2.13 sets it up in any thread on first use; older torch only has it in the
    thread that imported the module (and autograd's), so a second model thread of a replica holding
    both models would fail its first graph there. Runs as each model thread's initializer."""
    import collections

    import torch

    try:
        from torch._inductor import cudagraph_trees as trees
    except ImportError:  # a torch without inductor: nothing is compiled
        return
    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    init = getattr(trees, "_initialize_tls", None)
    if init is not None:
        init(trees.local)
    else:
        trees.local.tree_manager_containers = {}
        trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)


class _Model:
    """One model of a replica: its engine, loaded and warmed up on a worker thread of its own, where
    every later call of it runs too (compiled CUDA graphs, recorded per thread, are always replayed on
    the thread that recorded them; the event loop keeps accepting requests meanwhile).

    ``model`` holds source, template, quantize, adapter, dtype, context_cap, allow_pickle, engine and
    decoding (the ServeConfig fields), warm_decoding (whether warm-up compiles the generate path: the
    reranker generates only in mode reranker-greedy) and warm_scoring (the scoring path: the generator
    never scores)."""

    def __init__(self, role: str, model: dict, device: str):
        from duetto.config import from_dict
        from duetto.serve.config import DecodingOptions
        from duetto.serve.engine import ENGINES
        from duetto.serve.loading import inspect_saved

        t0 = time.perf_counter()
        self.device = device
        source = model["source"]
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{role}",
                                                            initializer=cuda_graph_thread)  # fmt: skip
        self.lock = threading.Lock()
        load = functools.partial(
            ENGINES[model.get("engine", "hf")], source, model.get("template", ""), device=device,
            dtype=model.get("dtype", "auto"), quantize=model.get("quantize", "auto"), adapter=model.get("adapter", "auto"),
            context_cap=int(model.get("context_cap", 0)), allow_pickle=bool(model.get("allow_pickle", False)),
            decoding=from_dict(DecodingOptions, model.get("decoding") or {}),
        )  # fmt: skip
        self.engine = self.worker.submit(load).result()
        self.lm = getattr(self.engine, "lm", None)
        self.spec = inspect_saved(source)
        self.load_s = time.perf_counter() - t0
        log.info("loaded %s (%s) on %s in %.1f s", source, role, device, self.load_s)
        # before Serve counts the replica ready: no request pays for compilation or first calls
        decoding, scoring = bool(model.get("warm_decoding", True)), bool(model.get("warm_scoring", True))
        self.warm_up = self.worker.submit(self.engine.warm_up, decoding, scoring).result()

    async def run(self, fn: Callable[[list[dict]], list], items: list[dict]) -> list:
        items = [dict(item) for item in items]  # copied here: the event loop may mark one meanwhile

        def locked() -> list:
            with self.lock:
                return fn(items)

        return await asyncio.get_running_loop().run_in_executor(self.worker, locked)

    def info(self) -> dict:
        info = {"source": self.spec.source, "adapter": self.spec.adapter, "method": self.spec.method,
                "device": self.device, "load_s": round(self.load_s, 2), **self.engine.info()}  # fmt: skip
        if self.lm is not None:
            info.update(template=self.lm.template, context=self.lm.context)
        return info


class _ModelReplica:
    """A replica of one or more models (``models``: role -> its _Model settings; ``options``: role ->
    its DeploymentOptions as a dict, whose batching settings its batched methods take). Each batched
    method (``@serve.batch``) merges every batch that queued while its model was busy into one call
    (serve/merge.py); a replica holding both models runs each on its own thread."""

    def __init__(self, models: dict[str, dict], options: dict[str, dict]):
        import ray

        from duetto.serve.loading import pick_device
        from duetto.serve.merge import MergedCalls

        # the GPUs Ray actually assigned, so a Serve config file's ray_actor_options decide too
        device = pick_device(bool(ray.get_gpu_ids()))
        self.models = {role: _Model(role, model, device) for role, model in models.items()}
        self._merged = {}
        for name, (role, run) in self._model_calls().items():
            opts = options[role]
            size = int(opts["max_batch_size"])
            getattr(self, name).set_max_batch_size(size)
            getattr(self, name).set_batch_wait_timeout_s(float(opts["batch_wait_timeout_s"]))
            self._merged[name] = MergedCalls(functools.partial(self.models[role].run, run), size,
                                             dropped=lambda item: item.get(_CLIENT_GONE, False))  # fmt: skip
        # Ray warns that max_batch_size x max_concurrent_batches exceeds max_ongoing_requests; parked
        # batches never run side by side (see serve/merge.py), so the warning does not apply here.
        serve_log = logging.getLogger("ray.serve")
        if _drop_parked_batches_warning not in serve_log.filters:
            serve_log.addFilter(_drop_parked_batches_warning)

    def _model_calls(self) -> dict[str, tuple[str, Callable[[list[dict]], list]]]:
        """{batched method name: (the role of its model, its model call on the request dicts)}."""
        raise NotImplementedError

    @staticmethod
    async def _batched(method: Any, request: dict) -> dict:
        """``await method(request)``; a request whose caller goes away is marked, so that the model call
        that takes it from the parked batches skips it (Serve itself only skips it when a batch starts)."""
        try:
            return await method(request)
        except asyncio.CancelledError:
            request[_CLIENT_GONE] = True
            raise

    async def info(self, role: str = "") -> dict:
        """The model of ``role`` (generator, reranker; empty: the replica's only one)."""
        model = self.models[role] if role else next(iter(self.models.values()))
        return model.info()


def _batch_method(name: str, answer: Callable[[Any], dict]) -> Any:
    """The ``@serve.batch`` method ``name`` (Serve finds ``self`` by that name): its batches run through
    ``self._merged[name]``, and ``answer(result)`` shapes each request's answer."""

    async def batch(self: _ModelReplica, items: list[dict]) -> list[dict]:
        results, call = await self._merged[name](items)
        info = {"batch_requests": call.requests, "model_ms": call.model_ms}
        # None: a request whose caller has gone, skipped by the model call (nobody reads its answer)
        return [None if r is None else {**answer(r), **info} for r in results]

    batch.__name__ = batch.__qualname__ = name
    return serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=PARK_SLOTS)(batch)


def _candidates(cands: list) -> dict:
    return {"candidates": [c.to_dict() for c in cands]}


def _requests_from(items: list[dict]):
    from duetto.serve.ensemble import EnsembleRequest

    # without the gone-mark, which a caller may set while its request is already in a model call
    return [EnsembleRequest(**{key: v for key, v in item.items() if key != _CLIENT_GONE}) for item in items]


def _scored_from(items: list[dict]):
    """Score items ({instruction, input, texts}) -> (requests, their candidates) for score_requests."""
    from duetto.serve.ensemble import EnsembleRequest
    from duetto.trainers.inference import Candidate

    reqs = [EnsembleRequest(it["instruction"], it.get("input", "")) for it in items]
    return reqs, [[Candidate(text) for text in it["texts"]] for it in items]


class _Generator(_ModelReplica):
    def _model_calls(self) -> dict:
        engine = self.models["generator"].engine
        return {"_generate_batch": ("generator", lambda items: engine.sample(_requests_from(items)))}

    async def generate(self, request: dict) -> dict:
        """One request ({instruction, input, k, max_new_tokens, temperature, top_p, seed}) -> its candidates."""
        return await self._batched(self._generate_batch, request)

    _generate_batch = _batch_method("_generate_batch", _candidates)


class _Reranker(_ModelReplica):
    def _model_calls(self) -> dict:
        engine = self.models["reranker"].engine
        return {
            "_score_batch": ("reranker", lambda items: engine.score(*_scored_from(items))),
            "_greedy_batch": ("reranker", lambda items: engine.sample(_requests_from(items), greedy=True)),
        }

    async def score(self, request: dict) -> dict:
        """{instruction, input, texts: [...]} -> {scores: [...]}: mean log-likelihood per response token."""
        return await self._batched(self._score_batch, request)

    async def greedy(self, request: dict) -> dict:
        """The reranker-greedy comparison mode: the reranker model answers on its own, greedily."""
        return await self._batched(self._greedy_batch, request)

    _score_batch = _batch_method("_score_batch", lambda scores: {"scores": scores})
    _greedy_batch = _batch_method("_greedy_batch", _candidates)


class _Models(_Generator, _Reranker):
    """Both models in one replica (``colocate: on``): one process on the GPU, each model on its own
    thread, so their kernels share one CUDA context instead of two processes taking turns on the GPU."""

    def _model_calls(self) -> dict:
        return {**_Generator._model_calls(self), **_Reranker._model_calls(self)}


Generator = serve.deployment(name="Generator")(_Generator)
Reranker = serve.deployment(name="Reranker")(_Reranker)
Models = serve.deployment(name="Models")(_Models)
