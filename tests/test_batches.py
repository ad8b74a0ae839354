"""Beyond one image per gradient (#23): the analytic first-layer leak, labels of batches with repeated labels, and
the settings that make DIA work at B > 1 and on CNNs, each refusing bad values in one line."""

from __future__ import annotations

import pytest
import torch
from helpers import attack_alone as attack

from dia import attacks, config
from dia import metrics as M
from dia.errors import UserError

QUIET = ["logger.wandb.mode=disabled", "run.progress=false"]


def _run(problems_factory, args, victims):
    cfg, model, problems, v, mean, std = problems_factory(QUIET + args, victims)
    res = attack(model, problems, cfg, lower=(0 - mean) / std, upper=(1 - mean) / std)
    return res, v, mean, std


# ---- the analytic attack -------------------------------------------------------------------------------
def test_analytic_is_exact_for_one_image_behind_a_first_linear_layer_with_bias_under_dropout(problems_factory):
    res, v, mean, std = _run(problems_factory, ["attack=analytic", "model.bias=true", "model.dropout=0.5"], [0, 1, 2])
    torch.testing.assert_close(res.x.flatten(0, 1), (v.images - mean) / std, atol=1e-4, rtol=0)
    assert res.status == ["converged"] * 3 and res.iterations.tolist() == [1, 1, 1]


def test_analytic_separates_a_batch_where_dropout_leaves_units_to_one_image(problems_factory):
    res, v, mean, std = _run(
        problems_factory, ["attack=analytic", "model.bias=true", "model.dropout=0.5", "batch_size=2"], [0, 1, 2, 3]
    )
    rec = (res.x * std + mean).clamp(0, 1)
    perms = M.match_problems(rec, v.images)
    matched = torch.cat([rec[k][p] for k, p in enumerate(perms)])
    assert M.ssim(matched, v.images).min() > 0.999


@pytest.mark.parametrize("args", [["model.bias=false"], ["model=cnn"], ["model=vit", "data=cifar10", "model.dim=32"]])
def test_analytic_is_refused_in_one_line_where_it_does_not_apply(problems_factory, args):
    cfg, _, problems, *_ = problems_factory(QUIET + ["attack=analytic", *args], [0])
    with pytest.raises(UserError, match=r"^attack=analytic: needs a first fully connected layer with a bias") as e:
        attacks.part(cfg.attack, problems)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "arg, rule",
    [
        ("attack.analytic_tol=2", "attack.analytic_tol=2.0: must be in (0, 1)"),
        ("attack.analytic_min_units=0", "attack.analytic_min_units=0: must be >= 1"),
    ],
)
def test_bad_analytic_settings_are_refused_in_one_line(arg, rule):
    with pytest.raises(UserError) as e:
        config.compose(["attack=analytic", arg])
    assert str(e.value) == rule


# ---- labels of batches ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["model.bias=true"], ["model=cnn"]])
def test_label_counts_are_exact_on_batches_with_repeated_labels(problems_factory, args):
    from dia.problems import infer_labels

    victims = [0, 2, 3, 4, 6, 8, 1, 5]  # labels 7 8 2 8 | 8 3 1 5: the first batch of 4 and the batch of 8 repeat 8
    for b in (4, 8):
        cfg, _, problems, v, _, _ = problems_factory([*args, "model.dropout=0.5", f"batch_size={b}"], victims)
        truth = v.labels.view(-1, b)
        assert any(len(set(t.tolist())) < b for t in truth)  # the batches do repeat labels
        got = infer_labels(problems.targets, cfg.data.num_classes, b)
        assert got.shape == truth.shape
        assert torch.equal(got, truth.sort(1).values), (got, truth)


def test_a_run_with_inferred_batch_labels_scores_them_after_matching(problems_factory, tmp_path):
    from dia.train import main

    args = ["attack=wiig", "model.bias=true", "batch_size=4", "victims=[0,2,3,4]", "attack.labels=infer"]
    assert main([*args, *QUIET, "attack.max_iterations=5", "attack.compile=false", f"run.output_dir={tmp_path}"]) == 0
    from dia.run import record

    m = record.read_metrics(next(tmp_path.glob("wiig-*")))
    assert m["labels"] == "infer" and sorted(r["attack_label"] for r in m["victims"]) == [2, 7, 8, 8]


