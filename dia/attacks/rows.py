"""The rows of an attack program: which problems (of which attack, at which rate) sit in which row, and what
the attacker's copy of the model applies at each dropout site for each row.

A program optimizes K problems at once, one per row of the engine state (dia.engine). Problems come in
*parts*: the problems of one attack with one config (a run, or a group of a run's problems). Per row and
per dropout site, a part's attack says what the attacker's copy applies there (`site_role`):

* None: nothing (IG: the attacker's model runs without dropout);
* "client": the client's recorded mask (WIIG, an oracle);
* "train": a trainable mask (DIA), parametrized as `clip` (the values, clipped to [0, 1]) or `sigmoid`.

Masks are applied pre-scaled by 1/(1-p) of the rate the row's attacker uses there (`attacker_rate`: the
model's p, or DIA's `assumed_rate`; or, for rows that learn it, `sigmoid` of a trainable `rate/<site>`
logit per problem), so IG, WIIG and DIA problems at every rate
of one model share one program (a *pack*). Rows change hands while a program runs (`admit`, `release`):
stopped problems leave, waiting ones take their rows, and the tensors are written in place, so a compiled
program is not recompiled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dia.engine import STATUS, AttackResult, AttackState
from dia.problems import Problems

if TYPE_CHECKING:
    from dia.attacks.ig import InvertingGradients

MASK = "mask/"  # trainable mask parameters are named mask/<site>
RATE = "rate/"  # learned dropout rates are logits named rate/<site> (one per problem: (K, 1))
RATE_LOGITS = (-7.0, 3.0)  # learned rates stay in [0.0009, 0.953]: the scale 1/(1-p) stays finite


@dataclass(frozen=True, eq=False)  # a part is itself: rows are found by identity
class Part:
    """Problems of one attack inside a program (a program holds one part, or several: a pack).

    `attack` is the attack with its own settings (`attack.cfg`); `problems` are as its server sees them
    (`InvertingGradients.view`).
    """

    attack: InvertingGradients
    problems: Problems

    def __post_init__(self) -> None:
        """With `attack.restarts` R > 1 the part holds every problem R times (`Problems.restarted`); its result
        keeps each problem's best start (`Rows.result`)."""
        starts = int(getattr(self.attack.cfg, "restarts", 1) or 1)
        object.__setattr__(self, "problems", self.problems.restarted(starts))

    @property
    def cfg(self) -> Any:
        """The attack's own settings (an attack section of a run config, as a plain object)."""
        return self.attack.cfg

    def role(self, site: str) -> str | None:
        """What the part's rows apply at `site`: nothing where the part's model does not drop there (p = 0)."""
        return self.attack.site_role(self.problems, site) if site in self.problems.mask_shapes else None

    def check_view(self) -> None:
        if self.problems.true_masks is not None and not self.attack.needs_client_masks:
            raise ValueError(f"{type(self.attack).__name__} must not see the client's dropout masks")


