"""Measure what the persistent compile cache saves: the first `torch.compile` call of a fresh process with an
empty cache, then of a second process reusing the cache (run.compile_cache), for one configuration.

    python benchmarks/compile_cache.py model=vit data=cifar10 num_victims=16

Each measurement is a separate `python -m dia.train` process (attack.max_iterations=20) whose notice
"torch.compile: first call X s" is read back; the device is whatever run.device picks.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def first_call_seconds(args: list[str], cache: Path, out: Path) -> tuple[float, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia.train",
            *args,
            "attack.compile=true",
            "attack.max_iterations=20",
            "logger.wandb.mode=disabled",
            "metrics.lpips=off",
            "run.progress=false",
            "run.checkpoint_every=-1",
            f"run.compile_cache={cache}",
            f"run.output_dir={out}",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    found = re.search(r"torch.compile: first call ([0-9.]+) s", proc.stderr)
    if proc.returncode != 0 or not found:
        sys.exit(f"dia.train failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(found.group(1)), wall


def main() -> None:
    args = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cold = first_call_seconds(args, cache, Path(tmp) / "a")
        warm = first_call_seconds(args, cache, Path(tmp) / "b")
    print("| configuration | first compile (empty cache) | later process (cache) | ratio |")
    print("|---|---|---|---|")
    print(
        f"| {' '.join(args) or 'defaults'} | {cold[0]:.1f} s (process {cold[1]:.0f} s) | {warm[0]:.1f} s "
        f"(process {warm[1]:.0f} s) | {cold[0] / warm[0]:.1f}x |"
    )


if __name__ == "__main__":
    main()
