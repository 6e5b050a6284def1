"""What a sweep leaves behind, rebuilt from its folder alone: results.csv/.md, best.json, pareto.png.

The trial folders and Tune's experiment state are the source of truth, so the same function serves
the end of `duetto sweep` and `duetto sweep report DIR` (also on a half-finished or killed sweep).
A trial's final numbers come from the metrics.json it wrote; a trial ASHA stopped early has only its
last interim report (its BLEU/ROUGE there are on the interim_eval_examples rows).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

COMPLETED, STOPPED, ERROR, UNFINISHED = "completed", "stopped early", "error", "unfinished"
METRIC_COLUMNS = ("bleu4", "rougeL", "eval_loss", "peak_memory_bytes", "tokens_per_second", "wall_seconds")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _error_line(trial_dir: Path) -> str:
    path = trial_dir / "error.txt"
    if not path.is_file():
        return ""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    # Tune's error.txt is a traceback; its most telling line is the last exception message.
    return lines[-1][:300] if lines else ""


def collect(sweep_dir: str | Path) -> tuple[Any, list[dict[str, Any]]]:
    """(SweepConfig, one row per trial) from a sweep folder."""
    from ray.tune import ExperimentAnalysis

    from duetto.tune.spec import space_keys
    from duetto.tune.sweep import load_sweep_dir

    sweep_dir = Path(sweep_dir).expanduser().resolve()
    sweep, _ = load_sweep_dir(sweep_dir)
    keys = space_keys(sweep)
    analysis = ExperimentAnalysis(str(sweep_dir))
    rows = []
    for trial in analysis.trials:
        params = dict(trial.config.get("trial") or {})
        method = params.get("method", "")
        trial_dir = Path(trial.path)
        metrics_file = trial_dir / "metrics.json"
        final = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        last = dict(trial.last_result or {})
        if trial.status == "ERROR":
            status = ERROR
        elif trial.status == "TERMINATED":
            status = COMPLETED if final else STOPPED
        else:
            status = UNFINISHED
        source = final if final else last
        row: dict[str, Any] = {"trial": trial_dir.name, "method": method}
        for key in keys.get(method, []):
            row[key] = params.get(key)
        for key in METRIC_COLUMNS:
            value = source.get(key)
            row[key] = value if _finite(value) else None
        if _finite(last.get("time_total_s")):  # the trial's own clock, start-up included, for every status
            row["wall_seconds"] = last["time_total_s"]
        row.update(
            status=status,
            failures=trial.num_failures,  # attempts that raised; Tune re-ran the trial after each but the last
            reports=last.get("training_iteration"),
            step=source.get("step"),
            eval_split=source.get("eval_split", ""),
            error=_error_line(trial_dir) if status == ERROR else "",
            trial_dir=str(trial_dir),
            model_dir=(final or {}).get("model_dir", ""),
        )
        rows.append(row)
    rows.sort(key=lambda r: (r["method"], r["trial"]))
    return sweep, rows


def best_per_method(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, dict[str, Any]]:
    """method -> its best completed row (only completed trials saved a model)."""
    best: dict[str, dict[str, Any]] = {}
    sign = 1 if mode == "max" else -1
    for row in rows:
        if row["status"] != COMPLETED or not _finite(row.get(metric)):
            continue
        current = best.get(row["method"])
        if current is None or sign * row[metric] > sign * current[metric]:
            best[row["method"]] = row
    return best


def best_json(best: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The schema `duetto serve --from-sweep DIR` reads: method -> trial_dir, model_dir, metrics, config."""
    import yaml

    out = {}
    for method, row in sorted(best.items()):
        trial_dir = Path(row["trial_dir"])
        config_file = trial_dir / "config.yaml"
        out[method] = {
            "trial": row["trial"],
            "trial_dir": str(trial_dir),
            "model_dir": row["model_dir"],
            "metrics": json.loads((trial_dir / "metrics.json").read_text()),
            "config": yaml.safe_load(config_file.read_text()) if config_file.is_file() else {},
        }
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = list(dict.fromkeys(k for row in rows for k in row)) or ["trial", "method", *METRIC_COLUMNS, "status"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in cols})


