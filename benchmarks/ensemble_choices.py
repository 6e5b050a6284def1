"""How the ensemble chose among its candidates, re-scored from a report's stored outputs.

`duetto report` writes this section itself since the function existed; this script adds it to a
report produced before that, from its outputs.jsonl (no model is loaded, nothing is decoded again):

    python benchmarks/ensemble_choices.py docs/results/study/outputs.jsonl --out docs/results/study/ensemble_choices.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from duetto.report import ensemble_choices, render_choices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outputs", help="a report's outputs.jsonl")
    ap.add_argument("--mode", default="reranker", help="the report config's ensemble.mode")
    ap.add_argument("--weight", type=float, default=0.5, help="mode mix's weight (the report config's ensemble.weight)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the markdown here")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.outputs).read_text(encoding="utf-8").splitlines() if line.strip()]
    choices = ensemble_choices(rows, mode=args.mode, weight=args.weight, n_resamples=args.bootstrap, seed=args.seed)
    if not choices:
        raise SystemExit(f"{args.outputs}: no row has ensemble_candidates")
    text = "\n".join([f"Re-scored from `{args.outputs}` by `benchmarks/ensemble_choices.py`.", "",
                      *render_choices(choices), ""])  # fmt: skip
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
