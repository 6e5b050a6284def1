"""The model cache: ``<cache_root>/models/<name>`` folders, each built once and published whole.

A folder is complete when its manifest (``duetto-model.json``, written last) is present. Builders of
one entry take a file lock, build into a temp folder beside it and rename it into place, so several
Ray workers resolving the same model build it once and never read a half-written folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Written last into every cached model folder: its presence means the folder is complete.
MANIFEST = "duetto-model.json"


def cache_root() -> Path:
    """``$DUETTO_CACHE`` if set, else ``~/.cache/duetto``."""
    env = os.environ.get("DUETTO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "duetto"


def models_dir() -> Path:
    """Where fetched and tiny models are cached: ``<cache_root>/models/<name>``."""
    return cache_root() / "models"


def read_manifest(model_dir: str | Path) -> dict[str, Any] | None:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(out: Path, data: dict[str, Any]) -> None:
    data = {**data, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.rename(out / MANIFEST)


@contextlib.contextmanager
def _build_lock(target: Path):
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, fresh: Callable[[], bool], build: Callable[[Path], Path]) -> Path:
    """``target``, built first unless ``fresh()``: ``build(work)`` gets an empty temp folder beside
    the target and returns the finished folder inside it, which then replaces the target."""
    if fresh():
        return target
    with _build_lock(target):
        if fresh():  # another process finished it while this one waited
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            done = build(work)
            if target.exists():  # stale (incomplete or outdated): replaced
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                target.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            done.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target
