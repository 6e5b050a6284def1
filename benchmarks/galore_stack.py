"""Full fine-tune trials stacked into one model's kernels, against the same trials one at a time.

A sweep's GaLore trials each own all the weights of a small model and train at batch 2 x 128, where
a step is bound by launching kernels, not by arithmetic. This measures whether N such trials go
faster as one stacked step (`torch.func.stack_module_state` + `vmap` of `functional_call`: every
matmul of the N models becomes one batched matmul) than as N separate steps, each replayed as a CUDA
graph as a single fast-path trial's is. Both arms run the same math per trial: forward, backward and
a fused AdamW step on every weight, the trials' rows and weights kept apart; the GaLore projection is
not in either arm (it is per-weight work that stacks the same way as AdamW's).

For N in --trials, in one process on one GPU: seconds per step of each arm, aggregate trained
tokens/s, the ratio, peak memory, and a check that the stacked step's per-trial losses equal the
separate models' on the first step (same weights, same rows).

    python benchmarks/galore_stack.py --model DIR --trials 1,4,8 --out galore_stack_h100.json
    python benchmarks/galore_stack.py --model TINY_DIR --trials 2 --steps 3 --cpu --out /tmp/s.json   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path


def _models(path: str, n: int, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
    models = []
    for i in range(n):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():  # trials differ: each its own small perturbation of the base
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 1e-3 * (i + 1))
        m.config.use_cache = False
        m.train()
        models.append(m)
    return models


def _batches(n: int, vocab: int, steps: int, device, seq: int = 128, rows: int = 2):
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n, rows, seq), generator=g).to(device) for _ in range(steps)]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _captured(eager):
    """``eager`` captured once as a CUDA graph after a warm-up on a side stream; returns the replay."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        eager()
    return g.replay


def one_at_a_time(models, device, graphs: bool, rows):
    """Each trial its own step (forward, backward, fused AdamW), replayed as a CUDA graph on a GPU."""
    import torch

    runs = []
    for i, m in enumerate(models):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=device.type == "cuda", capturable=graphs)
        x = rows[i].clone()

        def eager(m=m, opt=opt, x=x):
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=not graphs)

        runs.append((x, _captured(eager) if graphs else eager, opt))

    def step(batch):
        for i, (x, run, _) in enumerate(runs):
            x.copy_(batch[i])
            run()

    # a graph holds no reference to what it reads and writes: the step keeps the models, inputs and
    # optimizers (with their states) alive for as long as it can be replayed
    step.keep = (models, runs)
    return step


def _stacked_loss(skeleton):
    """Per-trial losses of stacked weights: ``(params, buffers, rows)``, each with a leading trial
    dimension, through ``skeleton``'s forward."""
    from torch.func import functional_call, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def loss_one(p, b, x):
        # the fused SDPA kernels reject vmap's batched strides; the math kernel is plain batched matmuls
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(skeleton, (p, b), (), {"input_ids": x, "labels": x}).loss

    return vmap(loss_one, in_dims=(0, 0, 0), randomness="different")


def stacked(models, device, graphs: bool, rows):
    """All trials as one step: stacked weights, vmap over the trial dimension, one fused AdamW.
    ``models[0]`` is the skeleton ``functional_call`` runs; the other models may be freed after."""
    import torch
    from torch.func import stack_module_state

    params, buffers = stack_module_state(models)
    params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    skeleton = models[0]
    batched = _stacked_loss(skeleton)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-5, fused=device.type == "cuda", capturable=graphs)
    x = rows.clone()

    def eager():
        batched(params, buffers, x).sum().backward()  # each trial's weights get their own loss's gradient
        opt.step()
        opt.zero_grad(set_to_none=not graphs)

    run = _captured(eager) if graphs else eager

    def step(batch):
        x.copy_(batch)
        run()

    step.keep = (skeleton, params, buffers, opt, x)  # see one_at_a_time
    return step


def first_losses_agree(models, data) -> float:
    """Largest relative difference between the stacked and the separate models' first-step losses
    (both through SDPA's math kernel, so the comparison is of the stacking alone)."""
    import torch
    from torch.func import stack_module_state
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params, buffers = stack_module_state(models)
    with torch.no_grad():
        stacked_losses = _stacked_loss(models[0])(params, buffers, data[0])
        with sdpa_kernel(SDPBackend.MATH):
            alone = torch.stack([m(input_ids=data[0][i], labels=data[0][i]).loss for i, m in enumerate(models)])
    return float(((stacked_losses - alone).abs() / alone.abs()).max())


def measure(path: str, n: int, steps: int, device, dtype) -> dict:
    import gc

    import torch

    graphs = device.type == "cuda"
    # labels are the inputs shifted by one: 127 trained tokens a row
    row: dict = {"trials": n, "steps": steps, "tokens_per_step": n * 2 * 127, "graphs": graphs}
    for arm in ("one_at_a_time", "stacked"):
        models = _models(path, n, device, dtype)
        data = _batches(n, models[0].config.vocab_size, steps, device)
        if arm == "stacked":
            row["first_loss_max_rel_diff"] = first_losses_agree(models, data)
        step = None
        if graphs:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            if arm == "one_at_a_time":
                step = one_at_a_time(models, device, graphs, data[0])
            else:
                step = stacked(models, device, graphs, data[0])
                del models[1:]  # the stacked copy holds the trials' weights now
            for b in data[:2]:
                step(b)
            _sync(device)
            t0 = time.perf_counter()
            for b in data:
                step(b)
            _sync(device)
            seconds = (time.perf_counter() - t0) / steps
            row[arm] = {"seconds_per_step": seconds, "tokens_per_s": row["tokens_per_step"] / seconds,
                        "peak_memory_bytes": torch.cuda.max_memory_allocated() if graphs else None}  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a failing arm is a result: record why
            row[arm] = {"error": f"{type(e).__name__}: {e}"[:800]}
        del step, models, data  # the arm's graphs, weights and states, before the next arm measures its peak
        gc.collect()
        if graphs:
            torch.cuda.empty_cache()
    a, b = row["one_at_a_time"].get("tokens_per_s"), row["stacked"].get("tokens_per_s")
    row["ratio"] = b / a if a and b else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a model folder (random weights are fine)")
    ap.add_argument("--trials", default="1,4,8")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # per-shape plans; the trials turn it off too
    rows = [measure(args.model, int(n), args.steps, device, dtype) for n in args.trials.split(",")]
    print(f"{'trials':>6} {'one at a time tok/s':>20} {'stacked tok/s':>14} {'ratio':>6} {'loss diff':>10}")
    for r in rows:
        a, b = r["one_at_a_time"], r["stacked"]
        print(f"{r['trials']:>6} {a.get('tokens_per_s', float('nan')):>20.0f} {b.get('tokens_per_s', float('nan')):>14.0f} "
              f"{(r['ratio'] or float('nan')):>6.2f} {r['first_loss_max_rel_diff']:>10.2e}  {a.get('error', '')}{b.get('error', '')}")  # fmt: skip
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = {"rows": rows, "machine": name, "torch": torch.__version__, "date": date.today().isoformat(),
           "model": args.model}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
