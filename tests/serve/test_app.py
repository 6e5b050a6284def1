"""The Serve app end to end over HTTP on tiny CPU models: one app start for the whole module.

Generator = a QLoRA-style trial (PEFT adapter over the tiny Gemma, study template); reranker = a
GaLore-style trial (full tiny SmolLM2-shaped model, chat template), so the two deployments use
different tokenizers and templates, as the real pair may.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import yaml

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _trial_cfg(trial) -> dict:
    return yaml.safe_load((trial / "config.yaml").read_text())


@pytest.fixture(scope="module")
def served(qlora_trial, galore_trial, serve_app):
    from duetto.config import from_dict
    from duetto.serve.app import free_port
    from duetto.serve.config import ServeConfig

    small = {"num_cpus": 0.25, "max_batch_size": 4, "batch_wait_timeout_s": 0.25}
    cfg = from_dict(ServeConfig, {
        "generator": str(qlora_trial),
        "reranker": str(galore_trial),
        "port": free_port(),
        "api_key": KEY,
        "ensemble": {"k": 3, "max_new_tokens": 8},
        "limits": {"max_k": 6, "max_new_tokens": 32, "max_context_tokens": 96, "max_body_bytes": 20000},
        # a small generator queue so that a burst meets back-pressure (503) in test_overload
        "generator_deployment": {**small, "max_ongoing_requests": 4, "max_queued_requests": 4},
        "reranker_deployment": {**small, "max_ongoing_requests": 8, "max_queued_requests": 16},
        "ingress_deployment": {"num_cpus": 0.25},
    })  # fmt: skip
    with serve_app(cfg) as url:
        yield url, cfg


@pytest.fixture(scope="module")
def http(served):
    url, _ = served
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def test_healthz_without_the_token_says_only_ready(http):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = http.get("/healthz", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ready"}, r.text  # no paths, devices, pids


def test_healthz_with_the_token_reports_both_models(http, qlora_trial, galore_trial):
    r = http.get("/healthz", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert body["generator"]["adapter"] is True and body["generator"]["template"] == "study"
    assert body["generator"]["method"] == "qlora" and body["generator"]["device"] == "cpu"
    assert body["reranker"]["adapter"] is False and body["reranker"]["template"] == "chat"
    assert body["generator"]["context"] == 96  # limits.max_context_tokens caps the tiny model's 1024


def test_models_lists_the_ensemble(http, served):
    r = http.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == [served[1].model_name]


def test_generate_returns_the_reranker_choice(http, galore_trial, load_lm):
    body = {"instruction": "What is the capital of France?", "k": 4, "max_new_tokens": 6, "seed": 5}
    r = http.post("/v1/generate", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["candidates"]) == 4 and out["mode"] == "reranker"
    scores = [c["reranker_score"] for c in out["candidates"]]
    assert out["chosen_index"] == max(range(4), key=lambda i: (scores[i], -i))
    assert out["response"] == out["candidates"][out["chosen_index"]]["text"]
    assert all(c["generator_logprob"] < 0 and 1 <= c["tokens"] <= 6 for c in out["candidates"])
    assert {"generate", "score", "total"} <= set(out["timings_ms"])
    # the deployment's scores are exactly what the reranker model gives these texts, encoded like
    # training examples of the trial's max_seq_len
    from duetto.trainers.inference import score_candidates

    rer = load_lm(galore_trial)
    max_seq_len = _trial_cfg(galore_trial)["max_seq_len"]
    assert rer.max_seq_len == max_seq_len < rer.context
    local = score_candidates(rer.model, rer.tokenizer, [(body["instruction"], "", c["text"]) for c in out["candidates"]],
                             template="chat", max_seq_len=max_seq_len)  # fmt: skip
    assert scores == pytest.approx(local, abs=1e-4)
    # same seed, other modes: same candidates, each mode picks by its own score
    gen = http.post("/v1/generate", json={**body, "mode": "generator"}, headers=AUTH).json()
    assert [c["text"] for c in gen["candidates"]] == [c["text"] for c in out["candidates"]]
    assert all(c["reranker_score"] is None for c in gen["candidates"])
    lps = [c["generator_logprob"] for c in gen["candidates"]]
    assert gen["chosen_index"] == max(range(4), key=lambda i: (lps[i], -i))
    mix = http.post("/v1/generate", json={**body, "mode": "mix", "weight": 0.3}, headers=AUTH).json()
    mixed = [0.7 * c["reranker_score"] + 0.3 * c["generator_logprob"] for c in mix["candidates"]]
    assert mix["chosen_index"] == max(range(4), key=lambda i: (mixed[i], -i)) and mix["weight"] == 0.3
    # pmi: the reranker scores each candidate again after an empty instruction
    pmi = http.post("/v1/generate", json={**body, "mode": "pmi", "weight": 1.0}, headers=AUTH).json()
    assert [c["reranker_score"] for c in pmi["candidates"]] == pytest.approx(scores, abs=1e-4)
    blank = score_candidates(rer.model, rer.tokenizer, [("", "", c["text"]) for c in pmi["candidates"]],
                             template="chat", max_seq_len=max_seq_len)  # fmt: skip
    assert [c["prior_score"] for c in pmi["candidates"]] == pytest.approx(blank, abs=1e-4)
    pmis = [c["reranker_score"] - c["prior_score"] for c in pmi["candidates"]]
    assert pmi["chosen_index"] == max(range(4), key=lambda i: (pmis[i], -i)) and pmi["weight"] == 1.0
    cons = http.post("/v1/generate", json={**body, "mode": "consensus"}, headers=AUTH).json()
    agree = [c["consensus"] for c in cons["candidates"]]
    assert cons["chosen_index"] == max(range(4), key=lambda i: (agree[i], -i)) and cons["batch"].keys() == {"generator"}
    greedy = http.post("/v1/generate", json={"instruction": body["instruction"], "mode": "reranker-greedy", "max_new_tokens": 4},
                       headers=AUTH).json()  # fmt: skip
    assert len(greedy["candidates"]) == 1 and greedy["candidates"][0]["generator_logprob"] is None
    assert greedy["batch"].keys() == {"reranker"}
    # greedy_candidate: the first of the k candidates is the generator's greedy answer
    alone = http.post("/v1/generate", json={**body, "mode": "generator", "temperature": 0}, headers=AUTH).json()
    mixed = http.post("/v1/generate", json={**body, "mode": "consensus", "temperature": 1.5, "greedy_candidate": True},
                      headers=AUTH).json()  # fmt: skip
    assert len(mixed["candidates"]) == 4 and mixed["candidates"][0]["text"] == alone["response"]


# Longer than the trials' max_seq_len for both models (so it is cut), within the served context.
OVERLONG = "Summarize: the children played in the garden while their parents cooked dinner and talked."


def test_trial_evaluation_report_and_endpoint_agree(http, qlora_trial, galore_trial, load_lm):
    """Same model, prompt and seed: the trial's own evaluation, the report's decoding (load_lm + the
    ensemble functions) and the endpoint give the same texts and scores, also for a prompt longer
    than the trial's max_seq_len (cut everywhere to BOS + its tail, as training cut it)."""
    from duetto.serve.ensemble import EnsembleRequest, ensemble_generate, sample_requests
    from duetto.trainers.evaluate import evaluate_generation
    from duetto.trainers.inference import count_prompt_tokens

    gen, rer = load_lm(qlora_trial), load_lm(galore_trial)
    questions = [OVERLONG, "Name a fruit."]
    # the generator alone (mode generator, greedy), then the reranker model alone (reranker-greedy)
    for trial, lm, mode, score in ((qlora_trial, gen, "generator", "generator_logprob"),
                                   (galore_trial, rer, "reranker-greedy", "reranker_score")):  # fmt: skip
        cfg = _trial_cfg(trial)
        assert count_prompt_tokens(lm.tokenizer, lm.template, OVERLONG) > cfg["max_seq_len"]
        rows = [{"instruction": q, "input": "", "response": "An answer."} for q in questions]
        # as trainers/trial.py calls it, on the trial's model
        _, trial_texts = evaluate_generation(lm.model, lm.tokenizer, rows, template=cfg["template"],
                                             max_seq_len=cfg["max_seq_len"], max_new_tokens=6, batch_size=2)  # fmt: skip
        report = sample_requests(lm, [EnsembleRequest(q, max_new_tokens=6) for q in questions], greedy=True)
        served = [http.post("/v1/generate", json={"instruction": q, "mode": mode, "temperature": 0, "max_new_tokens": 6},
                            headers=AUTH).json()["candidates"] for q in questions]  # fmt: skip
        assert [len(cs) for cs in served] == [1, 1]
        assert trial_texts == [cs[0].text for cs in report] == [cs[0]["text"] for cs in served], trial
        assert [cs[0]["tokens"] for cs in served] == [cs[0].tokens for cs in report]
        assert [cs[0][score] for cs in served] == pytest.approx([cs[0].generator_logprob for cs in report], abs=1e-4)
    # the ensemble: sampled with a seed, scored by the reranker at its trial's max_seq_len
    body = {"instruction": OVERLONG, "k": 3, "max_new_tokens": 6, "seed": 3}
    (local,) = ensemble_generate(gen, rer, [EnsembleRequest(OVERLONG, k=3, max_new_tokens=6, seed=3)], mode="reranker")
    out = http.post("/v1/generate", json=body, headers=AUTH).json()
    assert [c["text"] for c in out["candidates"]] == [c.text for c in local.candidates]
    for key in ("generator_logprob", "reranker_score"):
        assert [c[key] for c in out["candidates"]] == pytest.approx([getattr(c, key) for c in local.candidates], abs=1e-4)
    assert out["chosen_index"] == local.chosen_index and out["response"] == local.response


