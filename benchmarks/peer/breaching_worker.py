"""breaching's side of benchmarks/peer_breaching.py: runs inside breaching's own virtualenv (never imports dia).

    <peer-venv>/bin/python benchmarks/peer/breaching_worker.py JOBS.json

JOBS.json holds {"jobs": [...]}; each job names a problem file written by peer_breaching.py (tensors only, read
with `torch.load(weights_only=True)`: the user model's state dict, per-victim gradients, labels, the attack's
initial images), the victims, the iteration budget and the attack settings. For every victim it runs breaching's
inverting-gradients attacker (`breaching.attacks.prepare_attack` with the `invertinggradients` config, overridden
to match dia's settings, see `attack_config`) one victim after another and writes, next to the job's `out` stem,
`<out>.pt` (reconstructions in [0, 1], best losses) and `<out>.json` (wall seconds per call, versions, load).

The only change to breaching: its TotalVariation hard-codes 3 channel groups, so on 1-channel images the
one-line patch in `breaching-tv-channels.patch` (beside this file) is applied to the loaded class at runtime
(`patch_total_variation`); 3-channel data run breaching unpatched.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import textwrap
import time
import types
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PATCH = HERE / "breaching-tv-channels.patch"
sys.path.insert(0, str(HERE.parent))  # peer_breaching.py: the user models, defined once (torch only)


def patch_total_variation() -> None:
    """Apply the one-line patch of PATCH to breaching's TotalVariation.forward in this process."""
    from breaching.attacks.auxiliaries import regularizers

    lines = PATCH.read_text().splitlines()
    old = [ln[1:] for ln in lines if ln.startswith("-") and not ln.startswith("---")]
    new = [ln[1:] for ln in lines if ln.startswith("+") and not ln.startswith("+++")]
    if len(old) != 1 or len(new) != 1:
        raise RuntimeError(f"{PATCH.name}: expected a one-line patch")
    cls = regularizers.TotalVariation
    if getattr(cls, "_peer_patched", False):
        return
    src = inspect.getsource(cls.forward)
    if src.count(old[0] + "\n") != 1:
        raise RuntimeError(f"{PATCH.name} does not fit this breaching's TotalVariation.forward (another version?)")
    code = compile(textwrap.dedent(src.replace(old[0] + "\n", new[0] + "\n")), inspect.getsourcefile(cls), "exec")
    namespace: dict = {}
    exec(code, vars(regularizers), namespace)
    cls.forward = namespace["forward"]
    cls._peer_patched = True


def attack_config(iterations: int, settings: dict):
    """breaching's `invertinggradients` config with dia's settings: cosine objective (its default), TV weight,
    signed ("hard") Adam at dia's lr, boxed images, no step-size schedule, the iteration budget, randn init."""
    import breaching

    if not settings["signed_gradients"] or not settings["boxed"] or settings["init"] != "randn":
        raise ValueError("this worker matches signed, boxed, randn-initialised IG only")
    overrides = [
        "objective.type=cosine-similarity",
        "restarts.num_trials=1",
        "init=randn",
        "optim.optimizer=adam",
        "optim.signed=hard",
        f"optim.step_size={settings['lr']}",
        "optim.boxed=True",
        f"optim.max_iterations={iterations}",
        "optim.step_size_decay=null",
        "optim.warmup=0",
        f"optim.callback={10**9}",  # no log line (and no extra .item()) inside the timed loop
        f"regularization.total_variation.scale={settings['tv_weight']}",
    ]
    return breaching.get_attack_config("invertinggradients", overrides=overrides)


def run_job(job: dict) -> None:
    import breaching
    from peer_breaching import build_model

    prob = torch.load(job["problem"], weights_only=True)
    data = prob["data"]
    shape = tuple(int(v) for v in prob["input_shape"])
    patched = shape[0] != 3
    if patched:
        patch_total_variation()
    model = build_model(data, float(prob["p"]))
    model.load_state_dict(prob["state_dict"])
    names = [n for n, _ in model.named_parameters()]
    cfg = attack_config(int(job["iterations"]), job["settings"])
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    with _quiet():
        attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg, setup)
    mean, std = prob["mean"].view(1, -1, 1, 1), prob["std"].view(1, -1, 1, 1)
    # The server's payload: the model's parameters, and `buffers=[]` (public, empty: the models have no
    # buffers), which makes breaching run its copy in eval mode, i.e. without dropout: IG's attacker.
    metadata = types.SimpleNamespace(
        shape=shape, mean=prob["mean"].tolist(), std=prob["std"].tolist(), modality="vision"
    )
    payload = [dict(parameters=[p.detach().clone() for p in model.parameters()], buffers=[], metadata=metadata)]
    images, losses, seconds, load = [], [], [], [os.getloadavg()[0]]
    victims = list(job["victims"])
    for _calls, v in enumerate([None] * int(job.get("warmup", 0)) + victims):
        w = victims[0] if v is None else v  # warm-up calls (untimed) attack the first victim with a few iterations
        shared = [
            dict(
                gradients=[prob["gradients"][n][w].clone() for n in names],
                buffers=None,
                metadata=dict(num_data_points=1, labels=prob["labels"][w : w + 1].clone(), local_hyperparams=None),
            )
        ]
        init = prob["init"][w : w + 1].clone()
        if v is None:
            attacker.cfg.optim.max_iterations = int(job.get("warmup_iterations", 5))
        else:
            attacker.cfg.optim.max_iterations = int(job["iterations"])
        started = time.perf_counter()
        with _quiet():
            rec, stats = attacker.reconstruct(payload, shared, server_secrets={}, initial_data=init)
        took = time.perf_counter() - started
        if v is None:
            continue
        seconds.append(took)
        images.append((rec["data"].detach() * std + mean).clamp(0, 1))
        losses.append(min(stats["Trial_0_Val"]))  # the best objective value seen (what breaching keeps)
    load.append(os.getloadavg()[0])
    out = Path(job["out"])
    torch.save({"images": torch.cat(images), "loss": torch.tensor(losses)}, out.with_suffix(".pt"))
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "side": "breaching",
                "seconds": seconds,
                "load": load,
                "patched_tv": patched,
                "torch": torch.__version__,
                "breaching": _version("breaching"),
                "threads": torch.get_num_threads(),
                "iterations": int(job["iterations"]),
                "victims": victims,
            }
        )
    )


class _quiet:
    """breaching prints ("Loading attack configuration ...") and warns; keep the worker's output for errors."""

    def __enter__(self):
        self._stdout, sys.stdout = sys.stdout, open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.filterwarnings("ignore")
    logging.getLogger("breaching").setLevel(logging.WARNING)
    jobs = json.loads(Path(sys.argv[1]).read_text())["jobs"]
    with _quiet():
        import breaching  # noqa: F401 - its import-time prints and torch.jit.script warnings, not timed
    for job in jobs:
        run_job(job)


if __name__ == "__main__":
    main()