# ---- restarts ---------------------------------------------------------------------------------------------
def test_restarts_keep_each_problems_best_start_and_one_start_is_todays_attack(problems_factory):
    args = ["attack=dia", "model.dropout=0.5", "attack.max_iterations=40"]
    one, v, *_ = _run(problems_factory, args, [0, 1, 2])
    again, *_ = _run(problems_factory, [*args, "attack.restarts=1"], [0, 1, 2])
    torch.testing.assert_close(again.x, one.x, rtol=0, atol=0)
    three, *_ = _run(problems_factory, [*args, "attack.restarts=3"], [0, 1, 2])
    assert three.x.shape == one.x.shape and len(three.status) == 3
    # start 0 follows the single start's trajectory (up to the rounding of a larger program)
    assert (three.best_loss <= one.best_loss * (1 + 1e-3)).all(), (three.best_loss, one.best_loss)
    assert (three.best_loss < one.best_loss).any()


def test_bad_restarts_are_refused_in_one_line():
    with pytest.raises(UserError) as e:
        config.compose(["attack.restarts=0"])
    assert str(e.value) == "attack.restarts=0: must be an integer in 1..1000"


# ---- the image prior ---------------------------------------------------------------------------------------
def test_the_l2_prior_adds_the_mean_square_and_bad_weights_are_refused(problems_factory):
    from dia.attacks import ATTACKS, settings_of

    x = torch.randn(2, 1, 1, 28, 28)
    plain = ATTACKS.get("ig")(cfg=settings_of("ig")).prior(x)
    l2 = ATTACKS.get("ig")(cfg=settings_of("ig", l2_weight=0.5)).prior(x)
    torch.testing.assert_close(l2 - plain, 0.5 * x.flatten(1).pow(2).mean(1))
    with pytest.raises(UserError) as e:
        config.compose(["attack.l2_weight=-1"])
    assert str(e.value) == "attack.l2_weight=-1.0: must be >= 0"


# ---- BatchNorm: the client's batch statistics ---------------------------------------------------------------
def test_batch_statistics_the_server_knows_are_what_the_attackers_model_computes_at_the_true_images(problems_factory):
    import copy

    from dia.gradients import problem_gradients

    args = ["model=cnn", "model.batch_norm=native", "model.bn_stats=true", "batch_size=2", "model.dropout=0.25"]
    cfg, model, problems, v, mean, std = problems_factory(QUIET + args, [0, 1])
    stats = sorted(k for k in problems.targets if k.startswith("bn/"))
    assert stats == ["bn/features.1/mean", "bn/features.1/var", "bn/features.5/mean", "bn/features.5/var"]
    twin = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(twin)  # the attacker's copy (dia.attacks.program)
    params = {n: p.detach() for n, p in twin.named_parameters()}
    x = ((v.images - mean) / std)[None]
    got = problem_gradients(twin, params, x, problems.labels, problems.true_masks, "replay")
    for k, t in problems.targets.items():
        torch.testing.assert_close(got[k], t, rtol=1e-4, atol=1e-5)


def test_the_batch_norm_prior_weighs_in_only_when_set(problems_factory):
    cnn = ["attack=ig", "model=cnn", "model.batch_norm=native", "batch_size=2", "attack.max_iterations=3"]
    plain, *_ = _run(problems_factory, cnn, [0, 1])
    off, *_ = _run(problems_factory, [*cnn, "model.bn_stats=true"], [0, 1])
    on, *_ = _run(problems_factory, [*cnn, "model.bn_stats=true", "attack.bn_weight=0.5"], [0, 1])
    torch.testing.assert_close(off.x, plain.x, rtol=0, atol=0)  # statistics sent, not weighed: as before
    assert (on.best_loss > off.best_loss).all()