def test_openai_completions(http, served):
    r = http.post("/v1/completions", json={"model": served[1].model_name, "prompt": "Why is the sky blue?", "n": 2,
                                           "max_tokens": 5, "temperature": 0.7, "user": "u1"}, headers=AUTH)  # fmt: skip
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == served[1].model_name
    assert len(out["choices"]) == 1 and out["choices"][0]["index"] == 0
    ext = out["duetto"]
    assert len(ext["candidates"]) == 2  # n maps to k
    assert out["choices"][0]["text"] == ext["candidates"][ext["chosen_index"]]["text"]
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] == sum(c["tokens"] for c in ext["candidates"])
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


def test_openai_chat_completions(http):
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."}]
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 5}, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert msg["content"] == out["duetto"]["candidates"][out["duetto"]["chosen_index"]]["text"]
    assert len(out["duetto"]["candidates"]) == 3  # the configured k when n is absent


LONG = " ".join(["word"] * 120)

BAD_REQUESTS = [
    # (id, path, json body or raw bytes, status, field)
    ("malformed-json", "/v1/generate", b'{"instruction": "hi",', 400, "body"),
    ("not-an-object", "/v1/generate", ["instruction"], 400, "body"),
    ("missing-instruction", "/v1/generate", {"k": 2}, 422, "instruction"),
    ("empty-instruction", "/v1/generate", {"instruction": "   "}, 422, "instruction"),
    ("instruction-not-string", "/v1/generate", {"instruction": 42}, 422, "instruction"),
    ("k-as-string", "/v1/generate", {"instruction": "hi", "k": "3"}, 422, "k"),
    ("k-zero", "/v1/generate", {"instruction": "hi", "k": 0}, 422, "k"),
    ("k-over-limit", "/v1/generate", {"instruction": "hi", "k": 7}, 422, "k"),
    ("max-new-tokens-over-limit", "/v1/generate", {"instruction": "hi", "max_new_tokens": 33}, 422, "max_new_tokens"),
    ("negative-temperature", "/v1/generate", {"instruction": "hi", "temperature": -0.5}, 422, "temperature"),
    ("top-p-zero", "/v1/generate", {"instruction": "hi", "top_p": 0}, 422, "top_p"),
    ("greedy-candidate-as-string", "/v1/generate", {"instruction": "hi", "greedy_candidate": "yes"}, 422,
     "greedy_candidate"),
    ("negative-seed", "/v1/generate", {"instruction": "hi", "seed": -1}, 422, "seed"),
    ("unknown-field", "/v1/generate", {"instruction": "hi", "beam_width": 3}, 422, "beam_width"),
    ("unknown-mode", "/v1/generate", {"instruction": "hi", "mode": "best"}, 422, "mode"),
    ("weight-without-mix", "/v1/generate", {"instruction": "hi", "weight": 0.5}, 422, "weight"),
    ("combined-without-weights", "/v1/generate", {"instruction": "hi", "mode": "combined"}, 422, "mode"),
    ("prompt-over-context", "/v1/generate", {"instruction": LONG}, 422, "instruction"),
    ("body-too-large", "/v1/generate", {"instruction": "x" * 30000}, 413, "body"),
    # a lone UTF-16 surrogate is valid JSON but no tokenizer can encode it
    ("surrogate-instruction", "/v1/generate", b'{"instruction": "a\\ud800b"}', 422, "instruction"),
    ("surrogate-input", "/v1/generate", b'{"instruction": "hi", "input": "\\udfff"}', 422, "input"),
    ("surrogate-field-name", "/v1/generate", b'{"instruction": "hi", "\\ud800": 1}', 422, "body"),
    ("completions-surrogate-prompt", "/v1/completions", b'{"prompt": "\\ud800"}', 422, "prompt"),
    ("chat-surrogate-content", "/v1/chat/completions",
     b'{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "\\ud800"}]}', 422,
     "messages.1.content"),  # fmt: skip
    ("completions-n-over-limit", "/v1/completions", {"prompt": "hi", "n": 9}, 422, "n"),
    ("completions-max-tokens-over", "/v1/completions", {"prompt": "hi", "max_tokens": 100}, 422, "max_tokens"),
    ("completions-stream", "/v1/completions", {"prompt": "hi", "stream": True}, 422, "stream"),
    ("completions-unknown-model", "/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("completions-prompt-list", "/v1/completions", {"prompt": ["a", "b"]}, 422, "prompt"),
    ("completions-prompt-too-long", "/v1/completions", {"prompt": LONG}, 422, "prompt"),
    ("chat-no-messages", "/v1/chat/completions", {"messages": []}, 422, "messages"),
    (
        "chat-bad-role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "hi"}]},
        422,
        "messages.0.role",
    ),
    (
        "chat-multi-turn",
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        422,
        "messages",
    ),  # fmt: skip
    (
        "chat-both-max-tokens",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "max_completion_tokens": 2},
        422,
        "max_tokens",
    ),  # fmt: skip
]


