"""How fast GaLore's projection refreshes can go on one GPU with the library's own SVD call: SmolLM2-135M's
210 weight shapes (q, k, v, o, gate, up, down of 30 layers), ``torch.linalg.svd(g, full_matrices=False)``
as GaLore's projector calls it, run by T host threads (each on a CUDA stream of its own, as
trainers/refresh_pool.py runs them) in P processes at once, each process refreshing N trials' weights.

    python benchmarks/svd_refresh_floor.py --out benchmarks/results/svd_refresh_floor_h100.json

If more threads or more processes (each with its own CUDA context) made a batch of SVDs faster, the
host or the CUDA context would be what limits a refresh; if neither does, the GPU's SVD work is.
Prints one row per setting: SVDs, wall seconds, milliseconds per SVD. CUDA only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import time

SHAPES = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]
LAYERS = 30
SETTINGS = [(1, 8, 1), (1, 16, 4), (1, 32, 4), (2, 8, 2), (4, 8, 1), (4, 4, 1)]  # (processes, threads, trials)


def work(threads: int, trials: int, start, done, ready) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    dev = torch.device("cuda")
    torch.manual_seed(os.getpid())
    mats = [torch.randn(s, device=dev) * 0.01 for _ in range(LAYERS * trials) for s in SHAPES]
    local = threading.local()

    def one(m):
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            out = torch.linalg.svd(m, full_matrices=False)
        s.synchronize()
        return out

    pool = ThreadPoolExecutor(threads)
    list(pool.map(one, mats[:64]))  # cuSOLVER handles, workspaces, first calls
    torch.cuda.synchronize()
    ready.put(1)
    start.wait()
    t = time.perf_counter()
    list(pool.map(one, mats))
    torch.cuda.synchronize()
    done.put(time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    mp.set_start_method("spawn")
    rows = []
    for procs, threads, trials in SETTINGS:
        start, done, ready = mp.Event(), mp.Queue(), mp.Queue()
        ps = [mp.Process(target=work, args=(threads, trials, start, done, ready)) for _ in range(procs)]
        for p in ps:
            p.start()
        for _ in ps:
            ready.get()
        t = time.perf_counter()
        start.set()
        per = [done.get() for _ in ps]
        wall = time.perf_counter() - t
        for p in ps:
            p.join()
        n = procs * trials * LAYERS * len(SHAPES)
        rows.append({"processes": procs, "threads": threads, "trials_per_process": trials, "svds": n,
                     "wall_s": round(wall, 3), "per_process_s": [round(x, 3) for x in per],
                     "ms_per_svd": round(wall / n * 1e3, 2)})  # fmt: skip
        r = rows[-1]
        print(f"{procs:>2} proc x {threads:>2} threads, {trials} trial(s) each: {n:>4} SVDs in {wall:6.2f} s, "
              f"{r['ms_per_svd']:.2f} ms each", flush=True)  # fmt: skip
    out = {"rows": rows, "machine": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
           "shapes": [list(s) for s in SHAPES], "layers": LAYERS,
           "command": "python benchmarks/svd_refresh_floor.py --out OUT.json"}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
