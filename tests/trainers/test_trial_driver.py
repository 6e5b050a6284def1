"""What `duetto train` checks and prints in the driver, before any Ray worker starts: the data, an
output_dir that already holds a run, the opening line, and the warnings it keeps quiet."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pickle
import pkgutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from duetto.config import ConfigError, dump_yaml, load_config
from duetto.trainers.config import TrialConfig

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, train, test, *overrides: str) -> TrialConfig:
    return load_config(TrialConfig, None, [f"data.train={train}", f"data.test={test}", f"output_dir={tmp_path / 'out'}",
                                           *overrides])  # fmt: skip


def _write(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


# ---------------------------------------------------------------------------------------------
# data, checked in the driver
# ---------------------------------------------------------------------------------------------


def test_cli_names_a_missing_training_file_in_seconds_without_ray(tmp_path, unified_data):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "duetto", "train", "configs/qlora_study.yaml", "data.train=/nope.jsonl",
                           f"data.test={unified_data[1]}", f"output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data.train: /nope.jsonl: file not found" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "out").exists()
    assert elapsed < 20, elapsed  # python + imports; a Ray start and a worker retry take ~30 s here


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing_test", r"data\.test: .*nope-test\.jsonl: file not found"),
        ("schema", r"data\.train: .*bad\.jsonl:2: missing field 'response'"),
        ("not_json", r"data\.train: .*broken\.jsonl:2: invalid JSON"),
        ("empty_test", r"data\.test: .*empty\.jsonl leaves no test rows; evaluation needs at least one"),
        ("empty_train", r"data\.train: .*empty\.jsonl has no rows to train on"),
        ("val_leaves_nothing", r"data\.val_size=4: .*train\.jsonl has 4 training rows, which leaves 0 to train on"),
        ("val_rounds_to_zero", r"data\.val_size=0\.1: .*train\.jsonl has 4 training rows"),
        ("unreadable", r"data\.train: .*locked\.jsonl: Permission denied"),
    ],
)
def test_load_rows_names_the_key_and_the_file(tmp_path, case, needle):
    from duetto.trainers.trial_data import load_rows

    row = json.dumps({"instruction": "i", "response": "r"})
    train = _write(tmp_path / "train.jsonl", [row] * 4)
    test = _write(tmp_path / "test.jsonl", [row] * 2)
    empty = _write(tmp_path / "empty.jsonl", [])
    bad = {"schema": [row, json.dumps({"instruction": "i"})], "not_json": [row, "{oops"]}
    overrides = {
        "missing_test": [f"data.test={tmp_path / 'nope-test.jsonl'}"],
        "schema": [f"data.train={_write(tmp_path / 'bad.jsonl', bad['schema'])}"],
        "not_json": [f"data.train={_write(tmp_path / 'broken.jsonl', bad['not_json'])}"],
        "empty_test": [f"data.test={empty}"],
        "empty_train": [f"data.train={empty}"],
        "val_leaves_nothing": ["data.val_size=4"],
        "val_rounds_to_zero": ["data.val_size=0.1"],
        "unreadable": [f"data.train={_write(tmp_path / 'locked.jsonl', [row])}"],
    }[case]
    if case == "unreadable":
        (tmp_path / "locked.jsonl").chmod(0)
        if _can_read(tmp_path / "locked.jsonl"):
            pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(ConfigError, match=needle) as e:
        load_rows(_cfg(tmp_path, train, test, *overrides))
    again = pickle.loads(pickle.dumps(e.value))  # it may be raised in a Ray worker, too
    assert type(again) is ConfigError and str(again) == str(e.value)


def _can_read(path: Path) -> bool:
    try:
        path.open("rb").close()
        return True
    except OSError:
        return False


def test_load_rows_of_a_good_config(tmp_path):
    from duetto.trainers.trial_data import load_rows

    rows = [json.dumps({"instruction": f"i{n}", "response": "r"}) for n in range(10)]
    train, test = _write(tmp_path / "train.jsonl", rows), _write(tmp_path / "test.jsonl", rows[:3])
    got = load_rows(_cfg(tmp_path, train, test, "data.limit_train=8", "data.val_size=2", "eval.num_examples=1"))
    assert (len(got.train), len(got.held_out), got.split) == (6, 2, "validation")
    assert [r["instruction"] for r in got.held_out] == ["i6", "i7"]
    assert len(got.generation(_cfg(tmp_path, train, test, "eval.num_examples=1"))) == 1
    baseline = load_rows(_cfg(tmp_path, _write(tmp_path / "e.jsonl", []), test, "method=baseline", "max_steps=0"))
    assert baseline.train == [] and len(baseline.held_out) == 3  # the baseline trains nothing: no rows needed


#: One instance of every exception class defined in trainers/ and cluster/ (none today; a new one
#: must be added here, and survive pickling: Ray carries a worker's exception to the driver that way).
EXCEPTION_SAMPLES: dict[str, BaseException] = {}


def test_every_exception_class_of_trainers_and_cluster_survives_pickling():
    import duetto.cluster
    import duetto.trainers

    found = set()
    for package in (duetto.trainers, duetto.cluster):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found.add(f"{module.__name__}.{name}")
    assert found == set(EXCEPTION_SAMPLES), "add a sample of each new exception class to EXCEPTION_SAMPLES"
    for sample in EXCEPTION_SAMPLES.values():
        again = pickle.loads(pickle.dumps(sample))
        assert type(again) is type(sample) and str(again) == str(sample)


def test_errors_the_cluster_commands_raise_survive_pickling(tmp_path):
    from duetto.cluster import local

    with pytest.raises(ConfigError) as auth:
        local.start(tmp_path, auth="none")
    (tmp_path / local.STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError) as state:
        local.load_state(tmp_path)
    for e in (auth.value, state.value):
        assert str(pickle.loads(pickle.dumps(e))) == str(e)


# ---------------------------------------------------------------------------------------------
# an output_dir that already holds a run
# ---------------------------------------------------------------------------------------------


def _finished_run(tmp_path: Path, cfg: TrialConfig) -> Path:
    """What a finished trial leaves in output_dir (its files; no training needed to test the check)."""
    out = Path(cfg.output_dir)
    (out / "model").mkdir(parents=True)
    dump_yaml(cfg, out / "trial.yaml")
    (out / "metrics.json").write_text(json.dumps({"method": cfg.method, "step": 3}))
    (out / "ray" / "trial").mkdir(parents=True)
    return out


def test_a_finished_run_is_refused_naming_the_folder_and_the_ways_out(tmp_path, unified_data):
    from duetto.trainers.trial import check_output_dir

    cfg = _cfg(tmp_path, *unified_data)
    out = _finished_run(tmp_path, cfg)
    run_dir = out / "ray" / "trial"
    with pytest.raises(ConfigError) as e:
        check_output_dir(cfg, run_dir, resume=False, overwrite=False)
    msg = str(e.value)
    assert str(out) in msg and "finished run" in msg
    assert all(way in msg for way in ("--resume", "--overwrite", "new output_dir"))
    # an unfinished one (Ray's snapshot alone) too
    (out / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="unfinished run"):
        check_output_dir(cfg, run_dir, resume=False, overwrite=False)


def test_resume_needs_the_same_settings_and_names_those_that_differ(tmp_path, unified_data):
    from duetto.trainers.trial import check_output_dir

    cfg = _cfg(tmp_path, *unified_data, "learning_rate=1e-4")
    out = _finished_run(tmp_path, cfg)
    check_output_dir(cfg, out / "ray" / "trial", resume=True, overwrite=False)  # same settings: fine
    changed = _cfg(tmp_path, *unified_data, "learning_rate=2e-4", "qlora.r=16")
    with pytest.raises(ConfigError) as e:
        check_output_dir(changed, out / "ray" / "trial", resume=True, overwrite=False)
    msg = str(e.value)
    assert "learning_rate: 0.0001 there, 0.0002 now" in msg and "qlora.r: 4 there, 16 now" in msg
    assert "max_steps" not in msg and str(out / "trial.yaml") in msg
    with pytest.raises(ConfigError, match="holds no run to resume"):
        check_output_dir(_cfg(tmp_path / "fresh", *unified_data), tmp_path / "none", resume=True, overwrite=False)


def test_overwrite_removes_only_the_earlier_runs_files(tmp_path, unified_data):
    from duetto.trainers.trial import check_output_dir

    cfg = _cfg(tmp_path, *unified_data)
    out = _finished_run(tmp_path, cfg)
    (out / "notes.txt").write_text("mine")
    check_output_dir(cfg, out / "ray" / "trial", resume=False, overwrite=True)
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "ray"]
    check_output_dir(cfg, out / "ray" / "trial", resume=False, overwrite=False)  # now it is free


def test_rerun_with_changed_settings_and_missing_data_does_not_return_the_old_run(tmp_path, unified_data,
                                                                                  tiny_gemma_dir):  # fmt: skip
    """The new user's sequence: train, then `duetto train` into the same folder with other settings."""
    from duetto.trainers.trial import run_trial

    base = [f"model={tiny_gemma_dir}", "method=baseline", "max_steps=0", "max_seq_len=64", "eval.num_examples=2",
            "eval.max_new_tokens=4", "eval.loss_examples=4", "scaling.num_workers=0"]  # fmt: skip
    first = run_trial(_cfg(tmp_path, *unified_data, *base))
    assert first["num_eval_examples"] == 2
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run_trial(_cfg(tmp_path, unified_data[0], unified_data[1], *base, "eval.num_examples=3"))
    with pytest.raises(ConfigError, match="data.test: /nope.jsonl: file not found"):
        run_trial(_cfg(tmp_path, unified_data[0], "/nope.jsonl", *base, "eval.num_examples=3"))
    assert load_config(TrialConfig, tmp_path / "out" / "trial.yaml").eval.num_examples == 2  # untouched
    again = run_trial(_cfg(tmp_path, *unified_data, *base, "eval.num_examples=3"), overwrite=True)
    assert again["num_eval_examples"] == 3


