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
  (the heap is not given back), set through ctypes at process start;
* ``threshold``: `mallopt(M_MMAP_THRESHOLD, 32 MiB)` (glibc's largest: blocks up to 32 MiB from the heap,
  larger ones still mmapped, so a huge tensor cannot fail for want of heap) and the same trim threshold:
  what `dia.memory.keep_freed_memory` sets.

On a shared machine the wall-clock rate is noisy; the CPU time per iteration (user and system, from
getrusage) is the steadier measure. Results must be equal: the checksum of the final trainables is printed per run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def keep_memory(variant: str) -> bool:
    """Ask glibc to keep freed memory (see the variants above); False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    first = libc.mallopt(M_MMAP_MAX, 0) if variant == "keep" else libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(first) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def child(variant: str, model: str, k: int, iterations: int) -> dict:
    if variant != "default" and not keep_memory(variant):
        raise SystemExit("mallopt failed")
    import resource
    import time

    import torch

    from dia.bench import config, engine_module, engine_steps, setup

    net, problems, lower, upper = setup(model, k, torch.device("cpu"))
    cfg = config(model, "dia", "attack.compile=true", f"attack.max_iterations={iterations + 100}")
    module = engine_module("dia", net, problems.subset(list(range(k))), cfg, lower, upper, torch.device("cpu"))
    engine_steps(module, 20)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    engine_steps(module, iterations)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    faults = r1.ru_minflt - r0.ru_minflt
    user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    flat = module.state.flat.detach()
    return {
        "variant": variant,
        "it_per_s": iterations / seconds,
        "minflt_per_it": faults / iterations,
        "user_ms_per_it": 1000 * user / iterations,
        "sys_ms_per_it": 1000 * system / iterations,
        "checksum": float(flat.double().sum()),
        "load": os.getloadavg()[0],
    }


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--model", default="mlp")
    a.add_argument("--k", type=int, default=4)
    a.add_argument("--iterations", type=int, default=300)
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--variants", default="default,keep,threshold")
    a.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = a.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.k, args.iterations)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    for _ in range(args.repeats):
        for variant in runs:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    "--model",
                    args.model,
                    "--k",
                    str(args.k),
                    "--iterations",
                    str(args.iterations),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[variant].append(r)
            print(json.dumps(r), flush=True)
    for variant, rs in runs.items():
        print(
            f"{variant}: {statistics.median(r['it_per_s'] for r in rs):.1f} it/s (median of {len(rs)}), "
            f"{statistics.median(r['minflt_per_it'] for r in rs):.1f} minor faults per iteration, "
            f"CPU {statistics.median(r['user_ms_per_it'] for r in rs):.2f} ms user + "
            f"{statistics.median(r['sys_ms_per_it'] for r in rs):.2f} ms system per iteration, "
            f"checksums {sorted({r['checksum'] for r in rs})}"
        )


if __name__ == "__main__":
    main()
