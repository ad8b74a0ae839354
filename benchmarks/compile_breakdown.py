"""Where a cold torch.compile of the attack program spends its time, and what the compiled iteration then costs.

    python benchmarks/compile_breakdown.py                                   # the ViT, IG, 4 CIFAR-10 victims, p = 0.5
    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/compile_breakdown.py   # one compile worker
    TORCHINDUCTOR_VEC_ISA_OK=0 python benchmarks/compile_breakdown.py        # scalar C++ kernels (faster to compile)
    python benchmarks/compile_breakdown.py model=mlp data=mnist              # any dia.train overrides

Builds the program as dia.bench does (`dia.api.simulate`, `dia.bench.engine_module`; attack.compile=true), with
an empty compile cache of its own (a temporary TORCHINDUCTOR_CACHE_DIR), times the first iteration (trace + compile
+ one run) and the mean of 5 later ones, and prints torch._dynamo's compile-time breakdown (tracing, AOT autograd,
inductor's scheduler and code generation, the C++ compile). Inductor's settings come from its environment
variables. A benchmark, not a test.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dia-compile-breakdown-")

import torch
from torch._dynamo.utils import compile_times

from dia.api import simulate
from dia.bench import engine_module, engine_steps

SHOWN = (
    "_compile.compile_inner",
    "bytecode_tracing",
    "create_aot_dispatcher_function",
    "GraphLowering.run",
    "Scheduler.__init__",
    "Scheduler.codegen",
    "compile_file",
    "PyCodeCache.load_by_key_path",
)


def main() -> None:
    defaults = ["attack=ig", "model=vit", "data=cifar10", "model.dropout=0.5", "victims=[0,1,2,3]"]
    sim = simulate(*defaults, *sys.argv[1:], "attack.compile=true")
    cpu = torch.device("cpu")
    program = engine_module(sim.cfg.attack.name, sim.model, sim.problems, sim.cfg, sim.lower, sim.upper, cpu)
    started = time.perf_counter()
    engine_steps(program, 1)
    first = time.perf_counter() - started
    engine_steps(program, 1)
    started = time.perf_counter()
    engine_steps(program, 5)
    later = (time.perf_counter() - started) / 5
    threads = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "torch's default")
    print(f"torch {torch.__version__}, compile workers: {threads}, torch threads {torch.get_num_threads()}")
    print(f"first iteration (trace + compile + run): {first:.1f} s; later iterations: {later:.3f} s each")
    times = dict(
        line.split(", ") for line in compile_times(repr="str", aggregate=True).splitlines()[2:] if line.count(", ") == 1
    )
    for name in SHOWN:
        if name in times:
            print(f"  {name}: {float(times[name]):.1f} s")


if __name__ == "__main__":
    main()
