"""How strong must SAEs be? Matching against the SAEs' training budget (a dose–response).

At a few depths ``t``, SAEs are trained with the substrate's own recipe at several training budgets
(tokens seen), two seeds at layer ``t`` and one at its neighbour ``t − 1``, and every budget is
measured the same way:

- the **seed ceiling**: the Matching Score of the two seeds of layer ``t`` matched with each other
  (with its random null) and the explained variance of the same-layer swap
  ``decode_seed1(P(encode_seed0(h_t)))``, beside the own SAE's explained variance, L0 and dead
  fraction (:mod:`saematch_core.experiments.ceiling` measures the same at one budget);
- **SAE Match** from the neighbour layer: the Matching Score of SAE ``t − 1`` → SAE ``t`` and the
  hidden-state approximation ``ĥ_t = decode_t(P(encode_{t−1}(h_{t−1})))`` (paper Figs. 10/11): its
  explained variance on the stored activations and, with a language model, its ΔL (nats/token) when
  it replaces the residual after block ``t``.

Budgets up to the number of stored training rows are one epoch over that many distinct tokens (the
first rows of the recipe's shuffled order); larger budgets are extra epochs. The **epochs arm**
separates the two at equal tokens seen: ``tokens_seen`` tokens as several epochs over a random
subset of ``distinct`` rows, next to the budget arms with that many distinct tokens and with that
many tokens seen. :meth:`StrengthResult.fit` fits a straight line in log-budget to a measure (mean
over depths) for the book's extrapolation.

Every trained SAE is cached by a content key (training rows, recipe, budget, subset), so a rerun or
a resumed run trains nothing twice; every (depth, arm, budget) row is cached as a result.

:func:`budget_saes` gives the seed-0 SAEs of a run of consecutive layers at every budget (from the same
store), so that measures needing many layers, such as the persistence length (paper Fig. 8), can be
taken per budget by the experiment that owns them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saematch_core.cache import atomic_write_text, cache_root, content_key, is_intact, seal
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.scores import matching_scores
from saematch_core.experiments.measures.swap import explained_variance, matched_reconstructor
from saematch_core.experiments.results import (
    JsonResult,
    acts_digest,
    array_rows,
    finite_mean,
    load_or_compute,
    model_digest,
    sae_digest,
    tensor_digest,
)
from saematch_core.formats import load_sae, save_sae
from saematch_core.match import MatchConfig
from saematch_core.prepare import layer_seed
from saematch_core.profiles import SAETrainConfig
from saematch_core.sae import SAE
from saematch_core.train import DeltaLoss, sae_quality, train_sae

__all__ = ["Arm", "LogFit", "StrengthConfig", "StrengthResult", "StrengthRow", "budget_saes", "run"]

Arm = Literal["budget", "epochs"]
"""``budget``: one epoch over ``tokens_seen`` distinct rows (or every row, several epochs, above the
number of rows); ``epochs``: ``tokens_seen`` tokens over a subset of ``distinct_tokens`` rows."""

_METHOD = "folded"


@dataclass(frozen=True, kw_only=True)
class StrengthConfig:
    """What :func:`run` trains and measures."""

    depths: tuple[int, ...] | None = None
    """Layers ``t`` (each ≥ 1: SAE Match comes from ``t − 1``); ``None``: the layers of
    ``inputs.families[family]`` (the substrate's second-seed layers) when there are at least two,
    else three layers at about a quarter, half and three quarters of ``inputs.saes``' layers."""
    budgets: tuple[int, ...] = (25_000, 50_000, 100_000, 200_000)
    """Training budgets (tokens seen per SAE), ascending and distinct."""
    epochs_arm: tuple[int, int] | None = (100_000, 25_000)
    """``(tokens_seen, distinct)``: the arm that separates distinct tokens from epochs (two seeds of
    layer ``t`` only, so the seed ceiling but not SAE Match); ``None``: no such arm."""
    recipe: SAETrainConfig = field(default_factory=SAETrainConfig)
    """How every SAE is trained (the profile's ``sae``); ``n_tokens`` is replaced by the budget and the
    seed by the substrate's per-layer seed (:func:`saematch_core.prepare.layer_seed`)."""
    reuse: bool = True
    """At the budget equal to ``recipe.n_tokens``, when it is at least the number of training rows of
    the layer (one full pass), take ``inputs.saes`` (seed 0) and ``inputs.families[family]`` (seed 1)
    where they exist instead of training: the profile's own SAEs are exactly this recipe there."""
    family: str = "seed"
    """The family of ``inputs.families`` holding the profile's second-seed SAEs (for ``reuse`` and the
    default ``depths``)."""
    match: MatchConfig = field(default_factory=lambda: MatchConfig(fold=True))
    """The matching (default the paper's: folded, all parameters, exact)."""
    n_null: int = 5
    """Random matchings of the Matching Score's null."""
    max_eval_rows: int | None = None
    """Measure on at most this many of the kept evaluation rows (evenly spaced; ``None``: all): every
    measure encodes them several times per row, so this sets most of a row's cost."""
    delta_loss: bool = True
    """Measure the approximation's ΔL (needs ``inputs.model`` and ``inputs.tokens``)."""
    outlier_factor: float = 10.0
    """In the ΔL pass, tokens whose ``‖h_{t−1}‖`` or ``‖h_t‖`` exceeds this × the layer's median
    norm keep their own hidden state (as in training; position 0 always does)."""
    median_norms: Mapping[int, float] | None = None
    """Layer → median ‖h‖ (the activation cache's); ``None``: the median over the kept rows of
    ``inputs.activations``."""

    @classmethod
    def for_recipe(
        cls,
        recipe: SAETrainConfig,
        fractions: Sequence[float] = (0.125, 0.25, 0.5, 1.0),
        epochs_arm: tuple[float, float] | None = (0.5, 0.125),
        **changes: Any,
    ) -> StrengthConfig:
        """Budgets (and the epochs arm) as fractions of ``recipe.n_tokens``, so one setting serves
        every profile: the default ``(1/8, 1/4, 1/2, 1)`` spans 8× up to the profile's own budget.

        >>> StrengthConfig.for_recipe(SAETrainConfig(n_tokens=200_000)).budgets
        (25000, 50000, 100000, 200000)
        """
        n = recipe.n_tokens
        budgets = tuple(sorted({max(1, round(f * n)) for f in fractions}))
        arm = (
            None
            if epochs_arm is None
            else (max(2, round(epochs_arm[0] * n)), max(1, round(epochs_arm[1] * n)))
        )
        return cls(recipe=recipe, budgets=budgets, epochs_arm=arm, **changes)

    def __post_init__(self) -> None:
        if self.depths is not None:
            if isinstance(self.depths, (str, bytes)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in self.depths
            ):
                raise ValueError(f"StrengthConfig.depths: expected layers >= 1, got {self.depths!r}")
            if not self.depths or len(set(self.depths)) != len(self.depths):
                raise ValueError(f"StrengthConfig.depths: expected distinct layers, got {self.depths!r}")
            object.__setattr__(self, "depths", tuple(self.depths))
        budgets = tuple(self.budgets)
        if (
            not budgets
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in budgets)
            or list(budgets) != sorted(set(budgets))
        ):
            raise ValueError(
                f"StrengthConfig.budgets: expected ascending distinct ints >= 1, got {budgets!r}"
            )
        object.__setattr__(self, "budgets", budgets)
        if self.epochs_arm is not None:
            arm = tuple(self.epochs_arm)
            if (
                len(arm) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in arm)
                or not 1 <= arm[1] < arm[0]
            ):
                raise ValueError(
                    "StrengthConfig.epochs_arm: expected (tokens_seen, distinct) with "
                    f"1 <= distinct < tokens_seen, got {self.epochs_arm!r}"
                )
            object.__setattr__(self, "epochs_arm", arm)
        if not isinstance(self.recipe, SAETrainConfig):
            raise TypeError(
                f"StrengthConfig.recipe: expected a SAETrainConfig, got {type(self.recipe).__name__}"
            )
        if not isinstance(self.match, MatchConfig):
            raise TypeError(f"StrengthConfig.match: expected a MatchConfig, got {type(self.match).__name__}")
        if not isinstance(self.n_null, int) or isinstance(self.n_null, bool) or self.n_null < 0:
            raise ValueError(f"StrengthConfig.n_null: expected an int >= 0, got {self.n_null!r}")
        if self.max_eval_rows is not None and (
            not isinstance(self.max_eval_rows, int)
            or isinstance(self.max_eval_rows, bool)
            or self.max_eval_rows < 1
        ):
            raise ValueError(
                f"StrengthConfig.max_eval_rows: expected None or an int >= 1, got {self.max_eval_rows!r}"
            )
        for name in ("reuse", "delta_loss"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"StrengthConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.outlier_factor, (int, float)) or not self.outlier_factor > 1:
            raise ValueError(
                f"StrengthConfig.outlier_factor: expected a number > 1, got {self.outlier_factor!r}"
            )
        if self.median_norms is not None:
            if not isinstance(self.median_norms, Mapping) or not all(
                isinstance(v, (int, float)) and v > 0 for v in self.median_norms.values()
            ):
                raise ValueError("StrengthConfig.median_norms: expected a mapping layer → positive float")
            object.__setattr__(self, "median_norms", {int(k): float(v) for k, v in self.median_norms.items()})


@dataclass(frozen=True, kw_only=True)
class StrengthRow:
    """The measures of one depth at one training budget (one arm)."""

    depth: int
    """Layer ``t``."""
    arm: str
    """``budget`` or ``epochs`` (:data:`Arm`)."""
    tokens_seen: int
    """Training tokens per SAE: the budget (the trainer takes whole batches, so it rounds up to the
    next multiple of the batch size)."""
    distinct_tokens: int
    """Distinct training rows those tokens were drawn from."""
    l0: float
    """Mean L0 of the two seeds' SAEs of layer ``t`` on the kept evaluation rows."""
    dead_fraction: float
    """Mean fraction of their features never active there."""
    ev_self: float
    """Mean explained variance of ``h_t`` by each SAE's own reconstruction (1 − FVU)."""
    ms_same: float
    """Matching Score of seed 0 → seed 1 of layer ``t`` (the seed ceiling)."""
    ms_same_random: float
    """The same for random partners (chance; ``nan`` without a null)."""
    ev_swap: float
    """Explained variance of ``h_t`` by ``decode_seed1(P(encode_seed0(h_t)))``."""
    ms_neighbour: float
    """Matching Score of SAE ``t − 1`` → SAE ``t`` (seed 0; ``nan`` in the epochs arm)."""
    ms_neighbour_random: float
    """The same for random partners."""
    ev_neighbour: float
    """Explained variance of ``h_t`` by ``decode_t(P(encode_{t−1}(h_{t−1})))`` (the approximation), on
    the stored rows, from the error's mean square as in the seed ceiling (the hidden-state section
    removes the error's mean first, so its value is a little higher)."""
    dl_neighbour: float
    """ΔL (nats/token) when that approximation replaces the residual after block ``t`` (``nan``
    without a model or with ``delta_loss`` off)."""
    train_seconds: tuple[float, ...]
    """Training wall time of the row's SAEs (seed 0, seed 1 of layer ``t``, then seed 0 of ``t − 1``
    in the budget arm), measured when each was trained; ``nan`` for SAEs taken from the inputs."""
    measure_seconds: float
    """Wall time of the row's measures (matchings, scores, explained variances, ΔL), training excluded."""


@dataclass(frozen=True, kw_only=True)
class LogFit:
    """A straight line in log-budget, ``value ≈ intercept + slope · log10(tokens)``, fitted by least
    squares; an extrapolation of it is a prediction under the assumption that the trend stays
    log-linear, nothing more (bounded measures must bend before their bound)."""

    slope: float
    """Change per tenfold budget."""
    intercept: float
    """Value at one token (the line's offset)."""
    r2: float
    """Coefficient of determination of the fitted points (``nan`` for fewer than three)."""
    n_points: int
    """Points fitted."""

    def at(self, tokens: float) -> float:
        """The line's value at ``tokens`` training tokens.

        >>> LogFit(slope=0.1, intercept=-0.4, r2=1.0, n_points=4).at(1e6)
        0.2
        """
        if not tokens > 0:
            raise ValueError(f"tokens: expected > 0, got {tokens!r}")
        return round(self.intercept + self.slope * math.log10(tokens), 12)

    def reaches(self, value: float) -> float:
        """Training tokens at which the line equals ``value`` (``inf`` for a flat or undefined line).

        >>> LogFit(slope=-0.5, intercept=3.0, r2=1.0, n_points=4).reaches(0.0)
        1000000.0
        """
        if not (math.isfinite(self.slope) and math.isfinite(self.intercept)) or self.slope == 0:
            return math.inf
        return float(10 ** ((value - self.intercept) / self.slope))

    def meets(self, other: LogFit) -> float:
        """Training tokens at which this line reaches ``other`` from below (``inf`` when it never
        catches up, ``nan`` for an undefined line; the smallest budget fitted is not checked).

        >>> LogFit(slope=0.2, intercept=-1.0, r2=1.0, n_points=4).meets(
        ...     LogFit(slope=0.1, intercept=0.0, r2=1.0, n_points=4))
        10000000000.0
        """
        if not all(math.isfinite(v) for v in (self.slope, self.intercept, other.slope, other.intercept)):
            return math.nan
        if not self.slope > other.slope:
            return math.inf
        return float(10 ** ((other.intercept - self.intercept) / (self.slope - other.slope)))

    @classmethod
    def of(cls, tokens: Sequence[float], values: Sequence[float]) -> LogFit:
        """Least-squares fit to the finite points ``(log10 tokens, value)`` (a ``nan`` line for fewer
        than two)."""
        x = np.log10(np.asarray(tokens, dtype=np.float64))
        y = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if len(x) < 2 or np.ptp(x) == 0:
            return cls(slope=math.nan, intercept=math.nan, r2=math.nan, n_points=len(x))
        slope, intercept = np.polyfit(x, y, 1)
        resid = y - (intercept + slope * x)
        total = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float((resid**2).sum()) / total if len(x) > 2 and total > 0 else math.nan
        return cls(slope=float(slope), intercept=float(intercept), r2=r2, n_points=len(x))


@dataclass(frozen=True, kw_only=True)
class StrengthResult(JsonResult):
    """One :class:`StrengthRow` per (depth, arm, budget)."""

    kind: ClassVar[str] = "strength"
    rows: tuple[StrengthRow, ...]

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(sorted({r.depth for r in self.rows}))

    @property
    def budgets(self) -> tuple[int, ...]:
        """Tokens seen of the budget arm, ascending."""
        return tuple(sorted({r.tokens_seen for r in self.rows if r.arm == "budget"}))

    def row(self, depth: int, tokens_seen: int, arm: Arm = "budget") -> StrengthRow:
        for r in self.rows:
            if r.depth == depth and r.tokens_seen == tokens_seen and r.arm == arm:
                return r
        raise KeyError(f"depth, tokens_seen, arm: no row ({depth}, {tokens_seen}, {arm!r})")

    def series(self, metric: str, depth: int | None = None) -> tuple[float, ...]:
        """``metric`` (a :class:`StrengthRow` field) of the budget arm per budget (ascending): of one
        depth, or the mean over depths (``depth=None``)."""
        if depth is not None:
            return tuple(float(getattr(self.row(depth, b), metric)) for b in self.budgets)
        return tuple(
            finite_mean([float(getattr(self.row(t, b), metric)) for t in self.depths]) for b in self.budgets
        )

    def fit(self, metric: str) -> LogFit:
        """:class:`LogFit` of the depth-mean :meth:`series` of ``metric`` against the budget."""
        return LogFit.of(self.budgets, self.series(metric))

    def epochs_comparison(self, metric: str) -> dict[str, float]:
        """``metric`` (mean over depths) of the epochs arm next to the budget arms it separates:
        ``same_seen`` (one epoch, as many tokens seen), ``epochs`` (the arm) and ``same_distinct``
        (one epoch over as many distinct tokens); ``nan`` where the budget arm lacks that budget."""
        arm = [r for r in self.rows if r.arm == "epochs"]
        if not arm:
            raise ValueError("rows: no epochs arm in this result")
        seen, distinct = arm[0].tokens_seen, arm[0].distinct_tokens

        def mean_at(tokens: int) -> float:
            vals = [
                float(getattr(r, metric)) for r in self.rows if r.arm == "budget" and r.tokens_seen == tokens
            ]
            return finite_mean(vals)

        return {
            "same_seen": mean_at(seen),
            "epochs": finite_mean([float(getattr(r, metric)) for r in arm]),
            "same_distinct": mean_at(distinct),
        }

    def epochs_share(self, metric: str) -> float:
        """Share of the gain from ``distinct`` to ``tokens_seen`` distinct tokens (one epoch each) that
        the epochs arm recovers by repeating ``distinct`` tokens: 1 means training steps alone explain
        the gain, 0 that it needs new tokens (depth means; ``nan`` when the budget arms lack either)."""
        c = self.epochs_comparison(metric)
        gain = c["same_seen"] - c["same_distinct"]
        return (c["epochs"] - c["same_distinct"]) / gain if gain != 0 else math.nan

    def train_seconds(self) -> dict[int, list[float]]:
        """Tokens seen → training seconds of every SAE trained at that budget (any arm, any depth)."""
        out: dict[int, list[float]] = {}
        for r in self.rows:
            out.setdefault(r.tokens_seen, []).extend(s for s in r.train_seconds if math.isfinite(s))
        return out


# ------------------------------------------------------------------------------------------- SAEs
@dataclass(frozen=True)
class _Slot:
    """One SAE of a row: its layer, seed (0 or 1), tokens seen and distinct rows (``None``: every row)."""

    layer: int
    replica: int
    tokens: int
    distinct: int | None


class _SAEStore:
    """Trained SAEs by content key under ``<root>/strength_sae/`` (one safetensors file and a JSON
    sidecar with the training time each), with the training rows of one layer held at a time."""

    def __init__(self, inputs: Inputs, config: StrengthConfig, root: Path) -> None:
        if inputs.train_activations is None:
            raise ValueError(
                "Inputs.train_activations: expected the training rows of every layer to train on"
            )
        self.train = inputs.train_activations
        self.inputs = inputs
        self.config = config
        self.folder = root / "strength_sae"
        self._digests: dict[int, tuple[str, int]] = {}

    def rows_digest(self, layer: int) -> tuple[str, int]:
        """(digest, number) of the training rows of ``layer``."""
        if layer not in self._digests:
            if layer not in self.train:
                have = sorted(self.train)
                raise ValueError(
                    f"Inputs.train_activations: expected training rows of layer {layer}, got {have}"
                )
            rows = self.train[layer]
            self._digests[layer] = (acts_digest(rows), int(rows.shape[0]))
        return self._digests[layer]

    def recipe(self, slot: _Slot) -> SAETrainConfig:
        return dataclasses.replace(
            layer_seed(self.config.recipe, slot.layer, slot.replica), n_tokens=slot.tokens
        )

    def given(self, slot: _Slot) -> SAE | None:
        """The inputs' own SAE for ``slot`` when :attr:`StrengthConfig.reuse` applies, else ``None``."""
        cfg = self.config
        if not cfg.reuse or slot.distinct is not None or slot.tokens != cfg.recipe.n_tokens:
            return None
        if slot.tokens < self.rows_digest(slot.layer)[1]:
            return None
        family = self.inputs.saes if slot.replica == 0 else self.inputs.families.get(cfg.family, {})
        return family.get(slot.layer)

    def spec(self, slot: _Slot) -> dict[str, Any]:
        """What determines the slot's SAE: the inputs' SAE (its digest) or the training (its key)."""
        given = self.given(slot)
        if given is not None:
            return {"given": sae_digest(given)}
        digest, n = self.rows_digest(slot.layer)
        return {
            "rows": digest,
            "n_rows": n,
            "distinct": slot.distinct,
            "subset_seed": None if slot.distinct is None else self.inputs.seed,
            "config": dataclasses.asdict(self.recipe(slot)),
        }

    def get(self, slot: _Slot) -> tuple[SAE, float]:
        """(SAE, training seconds) of ``slot``: the inputs' own, the cached one, or trained now."""
        given = self.given(slot)
        if given is not None:
            return given, math.nan
        path = self.folder / f"{content_key(self.spec(slot))}.safetensors"
        side = path.with_suffix(".json")
        if not self.inputs.force and path.is_file() and side.is_file() and is_intact(path):
            try:
                seconds = float(json.loads(side.read_text(encoding="utf-8"))["train_seconds"])
                return load_sae(path, dtype=torch.float32), seconds
            except (OSError, ValueError, KeyError, TypeError):
                pass  # an unreadable sidecar: train again
        rows = self.train[slot.layer]
        if slot.distinct is not None:
            n = int(rows.shape[0])
            if slot.distinct > n:
                raise ValueError(
                    f"StrengthConfig.epochs_arm: expected distinct <= {n} training rows of layer "
                    f"{slot.layer}, got {slot.distinct}"
                )
            g = torch.Generator().manual_seed(self.inputs.seed)
            pick = torch.randperm(n, generator=g)[: slot.distinct].sort().values.numpy()
            rows = rows[pick]
        x = array_rows(rows, 0, int(rows.shape[0]), device=torch.device("cpu"), dtype=torch.float32)
        meta = {"layer": slot.layer, "seed_replica": slot.replica, "tokens_seen": slot.tokens}
        result = train_sae(x, self.recipe(slot), progress=False, meta=meta)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_sae(result.sae, path, force=True)
        seal(path)
        atomic_write_text(
            side,
            json.dumps(
                {"spec": self.spec(slot), "train_seconds": result.seconds, "final_fvu": result.final_fvu}
            ),
        )
        return result.sae, result.seconds


# ------------------------------------------------------------------------------------------ run
def budget_saes(inputs: Inputs, config: StrengthConfig, layers: Sequence[int]) -> dict[int, dict[int, SAE]]:
    """Budget → layer → the seed-0 SAE of every layer of ``layers`` at every budget of ``config``'s
    budget arm: trained now, read from the cache :func:`run` shares, or the inputs' own at the
    recipe's budget (exactly as :func:`run` gets the SAEs of its rows, so layers ``t − 1`` and ``t``
    of a depth are trained once for both). Cheapest budgets first, so an interrupted call keeps them.

    Raises
    ------
    ValueError
        ``layers`` empty, repeated or not ints, or a layer without training rows (named).
    """
    if not isinstance(config, StrengthConfig):
        raise TypeError(f"config: expected a StrengthConfig, got {type(config).__name__}")
    picked = list(layers)
    if (
        not picked
        or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in picked)
        or len(set(picked)) != len(picked)
    ):
        raise ValueError(f"layers: expected distinct layers >= 0, got {picked!r}")
    root = inputs.cache_dir if inputs.cache_dir is not None else cache_root() / "results"
    store = _SAEStore(inputs, config, root)
    for u in picked:
        store.rows_digest(u)  # every missing layer named before anything trains
    out: dict[int, dict[int, SAE]] = {}
    todo = [(b, u) for b in config.budgets for u in picked]
    for b, u in tqdm(todo, desc="SAEs per budget", disable=not inputs.progress):
        out.setdefault(b, {})[u] = store.get(_Slot(u, 0, b, None))[0]
    return out


