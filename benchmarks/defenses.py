"""The figures of docs/defenses.md: SSIM of IG, WIIG and DIA against defense strength, packed.

    python benchmarks/defenses.py --iterations 1000 --victims 8 --out results/defenses-cpu
    python -m dia.report results/defenses-cpu --no-montages       # figures/defense_ssim.png

A defense changes only the gradients the clients send, not the attack, so every defense setting of one
(dropout rate, attack) is one set of problems and all of them are attacked in ONE vectorized run (the
attack's results do not depend on how problems are grouped: tests/test_engine.py). Each setting is then
scored and written as its own run folder (metrics.json and config.yaml in dia.train's format), which
`python -m dia.report` reads like any other results. Same victims, model weights, client masks and
attacker initialisations in every setting: the curves are paired comparisons.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dia import defenses
from dia.api import simulate
from dia.attacks import attack
from dia.attacks import part as attack_part
from dia.config import compose
from dia.console import quiet_libraries
from dia.problems import Problems
from dia.run import record
from dia.scores import score

# (tag, dia.train arguments) of each defense setting; the x of the figure is the defense's strength key.
SETTINGS: list[tuple[str, list[str]]] = (
    [("none", ["defense=none"])]
    + [(f"dpsgd-s{s:g}", ["defense=dpsgd", f"defense.noise_multiplier={s}"]) for s in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)]
    + [(f"prune-r{r:g}", ["defense=prune", f"defense.ratio={r}"]) for r in (0.5, 0.9, 0.99, 0.999)]
    + [(f"quantize-b{b}", ["defense=quantize", f"defense.bits={b}"]) for b in (2, 4, 8)]
    + [("quantize-stoch-b2", ["defense=quantize", "defense.bits=2", "defense.rounding=stochastic"])]
    + [("sign", ["defense=sign"])]
    + [("prune0.9-dpsgd-s0.001", ["defense=[prune,dpsgd]", "defense.ratio=0.9", "defense.noise_multiplier=0.001"])]
)
PUBLIC = (
    "prune",
    "quantize",
    "sign",
)  # defenses whose zeros the attacker can see: also run with attack.model_defense=true


def pack(parts: list[Problems]) -> Problems:
    """One Problems of all parts' problems, in order."""
    first = parts[0]
    cat = lambda get: {n: torch.cat([get(p)[n] for p in parts]) for n in get(first)}  # noqa: E731
    return replace(
        first,
        targets=cat(lambda p: p.targets),
        labels=torch.cat([p.labels for p in parts]),
        seeds=[s for p in parts for s in p.seeds],
        true_masks=None if first.true_masks is None else cat(lambda p: p.true_masks),
    )


def run_block(base: list[str], settings: list[tuple[str, list[str]]], out: Path, device: torch.device) -> None:
    """Attack all `settings` of one (rate, attack) at once; write one run folder per setting."""
    cfgs = [compose(base + args) for _, args in settings]
    cfg = cfgs[0]
    started = time.time()
    sims = [simulate(config=c) for c in cfgs]  # the same victims and model; each setting's clients defend their own way
    victims, model, mean, std = sims[0].victims, sims[0].model, sims[0].mean, sims[0].std
    parts = [s.problems for s in sims]
    result = attack(model, [attack_part(cfg.attack, pack(parts))], device=device).result()
    wall = time.time() - started
    n = len(victims.indices)
    for i, ((tag, _), c, problems) in enumerate(zip(settings, cfgs, parts)):
        rows, _ = score(
            result.take(torch.arange(i * n, (i + 1) * n)), problems, victims.images, mean, std, skip=["lpips"]
        )
        for row, index, label in zip(rows, victims.indices, victims.labels.tolist()):
            row.update(index=index, label=label, attack_label=label)
        name = f"{c.attack.name}-p{c.model.dropout:g}-{tag}" + ("-md" if c.attack.model_defense else "")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        record.write_config(folder, OmegaConf.to_yaml(c))
        summary = record.summary(
            status="diverged" if any(r["status"] == "diverged" for r in rows) else "completed",
            attack=c.attack.name,
            model=c.model.name,
            data=c.data.name,
            dropout=c.model.dropout,
            rows=rows,
            labels=c.attack.labels,
            label_accuracy=1.0,
            iterations=max(r["iterations"] for r in rows),
            wall_time_s=round(wall / len(settings), 3),
            device=str(device),
            packed_with=len(settings),
            defense=defenses.summary(c.defense, c.attack.model_defense),
        )
        record.write_metrics(folder, summary)
        print(f"{name:<36} SSIM {summary['mean']['ssim']:.3f}", flush=True)
    print(f"  block of {len(settings)} settings x {n} victims: {wall:.0f} s", flush=True)


