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
    starts: int = 1  # R starts of every problem (`restarted`): R blocks of the same problems, start r in block r

    @property
    def clients(self) -> int:
        """How many clients' gradients these are (problems over starts)."""
        return self.num_problems // self.starts

    def restarted(self, starts: int) -> Problems:
        """Every problem `starts` times (block r: start r of every problem, in order); start 0 keeps each problem's
        seed, start r > 0 has its own (`restart_seed`), so R = 1 is the problems as they are."""
        if starts == 1 or self.starts != 1:
            return self
        out = self.subset(list(range(self.num_problems)) * starts)
        seeds = [s if r == 0 else restart_seed(s, r) for r in range(starts) for s in self.seeds]
        return replace(out, seeds=seeds, starts=starts)

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


def restart_seed(seed: int, start: int) -> int:
    """The seed of start `start` > 0 of a problem of seed `seed` (`Problems.restarted`)."""
    return (seed * 1_000_033 + start * 104_729 + 31) % (2**63 - 1)


def infer_labels(targets: dict[str, Tensor], num_classes: int, batch_size: int = 1) -> Tensor:
    """Each problem's labels from its shared gradient: (K,) for batch size 1, (K, B) for B > 1.

    B = 1, the last-layer sign rule of iDLG: for cross-entropy, the last linear layer's weight gradient is
    (softmax - onehot) outer h: every class row is a multiple of the same vector h, positive for wrong classes
    and negative for the true one. The true label is the row whose direction disagrees with all others.
    B > 1: how many images of each class the batch holds (`label_counts`), labels repeated as often as counted,
    in class order (a gradient does not say which image is which; the reconstructions are matched later).
    Uses the last 2-D parameter with `num_classes` rows (the classifier) and its bias when there is one.
    """
    if batch_size > 1:
        counts = label_counts(targets, num_classes, batch_size)
        classes = torch.arange(num_classes, device=counts.device)
        return torch.stack([classes.repeat_interleave(c) for c in counts])
    rows = _classifier(targets, num_classes)[1]  # (K, C, D)
    anchor = rows.gather(1, rows.norm(dim=2).argmax(1).view(-1, 1, 1).expand(-1, 1, rows.shape[2]))
    sign = torch.sign((rows * anchor).sum(2))  # (K, C): +1 along the anchor, -1 against it
    against = sign < 0
    # If the anchor is the true row, every other row is against it; else only the true row is.
    only_one_against = against.sum(1) == 1
    return torch.where(only_one_against, against.float().argmax(1), (~against).float().argmax(1))


def _classifier(targets: dict[str, Tensor], num_classes: int) -> tuple[str, Tensor]:
    """The classifier's weight gradient (K, C, D): the last 2-D parameter with `num_classes` rows, and its name."""
    last = [(n, g) for n, g in targets.items() if g.dim() == 3 and g.shape[1] == num_classes]
    if not last:
        raise ValueError(f"no classifier weight with {num_classes} rows among the gradients")
    return last[-1]


def label_counts(targets: dict[str, Tensor], num_classes: int, batch_size: int) -> Tensor:
    """How many of each problem's B images have each class, from the classifier's gradient: (K, C) integers
    summing to B (repeated labels included).

    With a bias (`_counts_from_bias`): with a mean cross-entropy over B images the classifier's bias gradient is
    (1/B) sum_i (p_i - onehot(y_i)), so B * db_c = P_c - n_c, the model's total probability for class c over the
    batch minus the count (iDLG's observation, counted as in Geng et al. 2021 and Yin et al. 2021). Exact as long
    as P_c is estimated to within 1/2. Without one (`_counts_without_bias`): from the weight rows' structure,
    approximate. docs/batches.md measures both.
    """
    name, rows = _classifier(targets, num_classes)
    k, c = rows.shape[:2]
    bias = targets.get(name.removesuffix("weight") + "bias") if name.endswith("weight") else None
    if bias is not None and tuple(bias.shape) == (k, c):
        return torch.stack([_counts_from_bias(batch_size * bias[i].double(), batch_size) for i in range(k)])
    return torch.stack([_counts_without_bias(rows[i].double(), batch_size) for i in range(k)])


def _counts_from_bias(v: Tensor, batch_size: int) -> Tensor:
    """Counts (C,) from v_c = B * db_c = P_c - n_c (one problem). A class the batch does not hold has v_c = P_c
    exactly; the probability mass left over, B minus theirs, is spread evenly over the others (starting from
    P_c = B / C everywhere, refined as absent classes are found); n_c = P_c - v_c, rounded to sum to B."""
    c = v.shape[0]
    mass = torch.full_like(v, batch_size / c)
    for _ in range(3):
        absent = (mass - v).round() <= 0
        if absent.all() or not absent.any():
            break
        left = (batch_size - v[absent].clamp(min=0).sum()).clamp(min=0)
        mass = torch.where(absent, v.clamp(min=0), left / (~absent).sum())
    share = (mass - v).clamp(min=0)
    return _round_to(share, share.round() > 0, batch_size)


RANK_GAP = 1e-2  # singular values below this share of the largest: noise of the probabilities, not a class


def _counts_without_bias(g: Tensor, batch_size: int) -> Tensor:
    """Counts (C,) from one problem's classifier weight gradient g (C, D) = (1/B) sum_i e_i h_i^T, e_i = p_i - onehot.

    With near-uniform p every e_i is about w_y = 1/C - onehot(y): g has the rank of the number of classes the
    batch holds (singular values above RANK_GAP of the largest), those classes are the ones whose w_c lies in its
    column space (smallest residuals), and g is about sum_c w_c f_c^T with f_c the summed features of class c's
    images: counts in proportion to |f_c| (one model's features have similar norms), at least one per class."""
    c = g.shape[0]
    u, sv, _ = torch.linalg.svd(g, full_matrices=False)
    m = max(1, min(batch_size, c - 1, int((sv > RANK_GAP * sv[0]).sum())))
    w = torch.full((c, c), 1.0 / c, dtype=g.dtype) - torch.eye(c, dtype=g.dtype)  # row c: w_c
    basis = u[:, :m]
    residual = (w - (w @ basis) @ basis.T).norm(dim=1) / w.norm(dim=1)
    present = residual.argsort()[:m]
    f, *_ = torch.linalg.lstsq(w[present].T, g)  # g ~ w[present].T @ f
    share = torch.zeros(c, dtype=g.dtype)
    share[present] = f.norm(dim=1) / f.norm(dim=1).sum() * batch_size
    return _round_to(share, share > 0, batch_size)


def _round_to(share: Tensor, present: Tensor, total: int) -> Tensor:
    """Integer counts close to `share` (C,) that sum to `total`, at least one for each `present` class (if they
    fit), none for the others: floors first, then largest remainders up (or smallest down)."""
    n = torch.where(present, share.floor().clamp(min=1), torch.zeros_like(share))
    while int(n.sum()) != total:
        up = int(n.sum()) < total
        gap = share - n
        allowed = present if up else present & (n > 1 if int(present.sum()) <= total else n > 0)
        gap = torch.where(allowed, gap, torch.full_like(gap, -float("inf") if up else float("inf")))
        j = int(gap.argmax() if up else gap.argmin())
        n[j] += 1 if up else -1
    return n.long()
