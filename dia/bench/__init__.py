"""Speed benchmark: the authors' loop against our engine, sequential, vectorized and under Lightning.

    python -m dia.bench [--device cpu|cuda] [--iterations N] [--ks 1,8,32,128] [--models mlp,vit]
                        [--attacks ig,dia] [--out FILE.json]

For each model/data pair (mlp+mnist, vit+cifar10; dropout p=0.25) and attack (ig, dia) it measures
victim-iterations per second and peak memory per victim (CUDA only; null on CPU) of

* ``baseline``: the authors' loop on one victim (`dia.bench.baseline.run_baseline`);
* ``sequential``: our engine with K=1, problem after problem;
* ``vectorized``: our engine with K problems at once in a plain loop (objective -> grad -> advance);
* ``compiled``: the vectorized engine with its gradient program under `torch.compile` (``--compile-ks``);
  the compile time is reported apart (``compile_s``), the rate is the steady state;
* ``lightning``: the eager vectorized engine under the Lightning Trainer (`dia.attacks.attack`), largest K only: the
  rate of a whole call (Trainer start-up included), and its overhead over the plain loop split into a
  fixed start-up and a per-iteration part (from a second, one-iteration call).

Ratios are against the baseline measured in the same run. Every mode is warmed up before timing; CUDA
is synchronized around the timed region. Memory is the peak allocation above what was allocated before
the mode started (model weights), over the victims held at once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dia import attacks
from dia.api import simulate
from dia.attacks import ATTACKS, Program, part
from dia.attacks.program import matmul_precision
from dia.bench.baseline import run_baseline
from dia.config import DEVICE, compose
from dia.errors import ExitCode, UserError
from dia.memory import keep_freed_memory
from dia.problems import Problems
from dia.run.runs import resolve_device

PAIRS = {"mlp": "mnist", "vit": "cifar10"}  # model -> victim data
DROPOUT = 0.25
EMBEDDED_VICTIMS = 128  # size of the embedded victim sets; larger K wraps around


def config(model: str, attack: str, *overrides: str) -> DictConfig:
    return compose(
        [
            f"model={model}",
            f"data={PAIRS[model]}",
            f"attack={attack}",
            f"model.dropout={DROPOUT}",
            "run.progress=false",
            "logger.wandb.mode=disabled",
            "attack.compile=false",
            *overrides,
        ]
    )


def setup(model_name: str, n: int, device: torch.device) -> tuple[nn.Module, Problems, Tensor, Tensor]:
    """The model (on `device`), n single-victim problems (victims 0..n-1 mod 128) and the valid box."""
    sim = simulate(config=config(model_name, "ig", f"victims={[i % EMBEDDED_VICTIMS for i in range(n)]}"))
    return sim.model.to(device), sim.problems, sim.lower.to(device), sim.upper.to(device)


def authors_loop(
    model: nn.Module,
    problems: Problems,
    *,
    attack: str,
    iterations: int,
    lower: Tensor,
    upper: Tensor,
    device: torch.device,
) -> None:
    """`iterations` of the authors' loop (`dia.bench.baseline.run_baseline`) on the first of `problems`."""
    run_baseline(
        model,
        {k: t[0].to(device) for k, t in problems.targets.items()},
        problems.labels[0].to(device),
        problems.rates,
        problems.mask_shapes,
        attack=attack,
        iterations=iterations,
        lower=lower,
        upper=upper,
        seed=problems.seeds[0],
        input_shape=problems.input_shape,
    )


def engine_module(
    attack: str,
    model: nn.Module,
    problems: Problems,
    cfg: DictConfig,
    lower: Tensor,
    upper: Tensor,
    device: torch.device,
) -> Program:
    """An attack module with its state initialised on `device`, ready for `engine_steps`."""
    module = Program(model, [part(cfg.attack, problems)], lower=lower, upper=upper).to(device)
    module.on_fit_start()
    return module


