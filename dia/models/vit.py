"""The paper's Vision Transformers (lucidrains' vit-pytorch layout, as in the paper's code), at two sizes.

* ``vit``: the small ViT for 32x32 inputs (patch 4, width 256, depth 4, 16 heads, MLP 256);
* ``vit_b16``: the same model at ViT-B/16 size (patch 16, width 768, depth 12, 12 heads, MLP 3072), the
  paper's ImageNet model.

Linear patch embedding, class token and position embedding drawn from randn, qkv without bias, pre-norm
blocks (LayerNorm eps 1e-5), a LayerNorm + linear head on the class token. Dropout on the embeddings, the
attention weights, the attention output and after both MLP sublayers. Written out by hand (not timm) so
that the parameters are created in the paper's order (`run.seed=43` gives the authors' weights) and the
five kinds of dropout site sit exactly where the paper's model has them. timm's ViT-B/16 (conv patch
embedding, qkv bias, ...) is `model=timm model.arch=vit_base_patch16_224`.

`model.drop_path` > 0 adds stochastic depth, which the paper's model does not have: each residual branch
(attention, MLP) of block i is dropped per sample with rate drop_path * i / (depth - 1), timm's linear
schedule, at sites `drop_paths.<i>.<0|1>` (kind drop_path). They hold no parameters, so the weights (and
`run.seed=43`'s authors' weights) are the same with or without them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from dia.errors import UserError
from dia.models import register_model, register_site_part
from dia.models.dropout import CapturableDropout, CapturableDropPath

# Which part of the network each dropout site is in (for per-part mask measures), from the site names
# of these ViTs: the embeddings, the attention weights, the attention output, the MLP sublayers.
_PARTS = (
    (re.compile(r"emb_drop"), "embedding"),
    (re.compile(r"blocks\.\d+\.0\.attn_drop"), "attention"),
    (re.compile(r"blocks\.\d+\.0\.out_drop"), "attention_out"),
    (re.compile(r"blocks\.\d+\.1\.net\.\d+"), "mlp"),
    (re.compile(r"drop_paths\.\d+\.[01]"), "drop_path"),
)


@register_site_part
def site_part(name: str) -> str | None:
    """'embedding', 'attention' (weights), 'attention_out' or 'mlp' for a site of these ViTs; None otherwise."""
    return next((part for pattern, part in _PARTS if pattern.fullmatch(name)), None)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.attn_drop = CapturableDropout(dropout)
        self.to_out = nn.Linear(inner, dim)
        self.out_drop = CapturableDropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop((q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.out_drop(self.to_out(out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            CapturableDropout(dropout),
            nn.Linear(hidden, dim),
            CapturableDropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ViT(nn.Module):
    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        num_classes: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        dim_head: int,
        dropout: float,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.to_patch_embedding = nn.Linear(channels * patch_size * patch_size, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.emb_drop = CapturableDropout(dropout)
        self.blocks = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth)
        )
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.drop_paths = (
            nn.ModuleList(nn.ModuleList([CapturableDropPath(r), CapturableDropPath(r)]) for r in rates)
            if drop_path > 0
            else None
        )

    def patchify(self, img: Tensor) -> Tensor:
        """b c (h p1) (w p2) -> b (h w) (p1 p2 c), the paper's patch layout."""
        b, c, h, w = img.shape
        p = self.patch_size
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, img: Tensor) -> Tensor:
        x = self.to_patch_embedding(self.patchify(img))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.emb_drop(x)
        for i, (attn, ff) in enumerate(self.blocks):
            if self.drop_paths is None:
                x = attn(x) + x
                x = ff(x) + x
            else:
                x = self.drop_paths[i][0](attn(x)) + x
                x = self.drop_paths[i][1](ff(x)) + x
        return self.head(x[:, 0])


@register_model("vit", "vit_b16")
def build_vit(cfg: Any, *, channels: int, image_size: int, num_classes: int) -> nn.Module:
    if image_size % cfg.patch_size:
        raise UserError(
            f"model.patch_size={cfg.patch_size} does not divide the input size {image_size}; "
            f"choose a divisor of {image_size}"
        )
    if cfg.dim % cfg.heads and cfg.dim_head is None:
        raise UserError(f"model.heads={cfg.heads} does not divide model.dim={cfg.dim}; set model.dim_head")
    return ViT(
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        patch_size=cfg.patch_size,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_dim=cfg.mlp_dim,
        dim_head=cfg.dim_head or cfg.dim // cfg.heads,
        dropout=cfg.dropout,
        drop_path=cfg.drop_path,
    )
