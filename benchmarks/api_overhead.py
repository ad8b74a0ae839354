"""The API adds nothing to an attack: the same problems through `dia.reconstruct` and through dia.train's run
path (`dia.run.execute`, what `python -m dia.train` calls), alternately in one process, timed end to end.

    python benchmarks/api_overhead.py [--repeats 3] [key=value ...]      # default: MNIST/MLP p=0.25 DIA, 4 victims

The reconstructions are identical (same seeds, same program); the times are the medians of the repeats.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

import dia
from dia.config import compose
from dia.console import quiet_libraries
from dia.run import execute


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("overrides", nargs="*", default=[])
    args = a.parse_args()
    quiet_libraries()
    base = [
        "attack=dia",
        "model.dropout=0.25",
        "num_victims=4",
        "attack.max_iterations=500",
        "attack.compile=false",
        "logger.wandb.mode=disabled",
        "metrics.lpips=off",
        "metrics.curves_ssim=false",
        "run.progress=false",
        "run.save_tensors=false",
        *args.overrides,
    ]
    sim = dia.simulate(*base)
    cfg = sim.cfg
    grads = [{n: t[k] for n, t in sim.problems.targets.items()} for k in range(sim.problems.num_problems)]
    # labels: given below; the attack's lr is attack_lr (lr is the client's)
    settings = {("attack_lr" if k == "lr" else k): v for k, v in cfg.attack.items() if k not in ("name", "labels")}
    times: dict[str, list[float]] = {"dia.reconstruct": [], "dia.train path": []}
    for i in range(args.repeats):
        t0 = time.perf_counter()
        r = dia.reconstruct(
            sim.model,
            grads,
            labels=sim.problems.labels,
            input_shape=tuple(sim.victims.images.shape[1:]),
            mean=cfg.data.mean,
            std=cfg.data.std,
            attack=cfg.attack.name,
            seed=cfg.run.seed,
            device="cpu",
            **settings,
        )
        times["dia.reconstruct"].append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            outcome = execute([compose(base + [f"run.output_dir={out}", f"run.name=api{i}"])], progress=False)[0]
            times["dia.train path"].append(time.perf_counter() - t0)
            same = [v["loss"] for v in outcome.output.metrics["victims"]] == [float(x) for x in r.loss]
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{cfg.attack.name} on {cfg.model.name}/{cfg.data.name}, {sim.problems.num_problems} victims, "
        f"{cfg.attack.max_iterations} iterations, compile={cfg.attack.compile}; identical losses: {same}"
    )
    for name, ts in times.items():
        print(f"  {name:<16} median {statistics.median(ts):7.2f} s  (runs: {', '.join(f'{t:.2f}' for t in ts)})")
    ratio = statistics.median(times["dia.reconstruct"]) / statistics.median(times["dia.train path"])
    print(f"  ratio reconstruct / train path: {ratio:.3f}")


if __name__ == "__main__":
    main()
