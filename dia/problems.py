"""K attack problems: what the server holds for each client (gradient, labels) plus evaluation-only truth."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class LocalTraining:
    """A FedAvg client's local training, as the server configures it: `steps` (T) plain SGD steps with learning
    rate `lr`, each on `batch` of the client's B images (consecutive chunks, step t takes chunk t mod B/batch;
    None: the whole batch every step), each drawing fresh dropout masks. Its target is (w_0 - w_T) / lr, the
    sum of the T gradients along the trajectory; a site's masks per problem are the T steps' masks stacked
    along the batch axis, (T * batch, ...)."""

    steps: int
    lr: float
    batch: int | None = None

    def images(self, step: int, total: int) -> slice:
        """The images (of `total`) local step `step` trains on."""
        b = self.batch or total
        chunk = step % (total // b)
        return slice(chunk * b, (chunk + 1) * b)

    def per_step(self, total: int) -> int:
        return self.batch or total

    @classmethod
    def of(cls, client: Any, images: int) -> LocalTraining | None:
        """The `client` config section for clients of `images` images as local training; None for one full-batch
        step (FedSGD, bit for bit)."""
        if client is None:
            return None
        batch = None if client.local_batch in ("full", images) else int(client.local_batch)
        if int(client.local_steps) == 1 and batch is None:
            return None
        return cls(int(client.local_steps), float(client.local_lr), batch)


@dataclass
class Problems:
    """One problem = one shared gradient computed by a client on its own batch of B victims."""

    targets: dict[str, Tensor]  # shared gradients, {param: (K, ...)}
    labels: Tensor  # (K, B), known to the attacker (as in the paper)
    input_shape: tuple[int, ...]  # (B, C, H, W) of one problem's batch
    mask_shapes: dict[str, tuple[int, ...]]  # per problem, batch included, for every site with p > 0
    rates: dict[str, float]  # dropout probability of each site with p > 0
    kinds: dict[str, str]  # kind of each site with p > 0: module | functional | drop_path
    seeds: list[int]  # one seed per problem for the attacker's random initialisation
    true_masks: dict[str, Tensor] | None = None  # the client's masks {site: (K, B, ...)}: WIIG and evaluation only
    lower: Tensor | None = None  # the valid image range in the attack's (normalized) space, (C, 1, 1): public
    upper: Tensor | None = None
    # FedAvg: the client's T local steps (public: the server sets them); None: FedSGD
    local: LocalTraining | None = None

    @property
    def num_problems(self) -> int:
        return self.labels.shape[0]

    def public(self) -> Problems:
        """What an honest-but-curious server sees: no client masks."""
        return replace(self, true_masks=None)

    def subset(self, index: list[int]) -> Problems:
        pick = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            targets={n: t[pick] for n, t in self.targets.items()},
            labels=self.labels[pick],
            seeds=[self.seeds[i] for i in index],
            true_masks=None if self.true_masks is None else {n: m[pick] for n, m in self.true_masks.items()},
        )

    def to(self, device: torch.device | str) -> Problems:
        return replace(
            self,
            targets={n: t.to(device) for n, t in self.targets.items()},
            labels=self.labels.to(device),
            true_masks=None if self.true_masks is None else {n: m.to(device) for n, m in self.true_masks.items()},
            lower=None if self.lower is None else self.lower.to(device),
            upper=None if self.upper is None else self.upper.to(device),
        )


def problem_seed(seed: int, index: int) -> int:
    """A per-problem seed, so a problem's randomness does not depend on how problems are grouped."""
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


def infer_labels(targets: dict[str, Tensor], num_classes: int) -> Tensor:
    """Each problem's label from its shared gradient, for batch size 1 (the last-layer sign rule of iDLG).

    For cross-entropy, the last linear layer's weight gradient is (softmax - onehot) outer h: every class
    row is a multiple of the same vector h, positive for wrong classes and negative for the true one. The
    true label is the row whose direction disagrees with all others. Uses the last 2-D parameter with
    `num_classes` rows (the classifier); returns (K,).
    """
    last = [g for g in targets.values() if g.dim() == 3 and g.shape[1] == num_classes]
    if not last:
        raise ValueError(f"no classifier weight with {num_classes} rows among the gradients")
    rows = last[-1]  # (K, C, D)
    anchor = rows.gather(1, rows.norm(dim=2).argmax(1).view(-1, 1, 1).expand(-1, 1, rows.shape[2]))
    sign = torch.sign((rows * anchor).sum(2))  # (K, C): +1 along the anchor, -1 against it
    against = sign < 0
    # If the anchor is the true row, every other row is against it; else only the true row is.
    only_one_against = against.sum(1) == 1
    return torch.where(only_one_against, against.float().argmax(1), (~against).float().argmax(1))
