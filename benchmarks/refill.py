"""Does refilling pay? One block of runs (IG/WIIG/DIA x dropout rates) attacked in programs of `--rows` rows,
once with `attack.refill=true` (waiting runs take the rows of stopped ones) and once without (waiting runs
wait for the next program), side by side in one process on the same device.

    python benchmarks/refill.py --rows 24 --victims 4 model=mlp model.width=256 attack.max_iterations=2000

Prints the wall time of each mode, the problems' stopping statistics (what refill can exploit: problems
that stop before the budget), and checks that both modes give every problem the same result. Extra
arguments are config overrides for every run. A benchmark, not a test: nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from dia.config import compose
from dia.console import quiet_libraries
from dia.run import execute

RATES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
ATTACKS = ("ig", "wiig", "dia")


def configs(out: Path, rows: int, victims: int, refill: bool, overrides: list[str]) -> list:
    return [compose(["data=mnist", "model=mlp", f"num_victims={victims}", *overrides, f"attack={a}",
                     f"model.dropout={p}", f"attack.parallel={rows}", f"attack.refill={str(refill).lower()}",
                     "run.progress=false", "logger.wandb.mode=disabled", "metrics.lpips=off",
                     "run.checkpoint_every=-1", f"run.output_dir={out}", f"run.name={a}-{p:g}"])
            for a in ATTACKS for p in RATES]


def run(out: Path, rows: int, victims: int, refill: bool, overrides: list[str]) -> tuple[float, int, dict]:
    notes: list[str] = []
    started = time.perf_counter()
    outcomes = execute(configs(out, rows, victims, refill, overrides), progress=False, note=notes.append)
    wall = time.perf_counter() - started
    if any(o.code != 0 for o in outcomes):
        raise SystemExit(f"a run failed: {[(o.name, o.message) for o in outcomes if o.code != 0]}")
    victims_of = {o.name: json.loads((out / o.name / "metrics.json").read_text())["victims"] for o in outcomes}
    return wall, sum(n.startswith("program") for n in notes), victims_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24, help="rows of a program (attack.parallel)")
    parser.add_argument("--victims", type=int, default=4, help="victims per run")
    args, overrides = parser.parse_known_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        on = run(Path(tmp) / "on", args.rows, args.victims, True, overrides)
        off = run(Path(tmp) / "off", args.rows, args.victims, False, overrides)
    problems = [v for vs in off[2].values() for v in vs]
    budget = compose(overrides).attack.max_iterations
    same = all(a["iterations"] == b["iterations"] and a["status"] == b["status"] and abs(a["ssim"] - b["ssim"]) < 1e-3
               for name in on[2] for a, b in zip(on[2][name], off[2][name]))
    its = [v["iterations"] for v in problems]
    print(f"{len(problems)} problems (18 runs x {args.victims} victims) in programs of {args.rows} rows; "
          f"budget {budget} iterations; overrides: {' '.join(overrides) or 'none'}")
    print(f"stopping: {dict(Counter(v['status'] for v in problems))}; iterations per problem: mean "
          f"{statistics.mean(its):.0f}, median {statistics.median(its):.0f}; "
          f"{sum(its) / (len(its) * budget):.0%} of the budget used")
    print("| mode | programs | wall (s) |\n|---|---|---|")
    print(f"| refill | {on[1]} | {on[0]:.1f} |\n| no refill | {off[1]} | {off[0]:.1f} |")
    print(f"refill / no refill wall time: {on[0] / off[0]:.2f}; results identical per problem: {same}")


if __name__ == "__main__":
    main()
