"""Paired bootstrap tests between systems of two `duetto report` runs on the same test split.

`duetto report` tests each row against the baseline (and the ensemble against the better single
model) within one run. This compares across runs, e.g. the study-settings trials against the
best-settings ones, from the raw `outputs.jsonl` each report keeps. Both files must hold the same
references in the same order (the same test split), or the pairing would be meaningless.

    python benchmarks/compare_reports.py docs/results/study/outputs.jsonl docs/results/study_best/outputs.jsonl \
        --pair QLoRA:GaLore@b --pair GaLore --pair QLoRA
A pair `X` compares system X of run A with X of run B; `X:Y` compares X of A with Y of A; a `@b` suffix
reads both sides from run B instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="outputs.jsonl of run A")
    ap.add_argument("b", help="outputs.jsonl of run B")
    ap.add_argument("--pair", action="append", required=True, help="X (A's X vs B's X), X:Y (within A), X:Y@b (within B)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from duetto.workflows.stats import METRICS, paired_bootstrap

    runs = {"a": _rows(args.a), "b": _rows(args.b)}
    refs = [r["reference"] for r in runs["a"]]
    if refs != [r["reference"] for r in runs["b"]]:
        raise SystemExit(f"{args.a} and {args.b}: the references differ, so these are not the same test split")
    print("| A | B | metric | Δ (B − A) | 95% interval | p(B not better) |\n|---|---|---|---|---|---|")
    for pair in args.pair:
        spec, _, within = pair.partition("@")
        x, _, y = spec.partition(":")
        if within not in ("", "b"):
            raise SystemExit(f"--pair {pair}: the suffix may only be @b")
        side_a, side_b = (within or "a", within or "a") if y else ("a", "b")
        y = y or x
        for run, name in ((side_a, x), (side_b, y)):
            if name not in runs[run][0]:
                raise SystemExit(f"--pair {pair}: run {run.upper()} has no system {name!r} "
                                 f"(it has {[k for k in runs[run][0] if k not in ('instruction', 'input', 'reference')]})")
        for metric, (stat, from_sums) in METRICS.items():
            t = paired_bootstrap(stat([r[x] for r in runs[side_a]], refs), stat([r[y] for r in runs[side_b]], refs),
                                 from_sums, n_resamples=args.bootstrap, seed=args.seed)
            print(f"| {x} ({Path(getattr(args, side_a)).parent.name}) | {y} ({Path(getattr(args, side_b)).parent.name}) "
                  f"| {metric} | {t['delta']:+.4f} | [{t['low']:+.4f}, {t['high']:+.4f}] | {t['p_not_better']:.3f} |")


if __name__ == "__main__":
    main()
