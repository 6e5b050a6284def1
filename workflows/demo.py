"""`duetto demo`: the whole product once, on a local Ray, with a real small model and real data.

model fetch -> data prepare -> sweep (both methods) -> results table -> ensemble endpoint on the best
GaLore and QLoRA trials -> one real HTTP query -> stop. Everything lands under one folder
(``duetto-runs/demo-<time>``); fetched models and data are cached under ``duetto-runs/cache`` so a
second run does not fetch again and nothing outside ``duetto-runs/`` is touched.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from duetto.files import file_sha256

STAGES = 6
#: The demo data when ../shared is absent: LLaMA-Factory's Alpaca demo file (CC BY-NC 4.0, research use),
#: from its PyPI source distribution; the same bytes as ../shared/data/alpaca_en_demo.json.
LLAMAFACTORY_SDIST = "llamafactory==0.9.5"
ALPACA_DEMO = ("data/alpaca_en_demo.json", "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318")
SHARED_FILES = {"alpaca": "alpaca_en_demo.json", "tulu": "tulu_v2_sample.jsonl", "ultrachat": "ultrachat_sample.jsonl"}


def _stage(n: int, text: str, t0: float) -> None:
    print(f"\n[{n}/{STAGES}] {text}  (t={time.perf_counter() - t0:.0f}s)", flush=True)


def demo_config() -> Path:
    """The shipped ``configs/demo.yaml``: package data of ``duetto.configs``, so an installed duetto
    finds it without a checkout."""
    return Path(str(importlib.resources.files("duetto.configs") / "demo.yaml"))


def find_shared_data() -> Path | None:
    """``../shared/data`` beside the checkout (or the working directory), when it holds the three files."""
    here = Path(__file__).resolve().parents[1]
    for root in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if all((root / f).is_file() for f in SHARED_FILES.values()):
            return root
    return None


def fetch_demo_alpaca(cache: Path) -> Path:
    """The Alpaca demo file from the llamafactory sdist on PyPI, verified by sha256, cached."""
    member, digest = ALPACA_DEMO
    target = cache / "data" / "llamafactory-0.9.5" / "alpaca_en_demo.json"
    if target.is_file() and file_sha256(target) == digest:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "-q", "-d", tmp, LLAMAFACTORY_SDIST]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise RuntimeError(f"pip download {LLAMAFACTORY_SDIST} failed (is PyPI reachable?): {proc.stderr.strip()[-500:]}")
        with tarfile.open(sdists[0]) as tar:
            name = next((m for m in tar.getnames() if m.endswith("/" + member)), None)
            if name is None:
                raise RuntimeError(f"{sdists[0].name} has no {member}")
            src = tar.extractfile(name)
            assert src is not None
            part = target.with_suffix(".part")
            part.write_bytes(src.read())
        if file_sha256(part) != digest:
            part.unlink()
            raise RuntimeError(f"{member} from {LLAMAFACTORY_SDIST}: sha256 mismatch (expected {digest})")
        part.rename(target)
    return target


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="demo sweep YAML (default: the shipped configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the demo sweep")
    parser.add_argument("--out", default=None, help="run folder (default: duetto-runs/demo-<time>)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (fetch name, path or hub id)")
    parser.add_argument("--train-size", type=int, default=200, help="training rows drawn from the demo data")
    parser.add_argument("--test-size", type=int, default=40, help="test rows")
    parser.add_argument("--port", type=int, default=0, help="HTTP port of the endpoint (0 = a free one)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint up until Ctrl-C")
    parser.add_argument("--question", default="Give three tips for staying healthy.", help="the query sent at the end")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    runs = Path("duetto-runs")
    out = Path(args.out or runs / f"demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Fetched models/data are reused by every later run, inside duetto-runs/ like everything else.
    os.environ.setdefault("DUETTO_CACHE", str((runs / "cache").resolve()))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cache = Path(os.environ["DUETTO_CACHE"])
    print(f"duetto demo -> {out}", flush=True)

    _stage(1, f"model: {args.model}", t0)
    from duetto.models import resolve_model

    model_path = resolve_model(args.model)
    print(f"  {model_path}")

    _stage(2, "data: real instruction data", t0)
    shared = find_shared_data()
    if shared is not None:
        sources = [{"kind": kind, "path": str(shared / f)} for kind, f in SHARED_FILES.items()]
        print(f"  using {shared} (Alpaca, Tulu v2, UltraChat samples)")
    else:
        alpaca = fetch_demo_alpaca(cache)
        sources = [{"kind": "alpaca", "path": str(alpaca)}]
        print(f"  using {alpaca} (from the {LLAMAFACTORY_SDIST} sdist, sha256 verified)")

    _stage(3, "prepare: clean, de-duplicate, split", t0)
    from duetto.config import from_dict
    from duetto.data.unify import DataConfig, prepare

    data_dir = out / "data"
    manifest = prepare(from_dict(DataConfig, {"sources": sources, "out": str(data_dir), "seed": 0,
                                              "train_size": args.train_size, "test_size": args.test_size}))
    print(f"  train {manifest['sizes']['train']} / test {manifest['sizes']['test']} -> {data_dir}")

    _stage(4, "sweep: GaLore and QLoRA trials on a local Ray (Ray Tune + Ray Train)", t0)
    import torch

    from duetto.tune.results import write_report
    from duetto.tune.spec import load_sweep
    from duetto.tune.sweep import start_sweep

    config = args.config or str(demo_config())
    on_gpu = ["resources.gpus_per_trial=0.5"] if torch.cuda.is_available() else []
    sweep = load_sweep(config, [*on_gpu,
        f"base.model={model_path}", f"base.data.train={data_dir / 'train.jsonl'}",
        f"base.data.test={data_dir / 'test.jsonl'}", f"storage_path={out / 'sweep'}", *args.overrides,
    ])
    sweep_dir = start_sweep(sweep)
    write_report(sweep_dir)

    _stage(5, "results", t0)
    print((sweep_dir / "results.md").read_text())

    _stage(6, "serve: QLoRA generates k candidates, GaLore re-ranks; one HTTP query", t0)
    import ray
    from ray import serve

    from duetto.serve.app import free_port, start
    from duetto.serve.client import EnsembleClient, format_answer
    from duetto.serve.config import ServeConfig

    port = args.port or free_port()
    # Fractional CPUs: on 2 cores three replicas asking 1 CPU each never schedule. With a GPU, the
    # generator and the reranker share it.
    gpu = 0.5 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    cfg = from_dict(ServeConfig, {
        "from_sweep": str(sweep_dir), "port": port, "quantize": "auto",
        "generator_deployment": {"num_cpus": 0.25, "num_gpus": gpu},
        "reranker_deployment": {"num_cpus": 0.25, "num_gpus": gpu},
        "ingress_deployment": {"num_cpus": 0.25},
    })
    url = start(cfg)
    print(f"  serving at {url}")
    try:
        with EnsembleClient(url, timeout=300) as client:
            answer = client.generate(args.question, k=4, max_new_tokens=48, seed=0)
        print(f"\n  Q: {args.question}\n")
        print(format_answer(answer, True))
        wall = time.perf_counter() - t0
        print(f"\nduetto demo finished in {wall:.0f} s. Everything is under {out}:")
        print(f"  data      {data_dir}\n  sweep     {sweep_dir} (results.md, results.csv, pareto.png, best.json)")
        print(f"  models    {cache / 'models'} (cache, reused by the next run)")
        if args.keep_serving:
            print(f"\n  still serving at {url} (Ctrl-C to stop); try:\n  curl -s {url}/v1/generate -H "
                  "'Content-Type: application/json' -d '{\"instruction\": \"Name three primary colours.\"}'")
            while True:
                time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
