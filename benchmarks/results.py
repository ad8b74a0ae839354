"""Reproduce docs/results.md: IG, WIIG and DIA on the same victims and budget, as a markdown table.

    python benchmarks/results.py --iterations 3000 --victims 8 --out results/   # a GPU helps for the ViT

Each row is one `python -m dia.train` configuration run in-process (so its run folder is written too).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dia.config import compose
from dia.console import quiet_libraries
from dia.run import execute

ROWS = [
    (
        "MNIST / MLP",
        ["model=mlp", "data=mnist"],
        [
            ("0", "ig", []),
            ("0.5", "ig", []),
            ("0.5", "wiig", []),
            ("0.5", "dia", ["attack.mask_param=clip"]),
            ("0.5", "dia", ["attack.mask_param=sigmoid"]),
        ],
    ),
    (
        "CIFAR-10 / ViT",
        ["model=vit", "data=cifar10"],
        [
            ("0.25", "ig", []),
            ("0.25", "wiig", []),
            ("0.25", "dia", ["attack.mask_param=clip"]),
            ("0.25", "dia", ["attack.mask_param=sigmoid"]),
        ],
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--victims", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated row prefixes to run, e.g. 'MNIST'")
    ap.add_argument("--out", type=Path, default=Path("results"))
    args = ap.parse_args()
    quiet_libraries()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [
        f"Device: {device}; {time.strftime('%Y-%m-%d')}; victims 0..{args.victims - 1} of the embedded set, "
        f"batch 1, all victims attacked at once, budget {args.iterations} iterations, seed 0.",
        "",
        "| dataset / model | p | attack | SSIM | PSNR dB | MSE (normalized) | mask bal. acc. | iterations | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    records = []
    for title, base, cells in ROWS:
        if args.only and not any(title.startswith(o) for o in args.only.split(",")):
            continue
        for p, attack, extra in cells:
            cfg = compose(
                base
                + extra
                + [
                    f"attack={attack}",
                    f"model.dropout={p}",
                    f"attack.max_iterations={args.iterations}",
                    f"num_victims={args.victims}",
                    "logger.wandb.mode=disabled",
                    "run.progress=false",
                    f"run.output_dir={args.out / 'runs'}",
                ]
            )
            out = execute([cfg], progress=False)[0].output
            m = out.metrics["mean"]
            label = attack.upper() + (f" ({cfg.attack.mask_param})" if attack == "dia" else "")
            rec = "-" if m.get("mask_bal_acc") is None else f"{m['mask_bal_acc']:.3f}"
            lines.append(
                f"| {title} | {p} | {label} | {m['ssim']:.3f} | {m['psnr']:.1f} | {m['mse']:.4g} | {rec} | "
                f"{out.metrics['iterations']} | {out.metrics['wall_time_s']:.0f} |"
            )
            records.append({"title": title, "p": p, "attack": label, **out.metrics})
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(records, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