# ---------------------------------------------------------------------------------------------
# what it prints
# ---------------------------------------------------------------------------------------------


def test_header_says_what_runs(tmp_path, unified_data, monkeypatch):
    from duetto.trainers.trial_data import load_rows
    from duetto.trainers.trial_reports import header

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = _cfg(tmp_path, *unified_data, "method=galore", "model=tiny", "scaling.use_gpu=false", "data.val_size=6")
    line = header(cfg, load_rows(cfg), tmp_path / "out")
    assert line == (f"duetto train: galore of tiny on 90 train rows ({unified_data[0]}), evaluated on 6 validation "
                    f"rows; in-process (Ray Train local mode) on CPU; output {tmp_path / 'out'}")  # fmt: skip
    worker = _cfg(tmp_path, *unified_data, "scaling.num_workers=1", "scaling.use_gpu=false")
    assert "; 1 Ray worker on CPU;" in header(worker, load_rows(worker), "o")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    joined = _cfg(tmp_path, *unified_data, "scaling.num_workers=2", "galore.layerwise=false")
    assert "2 Ray workers, on GPUs if the cluster has them" in header(joined, load_rows(joined), "o")


def test_progress_line_per_log():
    from types import SimpleNamespace

    from duetto.trainers.trial_reports import progress_line

    state = SimpleNamespace(global_step=10, max_steps=40)
    assert progress_line(state, {"loss": 2.34567, "grad_norm": 1.0, "learning_rate": 2e-5, "epoch": 0.25}) == (
        "duetto train: step 10/40  loss 2.3457  learning_rate 2.00e-05  epoch 0.25")
    assert progress_line(state, {"eval_loss": 2.0, "eval_runtime": 0.1, "epoch": 0.25}) == (
        "duetto train: step 10/40  eval_loss 2.0000  epoch 0.25")
    assert progress_line(state, {"epoch": 0.25, "total_flos": 1.0}) is None


