"""`duetto serve`: run the ensemble over HTTP, or `duetto serve bench` to load-test a running one.

    duetto serve --generator runs/qlora/trial --reranker runs/galore/trial [--k 4] [--port 8000]
    duetto serve configs/serve.yaml [--set ensemble.mode=mix]
    duetto serve --from-sweep duetto-runs/sweep
    duetto serve bench --url http://127.0.0.1:8000 --concurrency 4 --duration 30

Binds 127.0.0.1 unless --host says otherwise. Only the standard library is imported here; Ray,
torch and transformers load inside ``run``.
"""

from __future__ import annotations

import argparse
import sys

BENCH = "bench"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        nargs="?",
        default=None,
        metavar="CONFIG.yaml | bench",
        help="a ServeConfig YAML to serve (flags override it), or `bench` to run the load generator",
    )
    run = parser.add_argument_group("serving")
    run.add_argument("--generator", help="trial dir / model dir / PEFT adapter / HF model that samples the candidates")
    run.add_argument("--reranker", help="trial dir / model dir / HF model that scores the candidates")
    run.add_argument(
        "--from-sweep", metavar="DIR", help="sweep dir: best QLoRA trial generates, best GaLore trial reranks"
    )
    run.add_argument("--mode", choices=["reranker", "mix", "generator", "reranker-greedy"], help="default scoring mode")
    run.add_argument("--weight", type=float, help="generator log-prob weight in mode=mix")
    run.add_argument("--quantize", choices=["auto", "none", "8", "4"], help="base weights under a PEFT adapter")
    run.add_argument("--host", help="bind address (default 127.0.0.1; 0.0.0.0 exposes the server)")
    run.add_argument("--port", type=int, help="HTTP port (default 8000)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="any config key, dotted (e.g. generator_deployment.num_gpus=0.5); repeatable")  # fmt: skip
    run.add_argument(
        "--address",
        default=None,
        help="Ray to join: auto = the `ray start` head on this machine, or HOST:PORT (default: $RAY_ADDRESS, else a private local Ray)",
    )
    run.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    both = parser.add_argument_group("serving and bench")
    both.add_argument("--k", type=int, help="candidates per request (serving: the default; bench: what requests ask)")
    both.add_argument(
        "--max-new-tokens", type=int, help="tokens per candidate (serving: the default; bench: per request)"
    )
    both.add_argument(
        "--api-key", default=None, help="bearer token (default: $DUETTO_API_KEY); serving checks it, bench sends it"
    )
    bench = parser.add_argument_group("bench (duetto serve bench ...)")
    bench.add_argument("--url", default=None, help="endpoint to load, loopback only (default http://127.0.0.1:8000)")
    bench.add_argument("--concurrency", type=int, default=None, help="closed-loop clients (default 4)")
    bench.add_argument("--duration", type=float, default=None, help="seconds to send requests (default 10)")
    bench.add_argument(
        "--route", choices=["generate", "completions", "chat"], default=None, help="API route (default generate)"
    )
    bench.add_argument(
        "--extra", default=None, help='JSON object merged into every request body (e.g. \'{"mode": "mix"}\')'
    )
    bench.add_argument("--timeout", type=float, default=None, help="per-request timeout in seconds (default 120)")
    bench.add_argument("--json-out", default=None, metavar="PATH", help="also write the result as JSON")


_BENCH_ONLY = ("url", "concurrency", "duration", "route", "extra", "timeout", "json_out")
_SERVE_ONLY = ("generator", "reranker", "from_sweep", "mode", "weight", "quantize", "host", "port", "address")


def run(args: argparse.Namespace) -> int:
    if args.target == BENCH:
        given = [f"--{n.replace('_', '-')}" for n in _SERVE_ONLY if getattr(args, n) is not None]
        if given or args.overrides:
            print(f"duetto serve bench: {', '.join(given or ['--set'])} only apply when serving", file=sys.stderr)
            return 2
        from duetto.serve.bench import bench_main

        defaults = {
            "url": "http://127.0.0.1:8000",
            "concurrency": 4,
            "duration": 10.0,
            "route": "generate",
            "timeout": 120.0,
        }
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        return bench_main(args)
    given = [f"--{n.replace('_', '-')}" for n in _BENCH_ONLY if getattr(args, n) is not None]
    if given:
        print(f"duetto serve: {', '.join(given)} only apply to `duetto serve bench`", file=sys.stderr)
        return 2
    return _serve(args)


def build_config(args: argparse.Namespace):
    """ServeConfig from the optional YAML, then --set overrides, then the named flags (flags win)."""
    from duetto.config import from_dict, load_config, to_dict
    from duetto.serve.config import ServeConfig

    numeric = {"ensemble.k": args.k, "ensemble.max_new_tokens": args.max_new_tokens, "ensemble.weight": args.weight,
               "port": args.port}  # fmt: skip
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in numeric.items() if value is not None]
    cfg = load_config(ServeConfig, args.target, overrides)
    data = to_dict(cfg)
    # Strings are set as given, not parsed as YAML (a token like 0123 must stay a string).
    for flag, key in (("generator", "generator"), ("reranker", "reranker"), ("from_sweep", "from_sweep"),
                      ("quantize", "quantize"), ("host", "host"), ("api_key", "api_key")):  # fmt: skip
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    if args.mode is not None:
        data["ensemble"]["mode"] = args.mode
    return from_dict(ServeConfig, data)


def _serve(args: argparse.Namespace) -> int:
    import os
    import time

    from duetto.config import format_help, to_dict
    from duetto.serve.config import ServeConfig

    if args.help_config:
        print(format_help(ServeConfig))
        return 0
    cfg = build_config(args)
    if args.print_config:
        import yaml

        data = to_dict(cfg)
        if data.get("api_key"):
            data["api_key"] = "***"
        print(yaml.safe_dump(data, sort_keys=False), end="")
        return 0
    from duetto.serve.app import resolve_sources

    resolve_sources(cfg)  # a missing model or a bad sweep dir fails here, before Ray starts
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.resolved_api_key():
        print(f"duetto serve: warning: binding {cfg.host} without an API key; anyone who can reach it can use it",
              file=sys.stderr)  # fmt: skip
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from duetto.serve.app import start

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    # "local" always starts a private Ray: a bare ray.init() would silently join any `ray start` head
    # on this machine. `--address auto` joins that one on purpose.
    ray.init(address=address or "local", include_dashboard=False)
    try:
        print(f"duetto serve: loading {cfg.generator} (generator) and {cfg.reranker} (reranker) ...", file=sys.stderr)
        url = start(cfg)
        print(f"duetto serve: ready at {url}  (POST /v1/generate, /v1/completions, /v1/chat/completions; "
              f"GET /v1/models, /healthz). Ctrl-C stops.", flush=True)  # fmt: skip
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("duetto serve: stopping", file=sys.stderr)
        return 0
    finally:
        if address:  # a shared cluster: remove only our app, leave Serve and other apps running
            serve.delete(cfg.app_name)
        else:
            serve.shutdown()
        ray.shutdown()