def _fmt(value: Any, key: str) -> str:
    if value is None or value == "":
        return ""
    if key == "peak_memory_bytes":
        return f"{value / 2**30:.2f}"
    if key in ("tokens_per_second", "wall_seconds"):
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _hyper(row: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={_fmt(row.get(k), k)}" for k in keys)


def _split_note(rows: list[dict[str, Any]]) -> str:
    """Which rows the metrics were computed on: the test split means the choice has seen it."""
    splits = sorted({r.get("eval_split") for r in rows if r.get("eval_split")})
    if splits == ["validation"]:
        return " on a validation split held out of train (data.val_size)"
    if splits == ["test"]:
        return " on the **test** split (set base.data.val_size to keep the test split unseen)"
    return f" on the {' / '.join(splits)} splits" if splits else ""


def write_markdown(sweep, rows: list[dict[str, Any]], best: dict[str, dict[str, Any]], path: Path) -> None:
    from duetto.tune.spec import space_keys

    keys = space_keys(sweep)
    counts = Counter(row["status"] for row in rows)
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
        f"chosen by **{sweep.metric}** ({sweep.resolved_mode}){_split_note(rows)}; scheduler {sweep.scheduler.type}.",
        "Rows that stopped early show their last interim report (BLEU/ROUGE on the interim rows only).",
        "",
        "| trial | method | hyper-parameters | bleu4 | rougeL | eval_loss | peak mem (GiB) | tokens/s | wall (s) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [row["trial"], row["method"], _hyper(row, keys.get(row["method"], []))]
        cells += [_fmt(row.get(k), k) for k in METRIC_COLUMNS]
        status = row["status"]
        if row.get("failures"):
            status += f" ({row['failures']} failed attempt{'s' if row['failures'] > 1 else ''})"
        cells.append(status + (f": {row['error']}" if row.get("error") else ""))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Best trial per method", ""]
    for method in sweep.methods:
        row = best.get(method)
        if row is None:
            lines.append(f"- **{method}**: no completed trial")
            continue
        lines.append(
            f"- **{method}**: `{row['trial']}` {sweep.metric}={_fmt(row[sweep.metric], sweep.metric)} "
            f"({_hyper(row, keys.get(method, []))}); model: `{row['model_dir']}`"
        )
    errors = [r for r in rows if r["status"] == ERROR]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- `{r['trial']}`: {r['error']} (see `{r['trial_dir']}/error.txt`)" for r in errors]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def pareto_front(points: list[tuple[float, float]], mode: str) -> list[tuple[float, float]]:
    """Points no other point beats on both memory (lower) and quality (per ``mode``), by memory."""
    sign = 1 if mode == "max" else -1
    front: list[tuple[float, float]] = []
    for mem, q in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * q > sign * front[-1][1]:
            front.append((mem, q))
    return front


def plot_pareto(sweep, rows: list[dict[str, Any]], best: dict[str, dict[str, Any]], path: Path) -> int:
    """Quality vs peak memory of the completed trials, one colour per method; returns points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, mode = sweep.metric, sweep.resolved_mode
    done = [r for r in rows if r["status"] == COMPLETED and _finite(r.get(metric)) and _finite(r.get("peak_memory_bytes"))]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = {"galore": "tab:blue", "qlora": "tab:orange"}
    for method in sorted({r["method"] for r in done}):
        pts = [(r["peak_memory_bytes"] / 2**30, r[metric]) for r in done if r["method"] == method]
        ax.scatter(*zip(*pts), label=method, color=colours.get(method), alpha=0.8)
        if method in best:
            b = best[method]
            ax.scatter([b["peak_memory_bytes"] / 2**30], [b[metric]], marker="*", s=220, color=colours.get(method),
                       edgecolors="black", zorder=3)
    front = pareto_front([(r["peak_memory_bytes"] / 2**30, r[metric]) for r in done], mode)
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="black", linewidth=1, alpha=0.6, label="Pareto front")
    ax.set_xlabel("peak memory per trial (GiB)")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title(f"sweep {sweep.name}: {len(done)} completed trials (star = best per method)")
    if done:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no completed trials yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(done)


def write_report(sweep_dir: str | Path) -> dict[str, Any]:
    """Write results.csv, results.md, best.json and pareto.png into the sweep folder; return a summary."""
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    sweep, rows = collect(sweep_dir)
    best = best_per_method(rows, sweep.metric, sweep.resolved_mode)
    write_csv(rows, sweep_dir / "results.csv")
    write_markdown(sweep, rows, best, sweep_dir / "results.md")
    (sweep_dir / "best.json").write_text(json.dumps(best_json(best), indent=2, allow_nan=True))
    plot_pareto(sweep, rows, best, sweep_dir / "pareto.png")
    statuses = dict(Counter(row["status"] for row in rows))
    return {"sweep_dir": str(sweep_dir), "trials": len(rows), "statuses": statuses, "rows": rows, "best": best,
            "metric": sweep.metric}
