"""A weight gradient kept as its factors: the sum over R rows of outer products, never the (out, in) matrix.

A linear layer y = x W^T + b that sees R input rows (a problem's B images, times T tokens for a transformer)
has the weight gradient dL/dW = sum_r d_r a_r^T, where a_r is the layer's input row and d_r = dL/dy_r. When R is
small beside W's sides (one image through an MLP: R = 1, W 784 x 256), the inner product with a target matrix and
the squared norm need only the factors:

    <dL/dW, T> = sum_r d_r^T T a_r            ||dL/dW||^2 = sum_{r, s} (d_r . d_s) (a_r . a_s)

which read T once and never write an (out, in) temporary, forward or backward. That is the "ghost norm" of
differentially private training (Goodfellow 2015; Li et al. 2022, "Large Language Models Can Be Strong
Differentially Private Learners"), used here for gradient *distances* and kept differentiable: the attack
differentiates the distance through the factors back to the dummy images and masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LowRank:
    """K problems' weight gradients sum_r left[k, r] (x) right[k, r]: left (K, R, out), right (K, R, in)."""

    left: Tensor
    right: Tensor

    @property
    def shape(self) -> torch.Size:
        """The shape of the gradient it stands for, (K, out, in)."""
        return torch.Size((self.left.shape[0], self.left.shape[2], self.right.shape[2]))

    def inner(self, target: Tensor) -> Tensor:
        """<gradient_k, target_k> per problem; target (K, out, in) (or anything that views as it) -> (K,)."""
        t = target.reshape(self.shape)
        return ((self.left @ t) * self.right).sum((1, 2))

    def sq_norm(self) -> Tensor:
        """||gradient_k||^2 per problem, from the rows' Gram matrices (K,)."""
        if self.left.shape[1] == 1:
            return self.left.pow(2).sum((1, 2)) * self.right.pow(2).sum((1, 2))
        return ((self.left @ self.left.transpose(1, 2)) * (self.right @ self.right.transpose(1, 2))).sum((1, 2))

    def detach(self) -> LowRank:
        """The same gradient, cut from the autograd graph (a measured, never optimized distance)."""
        return LowRank(self.left.detach(), self.right.detach())

    def dense(self) -> Tensor:
        """The gradient itself, (K, out, in)."""
        return self.left.transpose(1, 2) @ self.right


def worth_factoring(rows: int, out_features: int, in_features: int) -> bool:
    """Whether a weight gradient of `rows` outer products is cheaper as factors: its rank is below both sides."""
    return rows < min(out_features, in_features)


__all__ = ["LowRank", "worth_factoring"]
