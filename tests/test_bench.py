"""The speed benchmark (dia.bench) and the authors'-loop baseline it compares against (dia.bench.baseline)."""

from __future__ import annotations

import pytest
import torch

from dia import bench
from dia.bench.baseline import run_baseline


@pytest.fixture(scope="module")
def mlp_setup():
    return bench.setup("mlp", 2, torch.device("cpu"))


def test_benchmark_structure() -> None:
    out = bench.benchmark(
        models=["mlp"], attacks=["dia"], ks=[1, 2], iterations=2, warmup=1, seq_problems=2, device="cpu"
    )
    assert out["device"] and out["date"] and out["iterations"] == 2
    rows = out["results"]
    assert [(r["mode"], r["k"]) for r in rows] == [
        ("baseline", 1),
        ("sequential", 1),
        ("vectorized", 1),
        ("vectorized", 2),
        ("lightning", 2),
    ]
    for r in rows:
        assert r["model"] == "mlp" and r["data"] == "mnist" and r["attack"] == "dia"
        assert r["victim_its_per_s"] > 0 and r["ms_per_iteration"] > 0 and r["speedup_vs_baseline"] > 0
        assert r["mem_per_victim_mib"] is None and r["mem_ratio_vs_baseline"] is None  # CPU: no memory figure
    assert rows[0]["speedup_vs_baseline"] == 1.0
    assert rows[3]["victim_iterations"] == 4 and rows[1]["victim_iterations"] == 4
    assert {"overhead_vs_loop", "startup_s", "steady_overhead_vs_loop"} <= set(rows[-1])
    assert all(bench.format_row(r) for r in rows)


@pytest.mark.parametrize("attack", ["ig", "dia"])
def test_baseline_matches_engine(mlp_setup, attack: str) -> None:
    """From the same start, the authors' loop and our engine (K=1) follow the same losses."""
    model, problems, lower, upper = mlp_setup
    j = 1
    module = bench.engine_module(
        attack, model, problems.subset([j]), bench.config("mlp", attack), lower, upper, torch.device("cpu")
    )
    x0 = module.state.params["x"][0].detach().clone()  # the engine's start, already clamped to the box
    masks0 = {
        k.removeprefix("mask/"): v[0].detach().clone() for k, v in module.state.params.items() if k.startswith("mask/")
    }
    assert bool(masks0) == (attack == "dia")
    found = [(p.requires_grad, p.grad) for p in model.parameters()]
    ours = bench.engine_steps(module, 6)[:, 0]
    _, theirs = run_baseline(
        model,
        {k: t[j] for k, t in problems.targets.items()},
        problems.labels[j],
        problems.rates,
        problems.mask_shapes,
        attack=attack,
        iterations=6,
        lower=lower,
        upper=upper,
        seed=problems.seeds[j],
        init_x=x0,
        init_masks=masks0 or None,
    )
    assert len(theirs) == 6
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-5, atol=2e-5)
    assert theirs[-1] < theirs[0]  # it is optimizing
    assert [(p.requires_grad, p.grad) for p in model.parameters()] == found  # model left as found


def test_baseline_draws_the_engines_start(mlp_setup) -> None:
    """Without an explicit start the baseline draws the engine's (unclamped) initial dummy from the seed."""
    model, problems, lower, upper = mlp_setup
    module = bench.engine_module(
        "dia", model, problems.subset([0]), bench.config("mlp", "dia"), lower, upper, torch.device("cpu")
    )
    x, losses = run_baseline(
        model,
        {k: t[0] for k, t in problems.targets.items()},
        problems.labels[0],
        problems.rates,
        problems.mask_shapes,
        attack="dia",
        iterations=0,
        lower=lower,
        upper=upper,
        seed=problems.seeds[0],
        input_shape=problems.input_shape,
    )
    assert losses == []
    torch.testing.assert_close(x, module.start()["x"][0])


def test_compiled_variants_are_rows_of_their_own() -> None:
    out = bench.benchmark(
        models=["mlp"],
        attacks=["ig"],
        ks=[2],
        iterations=2,
        warmup=1,
        seq_problems=1,
        device="cpu",
        lightning=False,
        compile_ks=(2,),
        variants=("default", "reduce-overhead+tf32"),
    )
    rows = out["results"]
    assert [r["mode"] for r in rows][-2:] == ["compiled", "compiled:reduce-overhead+tf32"]
    assert all(r["victim_its_per_s"] > 0 and r["compile_s"] > 0 for r in rows[-2:])
    assert torch.get_float32_matmul_precision() == "highest"  # the variant's precision does not leak out
    assert bench.variant_settings("reduce-overhead+tf32") == {
        "compile_mode": "reduce-overhead",
        "matmul_precision": "high",
    }


def test_medium_precision_reaches_onednn_only_inside_the_attack() -> None:
    """attack.matmul_precision=medium (the bench's 'bf16' variant) lets oneDNN take float32 matmuls on a CPU
    (docs/benchmarks.md); outside the attacker's program, the client's gradient stays at full precision."""
    from dia.attacks.program import matmul_precision

    assert bench.variant_settings("bf16") == {"matmul_precision": "medium"}
    assert bench.variant_settings("max-autotune") == {"compile_mode": "max-autotune"}
    with matmul_precision("medium"):
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")  # both: full float32
