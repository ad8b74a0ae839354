"""Where does a compiled attack iteration spend its CPU time? torch.profiler over the steady state, grouped.

    python benchmarks/cpu_profile.py [--model vit] [--attack dia] [--k 8] [--iterations 10] [--precision highest|medium]

The compiled gradient program calls matrix products as external kernels (aten mm/bmm/addmm/baddbmm, counted by
the FLOP counter of benchmarks/cpu_flops.py) and runs everything else as inductor's generated C++ kernels
(elementwise work, reductions, softmax, layer norms). This prints the share of self CPU time of each group over
`--iterations` iterations after compilation and warm-up. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from dia.bench import config, engine_module, engine_steps, setup
from dia.memory import keep_freed_memory

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def group(name: str) -> str:
    if name in MATMULS or "mkldnn" in name or "onednn" in name:
        return "matrix products (MKL / oneDNN)"
    if (
        "CompiledFxGraph" in name or name.startswith("cpp_fused") or "inductor" in name
    ):  # the call's self time = its C++
        return "inductor's generated kernels"
    if name.startswith("aten::"):
        return "eager aten ops outside the graph (the engine's optimizer step and box)"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit", choices=["vit", "mlp"])
    ap.add_argument("--attack", default="dia")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--precision", default="highest", choices=["highest", "medium"])
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_float32_matmul_precision(args.precision)
    device = torch.device("cpu")
    model, problems, lower, upper = setup(args.model, args.k, device)
    cfg = config(args.model, args.attack, f"attack.max_iterations={args.iterations + 10}", "attack.compile=true")
    module = engine_module(args.attack, model, problems, cfg, lower, upper, device)
    engine_steps(module, 3)  # compile and warm up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine_steps(module, args.iterations)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group(e.key)] += e.self_cpu_time_total
    print(
        f"# {args.model}/{args.attack}, K = {args.k}, {args.iterations} iterations, {torch.get_num_threads()} threads, "
        f"matmul precision {args.precision}: {total / 1e3 / args.iterations:.1f} ms self CPU time per iteration"
    )
    print("| group | share of self CPU time |\n|---|---|")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {100 * t / total:.1f} % |")
    print(f"\n| op (top {args.top}) | share | calls per iteration |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"| {e.key[:70]} | {100 * e.self_cpu_time_total / total:.1f} % | {e.count / args.iterations:.0f} |")


if __name__ == "__main__":
    main()
