"""dia beside breaching 0.1.2 (Geiping et al.'s reference library, its inverting-gradients attack), side by side
on the same user models, gradients, victims, budget and settings, one thread each. docs/peer-breaching.md has
the results and what is matched.

    python benchmarks/peer_breaching.py --quick                    # smoke run: 2 victims, a few iterations (~1-2 min)
    python benchmarks/peer_breaching.py                            # all modes at full budget (~15 min, 2-core CPU)
    python benchmarks/peer_breaching.py --modes quality --data mnist --json out.json

Modes:
- quality: 4 victims x 1,000 iterations; SSIM per victim of dia IG and breaching IG at p = 0 and 0.25, and dia's
  DIA at 0.25 (both sides' images scored by dia's SSIM, dia.metrics.ssim, what dia.evaluate reports);
- batch: 8 victims x 500 iterations, dia in one `dia.reconstruct` call (torch.compile with a cold cache, a warm
  cache, and eager) against breaching one victim after another: victim-iterations per second and the ratio;
- single: one victim per call, as in a notebook (budgets 100 and 500): ms per iteration, dia eager and compiled
  (warm cache) against breaching.
Timed measurements alternate A B A B (breaching, then each dia variant, per repeat; `--repeats`, default 2);
the table gives medians and ranges, each with the 1-minute load average before/after.

Each side runs in its own process: dia with this interpreter (the `import dia` of this checkout: the repository
root goes first on PYTHONPATH), breaching with the python of its own virtualenv (`--peer-python`, or created on
first use in $DIA_PEER_VENV, default benchmarks/peer/.venv: `python -m venv` + `pip install breaching==0.1.2
torch==<this torch> torchvision==<this torchvision>`). They exchange files of tensors only (state dicts,
gradients, images; `torch.save` / `torch.load(weights_only=True)`) in a temporary folder; breaching's side is
benchmarks/peer/breaching_worker.py. Every worker process sets one torch thread (OMP_NUM_THREADS=1,
MKL_NUM_THREADS=1, torch.set_num_threads(1); torch.compile's compile workers: --compile-threads, default 1);
imports and process start are not timed, each side's attack call is (dia: `dia.reconstruct`, from the model and
update to images, torch.compile included; breaching: `attacker.reconstruct` per victim). Batch and single runs
make one untimed call first (one victim, 5 iterations; dia's eager in batch mode, so a cold cache stays cold).

Matched: cosine gradient distance over all parameters, total variation with the same weight (default dia's
1e-5), signed Adam at lr 0.1, images boxed to the valid range after every step, no learning-rate schedule (dia:
lr_patience and early-stop patience 10^9, loss threshold 0; breaching: step_size_decay null), the same budget,
labels given, the attacker's copy of the model without dropout (breaching: eval mode), the same initial images
(dia's per-victim randn draw, boxed, handed to breaching as `initial_data`), and the same best-iterate rule (both
keep the iterate after the step whose loss improved). Not matched exactly: breaching's TV also counts the image
border against zero padding and adds 1e-8 per difference; dia's cosine adds 1e-8 to the denominator.

breaching's TotalVariation hard-codes 3 channel groups: on 1-channel images (MNIST) the worker applies the
one-line patch benchmarks/peer/breaching-tv-channels.patch to the loaded class at runtime (monkeypatch); the
installed package is not changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER = HERE / "peer"
WORKER = PEER / "breaching_worker.py"
BREACHING = "breaching==0.1.2"

# The two data sets and their user models (defined once here; breaching_worker.py imports build_model).
DATA = {
    "mnist": dict(asset="mnist_128.npz", shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,), model="MLP 784-256-256-10"),
    "cifar10": dict(
        asset="cifar10_128.npz",
        shape=(3, 32, 32),
        mean=(0.4915, 0.4823, 0.4468),
        std=(0.2470, 0.2435, 0.2616),
        model="CNN conv5x5 3-16-32, FC 2048-128-10",
    ),
}
# dia's IG settings with the schedule and the early stops switched off (breaching's IG has neither when
# step_size_decay is null): keys of configs/attack/*.yaml.
SETTINGS = dict(
    lr=0.1,
    tv_weight=1e-5,
    signed_gradients=True,
    boxed=True,
    init="randn",
    lr_patience=10**9,
    early_stop_patience=10**9,
    loss_threshold=0.0,
)


class MLP(nn.Module):
    """MNIST: 784-256-256-10, ReLU, dropout after each hidden layer."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Dropout(p),
            nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """CIFAR-10: two 5x5 conv (16, 32 channels) - ReLU - max-pool 2 blocks, dropout, FC 2048-128, ReLU, dropout, FC
    10."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(p), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Dropout(p), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(data: str, p: float) -> nn.Module:
    """The user model for `data` with dropout rate `p` (weights from torch's global generator: seed it first)."""
    return MLP(p) if data == "mnist" else CNN(p)


# ---- the problems: models, gradients, victims, initial images -------------------------------------------
def make_problem(data: str, p: float, victims: int, seed: int, folder: Path) -> Path:
    """One client per victim (batch 1): the seeded model, its gradient from one step with dropout active
    (`dia.capture_update`), and the attack's initial images (dia's per-victim draw, boxed); written as a file
    of tensors that both sides read."""
    import numpy as np

    import dia
    from dia.problems import problem_seed

    spec = DATA[data]
    asset = np.load(REPO / "dia" / "assets" / spec["asset"])
    images = torch.from_numpy(asset["images"][:victims]).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(asset["labels"][:victims]).long()
    mean = torch.tensor(spec["mean"]).view(-1, 1, 1)
    std = torch.tensor(spec["std"]).view(-1, 1, 1)
    x = (images - mean) / std
    torch.manual_seed(seed)
    model = build_model(data, p)
    names = [n for n, _ in model.named_parameters()]
    grads = []
    for j in range(victims):
        g = dia.capture_update(model, x[j : j + 1], labels[j : j + 1], seed=problem_seed(seed, j)).gradient
        if sorted(g) != sorted(names):
            raise RuntimeError(f"capture_update named the parameters {sorted(g)}, the model {sorted(names)}")
        grads.append(g)
    lower, upper = (0 - mean) / std, (1 - mean) / std
    # dia.reconstruct(seed=seed) starts problem j from randn((1, C, H, W)) drawn from a generator seeded with
    # problem_seed(seed, j), then boxes it (dia.attacks.rows.Rows.start_of, Program.on_fit_start).
    init = torch.stack(
        [
            torch.randn((1, *spec["shape"]), generator=torch.Generator().manual_seed(problem_seed(seed, j)))[0]
            for j in range(victims)
        ]
    )
    init = torch.maximum(torch.minimum(init, upper), lower)
    path = folder / f"{data}-p{p}.pt"
    torch.save(
        {
            "data": data,
            "p": float(p),
            "input_shape": torch.tensor(spec["shape"]),
            "seed": seed,
            "state_dict": model.state_dict(),
            "gradients": {n: torch.stack([g[n] for g in grads]) for n in names},
            "labels": labels,
            "originals": images,
            "mean": mean.flatten(),
            "std": std.flatten(),
            "init": init,
        },
        path,
    )
    return path


# ---- dia's side (this interpreter, its own process) --------------------------------------------------------
def dia_worker(jobfile: str) -> None:
    """Run the dia jobs of `jobfile`, as breaching_worker.py runs breaching's."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import dia
    import dia.api
    import dia.attacks
    import dia.config
    import dia.metrics
    import dia.run.pack
    import dia.run.runs
    import dia.scores
    import dia.updates

    if not Path(dia.__file__).resolve().is_relative_to(REPO):
        raise RuntimeError(f"import dia found {dia.__file__}, not this checkout's ({REPO})")
    notices: list[str] = []

    class Notices(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notices.append(record.getMessage())

    log = logging.getLogger("dia")
    log.addHandler(Notices(level=logging.INFO))
    log.setLevel(logging.INFO)
    for job in json.loads(Path(jobfile).read_text())["jobs"]:
        prob = torch.load(job["problem"], weights_only=True)
        model = build_model(prob["data"], prob["p"])
        model.load_state_dict(prob["state_dict"])
        names = [n for n, _ in model.named_parameters()]
        victims = list(job["victims"])
        calls = [[v] for v in victims] if job["per_call"] else [victims]
        calls = [[victims[0]]] * int(job.get("warmup", 0)) + calls
        images, losses, seconds, ssim, status, compile_s = [], [], [], [], [], []
        load = [os.getloadavg()[0]]
        for i, call in enumerate(calls):
            warm = i < int(job.get("warmup", 0))  # untimed calls first (a few iterations): first-call costs
            grads = [{n: prob["gradients"][n][v] for n in names} for v in call]
            del notices[:]
            started = time.perf_counter()
            r = dia.reconstruct(
                model,
                grads,
                labels=prob["labels"][call].view(-1, 1),
                input_shape=tuple(prob["input_shape"].tolist()),
                mean=prob["mean"].tolist(),
                std=prob["std"].tolist(),
                attack=job["attack"],
                seed=int(prob["seed"]),
                device="cpu",
                max_iterations=int(job.get("warmup_iterations", 5)) if warm else int(job["iterations"]),
                compile=job.get("warmup_compile", job["compile"]) if warm else job["compile"],  # True, False, "auto"
                **{("attack_lr" if k == "lr" else k): v for k, v in job["settings"].items()},  # lr: the client's
            )
            took = time.perf_counter() - started
            if warm:
                continue
            seconds.append(took)
            compile_s += [float(m.split()[-2]) for m in notices if m.startswith("torch.compile: first call")]
            images.append(r.images)
            losses.append(r.loss)
            status += list(r.status)
            ssim += [v["ssim"] for v in dia.evaluate(r, prob["originals"][call])["victims"]]
        load.append(os.getloadavg()[0])
        out = Path(job["out"])
        torch.save({"images": torch.cat(images), "loss": torch.cat(losses)}, out.with_suffix(".pt"))
        out.with_suffix(".json").write_text(
            json.dumps(
                {
                    "side": "dia",
                    "seconds": seconds,
                    "load": load,
                    "ssim_evaluate": ssim,
                    "status": status,
                    "compile_s": compile_s,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "dia": str(Path(dia.__file__).resolve().parent),
                    "iterations": int(job["iterations"]),
                    "victims": victims,
                }
            )
        )


# ---- orchestration ----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args, self.folder, self.count = args, folder, 0
        self.peer_python = peer_python(args)
        self.records: list[dict] = []  # every measurement, for --json

    def run(self, side: str, jobs: list[dict], env: dict[str, str] | None = None) -> list[dict]:
        """Run `jobs` in one fresh process of `side` ('dia' or 'breaching'); their results, in order."""
        self.count += 1
        jobfile = self.folder / f"jobs-{self.count}.json"
        for k, job in enumerate(jobs):
            job.setdefault("settings", dict(SETTINGS, tv_weight=self.args.tv_weight))
            job["out"] = str(self.folder / f"out-{self.count}-{k}")
        jobfile.write_text(json.dumps({"jobs": jobs}))
        cmd = (
            [str(self.peer_python), str(WORKER), str(jobfile)]
            if side == "breaching"
            else [sys.executable, str(Path(__file__).resolve()), "--dia-worker", str(jobfile)]
        )
        penv = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
        penv["TORCHINDUCTOR_COMPILE_THREADS"] = str(self.args.compile_threads)  # inductor's compile workers
        if side == "dia":
            penv["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        else:
            penv.pop("PYTHONPATH", None)
        done = subprocess.run(cmd, env=penv, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise SystemExit(f"{side} worker failed (exit {done.returncode}):\n{tail}")
        out = []
        for job in jobs:
            meta = json.loads(Path(job["out"]).with_suffix(".json").read_text())
            meta.update(torch.load(Path(job["out"]).with_suffix(".pt"), weights_only=True))
            out.append(meta)
        return out

    def note(self, record: dict) -> None:
        self.records.append({k: v for k, v in record.items() if not isinstance(v, torch.Tensor)})


def peer_python(args: argparse.Namespace) -> Path:
    """breaching's interpreter: --peer-python, or the virtualenv $DIA_PEER_VENV (default benchmarks/peer/.venv),
    created and installed on first use."""
    if args.peer_python:
        return Path(args.peer_python)
    venv = Path(os.environ.get("DIA_PEER_VENV") or PEER / ".venv")
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import breaching"], capture_output=True).returncode == 0:
        return python
    pins = [BREACHING, f"torch=={torch.__version__.split('+')[0]}"]
    try:
        import torchvision

        pins.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    except ImportError:
        pins.append("torchvision")
    print(f"creating breaching's virtualenv in {venv}: pip install {' '.join(pins)}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    return python


def load1() -> float:
    return os.getloadavg()[0]


def spread(values: list[float], fmt: str = "{:.3g}") -> str:
    """median (min-max) of the values ('—' for none: a dia-auto run that did not compile has no compile time)."""
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def loads(results: list[dict]) -> str:
    values = [x for r in results for x in r["load"]]
    return f"{min(values):.1f}-{max(values):.1f}"


def quality(b: Bench, problems: dict, out: list[str]) -> None:
    """dia IG and breaching IG (p = 0, 0.25), dia DIA (p = 0.25): SSIM per victim by the same function."""
    from dia.metrics import ssim

    a = b.args
    victims = list(range(a.quality_victims))
    plan = [
        (d, p, s, atk)
        for d in a.data
        for p in (0.0, 0.25)
        for s, atk in [("dia", "ig"), ("breaching", "ig")] + ([("dia", "dia")] if p else [])
    ]
    jobs = {
        s: [
            dict(
                problem=str(problems[d, p]),
                victims=victims,
                iterations=a.quality_iterations,
                attack=atk,
                per_call=False,
                compile=a.quality_compile,
            )
            for d, p, side, atk in plan
            if side == s
        ]
        for s in ("dia", "breaching")
    }
    warm = {"TORCHINDUCTOR_CACHE_DIR": str(b.folder / "inductor-warm")}
    res = {"breaching": iter(b.run("breaching", jobs["breaching"])), "dia": iter(b.run("dia", jobs["dia"], warm))}
    out += [
        f"### Quality: {len(victims)} victims x {a.quality_iterations} iterations, SSIM (dia.metrics.ssim on both "
        "sides' images)",
        "",
        "| data / model | p | attack | mean SSIM | per victim | best loss per victim | wall s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d, p, side, atk in plan:
        r = next(res[side])
        prob = torch.load(problems[d, p], weights_only=True)
        s = ssim(r["images"], prob["originals"][victims]).tolist()
        if side == "dia" and max(abs(x - y) for x, y in zip(s, r["ssim_evaluate"])) > 1e-5:
            raise RuntimeError(f"dia.evaluate's SSIM {r['ssim_evaluate']} differs from dia.metrics.ssim {s}")
        name = {"ig": "IG", "dia": "DIA"}[atk] + f" ({side})"
        out.append(
            f"| {d} / {DATA[d]['model'].split()[0]} | {p:g} | {name} | **{statistics.mean(s):.3f}** | "
            f"{', '.join(f'{x:.3f}' for x in s)} | {', '.join(f'{x:.4g}' for x in r['loss'].tolist())} | "
            f"{sum(r['seconds']):.1f} | {loads([r])} |"
        )
        b.note(
            dict(
                mode="quality",
                data=d,
                p=p,
                side=side,
                attack=atk,
                ssim=s,
                loss=r["loss"].tolist(),
                seconds=r["seconds"],
                load=r["load"],
                status=r.get("status"),
                patched_tv=r.get("patched_tv"),
            )
        )
    out.append("")


def batch(b: Bench, problems: dict, out: list[str]) -> None:
    """K victims x N iterations: dia in one call (cold / warm compile cache, eager) vs breaching victim by victim."""
    a = b.args
    victims, n = list(range(a.batch_victims)), a.batch_iterations
    warm = {d: b.folder / f"inductor-warm-batch-{d}" for d in a.data}
    variants = [
        v
        for v in ("breaching", "dia-auto", "dia-cold", "dia-warm", "dia-eager")
        if v == "breaching" or v in a.dia_variants
    ]
    for d in a.data:  # prime each warm cache (untimed): the same program shapes as the timed runs
        if "dia-warm" in variants:
            b.run(
                "dia",
                [
                    dict(
                        problem=str(problems[d, 0.25]),
                        victims=victims,
                        iterations=2,
                        attack="ig",
                        per_call=False,
                        compile=True,
                    )
                ],
                {"TORCHINDUCTOR_CACHE_DIR": str(warm[d])},
            )
    times: dict = {}
    for rep in range(a.repeats):
        for d in a.data:
            for v in variants:
                # one untimed call first on both sides (one victim, 5 iterations; dia's eager, so that a cold
                # cache stays cold): first-call costs such as lazy imports and allocator warm-up are not timed
                job = dict(
                    problem=str(problems[d, 0.25]),
                    victims=victims,
                    iterations=n,
                    attack="ig",
                    per_call=v == "breaching",
                    compile={"dia-eager": False, "dia-auto": "auto"}.get(v, True),
                    warmup=1,
                    warmup_iterations=5,
                    warmup_compile=False,
                )
                env = {}
                if v in ("dia-cold", "dia-auto"):  # a user's first run: nothing compiled, no cost book
                    cold = b.folder / f"inductor-{v}-{d}-{rep}"
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(cold)  # fresh and empty
                elif v == "dia-warm":
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(warm[d])
                else:
                    env["TORCHINDUCTOR_CACHE_DIR"] = str(b.folder / "inductor-unused")
                r = b.run("breaching" if v == "breaching" else "dia", [job], env)[0]
                if v in ("dia-cold", "dia-auto"):
                    shutil.rmtree(cold, ignore_errors=True)
                times.setdefault((d, v), []).append(r)
                b.note(
                    dict(
                        mode="batch",
                        data=d,
                        variant=v,
                        repeat=rep,
                        victims=len(victims),
                        iterations=n,
                        seconds=sum(r["seconds"]),
                        load=r["load"],
                        compile_s=r.get("compile_s"),
                    )
                )
    out += [
        f"### Batch: {len(victims)} victims x {n} iterations (IG, p = 0.25); dia in one `dia.reconstruct` call, "
        f"breaching one victim after another; {a.repeats} alternated repeats",
        "",
        "| data / model | side | victim-it/s: median (range) | wall s | vs breaching: ratio of medians (per "
        "repeat) | compile s | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in a.data:
        base = [len(victims) * n / sum(r["seconds"]) for r in times[d, "breaching"]]
        for v in variants:
            rs = times[d, v]
            rate = [len(victims) * n / sum(r["seconds"]) for r in rs]
            ratio = (
                (
                    f"{statistics.median(rate) / statistics.median(base):.2f}x "
                    f"({', '.join(f'{x / y:.2f}' for x, y in zip(rate, base))})"
                )
                if v != "breaching"
                else "1"
            )
            comp = (
                spread([c for r in rs for c in r.get("compile_s", [])], "{:.1f}")
                if v in ("dia-cold", "dia-warm", "dia-auto")
                else ""
            )
            label = {
                "breaching": "breaching, victim by victim",
                "dia-auto": "dia, compile=auto (the default), first run",
                "dia-cold": "dia, compiled, cold cache",
                "dia-warm": "dia, compiled, warm cache",
                "dia-eager": "dia, eager (compile=False)",
            }[v]
            out.append(
                f"| {d} / {DATA[d]['model'].split()[0]} | {label} | {spread(rate)} | "
                f"{spread([sum(r['seconds']) for r in rs], '{:.1f}')} | {ratio} | {comp} | {loads(rs)} |"
            )
    out.append("")


def single(b: Bench, problems: dict, out: list[str]) -> None:
    """One victim per call (a notebook): ms per iteration at each budget, dia eager / compiled vs breaching."""
    a = b.args
    victims = list(range(a.single_victims))
    variants = [
        v for v in ("breaching", "dia-auto", "dia-eager", "dia-warm") if v == "breaching" or v in a.dia_variants
    ]
    warm = {d: b.folder / f"inductor-warm-single-{d}" for d in a.data}
    for d in a.data:
        if "dia-warm" in variants:
            b.run(
                "dia",
                [
                    dict(
                        problem=str(problems[d, 0.25]),
                        victims=victims[:1],
                        iterations=2,
                        attack="ig",
                        per_call=True,
                        compile=True,
                    )
                ],
                {"TORCHINDUCTOR_CACHE_DIR": str(warm[d])},
            )
    times: dict = {}
    for rep in range(a.repeats):
        for d in a.data:
            for v in variants:
                jobs = [
                    dict(
                        problem=str(problems[d, 0.25]),
                        victims=victims,
                        iterations=n,
                        attack="ig",
                        per_call=True,
                        compile={"dia-warm": True, "dia-auto": "auto"}.get(v, False),
                        warmup=1 if k == 0 else 0,
                        warmup_iterations=5,
                    )
                    for k, n in enumerate(a.single_budgets)
                ]
                cache = {"dia-warm": warm[d], "dia-auto": b.folder / f"inductor-auto-single-{d}-{rep}"}
                env = {"TORCHINDUCTOR_CACHE_DIR": str(cache.get(v, b.folder / "inductor-unused"))}
                for n, r in zip(a.single_budgets, b.run("breaching" if v == "breaching" else "dia", jobs, env)):
                    times.setdefault((d, n, v), []).append(r)
                    b.note(
                        dict(
                            mode="single",
                            data=d,
                            variant=v,
                            repeat=rep,
                            iterations=n,
                            seconds=r["seconds"],
                            load=r["load"],
                        )
                    )
    out += [
        f"### One victim per call: ms per iteration (wall of each call / its iterations; {len(victims)} calls per "
        f"process after one untimed warm-up call, {a.repeats} alternated repeats)",
        "",
        "| data / model | iterations | side | ms / iteration: median (range) | vs breaching (time ratio) | load |",
        "|---|---|---|---|---|---|",
    ]
    for d in a.data:
        for n in a.single_budgets:
            base = [s * 1000 / n for r in times[d, n, "breaching"] for s in r["seconds"]]
            for v in variants:
                rs = times[d, n, v]
                ms = [s * 1000 / n for r in rs for s in r["seconds"]]
                label = {
                    "breaching": "breaching",
                    "dia-auto": "dia, compile=auto (the default), first run",
                    "dia-eager": "dia, eager",
                    "dia-warm": "dia, compiled (warm cache)",
                }[v]
                ratio = f"{statistics.median(ms) / statistics.median(base):.2f}" if v != "breaching" else "1"
                out.append(
                    f"| {d} / {DATA[d]['model'].split()[0]} | {n} | {label} | {spread(ms, '{:.2f}')} | {ratio} | "
                    f"{loads(rs)} |"
                )
    out.append("")


def machine() -> str:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    return f"{model}, {os.cpu_count()} logical CPUs"


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--quick", action="store_true", help="smoke run: 2 victims, a few iterations, 1 repeat, eager dia")
    a.add_argument("--modes", default="quality,batch,single")
    a.add_argument("--data", default="mnist,cifar10")
    a.add_argument("--repeats", type=int, default=2)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--tv-weight", type=float, default=SETTINGS["tv_weight"])
    a.add_argument("--quality-victims", type=int, default=4)
    a.add_argument("--quality-iterations", type=int, default=1000)
    a.add_argument(
        "--quality-compile",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=True,
        help="dia's quality runs compiled (true, default) or eager",
    )
    a.add_argument("--batch-victims", type=int, default=8)
    a.add_argument("--batch-iterations", type=int, default=500)
    a.add_argument("--single-victims", type=int, default=2, help="calls per process (one victim each)")
    a.add_argument("--single-budgets", default="100,500")
    a.add_argument(
        "--dia-variants",
        default="dia-auto,dia-cold,dia-warm,dia-eager",
        help="dia's timed variants: dia-auto (compile=auto, the default, on a first run: no cache, no cost book), "
        "dia-cold, dia-warm (compiled, cold/warm cache), dia-eager",
    )
    a.add_argument(
        "--compile-threads",
        type=int,
        default=1,
        help="torch.compile's compile workers on dia's side (TORCHINDUCTOR_COMPILE_THREADS; default 1: "
        "one core per side throughout; torch's own default here is the number of CPUs)",
    )
    a.add_argument(
        "--peer-python",
        help="breaching's python (a venv with breaching 0.1.2); default: created in "
        "$DIA_PEER_VENV or benchmarks/peer/.venv",
    )
    a.add_argument("--json", help="write every measurement here")
    a.add_argument("--dia-worker", help=argparse.SUPPRESS)
    args = a.parse_args()
    if args.dia_worker:
        return dia_worker(args.dia_worker)
    if args.quick:
        args.repeats, args.quality_victims, args.quality_iterations, args.quality_compile = 1, 2, 30, False
        args.batch_victims, args.batch_iterations, args.single_victims, args.single_budgets = 2, 30, 1, "10,30"
        args.dia_variants = "dia-eager"
    args.modes = args.modes.split(",")
    args.data = args.data.split(",")
    args.single_budgets = [int(n) for n in args.single_budgets.split(",")]
    args.dia_variants = args.dia_variants.split(",")
    for m in args.modes:
        if m not in ("quality", "batch", "single"):
            raise SystemExit(f"--modes: {m!r} is not quality, batch or single")
    for d in args.data:
        if d not in DATA:
            raise SystemExit(f"--data: {d!r} is not one of {', '.join(DATA)}")
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))  # this checkout's dia, as in the workers
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dia-peer-") as tmp:
        b = Bench(args, Path(tmp))
        victims = max(
            [args.quality_victims] * ("quality" in args.modes)
            + [args.batch_victims] * ("batch" in args.modes)
            + [args.single_victims] * ("single" in args.modes)
        )
        problems = {(d, p): make_problem(d, p, victims, args.seed, Path(tmp)) for d in args.data for p in (0.0, 0.25)}
        versions = b.run(
            "breaching",
            [dict(problem=str(problems[args.data[0], 0.0]), victims=[0], iterations=1, attack="ig", per_call=True)],
        )[0]
        out: list[str] = []
        for mode in args.modes:
            {"quality": quality, "batch": batch, "single": single}[mode](b, problems, out)
        load_after = os.getloadavg()
        import dia

        commit = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            or "?"
        )
        head = [
            f"## dia beside breaching {versions['breaching']}" + (" (--quick smoke run)" if args.quick else ""),
            "",
            f"- machine: {machine()}; one torch thread per side (OMP_NUM_THREADS=1, torch threads "
            f"{versions['threads']}, inductor compile threads {args.compile_threads}), each side in its own "
            f"processes, one process at a time",
            f"- dia: {Path(dia.__file__).resolve().parent} (commit {commit}), torch {torch.__version__}; "
            f"breaching {versions['breaching']}, torch {versions['torch']} (its own virtualenv)",
            f"- load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
            f"{'/'.join(f'{x:.2f}' for x in load_after)}; wall {time.time() - started:.0f} s; "
            f"{time.strftime('%Y-%m-%d %H:%M')}",
            "- models: "
            + "; ".join(f"{d}: {DATA[d]['model']}" for d in args.data)
            + f"; seed {args.seed}; settings {json.dumps(dict(SETTINGS, tv_weight=args.tv_weight))}",
            "",
        ]
        print("\n".join(head + out))
        if args.json:
            Path(args.json).write_text(json.dumps({"head": head, "records": b.records}, indent=1))


if __name__ == "__main__":
    main()