@pytest.mark.parametrize("path,body,status,field", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_naming_the_field(http, path, body, status, field):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    else:
        r = http.post(path, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert err["message"]


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing", headers=AUTH).status_code == 404
    r = http.get("/v1/generate", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


@pytest.mark.parametrize(
    "path", ["/v1/models", "/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/nothing"]
)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
                         ids=["missing", "wrong", "not-bearer"])  # fmt: skip
def test_token_checked_on_every_route_but_health(http, path, headers):
    r = (
        http.post(path, json={"instruction": "hi"}, headers=headers)
        if path != "/v1/models"
        else http.get(path, headers=headers)
    )
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def test_batching_merges_concurrent_requests(served, burst):
    url, _ = served
    batches = burst(url, AUTH)
    assert max(b["generator"] for b in batches) >= 2, batches
    assert max(b["reranker"] for b in batches) >= 2, batches


def test_overload_is_503_not_a_hang(served, http):
    """More requests than the generator's ongoing + queued limit: the excess is refused at once."""
    url, _ = served

    async def flood():
        async with httpx.AsyncClient(
            base_url=url, headers=AUTH, timeout=60, limits=httpx.Limits(max_connections=40)
        ) as c:
            return await asyncio.gather(*[
                c.post("/v1/generate", json={"instruction": "Tell a story.", "k": 2, "max_new_tokens": 8}) for _ in range(30)
            ])  # fmt: skip

    rs = asyncio.run(flood())
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 4, codes
    refused = next(r for r in rs if r.status_code == 503)
    assert refused.json()["error"]["type"] == "overloaded" and refused.headers["retry-after"]
    assert http.get("/healthz").status_code == 200  # nothing crashed


def test_bounded_load_run_has_no_errors(served):
    from duetto.serve.bench import run_load

    url, _ = served
    result = asyncio.run(run_load(url, concurrency=2, duration_s=3.0, k=2, max_new_tokens=4, api_key=KEY))
    assert result.errors == {}, result
    assert result.ok >= 2 and result.ok == result.requests
    assert (
        0 < result.latency_ms["p50"] <= result.latency_ms["p95"] <= result.latency_ms["p99"] <= result.latency_ms["max"]
    )
    assert result.req_per_s > 0
    assert set(result.batch_requests_mean) == {"generator", "reranker"}
    assert all(n >= 1 for n in result.batch_requests_mean.values())


def test_python_client_and_query_command(served, capsys):
    from duetto.serve.client import EnsembleClient, ServeError, configure, run

    url, cfg = served
    with EnsembleClient(url, api_key=KEY) as client:
        assert client.health()["status"] == "ready"
        assert client.models()["data"][0]["id"] == cfg.model_name
        out = client.generate("Name a color.", k=2, max_new_tokens=3, seed=1)
        assert len(out["candidates"]) == 2
        assert client.chat([{"role": "user", "content": "hi"}], n=1, max_tokens=2)["object"] == "chat.completion"
        assert client.complete("hi", n=1, max_tokens=2)["object"] == "text_completion"
        with pytest.raises(ServeError) as e:
            client.generate("hi", k=99)
        assert e.value.status == 422 and "k" in str(e.value)
    with EnsembleClient(url, api_key="nope") as bad, pytest.raises(ServeError) as e:
        bad.models()
    assert e.value.status == 401
    import argparse

    p = argparse.ArgumentParser()
    configure(p)
    assert run(p.parse_args(["Name a color.", "--url", url, "--api-key", KEY, "--k", "2", "--max-new-tokens", "3",
                             "--seed", "1", "--json"])) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["candidates"] == out["candidates"]  # same seed, same answer
    assert run(p.parse_args(["hi", "--url", url, "--api-key", "nope"])) == 1
    assert "401" in capsys.readouterr().err