def table(out: Path) -> str:
    """Markdown: one row per defense setting, one column per (p, attack[, model_defense]): mean SSIM [min-max]."""
    runs = [record.read_metrics(f) | {"tag": f.parent.name} for f in sorted(out.glob(f"*/{record.METRICS}"))]
    cols = sorted(
        {(r["dropout"], r["attack"], r["defense"]["model_defense"]) for r in runs},
        key=lambda c: (c[0], ["ig", "wiig", "dia"].index(c[1]), c[2]),
    )
    order = [t for t, _ in SETTINGS]
    settings = sorted(
        {r["tag"].split("-", 2)[2].removesuffix("-md") for r in runs},
        key=lambda t: order.index(t) if t in order else 99,
    )
    head = ["defense", "ε (δ=1e-5)"] + [f"p={p:g} {a.upper()}{' md' if md else ''}" for p, a, md in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tag in settings:
        mine = [r for r in runs if r["tag"].split("-", 2)[2].removesuffix("-md") == tag]
        eps = next((r["defense"]["epsilon"] for r in mine if r["defense"]["epsilon"] is not None), None)
        row = [tag, "-" if eps is None else f"{eps:.3g}"]
        for p, a, md in cols:
            r = next(
                (r for r in mine if (r["dropout"], r["attack"], r["defense"]["model_defense"]) == (p, a, md)), None
            )
            v = [x["ssim"] for x in r["victims"]] if r else []
            row.append(f"{sum(v) / len(v):.2f} [{min(v):.2f}–{max(v):.2f}]" if v else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--victims", type=int, default=8)
    ap.add_argument("--rates", default="0,0.25,0.5")
    ap.add_argument("--attacks", default="ig,wiig,dia")
    ap.add_argument("--model-defense", action="store_true", help="also the attack.model_defense=true blocks (IG, DIA)")
    ap.add_argument("--only", default="", help="comma-separated setting-tag prefixes, e.g. 'none,prune'")
    ap.add_argument("--extra", nargs="*", default=["model=mlp", "data=mnist"], help="more dia.train arguments")
    ap.add_argument("--out", type=Path, default=Path("results/defenses-cpu"))
    ap.add_argument("--table-only", action="store_true", help="only (re)write OUT/table.md from the run folders")
    args = ap.parse_args()
    if args.table_only:
        (args.out / "table.md").write_text(table(args.out))
        print(table(args.out))
        return
    quiet_libraries()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = [s for s in SETTINGS if not args.only or any(s[0].startswith(o) for o in args.only.split(","))]
    for p in args.rates.split(","):
        for name in args.attacks.split(","):
            if float(p) == 0 and name != "ig":
                continue  # without dropout WIIG and DIA are IG (tests/test_attacks.py): one block
            base = args.extra + [
                f"attack={name}",
                f"model.dropout={p}",
                f"attack.max_iterations={args.iterations}",
                f"num_victims={args.victims}",
                "logger.wandb.mode=disabled",
                "run.progress=false",
            ]
            run_block(base, settings, args.out, device)
            if args.model_defense and name != "wiig":
                public = [s for s in settings if s[0].startswith(PUBLIC)]
                if public:
                    run_block(base + ["attack.model_defense=true"], public, args.out, device)
    (args.out / "table.md").write_text(table(args.out))
    (args.out / "benchmark.json").write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                "args": vars(args) | {"out": str(args.out)},
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
