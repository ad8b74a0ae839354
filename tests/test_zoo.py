"""Model zoo: every model's client masks, replayed, reproduce the client's gradient (and withheld, do not).

Covers our models (mlp, vit, vit_b16, cnn), the timm-based ones (resnet18, timm:<arch> for a ViT, a ResNet
and a ConvNeXt), and the capture mechanisms behind them: module sites, drop-path sites and functional sites
(`F.dropout` calls, fused attention).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dia.config import compose, group_settings
from dia.errors import UserError
from dia.gradients import client_gradients, problem_gradients
from dia.models import build_for, build_model, describe_sites, dropout_control, dropout_sites, site_parts
from dia.models.capture import UncapturableModel, make_capturable
from dia.models.dropout import name_sites


def model_settings(name: str, **settings):
    return group_settings("model", name, **settings)


def _unchecked(cfg, **values):
    """Settings with values the config checks would refuse (the builder must refuse them too)."""
    for k, v in values.items():
        cfg[k] = v
    return cfg


# name: (config, channels, image size, site kinds that must be present)
ZOO = {
    "mlp": (model_settings("mlp", dropout=0.3, width=64), 1, 28, {"module"}),
    "vit": (model_settings("vit", dropout=0.3, dim=32, heads=4, depth=2, mlp_dim=32), 3, 32, {"module"}),
    "cnn-mnist": (model_settings("cnn", dropout=0.3), 1, 28, {"module"}),
    "cnn-cifar": (model_settings("cnn", dropout=0.3), 3, 32, {"module"}),
    "resnet18": (model_settings("resnet18", dropout=0.3, drop_path=0.2), 3, 32, {"functional", "drop_path"}),
    "vit_b16-small": (model_settings("vit_b16", dropout=0.3, dim=32, depth=2, heads=4, mlp_dim=64), 3, 32, {"module"}),
    "timm-vit_tiny": (
        model_settings("timm", arch="vit_tiny_patch16_224", dropout=0.3, drop_path=0.2),
        3,
        32,
        {"module", "drop_path"},
    ),
    "timm-resnet10t": (
        model_settings("timm", arch="resnet10t", dropout=0.3, drop_path=0.2),
        3,
        32,
        {"functional", "drop_path"},
    ),
    "timm-convnext_atto": (
        model_settings("timm", arch="convnext_atto", dropout=0.3, drop_path=0.2),
        3,
        32,
        {"module", "drop_path"},
    ),
}
HEAVY = {"resnet18", "timm-convnext_atto"}  # one problem is enough to check them; saves CPU time


def _attacker_copy(model: nn.Module) -> nn.Module:
    """What the attacks run: a deep copy in eval mode, BatchNorm as dia.attacks.ig sets it up."""
    attacker = copy.deepcopy(model).eval().requires_grad_(False)
    torch.func.replace_all_batch_norm_modules_(attacker)
    return attacker


def _replay_check(
    model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """K problems: the client's masks replayed (vectorized, on the attacker's copy) give the client's gradient;
    without them ("off") the gradient differs."""
    k = xs.shape[0]
    outs = [client_gradients(model, xs[i], ys[i], generator=torch.Generator().manual_seed(10 + i)) for i in range(k)]
    assert set(outs[0][1]) == set(dropout_sites(model, active_only=True)), "every active site records a mask"
    masks = {n: torch.stack([o[1][n] for o in outs]) for n in outs[0][1]}
    attacker = _attacker_copy(model)
    params = {n: p.detach() for n, p in attacker.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap, not the sequential fallback
        replay = problem_gradients(attacker, params, xs, ys, masks, "replay")
        off = problem_gradients(attacker, params, xs, ys, None, "off")
    for i in range(k):
        for n, g in outs[i][0].items():
            torch.testing.assert_close(
                replay[n][i], g, rtol=rtol, atol=atol, msg=lambda m, n=n, i=i: f"{n}, problem {i}: {m}"
            )
    gap = max((off[n][0] - g).abs().max().item() for n, g in outs[0][0].items())
    assert gap > 1e-3, "with p>0, the gradient without the client's masks must differ"


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_replayed_masks_reproduce_client_gradient_and_withheld_masks_do_not(name):
    cfg, c, s, kinds = ZOO[name]
    model = build_model(cfg, channels=c, image_size=s, num_classes=10, seed=0)
    found = {site.kind for site in dropout_sites(model, active_only=True).values()}
    assert kinds <= found, f"{name}: expected site kinds {kinds}, found {found}"
    k = 1 if name in HEAVY else 2  # K problems of B=2 each (one problem is still vmapped)
    xs = torch.randn(k, 2, c, s, s, generator=torch.Generator().manual_seed(0))
    _replay_check(model, xs, torch.tensor([[3, 7], [1, 1]])[:k])


def test_native_batch_norm_replays_with_batch_statistics():
    model = build_model(
        model_settings("timm", arch="resnet10t", dropout=0.3, batch_norm="native"),
        channels=3,
        image_size=32,
        num_classes=10,
        seed=0,
    )
    _replay_check(model, torch.randn(1, 2, 3, 32, 32), torch.tensor([[3, 7]]), rtol=1e-4, atol=1e-5)


def test_sites_are_named_like_the_models_and_described_by_kind():
    vit = build_model(
        model_settings("timm", arch="vit_tiny_patch16_224", drop_path=0.1),
        channels=3,
        image_size=32,
        num_classes=10,
        seed=0,
    )
    rows = {r["site"]: r for r in describe_sites(vit, torch.zeros(1, 3, 32, 32))}
    for site in (
        "pos_drop",
        "blocks.0.attn.attn_drop",
        "blocks.0.attn.proj_drop",
        "blocks.0.mlp.drop1",
        "blocks.0.mlp.drop2",
    ):
        assert rows[site]["kind"] == "module" and rows[site]["p"] == 0.25
    assert rows["blocks.0.attn.attn_drop"]["mask_shape"] == [3, 5, 5]  # heads, tokens, tokens
    assert rows["blocks.1.drop_path1"]["kind"] == "drop_path" and rows["blocks.1.drop_path1"]["mask_shape"] == [1, 1]
    resnet = build_model(model_settings("resnet18"), channels=3, image_size=32, num_classes=10, seed=0)
    (head,) = [r for r in describe_sites(resnet, torch.zeros(1, 3, 32, 32)) if r["kind"] == "functional"]
    assert (
        head["site"] == "functional_dropout"
        and head["mask_shape"] == [512]
        and "F.dropout in forward_head()" in head["captured_by"]
    )


def test_site_parts_tell_embedding_attention_and_mlp_sites_apart():
    ours = build_model(
        model_settings("vit", dim=32, heads=4, depth=2, mlp_dim=32), channels=3, image_size=32, num_classes=10, seed=0
    )
    timm_vit = build_model(
        model_settings("timm", arch="vit_tiny_patch16_224", drop_path=0.1),
        channels=3,
        image_size=32,
        num_classes=10,
        seed=0,
    )
    mlp = build_model(model_settings("mlp", width=16), channels=1, image_size=28, num_classes=10, seed=0)
    for model, depth in ((ours, 2), (timm_vit, 12)):
        parts = site_parts(dropout_sites(model, active_only=True))
        counts = {p: sum(v == p for v in parts.values()) for p in set(parts.values())}
        assert counts["embedding"] == 1 and counts["attention"] == counts["attention_out"] == depth
        assert counts["mlp"] == 2 * depth
        for name, part in parts.items():  # the attention-weight sites are those whose masks are (heads, tokens, tokens)
            assert (part == "attention") == name.endswith("attn_drop")
    assert site_parts(dropout_sites(timm_vit, active_only=True))["blocks.1.drop_path1"] == "drop_path"
    assert set(site_parts(dropout_sites(mlp)).values()) == {"hidden"}


def _vit_b16_parameter_shapes(channels: int = 3, size: int = 224, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The paper's ViT-B/16 from its description: linear patch embedding, randn class token and position
    embedding, 12 pre-norm blocks (LayerNorm, qkv without bias, output projection; LayerNorm, MLP 3072),
    LayerNorm + linear head."""
    dim, depth, mlp, tokens = 768, 12, 3072, (size // 16) ** 2 + 1
    shapes = {
        "to_patch_embedding.weight": (dim, channels * 16 * 16),
        "to_patch_embedding.bias": (dim,),
        "pos_embedding": (1, tokens, dim),
        "cls_token": (1, 1, dim),
    }
    for i in range(depth):
        a, f = f"blocks.{i}.0", f"blocks.{i}.1.net"
        shapes |= {
            f"{a}.norm.weight": (dim,),
            f"{a}.norm.bias": (dim,),
            f"{a}.to_qkv.weight": (3 * dim, dim),
            f"{a}.to_out.weight": (dim, dim),
            f"{a}.to_out.bias": (dim,),
            f"{f}.0.weight": (dim,),
            f"{f}.0.bias": (dim,),
            f"{f}.1.weight": (mlp, dim),
            f"{f}.1.bias": (mlp,),
            f"{f}.4.weight": (dim, mlp),
            f"{f}.4.bias": (dim,),
        }
    return shapes | {
        "head.0.weight": (dim,),
        "head.0.bias": (dim,),
        "head.1.weight": (classes, dim),
        "head.1.bias": (classes,),
    }


def test_vit_b16_is_the_papers_model_at_b16_size():
    cfg = compose(["model=vit_b16", "data=imagenet", "run.seed=43"])
    model = build_for(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == _vit_b16_parameter_shapes()  # no qkv bias, no conv, no extra norms
    assert sum(p.numel() for p in model.parameters()) == 86_540_008
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    sites = dropout_sites(model, active_only=True)
    assert len(sites) == 1 + 12 * 4 and {s.p for s in sites.values()} == {cfg.model.dropout}
    parts = site_parts(sites)
    assert [sum(v == p for v in parts.values()) for p in ("embedding", "attention", "attention_out", "mlp")] == [
        1,
        12,
        12,
        24,
    ]
    # randn class token and position embedding (not timm's truncated normal with std 0.02)
    assert 0.9 < model.pos_embedding.std().item() < 1.1 and model.pos_embedding.abs().max() > 3


def test_vit_b16_is_the_small_vits_builder_so_one_seed_gives_the_same_weights():
    """ViT-B/16 and the small ViT are one builder: at equal sizes and seed, equal weights (so run.seed=43 gives
    the authors' weights for both); a reduced-size B/16 runs and records its masks."""
    sizes = dict(patch_size=16, dim=32, depth=2, heads=4, mlp_dim=64)
    b16 = build_model(model_settings("vit_b16", **sizes), channels=3, image_size=64, num_classes=10, seed=43)
    small = build_model(model_settings("vit", **sizes), channels=3, image_size=64, num_classes=10, seed=43)
    for (n, a), b in zip(b16.state_dict().items(), small.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    with torch.no_grad(), dropout_control(b16, "record") as ctl:
        assert b16(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    assert ctl.masks["blocks.1.0.attn_drop"].shape == (2, 4, 17, 17) and ctl.masks["blocks.1.1.net.3"].shape == (
        2,
        17,
        64,
    )


def test_timm_vit_b16_stays_reachable():
    cfg = compose(["model=timm", "model.arch=vit_base_patch16_224", "data=cifar10"])
    names = {n for n, _ in build_for(cfg).named_parameters()}
    assert "patch_embed.proj.weight" in names and "blocks.0.attn.qkv.bias" in names


def test_configs_build_every_zoo_model_from_the_command_line_groups():
    for args, shape in [
        (["model=cnn", "data=cifar10"], (1, 10)),
        (["model=resnet18", "data=mnist"], (1, 10)),
        (["model=timm", "model.arch=convnext_atto", "data=cifar10", "model.drop_path=0.1"], (1, 10)),
    ]:
        cfg = compose(args)
        model = build_for(cfg)
        assert model(torch.zeros(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)).shape == shape


def test_cnn_takes_any_size_from_28_up():
    for c, s in [(1, 28), (3, 32), (3, 64), (1, 45)]:
        model = build_model(model_settings("cnn"), channels=c, image_size=s, num_classes=7, seed=0)
        assert model(torch.zeros(2, c, s, s)).shape == (2, 7)
    with pytest.raises(UserError, match="at least 28x28"):
        build_model(model_settings("cnn"), channels=1, image_size=16, num_classes=10, seed=0)


# ---- functional dropout ----------------------------------------------------------------------------------


def _helper_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training)


class FunctionalNet(nn.Module):
    """Dropout only through functional calls: two in forward, one through a helper function."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(torch.tanh(self.a(x.flatten(1))), p=0.3, training=self.training)
        x = F.dropout(torch.tanh(self.b(x)), p=0.2, training=self.training)
        return self.c(_helper_dropout(x, 0.4, self.training))


class SDPAttention(nn.Module):
    """Attention through F.scaled_dot_product_attention's own dropout_p, with no fused_attn switch."""

    def __init__(self, dim: int = 8, heads: int = 2, p: float = 0.3) -> None:
        super().__init__()
        self.heads, self.p = heads, p
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.head(self.proj(out.transpose(1, 2).reshape(b, n, d)).mean(1))


def test_functional_dropout_calls_become_sites_and_replay_exactly():
    model = name_sites(make_capturable(FunctionalNet(), torch.randn(2, 12)))
    sites = dropout_sites(model)
    assert sorted(sites) == ["functional_dropout", "functional_dropout_1", "functional_dropout_2"]
    assert {s.kind for s in sites.values()} == {"functional"} and sorted(s.p for s in sites.values()) == [0.2, 0.3, 0.4]
    assert "_helper_dropout" in sites["functional_dropout_2"].origin
    _replay_check(model, torch.randn(2, 3, 12), torch.tensor([[0, 1, 2], [3, 4, 0]]))
    model.train()  # outside a dropout_control block the model's own calls run: random in train mode
    x = torch.randn(4, 12)
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    assert F.dropout is torch.nn.functional.dropout and F.dropout.__name__ == "dropout"  # routing is undone


def test_fused_attention_dropout_is_captured():
    from timm.models.vision_transformer import Block

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.block, self.head = (
                nn.Linear(6, 16),
                Block(16, num_heads=2, attn_drop=0.3, proj_drop=0.2),
                nn.Linear(16, 4),
            )

        def forward(self, x):
            return self.head(self.block(self.embed(x)).mean(1))

    net = Net()
    assert net.block.attn.fused_attn, "timm uses F.scaled_dot_product_attention here by default"
    net = name_sites(make_capturable(net, torch.randn(2, 5, 6)))
    sites = dropout_sites(net, active_only=True)
    assert "block.attn.attn_drop" in sites and sites["block.attn.attn_drop"].p == 0.3
    with torch.no_grad(), dropout_control(net, "record") as ctl:
        net(torch.randn(2, 5, 6))
    assert ctl.masks["block.attn.attn_drop"].shape == (2, 2, 5, 5)
    _replay_check(net, torch.randn(2, 2, 5, 6), torch.tensor([[0, 1], [2, 3]]))

    sdpa = name_sites(make_capturable(SDPAttention(), torch.randn(2, 5, 8)))  # no flag: the call itself is routed
    (name,) = dropout_sites(sdpa, active_only=True)
    assert name == "functional_attn_drop" and sdpa.functional_attn_drop.p == 0.3
    _replay_check(sdpa, torch.randn(2, 2, 5, 8), torch.tensor([[0, 1], [2, 0]]), rtol=1e-4, atol=1e-6)


def test_randomness_nobody_captures_is_refused():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x) + 0.1 * torch.randn(2)

    with pytest.raises(UncapturableModel, match="still random"):
        make_capturable(Noisy(), torch.randn(2, 4))


def test_drop_path_sites_keep_or_drop_whole_samples():
    model = build_model(
        model_settings("timm", arch="convnext_atto", drop_path=0.5), channels=3, image_size=32, num_classes=10, seed=0
    )
    paths = {n: s for n, s in dropout_sites(model, active_only=True).items() if s.kind == "drop_path"}
    assert len(paths) == 11  # convnext_atto: 2+2+6+2 blocks, the first at rate 0
    with torch.no_grad(), dropout_control(model, "record", generator=torch.Generator().manual_seed(0)) as ctl:
        model(torch.randn(64, 3, 32, 32))
    last = ctl.masks["stages.3.blocks.1.drop_path"]
    assert last.shape == (64, 1, 1, 1) and 0.3 < last.mean().item() < 0.7


# ---- user errors -----------------------------------------------------------------------------------------


def test_unknown_timm_arch_is_one_line_with_suggestions():
    with pytest.raises(UserError) as err:
        build_model(model_settings("timm", arch="resnet_18"), channels=3, image_size=32, num_classes=10, seed=0)
    msg = str(err.value)
    assert "\n" not in msg and "unknown timm model 'resnet_18'" in msg and "resnet18" in msg
    with pytest.raises(UserError, match="convnext_atto"):
        build_model(model_settings("timm", arch="convnext_ato"), channels=3, image_size=32, num_classes=10, seed=0)


@pytest.mark.parametrize(
    "cfg, size, match",
    [
        (model_settings("timm", arch="convnext_atto"), 28, "cannot take 1x28x28 inputs"),
        (model_settings("timm", arch="vit_tiny_patch16_224"), 28, "does not divide the input size 28"),
        (model_settings("vit_b16", dim=32, depth=1, heads=4, mlp_dim=32), 28, "does not divide the input size 28"),
        (model_settings("timm", arch="convnext_atto", attn_dropout=0.2), 32, "no attention dropout sites"),
        (_unchecked(model_settings("timm", arch="vit_tiny_patch16_224"), drop_path=1.5), 32, "model.drop_path=1.5"),
    ],
)
def test_inputs_a_model_cannot_take_are_user_errors(cfg, size, match):
    with pytest.raises(UserError, match=match) as err:
        build_model(cfg, channels=1, image_size=size, num_classes=10, seed=0)
    assert "\n" not in str(err.value)


def test_timm_checkpoint_round_trip(tmp_path):
    cfg = model_settings("timm", arch="resnet10t", drop_path=0.1)
    model = build_model(cfg, channels=3, image_size=32, num_classes=10, seed=1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    cfg.checkpoint = str(tmp_path / "w.pt")
    other = build_model(cfg, channels=3, image_size=32, num_classes=10, seed=2)
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n


def test_dropout_does_not_import_capture():
    """dia.models.capture builds on dia.models.dropout, never the other way round (no import cycle)."""
    import ast
    import inspect

    import dia.models.dropout as dropout_module

    tree = ast.parse(inspect.getsource(dropout_module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not any(m and "capture" in m for m in imported), imported
