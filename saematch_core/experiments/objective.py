"""Which matching objective aligns function, and why; and does L0 mismatch predict where matching fails?

**The objective ablation** (:func:`run`). SAE Match minimises, over permutations ``P``, the summed
squared distance between the folded parameters of matched features,
``Σ_i ‖W_enc^A[:, i]/θ_i − W_enc^B[:, P(i)]/θ_P(i)‖² + ‖θ_i W_dec^A[i] − θ_P(i) W_dec^B[P(i)]‖² +
(b_enc^A[i]/θ_i − b_enc^B[P(i)]/θ_P(i))²``. The three terms live on very different scales: the
folded decoder term grows with θ², the folded encoder term shrinks with 1/θ², and which one decides
the matching depends on the scale the SAEs' inputs were expressed in when they were trained and
saved. Each :class:`Objective` is one way to match; per layer pair and objective the result holds

- the hidden-state approximation's explained variance and ΔL (replace ``h_t`` by
  ``W_dec^(t) P(f_{t−1}) + b_dec^(t)`` and run the rest of the model,
  :mod:`saematch_core.experiments.measures.replacement`), the codes moved as the matching saw them
  (folded codes ``f/θ`` into the folded decoder ``θ W_dec`` when the objective folds, raw codes into
  the raw decoder when it does not);
- the Matching Score (:func:`~saematch_core.experiments.measures.scores.matching_scores`) and the
  fraction of features matched to the same partner as the paper's objective;
- the per-term diagnostics: for each block of the folded parameters (``W_dec``: ``θ W_dec`` rows,
  ``b_enc``: ``b_enc/θ``, ``W_enc``: ``W_enc/θ`` columns) the mean squared distance of the matched
  pairs (summed over the block's coordinates) against its mean over uniformly random pairs
  (:func:`block_distances`) — how much each term is actually lowered by the matching.

Objectives (:func:`default_objectives`; every one goes through :func:`saematch_core.match.match`):

- ``summed``: the paper's, folded ``W_enc + W_dec + b_enc`` (the tool's default);
- ``normalised``: the same three folded blocks, each divided by its own scale: block ``k``'s vectors
  are multiplied by ``1/√S_k`` with ``S_k`` the mean squared distance of block ``k`` over uniformly
  random pairs of the two SAEs' features (:func:`random_pair_distance`), so each term contributes
  about 1 per random pair, whatever the units (:func:`block_weighted`). Rescaling one block in both
  SAEs leaves this matching unchanged;
- ``paper_scale``: the summed objective on the SAEs re-expressed on the input scale of the paper's
  SAEs (:func:`rescale_input`): an SAE of inputs ``x`` is the same function of ``u = x / c`` with
  ``b_enc/c``, ``θ/c``, ``b_dec/c`` (``W_enc``, ``W_dec`` unchanged); its folded blocks are then
  ``c · W_enc/θ``, ``θ W_dec / c`` and ``b_enc/θ`` (unchanged), i.e. the summed objective with the
  encoder term weighted ``c²`` and the decoder term ``1/c²``. One ``c`` for the whole model
  (:func:`paper_scale`): the geometric mean over layers of the mean θ divided by
  ``ObjectiveConfig.paper_theta`` (0.112, the geometric middle of the paper's Fig. 1 axis of mean θ,
  0.05–0.25). Folded codes ``f/θ`` do not change under ``c``, and ``θ W_dec / c`` decodes ``x/c``, so
  the approximation uses the original SAEs with this matching;
- ``decoder`` / ``encoder`` / ``encoder_no_bias`` / ``no_bias``: folded ``W_dec``; folded
  ``W_enc + b_enc`` (the paper's Fig. 12 "encoder"); folded ``W_enc``; folded ``W_enc + W_dec``;
- ``cosine``: exact matching of unfolded decoder rows by cosine (the common practice), its codes
  moved raw; ``cosine_folded_codes``: the same matching (cosine ignores the positive factor θ), its
  codes moved folded — separating *which* partners from *how the codes are carried over*;
- ``unfolded``: ``W_enc + W_dec + b_enc`` without folding.

**The L0 mismatch** (:func:`l0_mismatch`, the paper's Fig. 15 analogue): per consecutive pair,
``|log L0_t − log L0_{t−1}|`` (L0 measured on the evaluation tokens) against the Matching Score and
the approximation's EV of SAE Match (Spearman); then at a few early pairs SAE ``t`` is retrained at
SAE ``t−1``'s L0 (the profile's recipe and seed, only the L0 coefficient λ changed,
:func:`saematch_core.train.train_sae`) and the change of EV is measured.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from saematch_core.cost import feature_vectors
from saematch_core.experiments.inputs import ArrayLike, Inputs
from saematch_core.experiments.measures.coactivation import iter_code_pairs
from saematch_core.experiments.measures.replacement import (
    ApproxRow,
    CaptureStore,
    Replacement,
    check_tokens,
    replacement_rows,
)
from saematch_core.experiments.measures.scores import default_methods, matching_scores
from saematch_core.experiments.measures.summary import EARLY_FRACTION, rank_correlation
from saematch_core.experiments.measures.swap import permute_codes
from saematch_core.experiments.results import (
    JsonResult,
    cached_match,
    finite_mean,
    load_or_compute,
    map_layer_pairs,
    model_digest,
    pair_spec,
    sae_digest,
    tensor_digest,
)
from saematch_core.fold import fold
from saematch_core.match import MatchConfig
from saematch_core.prepare import layer_seed
from saematch_core.profiles import SAETrainConfig
from saematch_core.sae import SAE
from saematch_core.train import train_sae

__all__ = [
    "BLOCKS",
    "L0MismatchConfig",
    "L0MismatchResult",
    "LayerL0",
    "MismatchRow",
    "Objective",
    "ObjectiveConfig",
    "ObjectivePairResult",
    "ObjectiveResult",
    "ObjectiveRow",
    "RetrainResult",
    "RetrainRow",
    "Weighting",
    "block_distances",
    "block_weighted",
    "default_objectives",
    "l0_mismatch",
    "mean_l0",
    "paper_scale",
    "random_pair_distance",
    "rescale_input",
    "run",
]

Weighting = Literal["none", "normalised", "paper_scale"]
"""How an :class:`Objective` reweighs the parameter blocks before matching (module docstring)."""
_WEIGHTINGS: tuple[str, ...] = get_args(Weighting)

BLOCKS: tuple[str, ...] = ("W_dec", "b_enc", "W_enc")
"""The blocks of the per-term diagnostics, in the order the book shows them."""


# ============================================================================ SAE views and terms
def rescale_input(sae: SAE, c: float) -> SAE:
    """The same SAE as a function of ``u = x / c``: ``b_enc/c``, ``θ/c``, ``b_dec/c``.

    Its codes are the original codes divided by ``c`` and it reconstructs ``x̂ / c``; its folded
    codes ``f/θ`` are the original ones. For JumpReLU and ReLU SAEs (TopK selects by magnitude,
    which a common factor does not change either).

    >>> import torch
    >>> s = SAE(W_enc=torch.eye(2), b_enc=torch.ones(2), W_dec=torch.eye(2), b_dec=torch.ones(2),
    ...         threshold=torch.full((2,), 0.5))
    >>> x = torch.tensor([[2.0, 0.1]])
    >>> torch.allclose(rescale_input(s, 4.0)(x / 4).recon * 4, s(x).recon)
    True
    """
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
        raise ValueError(f"c: expected a finite number > 0, got {c!r}")
    theta = None if sae.threshold is None else sae.threshold / c
    return replace(sae, b_enc=sae.b_enc / c, b_dec=sae.b_dec / c, threshold=theta)


def block_weighted(sae: SAE, weights: Mapping[str, float]) -> SAE:
    """A copy whose blocks ``W_enc``, ``W_dec``, ``b_enc`` are multiplied by ``weights`` (default 1).

    Matching the copies weighs each block's squared distance by ``weight²``; folding still divides
    by θ (which is not touched). The copy is for matching only: its reconstruction is not the SAE's.
    """
    unknown = sorted(set(weights) - set(BLOCKS))
    if unknown:
        raise ValueError(f"weights: expected keys among {list(BLOCKS)}, got {unknown}")
    bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"weights: expected finite values > 0, got {bad}")
    return replace(
        sae,
        W_enc=sae.W_enc * weights.get("W_enc", 1.0),
        W_dec=sae.W_dec * weights.get("W_dec", 1.0),
        b_enc=sae.b_enc * weights.get("b_enc", 1.0),
    )


def _block_vectors(sae: SAE, block: str, fold_it: bool) -> Tensor:
    return feature_vectors(sae, (block,), fold=fold_it and sae.activation == "jumprelu", dtype=torch.float64)


def random_pair_distance(x: Tensor, y: Tensor) -> float:
    """Mean of ``‖x_i − y_j‖²`` over every pair ``(i, j)`` (the expectation under random partners),
    in closed form: ``mean‖x‖² + mean‖y‖² − 2 ⟨x̄, ȳ⟩``.

    >>> random_pair_distance(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [3.0]]))
    3.0
    """
    x, y = x.double(), y.double()
    value = x.square().sum(1).mean() + y.square().sum(1).mean() - 2 * (x.mean(0) @ y.mean(0))
    return float(value)


def block_distances(sae_a: SAE, sae_b: SAE, perm: Tensor, *, fold_it: bool = True) -> dict[str, float]:
    """Per block of :data:`BLOCKS`: the mean squared distance of the matched pairs (summed over the
    block's coordinates; folded parameters unless ``fold_it`` is False), as ``<block>``, and its mean
    over uniformly random pairs, as ``<block>_random``."""
    matched = perm >= 0
    out: dict[str, float] = {}
    for block in BLOCKS:
        x, y = _block_vectors(sae_a, block, fold_it), _block_vectors(sae_b, block, fold_it)
        d = (x[matched] - y[perm[matched]]).square().sum(1)
        out[block] = float(d.mean()) if bool(matched.any()) else math.nan
        out[f"{block}_random"] = random_pair_distance(x, y)
    return out


def normalising_weights(sae_a: SAE, sae_b: SAE, params: Sequence[str], *, fold_it: bool) -> dict[str, float]:
    """``1/√S_k`` per block ``k`` of ``params``, ``S_k`` its random-pair mean squared distance
    (:func:`random_pair_distance`); 1 where ``S_k`` is 0 (the block cannot tell features apart)."""
    out = {}
    for block in params:
        s = random_pair_distance(_block_vectors(sae_a, block, fold_it), _block_vectors(sae_b, block, fold_it))
        out[block] = 1.0 / math.sqrt(s) if s > 0 else 1.0
    return out


def paper_scale(saes: Mapping[int, SAE], paper_theta: float) -> float:
    """The input-scale factor ``c`` of :func:`rescale_input` that puts the geometric mean over
    layers of the mean θ at ``paper_theta``; 1 when no SAE has thresholds."""
    means = [float(s.threshold.double().mean()) for s in saes.values() if s.threshold is not None]
    means = [m for m in means if m > 0]
    if not means:
        return 1.0
    return math.exp(float(np.mean(np.log(means)))) / paper_theta


# ============================================================================ objectives
@dataclass(frozen=True, kw_only=True)
class Objective:
    """One way to match two SAEs' features (module docstring).

    Examples
    --------
    >>> Objective(name="decoder", match=MatchConfig(params=("W_dec",))).weighting
    'none'
    """

    name: str
    """Key in results (unique within a config)."""
    match: MatchConfig
    """Parameters, folding, metric and solver of the matching; ``match.fold`` also decides whether
    the approximation moves folded or raw codes."""
    weighting: Weighting = "none"
    """``none``; ``normalised`` (each block divided by its random-pair scale); ``paper_scale``
    (the SAEs re-expressed on the paper's input scale first)."""
    label: str = ""
    """Name in figures; default :attr:`name`."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Objective.name: expected a non-empty str, got {self.name!r}")
        if not isinstance(self.match, MatchConfig):
            raise TypeError(f"Objective.match: expected a MatchConfig, got {type(self.match).__name__}")
        if self.weighting not in _WEIGHTINGS:
            raise ValueError(
                f"Objective.weighting: expected one of {list(_WEIGHTINGS)}, got {self.weighting!r}"
            )
        if self.weighting == "normalised" and self.match.metric != "mse":
            raise ValueError("Objective.weighting: 'normalised' weighs squared distances; needs metric 'mse'")
        if not isinstance(self.label, str):
            raise TypeError(f"Objective.label: expected a str, got {type(self.label).__name__}")
        if not self.label:
            object.__setattr__(self, "label", self.name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (cache keys); the label is a name, not an input."""
        return {"name": self.name, "match": self.match.to_dict(), "weighting": self.weighting}


def default_objectives() -> tuple[Objective, ...]:
    """The ablation of the module docstring, the paper's objective first. The plain matchings use
    the configurations of :func:`~saematch_core.experiments.measures.scores.default_methods`, so
    they share their cached solves with the other sections."""
    base = default_methods()
    folded = base["folded"]
    return (
        Objective(name="summed", match=folded, label="summed (paper)"),
        Objective(name="normalised", match=folded, weighting="normalised", label="terms normalised"),
        Objective(name="paper_scale", match=folded, weighting="paper_scale", label="summed, paper's θ scale"),
        Objective(name="decoder", match=base["decoder_only"], label="folded decoder"),
        Objective(name="encoder", match=base["encoder_only"], label="folded encoder + b_enc"),
        Objective(name="encoder_no_bias", match=MatchConfig(params=("W_enc",)), label="folded encoder"),
        Objective(name="no_bias", match=MatchConfig(params=("W_enc", "W_dec")), label="summed without b_enc"),
        Objective(name="cosine", match=base["cosine"], label="decoder cosine"),
        Objective(
            name="cosine_folded_codes",
            match=MatchConfig(params=("W_dec",), metric="cosine"),
            label="decoder cosine, folded codes",
        ),
        Objective(name="unfolded", match=base["unfolded"], label="unfolded"),
    )


def _objective_perm(
    obj: Objective, a: SAE, b: SAE, c: float, cache_dir: Any
) -> tuple[Tensor, dict[str, float]]:
    """The matching of ``obj`` and the block weights it used (empty without weighting)."""
    weights: dict[str, float] = {}
    if obj.weighting == "paper_scale":
        a, b = rescale_input(a, c), rescale_input(b, c)
    elif obj.weighting == "normalised":
        weights = normalising_weights(a, b, obj.match.params, fold_it=obj.match.fold)
        a, b = block_weighted(a, weights), block_weighted(b, weights)
    return cached_match(a, b, obj.match, cache_dir).perm, weights


def _mover(a: SAE, b: SAE, perm: Tensor, folded: bool) -> Replacement:
    """``ĥ = decode_b(P(encode_a(h_prev)))`` with folded SAEs when ``folded``."""
    if folded:
        a = fold(a) if a.activation == "jumprelu" else a
        b = fold(b) if b.activation == "jumprelu" else b

    def fn(h_prev: Tensor | None, h_cur: Tensor) -> Tensor:
        assert h_prev is not None  # need_prev is set
        return b.decode(permute_codes(a.encode(h_prev.to(a.dtype)), perm.to(h_prev.device), b.d_sae))

    return fn


def _references(a: SAE, b: SAE) -> dict[str, Replacement]:
    """The baselines the objectives are read against: SAE ``t``'s own reconstruction (what a
    perfect matching could reach), SAE ``t−1``'s reconstruction and the skipped block."""

    def encdec_current(h_prev: Tensor | None, h_cur: Tensor) -> Tensor:
        return b(h_cur.to(b.dtype)).recon

    def encdec_previous(h_prev: Tensor | None, h_cur: Tensor) -> Tensor:
        assert h_prev is not None
        return a(h_prev.to(a.dtype)).recon

    def drop(h_prev: Tensor | None, h_cur: Tensor) -> Tensor:
        assert h_prev is not None
        return h_prev

    return {"encdec_current": encdec_current, "encdec_previous": encdec_previous, "drop": drop}


# ============================================================================ configs and results
def _check_eval(owner: str, batch_size: object, outlier_factor: object, median_norms: object) -> Any:
    """Validate the token-evaluation fields shared by both configs; returns ``median_norms`` normalised."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{owner}.batch_size: expected an int >= 1, got {batch_size!r}")
    if outlier_factor is not None and not (isinstance(outlier_factor, (int, float)) and outlier_factor > 1):
        raise ValueError(f"{owner}.outlier_factor: expected None or a number > 1, got {outlier_factor!r}")
    if median_norms is None:
        return None
    if not isinstance(median_norms, Mapping) or not all(
        isinstance(v, (int, float)) and v > 0 for v in median_norms.values()
    ):
        raise ValueError(f"{owner}.median_norms: expected a mapping layer → positive float")
    return {int(k): float(v) for k, v in median_norms.items()}


def _check_int(owner: str, name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}.{name}: expected an int >= {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """What :func:`run` measures and on how much."""

    objectives: tuple[Objective, ...] = field(default_factory=default_objectives)
    """The objectives compared; names must be unique. The first is the reference of
    :attr:`ObjectiveRow.agree_first`."""
    stride: int = 1
    """Evaluate every ``stride``-th consecutive layer pair (1: all), starting with the first: the
    knob of the compute (each pair costs a clean forward pass, one suffix pass per objective and
    reference, one co-activation pass and the uncached matchings)."""
    references: bool = True
    """Also evaluate enc-dec current, enc-dec previous and layer drop at every pair."""
    n_null: int = 5
    """Random matchings behind the Matching Score's chance level."""
    paper_theta: float = 0.112
    """Mean θ the ``paper_scale`` objective puts the SAEs at (geometric mean over layers):
    √(0.05 · 0.25), the middle of the paper's Fig. 1 axis for Gemma Scope."""
    batch_size: int = 8
    """Chunks per forward pass."""
    outlier_factor: float | None = 10.0
    """Tokens whose ‖h_{t−1}‖ or ‖h_t‖ exceeds this × the median pass through and are not counted."""
    median_norms: Mapping[int, float] | None = None
    """Layer → median ‖h‖ (the activation cache's), so outliers are those of training; ``None``:
    each batch's median."""

    def __post_init__(self) -> None:
        objs = tuple(self.objectives)
        if not objs or not all(isinstance(o, Objective) for o in objs):
            raise TypeError("ObjectiveConfig.objectives: expected a non-empty tuple of Objective")
        names = [o.name for o in objs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"ObjectiveConfig.objectives: expected unique names, got duplicates {dup}")
        object.__setattr__(self, "objectives", objs)
        _check_int("ObjectiveConfig", "stride", self.stride, 1)
        _check_int("ObjectiveConfig", "n_null", self.n_null, 0)
        if not isinstance(self.references, bool):
            raise TypeError(f"ObjectiveConfig.references: expected a bool, got {self.references!r}")
        if not (isinstance(self.paper_theta, (int, float)) and self.paper_theta > 0):
            raise ValueError(f"ObjectiveConfig.paper_theta: expected a number > 0, got {self.paper_theta!r}")
        norms = _check_eval("ObjectiveConfig", self.batch_size, self.outlier_factor, self.median_norms)
        object.__setattr__(self, "median_norms", norms)


@dataclass(frozen=True, kw_only=True)
class ObjectiveRow:
    """One objective on one layer pair."""

    objective: str
    explained_variance: float
    """EV of the approximation ``ĥ_t`` built with this matching."""
    delta_loss: float
    """ΔL (nats/token) of the same replacement."""
    delta_loss_se: float
    kl: float
    matching_score: float
    """Mean ``P(partner active | feature active)`` over included pairs."""
    agree_first: float
    """Fraction of SAE ``t−1``'s features matched to the same partner as by the config's first objective."""
    terms: Mapping[str, float]
    """:func:`block_distances` of the matching (folded parameters)."""
    weights: Mapping[str, float]
    """Block weights of a ``normalised`` objective (empty otherwise)."""


@dataclass(frozen=True, kw_only=True)
class ObjectivePairResult(JsonResult):
    """Every objective (and reference) on one layer pair."""

    kind: ClassVar[str] = "objective_pair"
    layer_a: int
    layer_b: int
    rows: tuple[ObjectiveRow, ...]
    references: tuple[ApproxRow, ...]
    """enc-dec current / previous and layer drop (empty without ``references``)."""
    random_score: float
    """Matching Score of random partners (mean over the null draws)."""
    scale: float
    """The ``c`` of the ``paper_scale`` objective."""
    l0_a: float
    """Mean L0 of SAE ``t−1`` on the counted tokens of the approximation."""
    l0_b: float

    def row(self, objective: str) -> ObjectiveRow:
        """The row of ``objective``."""
        for r in self.rows:
            if r.objective == objective:
                return r
        raise KeyError(f"objective: no row {objective!r}; have {[r.objective for r in self.rows]}")

    def reference(self, name: str) -> ApproxRow:
        """The row of reference ``name`` (``encdec_current``, ``encdec_previous``, ``drop``)."""
        for r in self.references:
            if r.scheme == name:
                return r
        raise KeyError(f"name: no reference {name!r}; have {[r.scheme for r in self.references]}")


@dataclass(frozen=True, eq=False)
class ObjectiveResult:
    """One :class:`ObjectivePairResult` per evaluated layer pair (each cached on its own)."""

    pairs: tuple[ObjectivePairResult, ...]
    labels: Mapping[str, str]
    """Objective name → label for figures, in config order."""

    @property
    def layers(self) -> list[int]:
        """Layer ``t`` (the replaced one, the pair's second) of every pair, in order."""
        return [p.layer_b for p in self.pairs]

    @property
    def objectives(self) -> list[str]:
        return list(self.labels)

    def series(self, objective: str, metric: str = "explained_variance") -> list[float]:
        """``metric`` of ``objective`` per pair (a field of :class:`ObjectiveRow`, or a key of its
        ``terms`` such as ``W_dec`` / ``W_dec_random``)."""
        out = []
        for p in self.pairs:
            r = p.row(objective)
            out.append(float(r.terms[metric]) if metric in r.terms else float(getattr(r, metric)))
        return out

    def reference_series(self, name: str, metric: str = "explained_variance") -> list[float]:
        """``metric`` of reference ``name`` per pair."""
        return [float(getattr(p.reference(name), metric)) for p in self.pairs]

    def mean(self, objective: str, metric: str = "explained_variance") -> float:
        """Mean of :meth:`series` over pairs where it is defined."""
        return finite_mean(self.series(objective, metric))

    def best(self, metric: str = "explained_variance", *, lower: bool = False) -> str:
        """The objective with the best mean ``metric`` (highest, or lowest with ``lower``)."""
        means = {o: self.mean(o, metric) for o in self.objectives}
        ok = {o: v for o, v in means.items() if not math.isnan(v)}
        if not ok:
            raise ValueError(f"metric: {metric!r} is undefined for every objective")
        return (min if lower else max)(ok, key=lambda o: ok[o])

    def wins(
        self, objective: str, than: str, metric: str = "explained_variance", *, lower: bool = False
    ) -> int:
        """Pairs where ``objective`` beats ``than`` on ``metric``."""
        a, b = np.asarray(self.series(objective, metric)), np.asarray(self.series(than, metric))
        return int(np.sum(a < b if lower else a > b))

    def table(self) -> tuple[list[str], Sequence[tuple[object, ...]]]:
        """Headers and rows: per objective, means over pairs of EV, ΔL, Matching Score, agreement
        with the first objective, and pairs where its EV beats the first's."""
        first = self.objectives[0]
        rows = [
            (
                self.labels[o],
                f"{self.mean(o):.3f}",
                f"{self.mean(o, 'delta_loss'):.3f}",
                f"{self.mean(o, 'matching_score'):.3f}",
                f"{self.mean(o, 'agree_first'):.2f}",
                f"{self.wins(o, first)}/{len(self.pairs)}",
            )
            for o in self.objectives
        ]
        headers = [
            "objective",
            "mean EV",
            "mean ΔL (nats)",
            "mean Matching Score",
            f"same partner as {first}",
            f"pairs with EV above {first}",
        ]
        return headers, rows


def _pairs(inputs: Inputs, stride: int) -> list[tuple[int, int]]:
    return inputs.layer_pairs(data=True)[::stride]


def _token_spec(
    inputs: Inputs, outlier_factor: float | None, medians: tuple[float | None, float | None]
) -> dict[str, Any]:
    model, (tokens, mask) = inputs.require_model()
    tokens, mask = check_tokens("tokens", tokens, mask)
    return {
        "model": model_digest(model),
        "tokens": tensor_digest(tokens),
        "token_mask": tensor_digest(mask),
        "outlier_factor": outlier_factor,
        "median_norms": None if medians == (None, None) else list(medians),
    }


def _medians(norms: Mapping[int, float] | None, la: int, lb: int) -> tuple[float | None, float | None]:
    return (None, None) if norms is None else (norms.get(la), norms.get(lb))


def _evaluate_pair(
    inputs: Inputs,
    la: int,
    lb: int,
    objectives: Sequence[Objective],
    *,
    saes: tuple[SAE, SAE] | None = None,
    scale: float,
    references: bool,
    n_null: int,
    batch_size: int,
    outlier_factor: float | None,
    medians: tuple[float | None, float | None],
    store: CaptureStore | None = None,
) -> ObjectivePairResult:
    """Every objective on one pair: matchings, replacement metrics, Matching Scores, terms."""
    a, b = (inputs.saes[la], inputs.saes[lb]) if saes is None else saes
    model, (tokens, mask) = inputs.require_model()
    tokens, mask = check_tokens("tokens", tokens, mask)
    device = next(model.parameters()).device
    a_dev, b_dev = a.to(device=device), b.to(device=device)
    perms, weights = {}, {}
    for obj in objectives:
        perms[obj.name], weights[obj.name] = _objective_perm(obj, a, b, scale, inputs.cache_dir)
    fns: dict[str, Replacement] = {
        o.name: _mover(a_dev, b_dev, perms[o.name], o.match.fold) for o in objectives
    }
    refs = _references(a_dev, b_dev) if references else {}
    l0 = {"a": 0.0, "b": 0.0, "n": 0}

    def count_l0(h_prev: Tensor | None, h_cur: Tensor, counted: Tensor) -> None:
        assert h_prev is not None
        l0["a"] += float((a_dev.encode(h_prev[counted].to(a_dev.dtype)) > 0).sum())
        l0["b"] += float((b_dev.encode(h_cur[counted].to(b_dev.dtype)) > 0).sum())
        l0["n"] += int(counted.sum())

    found = replacement_rows(
        model,
        tokens,
        mask,
        lb,
        {**fns, **{f"_ref_{k}": v for k, v in refs.items()}},
        batch_size=batch_size,
        outlier_factor=outlier_factor,
        medians=medians,
        store=store,
        on_batch=count_l0,
    )
    scores = matching_scores(
        inputs, (la, lb), {o.name: perms[o.name] for o in objectives}, saes=(a, b), n_null=n_null
    )
    first = perms[objectives[0].name]
    rows = tuple(
        ObjectiveRow(
            objective=o.name,
            explained_variance=found[o.name].explained_variance,
            delta_loss=found[o.name].delta_loss,
            delta_loss_se=found[o.name].delta_loss_se,
            kl=found[o.name].kl,
            matching_score=scores.row(o.name).matching_score,
            agree_first=float((perms[o.name] == first).double().mean()),
            terms=block_distances(a, b, perms[o.name]),
            weights=weights[o.name],
        )
        for o in objectives
    )
    ref_rows = tuple(replace(found[f"_ref_{k}"], scheme=k) for k in refs)
    n = max(int(l0["n"]), 1)
    return ObjectivePairResult(
        layer_a=la,
        layer_b=lb,
        rows=rows,
        references=ref_rows,
        random_score=scores.row("random").matching_score if n_null else math.nan,
        scale=scale,
        l0_a=l0["a"] / n if l0["n"] else math.nan,
        l0_b=l0["b"] / n if l0["n"] else math.nan,
    )


def run(inputs: Inputs, config: ObjectiveConfig | None = None) -> ObjectiveResult:
    """The objective ablation (module docstring) on every ``stride``-th consecutive layer pair.

    Parameters
    ----------
    inputs : the SAEs (all of them set the ``paper_scale`` factor), activations of every evaluated
        layer on the same tokens and ``keep`` (Matching Score), the language model and ``tokens``
        (the approximation), ``seed`` (the random null), the result cache.
    config : objectives, stride and token settings.

    Returns
    -------
    ObjectiveResult
        One :class:`ObjectivePairResult` per evaluated pair, each cached on its own (keyed by the
        two SAEs, the activations, the model, the tokens and the config).
    """
    cfg = ObjectiveConfig() if config is None else config
    if not isinstance(cfg, ObjectiveConfig):
        raise TypeError(f"config: expected an ObjectiveConfig, got {type(cfg).__name__}")
    scale = paper_scale(inputs.saes, cfg.paper_theta)
    pairs = _pairs(inputs, cfg.stride)
    if not pairs:
        raise ValueError("inputs: no consecutive layer pairs with SAEs and activations to evaluate")
    model, (tokens, _) = inputs.require_model()
    store = CaptureStore(model, tokens, [lb for _, lb in pairs])

    def spec(la: int, lb: int) -> dict[str, Any]:
        return {
            **_token_spec(inputs, cfg.outlier_factor, _medians(cfg.median_norms, la, lb)),
            "objectives": [o.to_dict() for o in cfg.objectives],
            "references": cfg.references,
            "n_null": cfg.n_null,
            "seed": inputs.seed,
            "scale": scale,
        }

    def compute(la: int, lb: int) -> ObjectivePairResult:
        return _evaluate_pair(
            inputs,
            la,
            lb,
            cfg.objectives,
            scale=scale,
            references=cfg.references,
            n_null=cfg.n_null,
            batch_size=cfg.batch_size,
            outlier_factor=cfg.outlier_factor,
            medians=_medians(cfg.median_norms, la, lb),
            store=store,
        )

    out = map_layer_pairs(ObjectivePairResult, inputs, pairs, compute, desc="objectives", spec=spec)
    return ObjectiveResult(pairs=tuple(out), labels={o.name: o.label for o in cfg.objectives})


# ============================================================================ L0 mismatch (Fig. 15)
def mean_l0(sae: SAE, acts: ArrayLike, keep: ArrayLike | None = None, *, chunk_size: int = 4096) -> float:
    """Mean number of active features per kept token (``nan`` without kept tokens)."""
    total, n = 0.0, 0
    for chunk in iter_code_pairs(sae, None, acts, None, keep=keep, chunk_size=chunk_size):
        total += float((chunk.a > 0).sum())
        n += chunk.a.shape[0]
    return total / n if n else math.nan


@dataclass(frozen=True, kw_only=True)
class L0MismatchConfig:
    """What :func:`l0_mismatch` measures."""

    objective: Objective = field(default_factory=lambda: default_objectives()[0])
    """The matching whose Matching Score and EV are related to the mismatch (default the paper's)."""
    stride: int = 1
    """Every ``stride``-th consecutive pair enters the correlations (1: all)."""
    n_retrain: int = 3
    """Early pairs at which SAE ``t`` is retrained at SAE ``t−1``'s L0 (0: none)."""
    retrain_pairs: tuple[tuple[int, int], ...] | None = None
    """Those pairs explicitly; ``None``: the ``n_retrain`` pairs with the largest mismatch among the
    pairs whose first layer lies in the first :attr:`early_fraction` of the depth."""
    early_fraction: float = EARLY_FRACTION
    """The paper's early layers (0–9 of 26) as a fraction of the depth."""
    train: SAETrainConfig | None = None
    """The recipe the SAEs were trained with (the profile's); required to retrain. Layer ``t``'s SAE
    is retrained with :func:`saematch_core.prepare.layer_seed` (same seed) and another λ."""
    l0_exponent: float = 0.72
    """``L0 ∝ λ^(−l0_exponent)``: the first guess of λ for a target L0 (measured on the default
    profile's L0 sweep: λ 0.05 → L0 213, 0.6 → 35); later tries interpolate the measured points."""
    l0_tolerance: float = 0.03
    """Stop once the retrained SAE's L0 is within this relative distance of the target."""
    max_tries: int = 3
    """Trainings per retrained pair at most (the closest L0 is kept)."""
    n_control: int = 1
    """At the first this-many retrained pairs, also retrain SAE ``t`` at its own λ (same seed, same
    code path): the EV change of pure retraining, against which the L0 effect is read. Training is
    deterministic, so one pair shows whether the retraining path reproduces the original SAE; each
    control costs one more training."""
    n_null: int = 0
    """Random matchings for the Matching Score's chance level (not needed for the correlations)."""
    batch_size: int = 8
    """Chunks per forward pass."""
    outlier_factor: float | None = 10.0
    """As in :class:`ObjectiveConfig`."""
    median_norms: Mapping[int, float] | None = None
    """As in :class:`ObjectiveConfig`."""

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            raise TypeError(f"L0MismatchConfig.objective: expected an Objective, got {self.objective!r}")
        _check_int("L0MismatchConfig", "stride", self.stride, 1)
        _check_int("L0MismatchConfig", "n_retrain", self.n_retrain, 0)
        _check_int("L0MismatchConfig", "max_tries", self.max_tries, 1)
        _check_int("L0MismatchConfig", "n_null", self.n_null, 0)
        _check_int("L0MismatchConfig", "n_control", self.n_control, 0)
        if self.retrain_pairs is not None:
            try:
                pairs = tuple((int(x), int(y)) for x, y in self.retrain_pairs)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    "L0MismatchConfig.retrain_pairs: expected (layer_a, layer_b) pairs, "
                    f"got {self.retrain_pairs!r}"
                ) from exc
            object.__setattr__(self, "retrain_pairs", pairs)
        if not 0 < self.early_fraction <= 1:
            raise ValueError(
                f"L0MismatchConfig.early_fraction: expected in (0, 1], got {self.early_fraction!r}"
            )
        if self.train is not None and not isinstance(self.train, SAETrainConfig):
            raise TypeError(
                f"L0MismatchConfig.train: expected an SAETrainConfig, got {type(self.train).__name__}"
            )
        for name in ("l0_exponent", "l0_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"L0MismatchConfig.{name}: expected a number > 0, got {value!r}")
        norms = _check_eval("L0MismatchConfig", self.batch_size, self.outlier_factor, self.median_norms)
        object.__setattr__(self, "median_norms", norms)


@dataclass(frozen=True, kw_only=True)
class MismatchRow:
    """One consecutive pair: L0 mismatch and how well the matching works."""

    layer_a: int
    layer_b: int
    l0_a: float
    """Mean L0 of SAE ``t−1`` on the kept evaluation rows."""
    l0_b: float
    mismatch: float
    """``|log L0_t − log L0_{t−1}|``."""
    matching_score: float
    explained_variance: float
    """EV of the approximation with the config's objective."""
    delta_loss: float


@dataclass(frozen=True, kw_only=True)
class RetrainRow:
    """One pair whose SAE ``t`` was retrained at SAE ``t−1``'s L0."""

    layer_a: int
    layer_b: int
    target_l0: float
    """L0 of SAE ``t−1`` (the neighbour's)."""
    l0_before: float
    """L0 of the original SAE ``t``."""
    l0_after: float
    """L0 of the retrained SAE ``t`` (closest try)."""
    coef_before: float
    """λ of the original SAE."""
    coef_after: float
    tries: int
    ev_before: float
    """EV of the approximation with the original SAE ``t``."""
    ev_after: float
    ev_control: float
    """EV with SAE ``t`` retrained at its own λ (``nan`` where the pair has no control: see
    :attr:`L0MismatchConfig.n_control`)."""
    score_before: float
    """Matching Score with the original SAE ``t``."""
    score_after: float
    delta_loss_before: float
    delta_loss_after: float
    fvu_after: float
    """Training FVU of the retrained SAE (last 10 % of steps)."""

    @property
    def ev_gain(self) -> float:
        """``ev_after − ev_before``."""
        return self.ev_after - self.ev_before


@dataclass(frozen=True, kw_only=True)
class L0MismatchResult(JsonResult):
    """Per pair mismatch and quality, and the retrained pairs."""

    kind: ClassVar[str] = "l0_mismatch"
    rows: tuple[MismatchRow, ...]
    retrained: tuple[RetrainRow, ...]

    @property
    def rho_mismatch_score(self) -> float:
        """Spearman of the mismatch and the Matching Score over pairs."""
        return rank_correlation(
            [r.mismatch for r in self.rows], [r.matching_score for r in self.rows], min_points=3
        )

    @property
    def rho_mismatch_ev(self) -> float:
        """Spearman of the mismatch and the approximation's EV over pairs."""
        return rank_correlation(
            [r.mismatch for r in self.rows], [r.explained_variance for r in self.rows], min_points=3
        )

    @property
    def ev_gain(self) -> tuple[float, ...]:
        """Per retrained pair, EV(retrained at the neighbour's L0) − EV(original)."""
        return tuple(float(r.ev_gain) for r in self.retrained)

    def l0_neighbours(self) -> dict[str, Any]:
        """The three measurements of the Fig. 15 claim: ``rho_mismatch_score``, ``rho_mismatch_ev``
        (floats) and ``ev_gain`` (a tuple of floats), as keyword arguments."""
        return {
            "rho_mismatch_score": float(self.rho_mismatch_score),
            "rho_mismatch_ev": float(self.rho_mismatch_ev),
            "ev_gain": self.ev_gain,
        }


def pick_retrain_pairs(
    rows: Sequence[MismatchRow], cfg: L0MismatchConfig, n_layers: int
) -> list[tuple[int, int]]:
    """The pairs :func:`l0_mismatch` retrains: ``cfg.retrain_pairs``, or the ``cfg.n_retrain`` pairs of
    ``rows`` with the largest mismatch among those starting in the first ``cfg.early_fraction`` of
    ``n_layers`` (ascending)."""
    if cfg.retrain_pairs is not None:
        return list(cfg.retrain_pairs)
    early = [r for r in rows if r.layer_a < cfg.early_fraction * n_layers and math.isfinite(r.mismatch)]
    early.sort(key=lambda r: (-r.mismatch, r.layer_a))
    return sorted((r.layer_a, r.layer_b) for r in early[: cfg.n_retrain])


def _next_coef(tried: Sequence[tuple[float, float]], target: float, exponent: float) -> float:
    """λ for ``target`` L0 from ``(λ, L0)`` points: the power law through the last point with the
    given exponent, or the log-log secant of the last two points when its slope is negative."""
    (c1, l1) = tried[-1]
    slope = -exponent
    if len(tried) >= 2:
        c0, l0 = tried[-2]
        if c0 != c1 and l0 > 0 and l1 > 0:
            s = (math.log(l1) - math.log(l0)) / (math.log(c1) - math.log(c0))
            if s < 0:
                slope = s
    step = (math.log(target) - math.log(l1)) / slope
    # A flat or noisy L0 response would send the secant far away: at most a factor 4 per try.
    return c1 * math.exp(min(max(step, -math.log(4.0)), math.log(4.0)))


@dataclass(frozen=True, kw_only=True)
class LayerL0(JsonResult):
    """Mean L0 of one SAE on the kept evaluation rows (cached: 30 layers take a minute to encode)."""

    kind: ClassVar[str] = "layer_l0"
    layer: int
    l0: float


@dataclass(frozen=True, kw_only=True)
class RetrainResult(JsonResult):
    """One retrained pair (cached: each costs one to ``max_tries + 1`` SAE trainings)."""

    kind: ClassVar[str] = "l0_retrain"
    row: RetrainRow


def l0_mismatch(
    inputs: Inputs,
    config: L0MismatchConfig | None = None,
    *,
    train_acts: Mapping[int, ArrayLike] | None = None,
) -> L0MismatchResult:
    """The paper's Fig. 15 analogue (module docstring).

    Parameters
    ----------
    inputs : as for :func:`run` (SAEs, activations and ``keep``, model and ``tokens``, cache).
    config : the objective, stride and the retraining.
    train_acts : layer → training rows (n, d_model) of the layers to retrain (position 0 and
        outliers already removed, as ``prepare`` trains); required when pairs are retrained.

    Returns
    -------
    L0MismatchResult
        Assembled from cached parts: every layer's L0, every pair's evaluation (shared with
        :func:`run` when it evaluates the same single objective without references) and every
        retrained pair.
    """
    cfg = L0MismatchConfig() if config is None else config
    if not isinstance(cfg, L0MismatchConfig):
        raise TypeError(f"config: expected an L0MismatchConfig, got {type(cfg).__name__}")
    pairs = _pairs(inputs, cfg.stride)
    if not pairs:
        raise ValueError("inputs: no consecutive layer pairs with SAEs and activations to evaluate")
    scale = paper_scale(inputs.saes, ObjectiveConfig().paper_theta)
    model, (tokens, _) = inputs.require_model()
    store = CaptureStore(model, tokens, [lb for _, lb in pairs])
    evaluate = _pair_evaluator(inputs, cfg, scale, store)

    def pair_spec_of(la: int, lb: int) -> dict[str, Any]:
        return {
            **_token_spec(inputs, cfg.outlier_factor, _medians(cfg.median_norms, la, lb)),
            "objectives": [cfg.objective.to_dict()],
            "references": False,
            "n_null": cfg.n_null,
            "seed": inputs.seed,
            "scale": scale,
        }

    evals = map_layer_pairs(
        ObjectivePairResult,
        inputs,
        pairs,
        lambda la, lb: evaluate(la, lb, None),
        desc="L0 mismatch",
        spec=pair_spec_of,
    )
    l0 = {x: _layer_l0(inputs, x) for x in sorted({x for p in pairs for x in p})}
    rows = tuple(
        _mismatch_row(la, lb, l0[la], l0[lb], res.row(cfg.objective.name))
        for (la, lb), res in zip(pairs, evals, strict=True)
    )
    if cfg.retrain_pairs is not None or cfg.n_retrain:
        retrain = pick_retrain_pairs(rows, cfg, max(inputs.saes) + 1)
    else:
        retrain = []
    by_pair = {(r.layer_a, r.layer_b): r for r in rows}
    retrained = []
    for index, (la, lb) in enumerate(retrain):
        control = index < cfg.n_control
        before = by_pair.get((la, lb))
        if before is None:
            before = _mismatch_row(
                la,
                lb,
                _layer_l0(inputs, la),
                _layer_l0(inputs, lb),
                evaluate(la, lb, None).row(cfg.objective.name),
            )
        if train_acts is None or lb not in train_acts:
            have = [] if train_acts is None else sorted(train_acts)
            raise ValueError(f"train_acts: expected training rows of layer {lb}, got layers {have}")
        spec = {
            **pair_spec_of(la, lb),
            **pair_spec(
                inputs.saes[la],
                inputs.saes[lb],
                (la, lb),
                acts=(inputs.acts(la), inputs.acts(lb)),
                keep=inputs.keep,
            ),
            "train_rows": tensor_digest(np.asarray(train_acts[lb])),
            "retrain": {k: v for k, v in _config_dict(cfg).items() if k in _RETRAIN_KEYS},
            "control": control,
        }
        rows_lb = train_acts[lb]
        found = load_or_compute(
            RetrainResult,
            spec,
            lambda la=la, lb=lb, before=before, rows_lb=rows_lb, control=control: RetrainResult(
                row=_retrain_pair(inputs, cfg, la, lb, before, evaluate, rows_lb, control=control)
            ),
            cache_dir=inputs.cache_dir,
            force=inputs.force,
        )
        retrained.append(found.row)
    return L0MismatchResult(rows=rows, retrained=tuple(retrained))


_RETRAIN_KEYS = ("objective", "train", "l0_exponent", "l0_tolerance", "max_tries", "n_null")


def _layer_l0(inputs: Inputs, layer: int) -> float:
    sae, acts = inputs.saes[layer], inputs.acts(layer)
    spec = {
        "sae": sae_digest(sae),
        "acts": tensor_digest(np.asarray(acts)),
        "keep": None if inputs.keep is None else tensor_digest(np.asarray(inputs.keep)),
        "layer": layer,
    }
    found = load_or_compute(
        LayerL0,
        spec,
        lambda: LayerL0(layer=layer, l0=mean_l0(sae, acts, inputs.keep, chunk_size=inputs.chunk_size)),
        cache_dir=inputs.cache_dir,
        force=inputs.force,
    )
    return found.l0


def _mismatch_row(la: int, lb: int, l0_a: float, l0_b: float, r: ObjectiveRow) -> MismatchRow:
    ok = l0_a > 0 and l0_b > 0
    return MismatchRow(
        layer_a=la,
        layer_b=lb,
        l0_a=l0_a,
        l0_b=l0_b,
        mismatch=abs(math.log(l0_b) - math.log(l0_a)) if ok else math.nan,
        matching_score=r.matching_score,
        explained_variance=r.explained_variance,
        delta_loss=r.delta_loss,
    )


def _config_dict(cfg: L0MismatchConfig) -> dict[str, Any]:
    return {
        "objective": cfg.objective.to_dict(),
        "stride": cfg.stride,
        "n_retrain": cfg.n_retrain,
        "retrain_pairs": None if cfg.retrain_pairs is None else [list(p) for p in cfg.retrain_pairs],
        "early_fraction": cfg.early_fraction,
        "train": None if cfg.train is None else dataclasses.asdict(cfg.train),
        "l0_exponent": cfg.l0_exponent,
        "l0_tolerance": cfg.l0_tolerance,
        "max_tries": cfg.max_tries,
        "n_control": cfg.n_control,
        "n_null": cfg.n_null,
        "batch_size": cfg.batch_size,
        "outlier_factor": cfg.outlier_factor,
        "median_norms": None
        if cfg.median_norms is None
        else {str(k): v for k, v in cfg.median_norms.items()},
    }


def _pair_evaluator(
    inputs: Inputs, cfg: L0MismatchConfig, scale: float, store: CaptureStore
) -> Callable[[int, int, SAE | None], ObjectivePairResult]:
    """``evaluate(la, lb, sae_b)``: the config's objective on one pair, with SAE ``t`` replaced by
    ``sae_b`` when given."""

    def evaluate(la: int, lb: int, sae_b: SAE | None) -> ObjectivePairResult:
        return _evaluate_pair(
            inputs,
            la,
            lb,
            (cfg.objective,),
            saes=None if sae_b is None else (inputs.saes[la], sae_b),
            scale=scale,
            references=False,
            n_null=cfg.n_null,
            batch_size=cfg.batch_size,
            outlier_factor=cfg.outlier_factor,
            medians=_medians(cfg.median_norms, la, lb),
            store=store,
        )

    return evaluate


def _retrain_pair(
    inputs: Inputs,
    cfg: L0MismatchConfig,
    la: int,
    lb: int,
    before: MismatchRow,
    evaluate: Callable[[int, int, SAE | None], ObjectivePairResult],
    train_rows: ArrayLike,
    *,
    control: bool,
) -> RetrainRow:
    """Retrain SAE ``lb`` at SAE ``la``'s L0 (``before.l0_a``) and measure the pair again; with
    ``control``, also at its own λ."""
    if cfg.train is None:
        raise ValueError("L0MismatchConfig.train: the SAEs' training recipe is required to retrain")
    rows = torch.as_tensor(np.asarray(train_rows, dtype=np.float32))
    recipe = layer_seed(cfg.train, lb)

    def train(coef: float) -> tuple[SAE, float, float]:
        result = train_sae(
            rows, replace(recipe, l0_coef=coef), progress=inputs.progress, desc=f"retrain {lb}"
        )
        return (
            result.sae,
            mean_l0(result.sae, inputs.acts(lb), inputs.keep, chunk_size=inputs.chunk_size),
            result.final_fvu,
        )

    target = before.l0_a
    tried: list[tuple[float, float]] = [(recipe.l0_coef, before.l0_b)]
    best: tuple[SAE, float, float, float] | None = None
    for _ in range(cfg.max_tries):
        coef = _next_coef(tried, target, cfg.l0_exponent)
        sae, l0, fvu = train(coef)
        tried.append((coef, l0))
        if best is None or abs(math.log(l0 / target)) < abs(math.log(best[1] / target)):
            best = (sae, l0, fvu, coef)
        if abs(l0 / target - 1) <= cfg.l0_tolerance:
            break
    assert best is not None  # max_tries >= 1
    after = evaluate(la, lb, best[0]).row(cfg.objective.name)
    ev_control = math.nan
    if control:
        ev_control = evaluate(la, lb, train(recipe.l0_coef)[0]).row(cfg.objective.name).explained_variance
    return RetrainRow(
        layer_a=la,
        layer_b=lb,
        target_l0=target,
        l0_before=before.l0_b,
        l0_after=best[1],
        coef_before=recipe.l0_coef,
        coef_after=best[3],
        tries=len(tried) - 1,
        ev_before=before.explained_variance,
        ev_after=after.explained_variance,
        ev_control=ev_control,
        score_before=before.matching_score,
        score_after=after.matching_score,
        delta_loss_before=before.delta_loss,
        delta_loss_after=after.delta_loss,
        fvu_after=best[2],
    )