@pytest.mark.parametrize(
    "args, rule",
    [
        (["attack.bn_weight=-1"], "attack.bn_weight=-1.0: must be >= 0"),
        (
            ["model=cnn", "model.bn_stats=true"],
            "model.bn_stats=true: the model has no BatchNorm; set model.batch_norm=native",
        ),
        (["model=cnn", "model.batch_norm=running"], "model.batch_norm='running': must be one of: none, native"),
        (["model=cnn", "model.conv_dropout=chan"], "model.conv_dropout='chan': must be one of: none, unit, channel"),
        (
            ["model=resnet18", "data=cifar10", "model.bn_stats=true"],
            "model.bn_stats=true: frozen BatchNorm has no batch statistics; set model.batch_norm=native",
        ),
    ],
)
def test_bad_batch_norm_and_conv_settings_are_refused_in_one_line(problems_factory, args, rule):
    with pytest.raises(UserError) as e:
        problems_factory(QUIET + args, [0, 1])
    assert str(e.value) == rule


# ---- masks at conv sites: as drawn, or per channel ---------------------------------------------------------
def test_conv_masks_per_channel_train_one_value_per_channel_and_are_scored_per_unit(problems_factory):
    from dia.scores import score

    args = ["attack=dia", "model=cnn", "model.conv_dropout=unit", "batch_size=2", "attack.max_iterations=3"]
    drawn, v, mean, std = _run(problems_factory, args, [0, 1])
    channel, *_ = _run(problems_factory, [*args, "attack.conv_masks=channel"], [0, 1])
    assert tuple(drawn.masks["features.3"].shape) == (1, 2, 6, 14, 14)
    assert tuple(channel.masks["features.3"].shape) == (1, 2, 6, 1, 1)
    assert channel.masks["classifier.0"].shape == drawn.masks["classifier.0"].shape  # 2-D sites as drawn
    _, _, problems, *_ = problems_factory(QUIET + args, [0, 1])
    rows, _ = score(channel, problems, v.images, mean, std, skip=("lpips",))
    assert all(r["mask_bal_acc"] is not None for r in rows)
    with pytest.raises(UserError) as e:
        config.compose(["attack.conv_masks=unit"])
    assert str(e.value) == "attack.conv_masks='unit': must be one of: drawn, channel"


# ---- the map's tables and figure (benchmarks/batches.py) ---------------------------------------------------
def _map_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "batches.py"
    spec = importlib.util.spec_from_file_location("batches_map", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finished_run(folder, *, model, batch, attack, ssims):
    from omegaconf import OmegaConf

    from dia.run import record

    folder.mkdir(parents=True)
    cfg = {"data": {"name": "mnist"}, "model": {"name": model, "dropout": 0.25}, "batch_size": batch}
    record.write_config(folder, OmegaConf.to_yaml({**cfg, "attack": {"name": attack}}))
    rows = [{"victim": i, "ssim": s, "iterations": 100 + i, "status": "max_iterations"} for i, s in enumerate(ssims)]
    record.write_metrics(
        folder, record.summary(status="completed", attack=attack, model=model, data="mnist", dropout=0.25, rows=rows)
    )


def test_the_map_reads_runs_of_several_result_folders_into_one_table_and_figure(tmp_path, capsys):
    """Cells pool the runs of every folder given (means and recovered counts over all their images, a table per B),
    the figure lands whole, and a figure name without an image suffix is refused before any work."""
    script = _map_script()
    _finished_run(tmp_path / "a" / "r1", model="mlp", batch=1, attack="dia", ssims=[0.9, 0.7])
    _finished_run(tmp_path / "b" / "r2", model="mlp", batch=1, attack="dia", ssims=[0.2])
    _finished_run(tmp_path / "b" / "r3", model="mlp", batch=2, attack="dia", ssims=[0.5, 0.65])
    figure = tmp_path / "map.png"
    assert script.main([str(tmp_path / "a"), str(tmp_path / "b"), "--by-batch-size", "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    assert "| mnist | mlp | 0.25 | dia | 0.60 (2/3) | 0.57 (1/2) |" in out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".map.png.tmp*"))
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "a"), "--figure", str(tmp_path / "map.jpg")])
    assert "--figure" in capsys.readouterr().err and not (tmp_path / "map.jpg").exists()
