"""When compiling the attack's program pays (`attack.compile=auto`), and running it compiled.

torch.compile makes an iteration of the eager loop 2-4x faster on a CPU (the factored eager program, which takes
small MLPs and CNNs, about as fast as compiled) but costs 20-45 s the first time for a small model (minutes
for the ViT), a few seconds from a warm cache. A short run does not repay that; a long one does. The rule, decided
before the first iteration so that `auto` gives exactly the result of the path it takes:

    compile when  horizon x t_eager x (1 - 1 / speedup)  >  compile_s

t_eager is measured (two evaluations of the eager program at the start, which change nothing), horizon is the
program's iteration budget, and compile_s and speedup come from the last compile of the same program on this
machine (`CostBook`, a JSON file beside torch.compile's own cache), else from a guess by the model's size
(`cold_guess`) and a conservative `SPEEDUP` (measured in docs/benchmarks.md). The same book gives the notice
before a compile its expected time. After every compile its first-call time and its
per-iteration time go into the book, so the next decision knows them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from dia.files import write_text

log = logging.getLogger("dia")
SPEEDUP = 2.5  # compiled vs the eager loop per iteration when nothing is known (measured 2.2-4x on a CPU)
# compiled vs the factored eager program (attack.eager=factored): no faster on a CPU for the models it takes (MLP,
# small CNN at 8 rows: 0.94-0.97x, docs/benchmarks.md), so a guess never compiles it; a compile the book knows of
# (attack.compile=true before) decides by its measured speed. On a GPU (not measured yet: benchmarks/gpu.sh eager)
# the eager program is launch-bound and SPEEDUP is the guess.
FACTORED_SPEEDUP = 1.0
BOOK = "dia-compile-costs.json"


def cache_dir() -> Path | None:
    """torch.compile's persistent cache folder (TORCHINDUCTOR_CACHE_DIR, else torch's default), None if unknown."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir as torch_cache_dir

        return Path(torch_cache_dir())
    except Exception:  # a private helper of torch: without it, no book
        return None


def book_dir() -> Path | None:
    """Where the cost book lives: $DIA_COMPILE_BOOK_DIR (a test suite gives each test its own, so that no
    earlier test's compile decides a later test's path), else beside torch.compile's cache."""
    return Path(os.environ["DIA_COMPILE_BOOK_DIR"]) if os.environ.get("DIA_COMPILE_BOOK_DIR") else cache_dir()