#: (logger name or warning category, a message it prints) for each known-harmless message, as printed.
HARMLESS_SAMPLES = [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
     "'kernels'. Please make sure you already `pip install kernels` and the kernels >= 0.11.1"),
    ("transformers.trainer_optimizer", "model.layers.0.self_attn.q_norm matched but ignored. "
     "OptimizerNames.GALORE_ADAMW_8BIT_LAYERWISE only supports linear layers."),
    (FutureWarning, "`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
     "`activation_checkpointing_enable` instead."),
]  # fmt: skip
RAY_SAMPLE = ("[2026-12-01 18:55:50,343 E 31396 31436] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher'"
              " and ID: 'f45d8b1fd4a3759d4466b3f301000000' has constructor arguments in the object store and "
              "max_restarts > 0")  # fmt: skip


def test_quiet_known_warnings_drops_exactly_those_messages(monkeypatch):
    from duetto.trainers.compat import KNOWN_HARMLESS, quiet_known_warnings

    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    assert len(KNOWN_HARMLESS) == len(HARMLESS_SAMPLES) + 1  # every entry has a sample here
    seen: set[str] = set()  # a record reaches each handler on its way up: count it once

    class Collect(logging.Handler):
        def emit(self, record):
            seen.add(f"{record.name}: {record.getMessage()}")

    handler = Collect()
    names = [s for s, _ in HARMLESS_SAMPLES if isinstance(s, str)] + ["transformers.trainer", "bitsandbytes"]
    for name in names:
        logging.getLogger(name).addHandler(handler)
    saved_filters = {name: list(logging.getLogger(name).filters) for name in names}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_warnings()
            quiet_known_warnings()  # twice: still one filter each
            assert all(len(logging.getLogger(n).filters) <= len(saved_filters[n]) + 1 for n in names)
            for source, message in HARMLESS_SAMPLES:
                if isinstance(source, str):
                    logging.getLogger(source).warning(message)
                    logging.getLogger(source).warning("Failed to load CUDA kernels: " + message[-20:])  # kept
                    other = "transformers.trainer" if source.startswith("transformers") else "bitsandbytes"
                    logging.getLogger(other).warning(message)  # the same text from another logger: kept
                else:
                    warnings.warn(message, source)  # dropped
                    warnings.warn(message, UserWarning)  # another category: kept
                    warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", source)  # kept
        dropped = {f"{source}: {message}" for source, message in HARMLESS_SAMPLES if isinstance(source, str)}
        assert len(seen) == 4 and not dropped & seen, seen  # per logger: the near miss and the other logger's
        assert [str(w.message)[:27] for w in caught] == ["`gradient_checkpointing_ena", "`gradient_checkpointing` is"]
        assert [w.category for w in caught] == [UserWarning, FutureWarning]
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).filters[:] = saved_filters[name]
    # The driver's printer of Ray's forwarded lines skips the PreemptionWatcher line only.
    import re

    import ray._private.ray_logging as ray_logging

    skip = re.compile(__import__("os").environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert skip.search(RAY_SAMPLE) and not skip.search(RAY_SAMPLE.replace("PreemptionWatcher", "TrainController"))
    assert ray_logging.stderr_deduplicator.skip_re.pattern == skip.pattern
