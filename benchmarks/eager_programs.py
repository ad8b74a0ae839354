"""The eager programs side by side: attack.eager = factored (the default), loop and vectorized, per victim-iteration.

    python benchmarks/eager_programs.py                         # MNIST MLP and CIFAR-10 CNN, K = 1 and 8 (~3 min)
    python benchmarks/eager_programs.py --data cifar10 --ks 8 --iterations 200 --repeats 5
    python benchmarks/eager_programs.py --device cuda --compiled --ks 1,8,64   # a GPU, beside the compiled program

The user models of benchmarks/peer_breaching.py (MLP 784-256-256-10, a small CNN), IG at p = 0.25, one torch
thread, K victims in one `dia.reconstruct` call (compile=False), the variants alternated A B C A B C per repeat in
one process (`--compiled`: also attack.compile=true, its compile untimed in the first call); reports the time per
victim-iteration (process time on a CPU, wall time on a GPU; median and minimum over the repeats: on a shared
machine the minimum is the least disturbed) and each variant's ratio to the loop. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_breaching import DATA, SETTINGS, build_model, make_problem

import dia


def problems(data: str, victims: int, folder: Path) -> tuple[torch.nn.Module, list[dict], torch.Tensor]:
    """The peer benchmark's problem (`make_problem`: its model, one client per victim): model, gradients, labels."""
    prob = torch.load(make_problem(data, 0.25, victims, 0, folder), weights_only=True)
    model = build_model(data, prob["p"])
    model.load_state_dict(prob["state_dict"])
    grads = [{n: g[j] for n, g in prob["gradients"].items()} for j in range(victims)]
    return model, grads, prob["labels"]


def seconds(
    data: str, model: torch.nn.Module, grads: list[dict], labels: torch.Tensor, eager: str, n: int, device: str = "cpu"
) -> float:
    """Process time of one `dia.reconstruct` call (on a GPU: wall time, after a synchronize)."""
    spec = DATA[data]
    clock = time.process_time if device == "cpu" else time.perf_counter
    started = clock()
    dia.reconstruct(
        model,
        grads,
        labels=labels.view(-1, 1),
        input_shape=spec["shape"],
        mean=spec["mean"],
        std=spec["std"],
        attack="ig",
        device=device,
        max_iterations=n,
        compile=eager == "compiled",
        eager="factored" if eager == "compiled" else eager,
        progress=False,
        **{("attack_lr" if k == "lr" else k): v for k, v in SETTINGS.items()},
    )
    if device != "cpu":
        torch.cuda.synchronize()
    return clock() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="mnist,cifar10")
    ap.add_argument("--ks", default="1,8")
    ap.add_argument("--eager", default="factored,loop,vectorized")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu (process time) or cuda (wall time)")
    ap.add_argument("--compiled", action="store_true", help="also the compiled program (attack.compile=true)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    variants = a.eager.split(",") + (["compiled"] if a.compiled else [])
    print(f"torch {torch.__version__}, {a.device}, 1 thread, {a.iterations} iterations, {a.repeats} alternated repeats")
    print("| data / model | K | eager | ms / victim-iteration: median (min) | vs loop (medians) |")
    print("|---|---|---|---|---|")
    for data in a.data.split(","):
        for k in map(int, a.ks.split(",")):
            with tempfile.TemporaryDirectory() as folder:
                model, grads, labels = problems(data, k, Path(folder))
            for v in variants:  # untimed: first-call costs
                seconds(data, model, grads, labels, v, 3, a.device)
            ms: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(a.repeats):
                for v in variants:
                    took = seconds(data, model, grads, labels, v, a.iterations, a.device)
                    ms[v].append(took * 1e3 / a.iterations / k)
            loop = statistics.median(ms["loop"]) if "loop" in ms else None
            for v in variants:
                med = statistics.median(ms[v])
                ratio = f"{loop / med:.2f}x" if loop else "—"
                name = f"{data} / {DATA[data]['model'].split()[0]}"
                print(f"| {name} | {k} | {v} | {med:.2f} ({min(ms[v]):.2f}) | {ratio} |")


if __name__ == "__main__":
    main()
