"""A small Python client for the ensemble endpoint, and the `duetto query` subcommand.

    from duetto.serve.client import EnsembleClient
    client = EnsembleClient("http://127.0.0.1:8000", api_key="...")
    out = client.generate("Name three primes.", k=4)
    print(out["response"], out["chosen_index"])

Only the standard library and httpx are imported, so `duetto --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "DUETTO_API_KEY"


class ServeError(RuntimeError):
    """A non-2xx answer from the endpoint; ``status`` and the decoded JSON ``body`` are kept."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {_error_message(body)}")


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        field = err.get("field")
        return f"{err.get('message', err)}" + (f" (field: {field})" if field else "")
    return str(body)[:500]


class EnsembleClient:
    """Thin wrapper over the HTTP API (see docs/serve.md); one method per route."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EnsembleClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, method: str, path: str, body: dict | None = None) -> Any:
        resp = self._http.request(method, path, json=body)
        try:
            data = resp.json()
        except ValueError:
            data = resp.text
        if resp.status_code >= 400:
            raise ServeError(resp.status_code, data)
        return data

    def _post(self, path: str, body: dict, options: dict) -> Any:
        """POST ``body`` plus the options that are set (None = the server's default)."""
        return self._send("POST", path, {**body, **{k: v for k, v in options.items() if v is not None}})

    def generate(self, instruction: str, input: str | None = None, **options: Any) -> dict:
        """POST /v1/generate. options: k, max_new_tokens, temperature, top_p, seed, mode, weight, greedy_candidate."""
        return self._post("/v1/generate", {"instruction": instruction, **({"input": input} if input else {})}, options)

    def complete(self, prompt: str, **options: Any) -> dict:
        """POST /v1/completions (OpenAI fields: n, max_tokens, temperature, top_p, seed, model)."""
        return self._post("/v1/completions", {"prompt": prompt}, options)

    def chat(self, messages: list[dict[str, str]], **options: Any) -> dict:
        """POST /v1/chat/completions with OpenAI-style messages."""
        return self._post("/v1/chat/completions", {"messages": messages}, options)

    def models(self) -> dict:
        return self._send("GET", "/v1/models")

    def health(self) -> dict:
        """GET /healthz; raises ServeError(503) while the models are still loading."""
        return self._send("GET", "/healthz")


# --- `duetto query` ------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    from duetto.serve.selection import MODES

    parser.add_argument("instruction", help="the instruction (the prompt) to send")
    parser.add_argument("--input", default=None, help="optional input/context for the instruction")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"endpoint base URL (default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help=f"bearer token (default: ${API_KEY_ENV})")
    parser.add_argument("--k", type=int, default=None, help="candidates to sample (server default if omitted)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="makes the sampled candidates reproducible")
    parser.add_argument("--mode", default=None, choices=MODES, help="scoring mode")
    parser.add_argument("--weight", type=float, default=None, help="mode mix: the generator log-prob's weight; mode pmi: the prior's")
    parser.add_argument("--greedy-candidate", action=argparse.BooleanOptionalAction, default=None,
                        help="the first candidate is the generator's greedy answer (server default if omitted)")
    parser.add_argument("--candidates", action="store_true", help="also print every candidate with its scores")
    parser.add_argument("--json", action="store_true", help="print the whole JSON answer")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer")


def format_answer(out: dict, show_candidates: bool) -> str:
    lines = [out["response"]]
    if show_candidates:
        lines.append("")
        for i, c in enumerate(out.get("candidates", [])):
            mark = "*" if i == out.get("chosen_index") else " "
            gen, rerank = ("   n/a" if c.get(key) is None else f"{c[key]:7.3f}"
                           for key in ("generator_logprob", "reranker_score"))  # fmt: skip
            text = c["text"].replace("\n", " ")
            lines.append(f"{mark} [{i}] gen={gen} rerank={rerank}  {text[:100]}")
        t = out.get("timings_ms", {})
        if t:
            lines.append("timings_ms: " + ", ".join(f"{k}={v:.1f}" for k, v in t.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import httpx

    try:
        with EnsembleClient(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            out = client.generate(args.instruction, input=args.input, k=args.k, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed, mode=args.mode,
                                  weight=args.weight, greedy_candidate=args.greedy_candidate)  # fmt: skip
    except ServeError as e:
        print(f"duetto query: {e}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"duetto query: cannot reach {args.url}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else format_answer(out, args.candidates))
    return 0
