"""How close does one attack iteration come to the CPU's peak? FLOPs per iteration against a matmul benchmark.

    python benchmarks/cpu_flops.py [--models vit,mlp] [--k 4] [--iterations 20] [--threads N]

Per model (DIA, p = 0.25, K problems): the floating-point operations of one iteration of the attack program
(the double backward of K problems' gradient distance: `torch.utils.flop_counter.FlopCounterMode` over one
eager call; it counts matrix products and attention, not elementwise work), the measured rate of the
compiled program (steady state), hence the FLOP/s it reaches; beside it the peak of this machine measured as
the best of float32 `torch.mm` of square matrices (n = 256..2048) with the same threads.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dia.bench import config, device_name, engine_module, engine_steps, setup


def peak_gflops(seconds: float = 1.0) -> tuple[float, int]:
    """The best float32 matmul rate (GFLOP/s) over square sizes, and the size that reached it."""
    best = (0.0, 0)
    for n in (256, 512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            reps += 1
        rate = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
        best = max(best, (rate, n))
    return best


def program_flops(model: str, k: int) -> int:
    """FLOPs of one iteration's gradient program for K problems (eager; matmuls, convolutions, attention)."""
    net, problems, lower, upper = setup(model, k, torch.device("cpu"))
    module = engine_module(
        "dia", net, problems.subset(list(range(k))), config(model, "dia"), lower, upper, torch.device("cpu")
    )
    with FlopCounterMode(display=False) as counter:
        module.gradient(module.state.flat.detach())
    return counter.get_total_flops()


def compiled_rate(model: str, k: int, iterations: int) -> float:
    """Iterations per second of the compiled program (K problems), after compilation and 3 warm-up steps."""
    net, problems, lower, upper = setup(model, k, torch.device("cpu"))
    cfg = config(model, "dia", "attack.compile=true", f"attack.max_iterations={iterations + 10}")
    module = engine_module("dia", net, problems.subset(list(range(k))), cfg, lower, upper, torch.device("cpu"))
    engine_steps(module, 3)
    t0 = time.perf_counter()
    engine_steps(module, iterations)
    return iterations / (time.perf_counter() - t0)


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--models", default="vit,mlp")
    a.add_argument("--k", type=int, default=4)
    a.add_argument("--iterations", type=int, default=20)
    a.add_argument("--threads", type=int, default=None)
    args = a.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {device_name(torch.device('cpu'))}, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    peak, n = peak_gflops()
    print(f"peak float32 matmul: {peak:.1f} GFLOP/s (n = {n})")
    for model in args.models.split(","):
        flops = program_flops(model, args.k)
        rate = compiled_rate(model, args.k, args.iterations)
        achieved = flops * rate / 1e9
        print(
            f"{model}: K = {args.k}: {flops / 1e9:.3f} GFLOP per iteration ({flops / args.k / 1e6:.1f} MFLOP per "
            "victim), "
            f"compiled {rate:.2f} it/s = {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f} % of peak "
            f"(load average now {os.getloadavg()[0]:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
