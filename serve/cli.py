"""`duetto serve run`: the ensemble over HTTP; `duetto serve bench`: load-test a running one.

    duetto serve run --generator runs/qlora/trial --reranker runs/galore/trial [--k 4] [--port 8000]
    duetto serve run configs/serve.yaml [--set ensemble.mode=mix]
    duetto serve run --from-sweep duetto-runs/sweeps/study
    duetto serve run --from-sweep duetto-runs/sweeps/study --ensemble-from reports/study/report.json
    duetto serve bench --url http://127.0.0.1:8000 --concurrency 4 --duration 30

`run` is the default action (`duetto serve --generator ...` and `duetto serve configs/serve.yaml`
work too). Binds 127.0.0.1 unless --host says otherwise. Only the standard library and the config
module are imported here; Ray, torch and transformers load inside ``run``.
"""

from __future__ import annotations

import argparse
import sys

ACTIONS = ("run", "bench")

#: ServeConfig fields with a named flag on `duetto serve run` (flag name, dotted key).
SERVE_FLAGS = ["generator", "reranker", "from_sweep", ("mode", "ensemble.mode"), ("weight", "ensemble.weight"),
               "quantize", "adapter", "host", "port", ("k", "ensemble.k"), ("max_new_tokens", "ensemble.max_new_tokens"),
               "api_key"]  # fmt: skip


def legacy_argv(argv: list[str]) -> list[str]:
    """`duetto serve [CONFIG] --generator ...` (no action word) means `duetto serve run ...`."""
    if argv and argv[0] in (*ACTIONS, "-h", "--help"):
        return argv
    return ["run", *argv]


def configure(parser: argparse.ArgumentParser) -> None:
    from duetto.config import add_config_flags
    from duetto.serve.config import ServeConfig

    sub = parser.add_subparsers(dest="serve_action", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="serve the ensemble over HTTP (the default action)",
                         description="Serve the generate-then-rerank ensemble over HTTP.")  # fmt: skip
    run.add_argument("config", nargs="?", default=None, metavar="CONFIG.yaml",
                     help="a ServeConfig YAML to start from (flags, then --set, override it)")  # fmt: skip
    add_config_flags(run, ServeConfig, SERVE_FLAGS)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="any config key, dotted (e.g. generator_deployment.num_gpus=0.5); repeatable")  # fmt: skip
    run.add_argument("--ensemble-from", default=None, metavar="REPORT.json",
                     help="start the ensemble settings (mode, weights, greedy_candidate, k, temperature, top_p, "
                          "max_new_tokens) from what a `duetto report` chose on its validation rows and sampled "
                          "with (named flags and --set still override)")  # fmt: skip
    run.add_argument(
        "--address",
        default=None,
        help="Ray to join: auto = the `ray start` head on this machine, or HOST:PORT (default: $RAY_ADDRESS, else a private local Ray)",
    )
    run.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    run.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    bench = sub.add_parser("bench", help="closed-loop load test of a running endpoint (loopback only)",
                           description="Closed-loop load test of a running ensemble endpoint.")  # fmt: skip
    bench.add_argument("--url", default="http://127.0.0.1:8000", help="endpoint to load, loopback only (default %(default)s)")
    bench.add_argument("--concurrency", type=int, default=4, help="closed-loop clients (default %(default)s)")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds to send requests (default %(default)s)")
    bench.add_argument("--route", choices=["generate", "completions", "chat"], default="generate",
                       help="API route (default %(default)s)")  # fmt: skip
    bench.add_argument("--k", type=int, default=None, help="candidates each request asks for (default: the server's)")
    bench.add_argument("--max-new-tokens", type=int, default=None, help="tokens per candidate (default: the server's)")
    bench.add_argument("--extra", default=None, help='JSON object merged into every request body (e.g. \'{"mode": "mix"}\')')
    bench.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds (default %(default)s)")
    bench.add_argument("--json-out", default=None, metavar="PATH", help="also write the result as JSON")
    bench.add_argument("--api-key", default=None, help="bearer token to send (default: $DUETTO_API_KEY)")


def run(args: argparse.Namespace) -> int:
    if args.serve_action == "bench":
        from duetto.serve.bench import bench_main

        return bench_main(args)
    return _serve(args)


def build_config(args: argparse.Namespace):
    """ServeConfig from the optional YAML, then a report's validated ensemble settings
    (--ensemble-from), then the named flags, then --set overrides."""
    from duetto.config import ConfigError, config_flags, load_config
    from duetto.serve.config import ServeConfig, ensemble_from_report

    flags = config_flags(args)
    if getattr(args, "ensemble_from", None):
        try:
            flags = {**ensemble_from_report(args.ensemble_from), **flags}
        except ConfigError as e:
            raise ConfigError(f"--ensemble-from: {e}") from None
    return load_config(ServeConfig, args.config, args.overrides, flags=flags)


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

    from duetto.ray_connect import init_local, join
    from duetto.serve.app import start

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    # A private Ray bound to loopback: a bare ray.init() would silently join any `ray start` head on
    # this machine. `--address auto` joins that one on purpose.
    if address:
        join(address)
    else:
        init_local(include_dashboard=False)
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
