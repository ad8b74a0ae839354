"""Does refilling pay? One block of runs (IG/WIIG/DIA x dropout rates) attacked three ways, side by side in
one process on the same device: all problems in one program (what attack.parallel=auto gives on a GPU when
they fit), programs of `--rows` rows one after the other (attack.refill=false), and programs of `--rows`
rows whose stopped runs' rows are taken by waiting runs (attack.refill=true).

    python benchmarks/refill.py --rows 24 --victims 4 model.width=256 attack.max_iterations=1000 \
        attack.lr_patience=40 attack.early_stop_patience=200 attack.compile=false

Prints the problems' stopping statistics (what refill can exploit: problems that stop before the budget),
per mode the wall time and the row-iterations computed (program iterations x rows: stopped rows are
computed too), and how far the modes' results are apart (rows of other programs round differently).
Extra arguments are config overrides for every run (MNIST/MLP unless overridden). A benchmark, not a
test: nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from dia.config import compose
from dia.console import quiet_libraries
from dia.run import execute, record

RATES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
ATTACKS = ("ig", "wiig", "dia")


def configs(out: Path, rows: int, victims: int, refill: bool, overrides: list[str]) -> list:
    return [
        compose(
            [
                "data=mnist",
                "model=mlp",
                f"num_victims={victims}",
                *overrides,
                f"attack={a}",
                f"model.dropout={p}",
                f"attack.parallel={rows}",
                f"attack.refill={str(refill).lower()}",
                "run.progress=false",
                "logger.wandb.mode=disabled",
                "metrics.lpips=off",
                "run.checkpoint_every=-1",
                f"run.output_dir={out}",
                f"run.name={a}-{p:g}",
            ]
        )
        for a in ATTACKS
        for p in RATES
    ]


def run(out: Path, rows: int | str, victims: int, refill: bool, overrides: list[str]) -> tuple[float, int, int, dict]:
    """Wall time, programs, program iterations x rows (the work done), and each run's per-victim results."""
    notes: list[str] = []
    started = time.perf_counter()
    outcomes = execute(configs(out, rows, victims, refill, overrides), progress=False, note=notes.append)
    wall = time.perf_counter() - started
    if any(o.code != 0 for o in outcomes):
        raise SystemExit(f"a run failed: {[(o.name, o.message) for o in outcomes if o.code != 0]}")
    done = [re.match(r"program done: (\d+) iterations of (\d+) rows", n) for n in notes]
    work = sum(int(m.group(1)) * int(m.group(2)) for m in done if m)
    victims_of = {o.name: record.read_metrics(out / o.name)["victims"] for o in outcomes}
    return wall, sum(m is not None for m in done), work, victims_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24, help="rows of a program (attack.parallel)")
    parser.add_argument("--victims", type=int, default=4, help="victims per run")
    args, overrides = parser.parse_known_args()
    quiet_libraries()
    modes = {
        f"all {18 * args.victims} rows at once": (18 * args.victims, False),
        f"{args.rows} rows, no refill": (args.rows, False),
        f"{args.rows} rows, refill": (args.rows, True),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: run(Path(tmp) / str(i), rows, args.victims, refill, overrides)
            for i, (name, (rows, refill)) in enumerate(modes.items())
        }
    first = next(iter(results.values()))[3]
    problems = [v for vs in first.values() for v in vs]
    budget = compose(overrides).attack.max_iterations
    pairs = [(a, b) for r in list(results.values())[1:] for name in first for a, b in zip(r[3][name], first[name])]
    differ = sum(a["iterations"] != b["iterations"] or a["status"] != b["status"] for a, b in pairs)
    delta = [abs(a["ssim"] - b["ssim"]) for a, b in pairs]
    its = [v["iterations"] for v in problems]
    print(
        f"{len(problems)} problems (18 runs x {args.victims} victims); budget {budget} iterations; "
        f"overrides: {' '.join(overrides) or 'none'}"
    )
    print(
        f"stopping: {dict(Counter(v['status'] for v in problems))}; iterations per problem: mean "
        f"{statistics.mean(its):.0f}, median {statistics.median(its):.0f}; "
        f"{sum(its) / (len(its) * budget):.0%} of the budget used (problem-iterations needed: {sum(its)})"
    )
    print("| mode | programs | row-iterations computed | wall (s) | ms per row-iteration |\n|---|---|---|---|---|")
    for name, (wall, programs, work, _) in results.items():
        print(f"| {name} | {programs} | {work} | {wall:.1f} | {1000 * wall / max(work, 1):.3f} |")
    # Rows of different programs round differently (other batch sizes, other kernels); over long attacks the
    # difference can grow (a sign flips in the signed step), so compare the modes' results, do not expect bits.
    print(
        f"against the first mode, per problem: mean |ΔSSIM| {statistics.mean(delta):.4f}, max {max(delta):.4f}; "
        f"{differ} of {len(pairs)} problem results stopped at another iteration or status"
    )


if __name__ == "__main__":
    main()
