"""Threads or processes on a CPU? The same compiled attack program as one process using every core, or as G
processes with one share of the cores and of the rows each, side by side in one run.

    python benchmarks/cpu_processes.py --model vit --attack dia --rows 16 --processes 2 --iterations 30 --rounds 2 \
        [--precision medium]

A: one process, all T cores as torch threads, K rows. B: G processes started together, T/G threads and K/G rows
each (what `dia.grid --parallel G` runs on a CPU). Every process compiles and warms up first, then all start the
clock on one signal; the rate is all victim-iterations over the slowest process's wall time. The rounds
alternate A and B so that a change in the machine's load shows as spread. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

READY = "#ready"


def worker(args: argparse.Namespace) -> None:
    from dia.memory import keep_freed_memory

    keep_freed_memory()
    import torch

    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.precision)  # as attack.matmul_precision sets it for the attacker's program
    from dia.bench import config, engine_module, engine_steps, setup

    device = torch.device("cpu")
    model, problems, lower, upper = setup(args.model, args.rows, device)
    cfg = config(
        args.model, args.attack, f"attack.max_iterations={args.warmup + args.iterations + 1}", "attack.compile=true"
    )
    module = engine_module(args.attack, model, problems, cfg, lower, upper, device)
    engine_steps(module, args.warmup)
    print(READY, flush=True)
    sys.stdin.readline()  # the common start signal
    t0 = time.perf_counter()
    engine_steps(module, args.iterations)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "victim_iterations": args.rows * args.iterations}), flush=True)


def launch(args: argparse.Namespace, processes: int) -> float:
    """Victim-iterations per second of `processes` workers sharing the cores and rows."""
    threads, rows = max(1, args.cores // processes), args.rows // processes
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--threads",
        str(threads),
        "--rows",
        str(rows),
        "--model",
        args.model,
        "--attack",
        args.attack,
        "--precision",
        args.precision,
        "--iterations",
        str(args.iterations),
        "--warmup",
        str(args.warmup),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(processes)
    ]
    for p in procs:  # wait until every worker has compiled and warmed up
        for line in p.stdout:
            if line.strip() == READY:
                break
        else:
            raise SystemExit(f"a worker exited before it was ready (exit {p.wait()})")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.read().strip().splitlines()[-1]) for p in procs]
    for p in procs:
        p.wait()
    return sum(r["victim_iterations"] for r in results) / max(r["seconds"] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit", choices=["vit", "mlp"])
    ap.add_argument("--attack", default="dia")
    ap.add_argument("--rows", type=int, default=16, help="K: rows of the single process (split between the G)")
    ap.add_argument("--processes", type=int, default=2, help="G")
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--precision",
        default="highest",
        choices=["highest", "medium"],
        help="float32 matmul precision of every process (attack.matmul_precision)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.rows % args.processes:
        raise SystemExit(f"error: --rows {args.rows} must divide into --processes {args.processes}")
    print(
        f"# {args.model}/{args.attack}, {args.cores} cores, K = {args.rows}, {args.iterations} timed iterations, "
        f"matmul precision {args.precision}; "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )
    rates: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name, g in (("A", 1), ("B", args.processes)):
            rates[name].append(launch(args, g))
            print(f"round {r + 1} {name}: {rates[name][-1]:.1f} victim-it/s", flush=True)
    a, b = statistics.median(rates["A"]), statistics.median(rates["B"])
    print(f"| layout | victim-it/s (median of {args.rounds}) |\n|---|---|")
    print(f"| 1 process × {args.cores} threads × {args.rows} rows | {a:.1f} |")
    print(
        f"| {args.processes} processes × {max(1, args.cores // args.processes)} thread(s) × "
        f"{args.rows // args.processes} rows "
        f"| {b:.1f} ({b / a:.2f}×) |"
    )
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
