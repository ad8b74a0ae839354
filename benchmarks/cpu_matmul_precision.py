"""What `attack.matmul_precision=medium` does to a float32 matmul on this CPU: speed and error, side by side.

    python benchmarks/cpu_matmul_precision.py [--threads 2] [--repeats 50] [--authors-loop 40]

torch's "medium" float32 matmul precision lets oneDNN use bf16 arithmetic (`torch.backends.mkldnn.matmul.
fp32_precision = "bf16"`) where the CPU has bf16 instructions; with "highest" float32 matmuls go to MKL. For the
shapes of the paper's ViT program (K rows x 65 tokens x width 256, the attention products, the gradient's
transposed products) and one large square product, this prints the time of one product in each mode and the
largest error against float64, relative to the largest output. `--authors-loop N` also times N iterations of
the authors' loop (`dia.bench.baseline`, ViT/CIFAR-10 DIA p = 0.25, victim 0) in each mode, alternating, twice:
whether the loop as written gains the same. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

# (m, k, n): the ViT's token-wise linears at 24 rows (24 x 65 tokens), its attention products per head, the
# weight-gradient products (tokens summed), and a large square product as the peak reference
SHAPES = {
    "linear 1560x256 @ 256x256": (1560, 256, 256),
    "linear 1560x256 @ 256x768": (1560, 256, 768),
    "weight grad 256x1560 @ 1560x256": (256, 1560, 256),
    "attention 65x16 @ 16x65": (65, 16, 65),
    "square 2048": (2048, 2048, 2048),
}


def seconds_per_product(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument(
        "--authors-loop", type=int, default=0, metavar="N", help="also time N iterations of the authors' loop"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {args.threads} torch threads, torch {torch.__version__}, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        "| product | highest: ms | medium: ms | speed-up | rel. error highest | rel. error medium "
        "|\n|---|---|---|---|---|---|"
    )
    g = torch.Generator().manual_seed(0)
    for name, (m, k, n) in SHAPES.items():
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        exact = a.double() @ b.double()
        row = {}
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            err = ((a @ b).double() - exact).abs().max().item() / exact.abs().max().item()
            reps = max(3, args.repeats // (20 if m >= 2048 else 1))
            row[precision] = (1e3 * seconds_per_product(a, b, reps), err)
        torch.set_float32_matmul_precision("highest")
        (th, eh), (tm, em) = row["highest"], row["medium"]
        print(f"| {name} | {th:.3f} | {tm:.3f} | {th / tm:.2f}× | {eh:.1e} | {em:.1e} |")
    if args.authors_loop:
        authors_loop(args.authors_loop)


def authors_loop(iterations: int) -> None:
    """Victim-iterations per second of the authors' loop (ViT DIA, one victim) at each precision, alternating."""
    from dia.bench import authors_loop as loop
    from dia.bench import setup

    device = torch.device("cpu")
    model, problems, lower, upper = setup("vit", 1, device)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        loop(model, problems, attack="dia", iterations=n, lower=lower, upper=upper, device=device)
        return n / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {"highest": [], "medium": []}
    for _ in range(2):
        for precision in rates:
            torch.set_float32_matmul_precision(precision)
            run(3)  # warm-up
            rates[precision].append(run(iterations))
    torch.set_float32_matmul_precision("highest")
    print(
        f"authors' loop, ViT DIA: highest {', '.join(f'{r:.1f}' for r in rates['highest'])} it/s; "
        f"medium {', '.join(f'{r:.1f}' for r in rates['medium'])} it/s"
    )


if __name__ == "__main__":
    main()
