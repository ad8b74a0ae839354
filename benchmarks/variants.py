"""Is a faster engine variant as good? The same attack run with each compiled variant (dia.bench.VARIANTS:
torch.compile mode, matmul precision), side by side in one process: wall time and reconstruction quality.

    python benchmarks/variants.py default reduce-overhead tf32 -- data=cifar10 model=vit model.dropout=0.25 \\
        num_victims=16 attack.max_iterations=3000 run.seed=43

A variant is worth keeping only if its SSIM per victim matches the default's (the issue's rule); the table
gives the mean and the largest per-victim difference. A benchmark, not a test.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from dia.bench import VARIANTS, variant_settings
from dia.config import compose
from dia.console import quiet_libraries
from dia.run import execute, record


def main() -> None:
    args = sys.argv[1:]
    cut = args.index("--") if "--" in args else len(args)
    variants, overrides = args[:cut] or ["default"], args[cut + 1 :]
    for v in variants:
        if any(name not in VARIANTS for name in v.split("+")):
            raise SystemExit(f"error: variant '{v}': choose from {', '.join(VARIANTS)} (join with '+')")
    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            settings = [f"attack.{k}={val}" for k, val in variant_settings(v).items()]
            cfg = compose(
                [
                    *overrides,
                    *settings,
                    "attack.compile=true",
                    "run.progress=false",
                    "logger.wandb.mode=disabled",
                    "metrics.lpips=off",
                    "run.checkpoint_every=-1",
                    f"run.output_dir={tmp}",
                    f"run.name={v.replace('+', '_')}",
                ]
            )
            started = time.perf_counter()
            outcome = execute([cfg], progress=False)[0]
            wall = time.perf_counter() - started
            if outcome.code != 0:
                raise SystemExit(f"{v}: exit {outcome.code}: {outcome.message}")
            victims = record.read_metrics(Path(tmp) / cfg.run.name)["victims"]
            rows.append((v, wall, [x["ssim"] for x in victims]))
    base = rows[0][2]
    print(f"overrides: {' '.join(overrides) or 'none'}")
    print("| variant | wall (s) | vs first | mean SSIM | max per-victim |ΔSSIM| vs first |\n|---|---|---|---|---|")
    for v, wall, ssim in rows:
        worst = max(abs(a - b) for a, b in zip(ssim, base))
        print(f"| {v} | {wall:.1f} | {rows[0][1] / wall:.2f}× | {statistics.mean(ssim):.3f} | {worst:.3f} |")


if __name__ == "__main__":
    main()