def engine_steps(module: Program, n: int) -> Tensor:
    """n iterations of our engine in a plain loop (no host syncs); the losses, (n, K)."""
    return torch.stack([module.step() for _ in range(n)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, prepare: Callable[[], Any], work: Callable[[Any], Any]) -> tuple[float, float | None]:
    """Seconds of `work(prepare())` (prepare = set-up and warm-up, untimed) and the peak MiB above the start."""
    start = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    ready = prepare()
    _sync(device)
    t0 = time.perf_counter()
    work(ready)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = None if start is None else (torch.cuda.max_memory_allocated(device) - start) / 2**20
    return seconds, peak


def _row(
    model: str,
    attack: str,
    mode: str,
    k: int,
    live: int,
    steps: int,
    victim_its: int,
    seconds: float,
    peak: float | None,
) -> dict[str, Any]:
    return {
        "model": model,
        "data": PAIRS[model],
        "attack": attack,
        "mode": mode,
        "k": k,
        "victim_iterations": victim_its,
        "seconds": round(seconds, 4),
        "victim_its_per_s": victim_its / seconds,
        "ms_per_iteration": 1000 * seconds / steps,
        "mem_per_victim_mib": None if peak is None else peak / live,
    }


def bench_pair(
    model_name: str,
    attack: str,
    ks: list[int],
    *,
    iterations: int,
    warmup: int,
    seq_problems: int,
    device: torch.device,
    lightning: bool = True,
    compile_ks: tuple[int, ...] = (),
    variants: tuple[str, ...] = ("default",),
    report: Callable[[dict], None] = lambda r: None,
) -> list[dict]:
    """All modes for one model/attack; rows with speed-up and memory ratio against the baseline."""
    model, problems, lower, upper = setup(model_name, max([*ks, *compile_ks, seq_problems]), device)
    cfg = config(model_name, attack, f"attack.max_iterations={warmup + iterations}")
    rows: list[dict] = []

    def add(row: dict) -> None:
        base = rows[0] if rows else row
        row["speedup_vs_baseline"] = row["victim_its_per_s"] / base["victim_its_per_s"]
        mem, base_mem = row["mem_per_victim_mib"], base["mem_per_victim_mib"]
        row["mem_ratio_vs_baseline"] = None if mem is None or not base_mem else mem / base_mem
        rows.append(row)
        report(row)

    def baseline(n: int) -> None:
        authors_loop(model, problems, attack=attack, iterations=n, lower=lower, upper=upper, device=device)

    def one(j: int, n: int) -> Tensor:
        return engine_steps(engine_module(attack, model, problems.subset([j]), cfg, lower, upper, device), n)

    baseline(1)  # one-time costs (kernels, library handles, workspaces) outside every measurement
    one(0, 1)

    # (a) the authors' loop, victim 0
    s, peak = measure(device, lambda: baseline(warmup), lambda _: baseline(iterations))
    add(_row(model_name, attack, "baseline", 1, 1, iterations, iterations, s, peak))

    # (b) our engine, K=1, one problem after the other
    s, peak = measure(device, lambda: one(0, warmup), lambda _: [one(j, iterations) for j in range(seq_problems)])
    add(_row(model_name, attack, "sequential", 1, 1, seq_problems * iterations, seq_problems * iterations, s, peak))

    # (c) our engine, K problems at once
    loop_rate = {}
    for k in ks:

        def prepare(k: int = k) -> Program:
            module = engine_module(attack, model, problems.subset(list(range(k))), cfg, lower, upper, device)
            engine_steps(module, warmup)
            return module

        s, peak = measure(device, prepare, lambda module: engine_steps(module, iterations))
        add(_row(model_name, attack, "vectorized", k, k, iterations, k * iterations, s, peak))
        loop_rate[k] = rows[-1]["victim_its_per_s"]

    # (c') the same with the gradient program compiled, in each variant (compile mode, matmul precision)
    for variant in variants:
        settings = variant_settings(variant)
        compiled_cfg = config(
            model_name,
            attack,
            f"attack.max_iterations={warmup + iterations}",
            "attack.compile=true",
            *(f"attack.{k}={v}" for k, v in settings.items()),
        )
        for k in compile_ks:
            started = {}

            def prepare_compiled(k: int = k, started: dict = started, compiled_cfg: Any = compiled_cfg) -> Program:
                started["t"] = time.perf_counter()
                module = engine_module(
                    attack, model, problems.subset(list(range(k))), compiled_cfg, lower, upper, device
                )
                engine_steps(module, warmup)
                _sync(device)
                started["compile_s"] = time.perf_counter() - started["t"]
                return module

            with matmul_precision(settings.get("matmul_precision", "highest")):
                s, peak = measure(device, prepare_compiled, lambda module: engine_steps(module, iterations))
            mode = "compiled" if variant == "default" else f"compiled:{variant}"
            row = _row(model_name, attack, mode, k, k, iterations, k * iterations, s, peak)
            row["compile_s"] = started["compile_s"]
            add(row)

    # (d) the eager engine under the Lightning Trainer (dia.attacks.attack), largest K
    if lightning:
        k = max(ks)
        sub = problems.subset(list(range(k)))

        def fit(iters: int) -> None:
            run_cfg = config(model_name, attack, f"attack.max_iterations={iters}", f"attack.parallel={k}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                attacks.attack(model, [part(run_cfg.attack, sub)], lower=lower, upper=upper, device=device)
            model.to(device)  # the Trainer's teardown moves the module (and our model) back to the CPU

        s, peak = measure(device, lambda: fit(warmup), lambda _: fit(iterations))
        row = _row(model_name, attack, "lightning", k, k, iterations, k * iterations, s, peak)
        row["overhead_vs_loop"] = loop_rate[k] / row["victim_its_per_s"] - 1
        if iterations > 1:  # split the harness cost into a fixed start-up and a per-iteration part
            s1, _ = measure(device, lambda: None, lambda _: fit(1))
            per_it = max(s - s1, 1e-9) / (iterations - 1)
            row["startup_s"] = max(s1 - per_it, 0.0)
            row["steady_overhead_vs_loop"] = loop_rate[k] * per_it / k - 1
        add(row)
    return rows


VARIANTS = {  # attack.* settings; "bf16" is torch's "medium" float32 matmul precision: TF32/bf16 on GPUs, and on a
    # CPU oneDNN's bf16 math mode for float32 matmuls where the CPU has bf16 instructions (avx512_bf16, AMX)
    "default": {},
    "reduce-overhead": {"compile_mode": "reduce-overhead"},
    "max-autotune": {"compile_mode": "max-autotune"},
    "tf32": {"matmul_precision": "high"},
    "bf16": {"matmul_precision": "medium"},
}


def variant_settings(variant: str) -> dict[str, str]:
    """attack.* settings of a compiled variant: names of VARIANTS joined by '+' (e.g. reduce-overhead+tf32)."""
    out: dict[str, str] = {}
    for name in variant.split("+"):
        out.update(VARIANTS[name])
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def benchmark(
    *,
    models: list[str],
    attacks: list[str],
    ks: list[int],
    iterations: int = 30,
    warmup: int = 3,
    seq_problems: int = 3,
    device: str = "cpu",
    lightning: bool = True,
    compile_ks: tuple[int, ...] = (),
    variants: tuple[str, ...] = ("default",),
    report: Callable[[dict], None] = lambda r: None,
) -> dict[str, Any]:
    """The whole benchmark as a JSON-able dict: environment, settings and one row per (model, attack, mode, K)."""
    dev = resolve_device(device)
    rows: list[dict] = []
    for model_name in models:
        for attack in attacks:
            rows += bench_pair(
                model_name,
                attack,
                ks,
                iterations=iterations,
                warmup=warmup,
                seq_problems=seq_problems,
                device=dev,
                lightning=lightning,
                compile_ks=compile_ks,
                variants=variants,
                report=report,
            )
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(dev),
        "torch": torch.__version__,
        "dropout": DROPOUT,
        "iterations": iterations,
        "warmup": warmup,
        "seq_problems": seq_problems,
        "ks": ks,
        "results": rows,
    }


HEADER = (
    f"{'model':<5} {'attack':<6} {'mode':<10} {'K':>5} {'victim-it/s':>12} {'ms/it':>9} {'MiB/victim':>11} "
    f"{'speedup':>8} {'mem':>6}"
)


def format_row(r: dict) -> str:
    mem = "-" if r["mem_per_victim_mib"] is None else f"{r['mem_per_victim_mib']:.1f}"
    ratio = "-" if r["mem_ratio_vs_baseline"] is None else f"{r['mem_ratio_vs_baseline']:.2f}"
    extra = f"  (compile {r['compile_s']:.1f} s)" if "compile_s" in r else ""
    if "overhead_vs_loop" in r:
        extra = f"  (vs loop: {100 * r['overhead_vs_loop']:+.0f}%"
        if "startup_s" in r:
            extra += f"; start-up {r['startup_s']:.2f} s, then {100 * r['steady_overhead_vs_loop']:+.0f}% per iteration"
        extra += ")"
    return (
        f"{r['model']:<5} {r['attack']:<6} {r['mode']:<10} {r['k']:>5} {r['victim_its_per_s']:>12.1f} "
        f"{r['ms_per_iteration']:>9.2f} {mem:>11} {r['speedup_vs_baseline']:>7.2f}x {ratio:>6}{extra}"
    )


def _ints(option: str, text: str, lo: int) -> list[int]:
    """'1,8,32' as integers >= lo (a UserError naming the option otherwise)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not all(p.isdigit() and len(p) <= 9 and int(p) >= lo for p in parts):
        raise UserError(f"{option} '{text}': expected comma-separated integers >= {lo}, e.g. 1,8,32")
    return [int(p) for p in parts]


def _names(option: str, text: str, valid: list[str]) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in valid]
    if not names or bad:
        raise UserError(f"{option} '{text}': unknown '{bad[0] if bad else text}'; choose from: {', '.join(valid)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked: every problem is one UserError line."""
    parser = argparse.ArgumentParser(prog="python -m dia.bench", description=__doc__.split("\n")[0])
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; see `python -m dia.bench --help`"))  # type: ignore[method-assign]
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before timing")
    parser.add_argument("--ks", default="1,8,32,128", help="problems optimized at once (comma-separated)")
    parser.add_argument("--models", default="mlp,vit")
    parser.add_argument("--attacks", default="ig,dia")
    parser.add_argument("--seq-problems", type=int, default=3, help="problems run one after another in 'sequential'")
    parser.add_argument("--compile-ks", default="", help="K values to also run with the compiled gradient program")
    parser.add_argument(
        "--variants",
        default="default",
        help=f"compiled variants (comma-separated; '+' combines): {', '.join(VARIANTS)}",
    )
    parser.add_argument("--no-lightning", action="store_true", help="skip the Lightning harness measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name, lo in (("iterations", 1), ("warmup", 0), ("seq_problems", 1), ("threads", 1)):
        v = getattr(args, name)
        if v is not None and not lo <= v <= 10**9:
            raise UserError(f"--{name.replace('_', '-')}={v}: must be an integer in {lo}..{10**9}")
    args.ks = _ints("--ks", args.ks, 1)
    if not args.ks:
        raise UserError("--ks: give at least one K, e.g. --ks 1,8")
    args.compile_ks = tuple(_ints("--compile-ks", args.compile_ks, 1))
    args.variants = tuple(args.variants.split(","))
    for v in args.variants:
        _names("--variants", v.replace("+", ","), list(VARIANTS))
    args.models = _names("--models", args.models, list(PAIRS))
    args.attacks = _names("--attacks", args.attacks, ATTACKS.names())
    if not DEVICE.fullmatch(args.device):
        raise UserError(f"--device '{args.device}': must be auto, cpu, mps, cuda or cuda:N")
    try:
        resolve_device(args.device)
    except UserError:
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu") from None
    if args.out is not None and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):
        raise UserError(f"--out '{args.out}': must be a file in an existing folder")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line, whatever the input held
        return ExitCode.BAD_INPUT
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as dia.train and dia.grid do (dia.memory)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    dev = resolve_device(args.device)
    print(f"# dia.bench  {datetime.datetime.now():%Y-%m-%d %H:%M}  {device_name(dev)}  torch {torch.__version__}")
    print(
        f"# dropout p={DROPOUT}, {args.iterations} timed iterations after {args.warmup} warm-up; "
        f"speedup and mem are relative to the baseline (authors' loop, one victim) of the same model/attack"
    )
    print(HEADER, flush=True)
    out = benchmark(
        models=args.models,
        attacks=args.attacks,
        ks=args.ks,
        iterations=args.iterations,
        warmup=args.warmup,
        seq_problems=args.seq_problems,
        device=args.device,
        lightning=not args.no_lightning,
        compile_ks=args.compile_ks,
        variants=args.variants,
        report=lambda r: print(format_row(r), flush=True),
    )
    if args.out:
        tmp = Path(args.out).with_name(f".{Path(args.out).name}.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        os.replace(tmp, args.out)
        print(f"# wrote {args.out}")
    return ExitCode.OK