class Rows:
    """The program's sites and, per row, its part, labels, target and what it applies at each site.

    Built from the parts a program starts with plus the parts expected to enter later (`expect`): together
    they fix the sites, which of them some row trains or takes from the client, and where rows differ.
    """

    def __init__(self, parts: Sequence[Part], expect: Sequence[Part] = ()) -> None:
        parts = list(parts)
        for part in parts + list(expect):
            part.check_view()
            if part.problems.local != parts[0].problems.local:
                raise ValueError("problems of clients that trained differently (client.local_*) cannot share a program")
        self._scheme(parts + list(expect))
        sizes = [p.problems.num_problems for p in parts]
        self.parts = parts
        self.index = [torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(parts))]
        first = parts[0].problems
        self.input_shape = first.input_shape
        self.local = first.local  # FedAvg: every part's clients train alike (dia.run.pack keys on the client section)
        self.targets = {n: torch.cat([p.problems.targets[n] for p in parts]) for n in first.targets}
        self.labels = torch.cat([p.problems.labels for p in parts])
        tables = [self._tables(part) for part in parts]
        self.tables = {
            name: {s: torch.cat([t[name][s] for t in tables]) for s in tables[0][name]} for name in tables[0]
        }
        self.weights = torch.cat([torch.full((p.problems.num_problems,), float(p.attack.mask_weight())) for p in parts])

    # ---- the scheme: sites, and which rows do what there -------------------------------------------
    def _scheme(self, parts: list[Part]) -> None:
        roles = [{site: part.role(site) for site in part.problems.mask_shapes} for part in parts]
        sites: dict[str, tuple[int, ...]] = {}
        for part, role in zip(parts, roles):
            sites.update({s: part.problems.mask_shapes[s] for s, r in role.items() if r is not None and s not in sites})
        self.sites = sites
        self.trained = [s for s in sites if any(r.get(s) == "train" for r in roles)]
        # the mask parameters' shape per trained site (the training parts' `trained_shape`: the site's, or per channel)
        self.param_shapes = {
            s: next(p.attack.trained_shape(p.problems, s) for p, r in zip(parts, roles) if r.get(s) == "train")
            for s in self.trained
        }
        self.from_client = [s for s in sites if any(r.get(s) == "client" for r in roles)]
        self.mixed = {s: not all(r.get(s) == "train" for r in roles) for s in sites}  # some row does not train s
        self.learned = [s for s in self.trained if any(p.attack.learns_rate() and p.role(s) == "train" for p in parts)]
        kinds = {p.attack.mask_parametrization() for p in parts if any(p.role(s) == "train" for s in self.trained)}
        self.sigmoid_any = "sigmoid" in kinds
        self.clip_any = "clip" in kinds

    def scheme_key(self) -> tuple:
        """The program's sites and what its rows do there: what a compiled program is specialized to."""
        sites = tuple(sorted(self.sites.items()))
        return sites, tuple(self.trained), tuple(self.from_client), tuple(self.learned), self.sigmoid_any, self.clip_any

    def _tables(self, part: Part) -> dict[str, dict[str, Tensor]]:
        """Per site, the part's rows: trains?, scale 1/(1-p), target keep-rate's p (trained sites), sigmoid?,
        learns its rate?, and the client's mask (sites some row takes from the client). p is the rate the
        attacker uses: the client's for its masks, the attack's `attacker_rate` for trained ones."""
        n = part.problems.num_problems
        sigmoid = part.attack.mask_parametrization() == "sigmoid"
        learns = part.attack.learns_rate()
        out: dict[str, dict[str, Tensor]] = {
            "train": {},
            "scale": {},
            "rate": {},
            "sigmoid": {},
            "learn": {},
            "client": {},
        }
        for site, shape in self.sites.items():
            r = part.role(site)
            p = part.attack.attacker_rate(part.problems, site) if r == "train" else part.problems.rates.get(site, 0.0)
            out["train"][site] = torch.full((n,), r == "train")
            out["learn"][site] = torch.full((n,), r == "train" and learns)
            out["scale"][site] = torch.full((n,), 1.0 / (1.0 - p) if r is not None else 1.0)
            out["rate"][site] = torch.full((n,), p if r == "train" else 0.0)
            out["sigmoid"][site] = torch.full((n,), r == "train" and sigmoid)
            if site in self.from_client:
                out["client"][site] = part.problems.true_masks[site] if r == "client" else torch.ones(n, *shape)
        return out

    @property
    def steps(self) -> int:
        """T: the local steps each row's client took (1: FedSGD)."""
        return 1 if self.local is None else self.local.steps

    def fits(self, part: Part) -> bool:
        """Whether `part` can take rows of this program without changing it: its clients trained alike, each site
        it drops at exists with the same shape and role, rows that do not train a trained site are allowed
        there, and its mask parametrization is one the program has."""
        if part.problems.local != self.local:
            return False
        for site in set(part.problems.mask_shapes) | set(self.sites):
            r = part.role(site)
            if r is not None and self.sites.get(site) != part.problems.mask_shapes[site]:
                return False
            if (r == "train") != (site in self.trained) and (r == "train" or not self.mixed[site]):
                return False
            if r == "client" and site not in self.from_client:
                return False
            if r == "train" and part.attack.learns_rate() and site not in self.learned:
                return False
            if r == "train" and part.attack.trained_shape(part.problems, site) != self.param_shapes[site]:
                return False
        trains = any(part.role(s) == "train" for s in self.trained)
        kind = part.attack.mask_parametrization()
        return not trains or (self.sigmoid_any if kind == "sigmoid" else self.clip_any)

    # ---- what each row applies -----------------------------------------------------------------------
    def masks(self, params: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The (unscaled) masks every row applies, {site: (K, B, ...)}; None when no row drops anything."""
        if not self.sites:
            return None
        out = {}
        for site in self.sites:
            fixed = self.tables["client"].get(site)
            raw = params.get(MASK + site)
            if raw is None:  # no row trains this site: the client's masks where given (WIIG rows)
                out[site] = fixed
                continue
            value = raw
            if self.sigmoid_any:
                value = (
                    torch.sigmoid(raw)
                    if not self.clip_any
                    else torch.where(column(self.tables["sigmoid"][site], raw), torch.sigmoid(raw), raw)
                )
            if self.mixed[site]:
                value = torch.where(column(self.tables["train"][site], value), value, 1.0 if fixed is None else fixed)
            out[site] = value
        return out

    def applied(
        self, masks: dict[str, Tensor] | None, params: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor] | None:
        """`masks` scaled by each row's 1/(1-p): what the attacker's copy multiplies each site's input by
        (p learned from `params` at the sites where rows learn it)."""
        if masks is None:
            return None
        scales = dict(self.tables["scale"])
        if self.learned and params is not None:
            rates = self.rates(params)
            scales.update(
                {s: torch.where(self.tables["learn"][s], 1.0 / (1.0 - rates[s]), scales[s]) for s in self.learned}
            )
        return {s: m * column(scales[s], m) for s, m in masks.items()}

    def rates(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per trained site, each row's dropout rate as its attacker has it (K,): fixed, or sigmoid of its logit."""
        out = dict(self.tables["rate"])
        for s in self.learned:
            out[s] = torch.where(self.tables["learn"][s], torch.sigmoid(params[RATE + s][:, 0]), out[s])
        return {s: out[s] for s in self.trained}

    def clamp_rates(self, params: dict[str, Tensor]) -> None:
        """Keep learned rate logits in `RATE_LOGITS` (in place)."""
        for s in self.learned:
            params[RATE + s].clamp_(*RATE_LOGITS)

    def clip_masks(self, params: dict[str, Tensor]) -> None:
        """Keep clip-parametrized masks in [0, 1] (in place)."""
        if not self.clip_any:
            return
        for site in self.trained:
            v = params[MASK + site]
            if self.sigmoid_any:
                v.copy_(torch.where(column(self.tables["sigmoid"][site], v), v, v.clamp(0.0, 1.0)))
            else:
                v.clamp_(0.0, 1.0)

    # ---- where problems start ----------------------------------------------------------------------
    def start_of(self, part: Part, init: Any) -> dict[str, Tensor]:
        """The part's rows' start, each from its own seed: the dummies (the attack's `init_images`, by default
        `init(shape, generator)`), then the
        masks of the trained sites (the attack's `init_mask`; ones where the part does not train), then the
        logits of the learned rates (at the attack's `attacker_rate`; 0 where the part does not learn)."""
        gens = [torch.Generator().manual_seed(s) for s in part.problems.seeds]
        out = {"x": part.attack.init_images(part.problems, gens, init)}
        for site in self.trained:
            out[MASK + site] = (
                part.attack.init_mask(part.problems, site, gens)
                if part.role(site) == "train"
                else torch.ones(len(gens), *self.param_shapes[site])
            )
        for site in self.learned:
            learns = part.role(site) == "train" and part.attack.learns_rate()
            logit = (
                torch.logit(torch.tensor(part.attack.attacker_rate(part.problems, site)))
                if learns
                else torch.tensor(0.0)
            )
            out[RATE + site] = logit.clamp(*RATE_LOGITS).expand(len(gens), 1).clone()
        return out

    # ---- rows change hands -----------------------------------------------------------------------------
    def admit(self, part: Part, rows: Tensor, device: torch.device) -> None:
        """`part`'s problems take rows `rows` (an index; call `fits` first): targets, labels, tables in place."""
        part.check_view()
        if not self.fits(part) or len(rows) != part.problems.num_problems:
            raise ValueError(f"{type(part.attack).__name__}: these problems do not fit this program's rows")
        idx = rows.to(device)
        for name, t in part.problems.targets.items():
            self.targets[name][idx] = t.to(device)
        self.labels[idx] = part.problems.labels.to(device)
        for name, table in self._tables(part).items():
            for site, value in table.items():
                self.tables[name][site][idx] = value.to(device)
        self.weights[idx] = float(part.attack.mask_weight())
        self.parts.append(part)
        self.index.append(rows.cpu())

    def rows_of(self, part: Part) -> Tensor:
        """The rows (CPU index) that `part`, a part now in the program, holds."""
        return self.index[self._position(part)]

    def release(self, part: Part) -> Tensor:
        """`part` leaves; returns the rows it held (now free)."""
        i = self._position(part)
        rows = self.index[i]
        del self.parts[i], self.index[i]
        return rows

    def _position(self, part: Part) -> int:
        return next(i for i, p in enumerate(self.parts) if p is part)

    def to(self, device: torch.device) -> Rows:
        self.targets = {n: t.to(device) for n, t in self.targets.items()}
        self.labels = self.labels.to(device)
        self.tables = {name: {s: t.to(device) for s, t in table.items()} for name, table in self.tables.items()}
        self.weights = self.weights.to(device)
        return self

    # ---- results -------------------------------------------------------------------------------------
    def chosen(self, part: Part, state: AttackState) -> Tensor:
        """`part`'s rows that make its result, one per problem: with R starts, each problem's start of lowest loss
        (first among equals); else all its rows."""
        rows = self.rows_of(part)
        starts = part.problems.starts
        if starts == 1:
            return rows
        k = len(rows) // starts
        best = state.best_loss[rows.to(state.best_loss.device)].cpu().view(starts, k).argmin(0)
        return rows[best * k + torch.arange(k)]

    def result(self, part: Part, state: AttackState) -> AttackResult:
        """The best iterates and bookkeeping of `part` (its recovered masks only where it trains them); with R
        starts, each problem's start of lowest loss (`chosen`)."""
        rows = self.chosen(part, state).to(state.flat.device)
        own = [k for k in self.trained if part.role(k) == "train"]
        masks = self.masks(state.best_params) if own else None
        learned = [k for k in own if k in self.learned] if part.attack.learns_rate() else []
        rates = self.rates(state.best_params) if learned else {}
        return AttackResult(
            x=state.best_params["x"][rows].detach().cpu(),
            masks={k: masks[k][rows].detach().cpu() for k in own} if own else None,
            rates={k: rates[k][rows].detach().cpu() for k in learned} or None,
            best_loss=state.best_loss[rows].cpu(),
            best_iteration=state.best_iteration[rows].cpu(),
            iterations=state.iterations[rows].cpu(),
            status=[STATUS[int(c)] for c in state.status[rows].cpu()],
        )

    def curves(self, state: AttackState, rows: Tensor | slice = slice(None)) -> dict[str, Tensor]:
        """What is worth plotting while an attack runs: means over `rows` (stopped ones at their last value)."""
        out = {
            "attack/loss": state.last_loss[rows].mean(),
            "attack/best_loss": state.best_loss[rows].mean(),
            "attack/lr": state.lr[rows].mean(),
            "attack/running": state.active[rows].sum(),
        }
        if self.trained:  # the trained masks' mean keep-rate (the client's is 1 - p) and undecided share
            masks = self.masks(state.params)
            flat = torch.cat([masks[k].detach()[rows][self.tables["train"][k][rows]].flatten() for k in self.trained])
            if flat.numel():
                out["masks/keep_rate"] = flat.mean()
                out["masks/undecided"] = ((flat > 0.1) & (flat < 0.9)).float().mean()
        if self.learned:  # the learned dropout rate, mean over the rows and sites that learn it
            rates = self.rates(state.params)
            learned = torch.cat([rates[k].detach()[rows][self.tables["learn"][k][rows]] for k in self.learned])
            if learned.numel():
                out["masks/rate"] = learned.mean()
        return out


def column(per_row: Tensor, like: Tensor) -> Tensor:
    """A (K,) tensor shaped to broadcast over `like` (K, ...)."""
    return per_row.view(-1, *([1] * (like.dim() - 1)))
