"""What unrolling T local steps costs the attacker: time and memory per attack iteration against T, side by side in
one run (each T in its own child process, so its peak memory is its own).

    python benchmarks/fedavg.py --steps 1,2,5,10 --problems 8 -- model=mlp data=mnist model.dropout=0.5
    python benchmarks/fedavg.py --plot results/fedavg-cpu/report/table.csv docs/figures/fedavg-cpu-ssim.png
    python benchmarks/fedavg.py --mismatch --steps 1,2,5,10,50 --problems 16 -- model.dropout=0.5

Per T: the DIA program (IG/WIIG are the same program with other masks) for `--problems` problems, eager
(`attack.compile=false`: compile time would dominate a short benchmark), `--iterations` timed after 3 warm-up
iterations; memory: the peak of one iteration above what was allocated before it (CUDA: torch's peak
allocation; CPU: the process's peak resident size, so only differences between rows are meaningful).
`--mismatch`: IG's mismatch itself, no attack: the cosine distance between the client's update and the attacker's
model of it at the true images, without masks (IG's model) and with the client's masks (WIIG's: 0), mean ± std
over the problems, per T. `--plot TABLE PNG` draws SSIM against T, one panel per dropout rate and one line per
attack (mean ± std over
victims), from the table.csv `python -m dia.report` writes for a FedAvg grid (its local_steps column).
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(steps: int, problems: int, iterations: int, overrides: list[str]) -> dict[str, float]:
    """Time (s) and peak memory (MiB) of one attack iteration at `steps` local steps, in this process."""
    import torch

    from dia.api import simulate
    from dia.attacks import ATTACKS
    from dia.console import quiet_libraries

    quiet_libraries()
    sim = simulate(
        *overrides, f"num_victims={problems}", f"client.local_steps={steps}", "attack=dia", "attack.compile=false"
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cls = ATTACKS.get("dia")
    module = cls(sim.model, cls.view(sim.problems), sim.cfg.attack).to(device)
    module.rows.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    module.on_fit_start()
    module.step()  # the first iteration sets the peak
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**10  # KiB on Linux
    for _ in range(2):
        module.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        module.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {
        "steps": steps,
        "s_per_iteration": (time.perf_counter() - started) / iterations,
        "peak_mib": peak,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    }


def mismatch(steps: list[int], problems: int, overrides: list[str]) -> None:
    """IG's mismatch against T: cosine distance of the dropout-free model of the update at the true images."""
    import statistics

    from dia.api import simulate
    from dia.gradients import problem_gradients
    from dia.losses import cosine_distance

    print(f"overrides: {' '.join(overrides) or 'none'}; {problems} clients of one image each")
    print("| T | IG's model: cosine distance at the true images | with the client's masks |\n|---|---|---|")
    for t in steps:
        sim = simulate(*overrides, f"num_victims={problems}", f"client.local_steps={t}")
        p = sim.problems
        x = ((sim.victims.images - sim.mean) / sim.std).view(p.num_problems, p.input_shape[0], *p.input_shape[1:])
        params = {n: w.detach() for n, w in sim.model.named_parameters()}
        masks = {n: m / (1 - p.rates[n]) for n, m in p.true_masks.items()}
        blind = cosine_distance(
            problem_gradients(sim.model, params, x, p.labels, None, "off", p.local), p.targets
        ).tolist()
        exact = cosine_distance(
            problem_gradients(sim.model, params, x, p.labels, masks, "apply", p.local), p.targets
        ).tolist()
        print(
            f"| {t} | {statistics.mean(blind):.3f} ± {statistics.stdev(blind):.3f} | {max(abs(v) for v in exact):.1e} |"
        )


def plot(table: str, png: str, metric: str = "ssim") -> None:
    """SSIM (mean ± std over victims) against T per attack, one panel per dropout rate, from a report's table.csv."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(table) as f:
        rows = list(csv.DictReader(f))
    rates = sorted({float(r["dropout"]) for r in rows})
    fig, axes = plt.subplots(1, len(rates), figsize=(3.4 * len(rates), 3.0), sharey=True, squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for attack in ("ig", "wiig", "dia"):
            pts = sorted(
                (int(r["local_steps"]), float(r[f"{metric}_mean"]), float(r[f"{metric}_std"]))
                for r in rows
                if float(r["dropout"]) == rate and r["attack"] == attack and r[f"{metric}_mean"]
            )
            if pts:
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts],
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=attack.upper(),
                )
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10], ["1", "2", "5", "10"])
        ax.set_title(f"p = {rate:g}")
        ax.set_xlabel("local steps T")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric.upper())
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    args = sys.argv[1:]
    cut = args.index("--") if "--" in args else len(args)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="1,2,5,10", help="the T values, comma-separated")
    p.add_argument("--problems", type=int, default=8, help="problems (victims) in the program")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per T")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: measure this T, print JSON
    p.add_argument("--mismatch", action="store_true", help="IG's model's cosine distance at the true images, per T")
    p.add_argument(
        "--plot", nargs=2, metavar=("TABLE_CSV", "PNG"), help="draw SSIM against T from a report's table.csv"
    )
    a = p.parse_args(args[:cut])
    overrides = args[cut + 1 :]
    if a.plot:
        plot(*a.plot)
        return
    if a.mismatch:
        mismatch([int(t) for t in a.steps.split(",")], a.problems, overrides)
        return
    if a.one is not None:
        print(json.dumps(one(a.one, a.problems, a.iterations, overrides)))
        return
    rows = []
    for steps in (int(t) for t in a.steps.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(steps),
                "--problems",
                str(a.problems),
                "--iterations",
                str(a.iterations),
                "--",
                *overrides,
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(
                f"T={steps}: exit {out.returncode}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}"
            )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"device: {rows[0]['device']}; DIA, {a.problems} problems, eager; overrides: {' '.join(overrides) or 'none'}")
    print("| T | s / iteration | vs T=1 | peak MiB (one iteration) | vs T=1 |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['steps']} | {r['s_per_iteration']:.4f} | {r['s_per_iteration'] / rows[0]['s_per_iteration']:.2f}× "
            f"| {r['peak_mib']:.1f} | {r['peak_mib'] / max(rows[0]['peak_mib'], 1e-9):.2f}× |"
        )


if __name__ == "__main__":
    main()
