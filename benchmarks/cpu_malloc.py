"""Allocation churn of the compiled attack program on a CPU: minor page faults per iteration, with glibc's
default malloc settings and with settings that keep freed memory in the process, side by side.

    python benchmarks/cpu_malloc.py [--model mlp] [--k 4] [--iterations 300] [--repeats 3]

Each variant runs in its own process (malloc settings must be made before torch allocates anything),
alternating A, B, A, B, ...: the compiled DIA program (p = 0.25, K problems) is warmed up (compilation and
20 iterations), then `--iterations` are timed, with `resource.getrusage().ru_minflt` before and after.
Variants:

* ``default``: glibc's defaults (large blocks come from mmap and go back to the system when freed, with
  glibc's dynamic threshold);
* ``keep``: `mallopt(M_MMAP_MAX, 0)` (no mmap: every block from the heap) and `mallopt(M_TRIM_THRESHOLD, 1 GiB)`
  (the heap is not given back), set through ctypes at process start.

Results must be equal: the checksum of the final trainables is printed per run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_memory() -> bool:
    """Ask glibc to keep freed memory (no mmap for large blocks, no trimming); False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def child(variant: str, model: str, k: int, iterations: int) -> dict:
    if variant == "keep" and not keep_memory():
        raise SystemExit("mallopt failed")
    import resource
    import time

    import torch

    from dia.bench import config, engine_module, engine_steps, setup

    net, problems, lower, upper = setup(model, k, torch.device("cpu"))
    cfg = config(model, "dia", "attack.compile=true", f"attack.max_iterations={iterations + 100}")
    module = engine_module("dia", net, problems.subset(list(range(k))), cfg, lower, upper, torch.device("cpu"))
    engine_steps(module, 20)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    engine_steps(module, iterations)
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    flat = module.state.flat.detach()
    return {"variant": variant, "it_per_s": iterations / seconds, "minflt_per_it": faults / iterations,
            "checksum": float(flat.double().sum()), "load": os.getloadavg()[0]}


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--model", default="mlp")
    a.add_argument("--k", type=int, default=4)
    a.add_argument("--iterations", type=int, default=300)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = a.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.k, args.iterations)))
        return
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    for _ in range(args.repeats):
        for variant in runs:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--model", args.model, "--k", str(args.k),
                                  "--iterations", str(args.iterations)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[variant].append(r)
            print(json.dumps(r), flush=True)
    for variant, rs in runs.items():
        print(f"{variant}: {statistics.median(r['it_per_s'] for r in rs):.1f} it/s (median of {len(rs)}), "
              f"{statistics.median(r['minflt_per_it'] for r in rs):.1f} minor faults per iteration, "
              f"checksums {sorted({r['checksum'] for r in rs})}")


if __name__ == "__main__":
    main()