def _default_depths(inputs: Inputs, family: str) -> tuple[int, ...]:
    seeded = sorted(t for t in inputs.families.get(family, {}) if t >= 1 and t - 1 in inputs.saes)
    if len(seeded) >= 2:
        return tuple(seeded)
    layers = sorted(t for t in inputs.saes if t >= 1)
    if not layers:
        raise ValueError(f"Inputs.saes: expected layers >= 1 to pick depths from, got {sorted(inputs.saes)}")
    return tuple(dict.fromkeys(layers[min(len(layers) - 1, int(f * len(layers)))] for f in (0.25, 0.5, 0.75)))


def _thinned(inputs: Inputs, max_rows: int) -> np.ndarray:
    """``inputs.keep`` (all rows when ``None``) with at most ``max_rows`` rows left, evenly spaced."""
    n = int(next(iter((inputs.activations or {}).values())).shape[0]) if inputs.activations else 0
    keep = np.ones(n, dtype=bool) if inputs.keep is None else np.asarray(inputs.keep, dtype=bool).copy()
    rows = np.flatnonzero(keep)
    if len(rows) > max_rows:
        keep[:] = False
        keep[rows[np.linspace(0, len(rows) - 1, max_rows).round().astype(np.int64)]] = True
    return keep


def _median_norm(config: StrengthConfig, inputs: Inputs, layer: int) -> float:
    if config.median_norms is not None and layer in config.median_norms:
        return config.median_norms[layer]
    acts = inputs.acts(layer)
    norms = np.concatenate(
        [
            torch.linalg.vector_norm(
                array_rows(acts, i, i + inputs.chunk_size, device=torch.device("cpu"), dtype=torch.float32),
                dim=-1,
            ).numpy()
            for i in range(0, int(acts.shape[0]), inputs.chunk_size)
        ]
    )
    if inputs.keep is not None:
        norms = norms[np.asarray(inputs.keep, dtype=bool)]
    return float(np.median(norms))