class CostBook:
    """Per program signature: the last compile's first-call seconds and its compiled and eager seconds per
    iteration. A missing or unreadable book is an empty one; writing it never fails a run."""

    def __init__(self, folder: Path | None) -> None:
        self.path = None if folder is None else Path(folder) / BOOK

    def read(self) -> dict[str, dict[str, float]]:
        try:
            data = json.loads(self.path.read_text()) if self.path is not None and self.path.is_file() else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, signature: str) -> dict[str, float]:
        entry = self.read().get(signature, {})
        return entry if isinstance(entry, dict) else {}

    def put(self, signature: str, **values: float) -> None:
        if self.path is None:
            return
        data = self.read()
        entry = data.get(signature)
        data[signature] = {
            **(entry if isinstance(entry, dict) else {}),
            **{k: round(float(v), 6) for k, v in values.items()},
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass


def signature(model: torch.nn.Module, flat: torch.Tensor, key: Any) -> str:
    """What makes two programs the same compiled program: the model's class and parameter shapes, the rows and
    columns of the state, `key` (objective, sites, roles, compile mode), the device type and torch's version."""
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    where = [flat.device.type, torch.__version__]
    text = json.dumps([type(model).__qualname__, shapes, tuple(flat.shape), repr(key), where], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seconds_per_call(fn: Any, arg: torch.Tensor, calls: int = 2) -> float:
    """The median wall time of `calls` calls of `fn(arg)` after one untimed call (which pays one-time costs)."""
    fn(arg)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cold_guess(model: torch.nn.Module, device: torch.device) -> float:
    """A rough guess of a first compile's seconds from the model's size, its leaf modules (measured: the MLP's 11
    about 40 s, the ViT's 48 about 100-150 s on an idle 2-core CPU; 13 s and 52 s on an H200)."""
    leaves = sum(1 for m in model.modules() if not any(True for _ in m.children()))
    return (5 + 1.0 * leaves) if device.type == "cuda" else (15 + 2.5 * leaves)


def about(seconds: float) -> str:
    """'40 s', '2.5 min': a duration as a person reads an estimate."""
    if seconds < 90:
        return f"{max(1, round(seconds / 5) * 5) if seconds >= 10 else max(1, round(seconds))} s"
    return f"{seconds / 60:.1f} min"


def pays(
    *, horizon: int, t_eager: float, known: dict[str, float], cold: float, speedup: float = SPEEDUP
) -> tuple[bool, str]:
    """Whether compiling repays itself over `horizon` iterations, and the reason in words (`cold`: a first
    compile's seconds when the book knows none; `speedup`: compiled vs eager when the book knows none)."""
    compile_s = known.get("compile_s", cold)
    if known.get("t_compiled"):  # measured: against the eager time measured beside it, else against this one
        speedup = known.get("t_eager", t_eager) / known["t_compiled"]
    eager = horizon * t_eager
    compiled = compile_s + eager / speedup
    source = "measured before" if "compile_s" in known else "a first compile's estimate"
    why = (
        f"{horizon} iterations: eager ~{eager:.0f} s, compiled ~{compiled:.0f} s ({compile_s:.0f} s to compile, "
        f"{source}; {speedup:.1f}x faster after)"
    )
    return eager > compiled, why


class CompiledOrEager:
    """`torch.compile(fn)`, falling back to `eager` (with one notice) when compilation fails and not `strict`.

    Before the first call one notice says what is coming: a compile of about the seconds this program took last
    time (`book`), else of `guess` seconds. `compile_s` is the wall time of the first call (tracing + compiling, or
    loading from the persistent cache, plus one run), logged as a notice; it and the per-iteration time of the
    next calls go into `book`.
    """

    def __init__(
        self,
        fn: Any,
        *,
        strict: bool,
        mode: str = "default",
        eager: Any = None,
        book: CostBook | None = None,
        signature: str = "",
        guess: float | None = None,
    ) -> None:
        self.eager, self.strict, self.guess = eager if eager is not None else fn, strict, guess
        self.compiled: Any = torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
        self.compile_s: float | None = None
        self.book, self.signature, self.times = book, signature, []

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args)
        try:
            if self.compile_s is not None:
                return self._timed(*args)
            self.announce()
            started = time.perf_counter()
            out = self.compiled(*args)
            self.compile_s = time.perf_counter() - started
            log.info("torch.compile: first call %.1f s", self.compile_s)
            if self.book is not None:
                self.book.put(self.signature, compile_s=self.compile_s)
            return out
        except Exception as exc:  # no compiler toolchain, an unsupported op, ...
            if self.strict:
                raise
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            warnings.warn(
                f"torch.compile failed ({type(exc).__name__}: {first}); "
                "running eagerly (set attack.compile=false to skip the attempt)",
                stacklevel=2,
            )
            self.compiled = None
            return self.eager(*args)

    def announce(self) -> None:
        """One notice before the first call: about how long it takes, and where the compiled program is cached."""
        folder = cache_dir()
        where = f"cached in {folder}" if folder is not None else "not cached on disk"
        last = self.book.get(self.signature).get("compile_s") if self.book is not None else None
        if isinstance(last, (int, float)):
            message = f"compiling the attack program (~{about(last)}, as the last time on this machine; {where})"
        else:
            guess = f"~{about(self.guess)}, a rough guess" if self.guess else "a minute or more"
            message = f"compiling the attack program (first time for this model and shape: {guess}; {where})"
        log.info(message)

    def _timed(self, *args: Any) -> Any:
        """A compiled call; the 10 calls after the first are timed for the book (no host sync is added: the CPU
        program returns when it is done; on a GPU the time is the launch, an underestimate the rule tolerates)."""
        if len(self.times) >= 10:
            return self.compiled(*args)
        started = time.perf_counter()
        out = self.compiled(*args)
        self.times.append(time.perf_counter() - started)
        if len(self.times) == 10 and self.book is not None:
            self.book.put(self.signature, t_compiled=statistics.median(self.times))
        return out


__all__ = [
    "CompiledOrEager",
    "CostBook",
    "pays",
    "signature",
    "seconds_per_call",
    "cache_dir",
    "book_dir",
    "cold_guess",
    "about",
]