def _swap_state(
    reconstruct: Callable[[Tensor], Tensor], limit_prev: float, limit_cur: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """``(h_{t−1}, h_t) ↦ ĥ_t`` for :meth:`DeltaLoss.from_source`: the swap everywhere except position 0
    and outliers of either layer, which keep ``h_t``."""

    def fn(h_prev: Tensor, h_cur: Tensor) -> Tensor:
        flat = h_prev.reshape(-1, h_prev.shape[-1]).float()
        new = reconstruct(flat).reshape(h_cur.shape).to(h_cur.dtype)
        through = (torch.linalg.vector_norm(h_prev.float(), dim=-1) > limit_prev) | (
            torch.linalg.vector_norm(h_cur.float(), dim=-1) > limit_cur
        )
        through[:, 0] = True
        return torch.where(through[..., None], h_cur, new)

    return fn


def run(inputs: Inputs, config: StrengthConfig | None = None) -> StrengthResult:
    """Train SAEs at every budget and depth and measure the seed ceiling and SAE Match on them.

    Parameters
    ----------
    inputs : ``train_activations`` (the rows SAEs are trained on, layers ``t − 1`` and ``t`` of every
        depth), ``activations`` and ``keep`` (evaluation rows, the same tokens for every layer),
        ``saes`` and ``families[config.family]`` (reused at the recipe's own budget, and the default
        depths), ``model`` and ``tokens`` (for ΔL), ``seed`` (the epochs arm's subset, the nulls), and
        the cache: trained SAEs under ``<cache>/strength_sae/``, each row as a result file, so a
        rerun is instant and an interrupted run resumes with the SAEs it had trained.
    config : depths, budgets, the epochs arm, the recipe, the matching.

    Returns
    -------
    StrengthResult
        Rows by depth, then budget arm ascending, then the epochs arm.

    Examples
    --------
    See ``tests/test_strength.py`` (tiny SAEs on synthetic residuals).
    """
    cfg = StrengthConfig() if config is None else config
    if not isinstance(cfg, StrengthConfig):
        raise TypeError(f"config: expected a StrengthConfig, got {type(cfg).__name__}")
    depths = cfg.depths if cfg.depths is not None else _default_depths(inputs, cfg.family)
    for t in depths:
        for layer in (t - 1, t):
            inputs.acts(layer)  # a clear error when the evaluation rows are missing
    if cfg.delta_loss:
        inputs.require_model()
    if cfg.max_eval_rows is not None:
        inputs = inputs.replace(keep=_thinned(inputs, cfg.max_eval_rows))
    root = inputs.cache_dir if inputs.cache_dir is not None else cache_root() / "results"
    store = _SAEStore(inputs, cfg, root)
    keep = inputs.keep
    methods = {_METHOD: cfg.match}
    shared = {
        "keep": None if keep is None else acts_digest(keep),
        "match": cfg.match.to_dict(),
        "n_null": cfg.n_null,
        "seed": inputs.seed,
    }
    probe: dict[str, Any] = {}

    def delta_loss(t: int, prev: SAE, cur: SAE) -> float:
        if not cfg.delta_loss:
            return math.nan
        model, (ids, mask) = inputs.require_model()
        if "probe" not in probe:
            lengths = mask.long().sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
            layers = sorted({u for d in depths for u in (d - 1, d)})
            probe["probe"] = DeltaLoss(model, ids, lengths, layers=layers)
        limits = [cfg.outlier_factor * _median_norm(cfg, inputs, u) for u in (t - 1, t)]
        swap = matched_reconstructor(prev, cur, cfg.match, cache_dir=inputs.cache_dir)
        return probe["probe"].from_source(t, t - 1, _swap_state(swap, *limits))

    def measure(t: int, slots: Sequence[_Slot], arm: str) -> StrengthRow:
        got = [store.get(s) for s in slots]
        t0 = time.perf_counter()
        a, b = got[0][0], got[1][0]
        acts_t = inputs.acts(t)
        x_t = acts_t if keep is None else acts_t[np.asarray(keep, dtype=bool)]
        x_t = array_rows(x_t, 0, int(x_t.shape[0]), device=torch.device("cpu"), dtype=torch.float32)
        quality = [sae_quality(s, x_t) for s in (a, b)]
        same = matching_scores(inputs, (t, t), methods, saes=(a, b), n_null=cfg.n_null)
        ev_swap = explained_variance(
            matched_reconstructor(a, b, cfg.match, cache_dir=inputs.cache_dir), acts_t, acts_t, keep=keep
        )
        nan = math.nan
        ms_n = ms_nr = ev_n = dl_n = nan
        if len(got) > 2:
            p = got[2][0]
            nb = matching_scores(inputs, (t - 1, t), methods, saes=(p, a), n_null=cfg.n_null)
            ms_n = nb.row(_METHOD).matching_score
            ms_nr = nb.row("random").matching_score if cfg.n_null else nan
            swap = matched_reconstructor(p, a, cfg.match, cache_dir=inputs.cache_dir)
            ev_n = explained_variance(swap, inputs.acts(t - 1), acts_t, keep=keep)
            dl_n = delta_loss(t, p, a)
        first = slots[0]
        return StrengthRow(
            depth=t,
            arm=arm,
            tokens_seen=first.tokens,
            distinct_tokens=first.distinct
            if first.distinct is not None
            else min(first.tokens, store.rows_digest(t)[1]),
            l0=finite_mean([q.l0 for q in quality]),
            dead_fraction=finite_mean([q.dead_fraction for q in quality]),
            ev_self=finite_mean([1.0 - q.fvu for q in quality]),
            ms_same=same.row(_METHOD).matching_score,
            ms_same_random=same.row("random").matching_score if cfg.n_null else nan,
            ev_swap=ev_swap,
            ms_neighbour=ms_n,
            ms_neighbour_random=ms_nr,
            ev_neighbour=ev_n,
            dl_neighbour=dl_n,
            train_seconds=tuple(s for _, s in got),
            measure_seconds=time.perf_counter() - t0,
        )

    # Cheapest rows first (reused SAEs, then by tokens to train), so that an interrupted run has
    # every depth's cheap budgets; rows come back ordered by depth.
    plan: list[tuple[int, str, list[_Slot]]] = [
        (t, "budget", [_Slot(t, 0, budget, None), _Slot(t, 1, budget, None), _Slot(t - 1, 0, budget, None)])
        for budget in cfg.budgets
        for t in depths
    ]
    if cfg.epochs_arm is not None:
        seen, distinct = cfg.epochs_arm
        plan += [(t, "epochs", [_Slot(t, 0, seen, distinct), _Slot(t, 1, seen, distinct)]) for t in depths]
    plan.sort(key=lambda item: sum(0 if store.given(s) is not None else s.tokens for s in item[2]))
    model_spec: dict[str, Any] = {}
    if cfg.delta_loss:
        model, (ids, mask) = inputs.require_model()
        model_spec = {
            "model": model_digest(model),
            "tokens": tensor_digest(ids),
            "token_mask": None if mask is None else tensor_digest(mask),
            "outlier_factor": cfg.outlier_factor,
        }
    rows: list[StrengthRow] = []
    for t, arm, slots in tqdm(plan, desc="SAE strength", disable=not inputs.progress):
        spec = {
            **shared,
            "depth": t,
            "arm": arm,
            "saes": [store.spec(s) for s in slots],
            "acts": [acts_digest(inputs.acts(t - 1)), acts_digest(inputs.acts(t))],
            **(
                {**model_spec, "median_norms": [_median_norm(cfg, inputs, u) for u in (t - 1, t)]}
                if arm == "budget"
                else {}
            ),
        }
        rows.append(
            load_or_compute(
                _RowResult,
                spec,
                lambda t=t, slots=slots, arm=arm: _RowResult(row=measure(t, slots, arm)),
                cache_dir=inputs.cache_dir,
                force=inputs.force,
            ).row
        )
    order = {t: i for i, t in enumerate(depths)}
    rows.sort(key=lambda r: (order[r.depth], r.arm != "budget", r.tokens_seen))
    return StrengthResult(rows=tuple(rows))


@dataclass(frozen=True, kw_only=True)
class _RowResult(JsonResult):
    """One row, the unit the result cache stores (so an interrupted run keeps its finished rows)."""

    kind: ClassVar[str] = "strength_row"
    row: StrengthRow
