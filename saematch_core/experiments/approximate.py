"""Hidden-state approximation: replace the residual after block ``t`` and measure the damage.

For each layer ``t`` (``t ≥ 1``) and each :class:`Scheme`, the residual stream ``h_t`` (output of
decoder block ``t``) is replaced by an approximation ``ĥ_t``, the rest of the model runs on it, and
two numbers are reported per (layer, scheme) (paper Figs. 10/11/14/16/17):

- ``ΔL``: mean increase of the next-token loss (nats/token) against the clean model;
- explained variance ``EV = 1 − Var(ĥ_t − h_t) / Var(h_t)``, where ``Var`` of a set of vectors is
  the mean squared distance to their mean (summed over the ``d_model`` coordinates).

Schemes (``kind``):

- ``"match"``: SAE Match, ``ĥ_t = W_dec^(t) P(f_{t−1}) + b_dec^(t)`` with ``f_{t−1}`` the codes of
  SAE ``t−1`` on ``h_{t−1}`` and ``P`` the matching of SAE ``t−1``'s features to SAE ``t``'s
  (:func:`saematch_core.match.match`). With ``MatchConfig.fold`` both SAEs are folded *before*
  encoding and decoding, so the codes moved by ``P`` are the folded codes ``f/θ^(t−1)`` and the
  decoder is the folded ``θ^(t) W_dec^(t)``: the matching is always applied to the codes of the same
  SAE pair it was computed on.
- ``"hybrid"`` (appendix B): features of SAE ``t−1`` whose matching cost ranks in the lowest
  ``quantile`` fraction go through ``P`` and SAE ``t``'s decoder, the rest through SAE ``t−1``'s own
  decoder: ``ĥ = W_dec^(t−1) f_{q+} + W_dec^(t) P(f_{q−}) + b_dec^(t)``. ``quantile = 1`` is
  ``"match"``; ``0`` is the previous layer's reconstruction with layer ``t``'s decoder bias.
- ``"drop"``: ``ĥ_t = h_{t−1}`` (block ``t`` skipped).
- ``"encdec_current"``: ``ĥ_t = SAE_t(h_t)``, the current layer's own reconstruction.
- ``"encdec_previous"``: ``ĥ_t = SAE_{t−1}(h_{t−1})``.
- ``"linear"``: ``ĥ_t = h_{t−1} A + c``, least squares (tiny ridge) fitted on separate tokens.
- ``"exact"``: ``ĥ_t = h_t`` (a control: ΔL = 0 and EV = 1 up to rounding).

Tokens: position 0 of every chunk (BOS / attention sink), padding, and *outlier* tokens (norm of
``h_{t−1}`` or ``h_t`` above ``outlier_factor`` × the median over the batch's real tokens) pass
through unchanged and are left out of both metrics. The loss term of position ``p`` is the loss of
predicting token ``p+1``; it counts when ``p`` counts and ``p+1`` is a real token.

Cost: one clean forward pass per (layer, batch) records ``h_{t−1}``, ``h_t``, the clean loss and
the exact arguments every block was called with; each scheme then runs only blocks ``t+1 …`` and
the final norm and unembedding on ``ĥ_t``. That shortcut is checked once per call against the full
model with a forward hook (:func:`replaced_layer`), and the full model is used when they disagree.
Results are cached per (layer, scheme) under :func:`saematch_core.experiments.results.result_path`: a rerun is
instant, an interrupted run resumes at the layer it stopped in, and adding a scheme computes only it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.measures.replacement import (
    ApproxRow,
    CaptureStore,
    check_tokens,
    counted_tokens,
    replaced_layer,
    replacement_rows,
)
from saematch_core.experiments.measures.swap import matched_pair, permute_codes
from saematch_core.experiments.results import (
    JsonResult,
    finite_mean,
    model_digest,
    read_result,
    result_path,
    sae_digest,
    tensor_digest,
    write_result,
)
from saematch_core.match import MatchConfig, MatchResult
from saematch_core.models import capture_forward, decoder_layers
from saematch_core.sae import SAE

__all__ = [
    "ApproxRow",
    "ApproximationConfig",
    "ApproximationResult",
    "L0SweepResult",
    "LossSplit",
    "Scheme",
    "SchemeKind",
    "SweepRow",
    "default_schemes",
    "hybrid_schemes",
    "l0_sweep",
    "loss_split",
    "replaced_layer",
    "run",
    "scheme_means",
]

logger = logging.getLogger(__name__)

SchemeKind = Literal["exact", "drop", "encdec_current", "encdec_previous", "match", "hybrid", "linear"]
_KINDS: tuple[str, ...] = get_args(SchemeKind)
_NEEDS_MATCH = ("match", "hybrid")


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """One way to build ``ĥ_t`` (see the module docstring for each ``kind``).

    Examples
    --------
    >>> Scheme(kind="match", match=MatchConfig(fold=False)).label
    'match_unfolded'
    >>> Scheme(kind="hybrid", quantile=0.25, match=MatchConfig()).label
    'hybrid_q0.25'
    """

    kind: SchemeKind
    """Which approximation; one of ``exact, drop, encdec_current, encdec_previous, match, hybrid, linear``."""
    match: MatchConfig | None = None
    """Matching config for ``match`` and ``hybrid`` (required there, must be ``None`` elsewhere)."""
    quantile: float | None = None
    """For ``hybrid`` only: fraction in [0, 1] of SAE ``t−1``'s features (lowest matching cost first)
    that go through the matching and SAE ``t``'s decoder."""
    label: str = ""
    """Name in results; default derived from the fields (``match_folded``, ``hybrid_q0.5``, ...)."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Scheme.kind: expected one of {list(_KINDS)}, got {self.kind!r}")
        if self.kind in _NEEDS_MATCH:
            if not isinstance(self.match, MatchConfig):
                raise TypeError(
                    f"Scheme.match: expected a MatchConfig for kind {self.kind!r}, got {self.match!r}"
                )
        elif self.match is not None:
            raise ValueError(
                f"Scheme.match: only valid for kinds {list(_NEEDS_MATCH)}, got kind {self.kind!r}"
            )
        if self.kind == "hybrid":
            q = self.quantile
            if not isinstance(q, (int, float)) or isinstance(q, bool) or not 0.0 <= float(q) <= 1.0:
                raise ValueError(f"Scheme.quantile: expected a number in [0, 1] for kind 'hybrid', got {q!r}")
            object.__setattr__(self, "quantile", float(q))
        elif self.quantile is not None:
            raise ValueError(f"Scheme.quantile: only valid for kind 'hybrid', got kind {self.kind!r}")
        if not isinstance(self.label, str):
            raise TypeError(f"Scheme.label: expected a str, got {type(self.label).__name__}")
        if not self.label:
            object.__setattr__(self, "label", self._default_label())

    def _default_label(self) -> str:
        if self.kind == "hybrid":
            return f"hybrid_q{self.quantile:g}"
        if self.kind != "match":
            return self.kind
        cfg = self.match
        assert cfg is not None  # checked in __post_init__
        label = "match_" + ("folded" if cfg.fold else "unfolded")
        if cfg.metric == "cosine":
            label += "_cosine"
        if cfg.solver not in ("scipy", "sparse"):  # the exact solvers give the same matching
            label += f"_{cfg.solver}"
        if tuple(cfg.params) != ("W_enc", "W_dec", "b_enc"):
            label += "_" + "+".join(cfg.params)
        return label

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (used in cache keys)."""
        return {
            "kind": self.kind,
            "label": self.label,
            "match": None if self.match is None else self.match.to_dict(),
            "quantile": self.quantile,
        }

    @property
    def needs_previous(self) -> bool:
        """Whether the scheme reads layer ``t−1`` (everything but ``exact`` and ``encdec_current``)."""
        return self.kind not in ("exact", "encdec_current")


def default_schemes() -> tuple[Scheme, ...]:
    """The paper's comparison plus the reviewers' baselines: drop, enc-dec current/previous, folded,
    unfolded and cosine matching, and the least-squares linear map."""
    return (
        Scheme(kind="drop"),
        Scheme(kind="encdec_current"),
        Scheme(kind="encdec_previous"),
        Scheme(kind="match", match=MatchConfig(fold=True)),
        Scheme(kind="match", match=MatchConfig(fold=False)),
        Scheme(kind="match", match=MatchConfig(fold=False, metric="cosine", params=("W_dec",))),
        Scheme(kind="linear"),
    )


def hybrid_schemes(quantiles: Sequence[float], match: MatchConfig | None = None) -> tuple[Scheme, ...]:
    """One ``hybrid`` scheme per quantile (appendix B, Figs. 16/17)."""
    cfg = MatchConfig() if match is None else match
    return tuple(Scheme(kind="hybrid", quantile=float(q), match=cfg) for q in quantiles)


@dataclass(frozen=True, kw_only=True)
class ApproximationConfig:
    """Settings of :func:`run` (and :func:`l0_sweep`)."""

    schemes: tuple[Scheme, ...] = field(default_factory=default_schemes)
    """The approximations to evaluate, all on the same tokens. Labels must be unique."""
    batch_size: int = 8
    """Chunks per forward pass."""
    outlier_factor: float | None = 10.0
    """Tokens whose ``‖h_{t−1}‖`` or ``‖h_t‖`` exceeds this × the batch median pass through unchanged
    and are not counted; ``None`` disables the rule (position 0 and padding still pass through)."""
    median_norms: Mapping[int, float] | None = None
    """Layer → median ‖h‖ over real tokens at positions ≥ 1 (e.g. an activation cache's manifest),
    so outliers are defined exactly as in training; ``None``: the median of each batch."""
    ridge: float = 1e-6
    """Ridge for the ``linear`` baseline, relative to the mean squared norm of ``h_{t−1}``."""
    suffix: bool = True
    """Run only blocks ``t+1 …`` on ``ĥ_t`` (checked against the full model once); ``False`` runs the
    full model with a forward hook for every scheme (the slow reference)."""
    layers: tuple[int, ...] | None = None
    """Blocks ``t`` whose output is replaced; ``None``: every ``t ≥ 1`` whose SAEs the schemes need."""

    def __post_init__(self) -> None:
        schemes = tuple(self.schemes)
        if not schemes or not all(isinstance(s, Scheme) for s in schemes):
            raise TypeError("ApproximationConfig.schemes: expected a non-empty tuple of Scheme")
        labels = [s.label for s in schemes]
        dup = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dup:
            raise ValueError(f"ApproximationConfig.schemes: expected unique labels, got duplicates {dup}")
        object.__setattr__(self, "schemes", schemes)
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"ApproximationConfig.batch_size: expected an int >= 1, got {self.batch_size!r}")
        if self.outlier_factor is not None and not (
            isinstance(self.outlier_factor, (int, float)) and self.outlier_factor > 1
        ):
            raise ValueError(
                "ApproximationConfig.outlier_factor: expected None or a number > 1, "
                f"got {self.outlier_factor!r}"
            )
        if self.median_norms is not None:
            if not isinstance(self.median_norms, Mapping) or not all(
                isinstance(v, (int, float)) and v > 0 for v in self.median_norms.values()
            ):
                raise ValueError(
                    "ApproximationConfig.median_norms: expected a mapping layer → positive float"
                )
            object.__setattr__(self, "median_norms", {int(k): float(v) for k, v in self.median_norms.items()})
        if not isinstance(self.ridge, (int, float)) or not self.ridge >= 0:
            raise ValueError(f"ApproximationConfig.ridge: expected a number >= 0, got {self.ridge!r}")
        if not isinstance(self.suffix, bool):
            raise TypeError(f"ApproximationConfig.suffix: expected a bool, got {self.suffix!r}")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in self.layers
            ):
                raise TypeError(f"ApproximationConfig.layers: expected a tuple of ints, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))


@dataclass(frozen=True, kw_only=True)
class ApproximationResult(JsonResult):
    """Rows for every (layer, scheme), layers ascending, schemes in config order."""

    kind: ClassVar[str] = "approximation"
    rows: tuple[ApproxRow, ...]
    """One row per (layer, scheme)."""

    def row(self, layer: int, scheme: str) -> ApproxRow:
        """The row of ``layer`` and scheme label ``scheme``."""
        for r in self.rows:
            if r.layer == layer and r.scheme == scheme:
                return r
        raise KeyError(f"layer, scheme: no row for ({layer}, {scheme!r})")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({r.layer for r in self.rows}))

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.scheme for r in self.rows))

    def series(self, scheme: str, metric: str = "delta_loss") -> tuple[float, ...]:
        """``metric`` of ``scheme`` per layer (ascending), for plotting."""
        return tuple(float(getattr(self.row(t, scheme), metric)) for t in self.layers)


@dataclass(frozen=True, kw_only=True)
class LossSplit:
    """ΔL of a matching scheme split into SAE reconstruction error and matching error.

    ``total = reconstruction + matching``: the reconstruction part is the ΔL of replacing ``h_t``
    by SAE ``t``'s own reconstruction (the best a perfect matching could do with these SAEs); the
    rest is charged to the matching (and to what SAE ``t−1``'s codes miss about ``h_t``).
    """

    layer: int
    total: float
    """ΔL of the matching scheme."""
    reconstruction: float
    """ΔL of ``encdec_current``."""
    matching: float
    """``total − reconstruction``."""


def scheme_means(
    results: Mapping[str, ApproximationResult], schemes: Sequence[str], labels: Mapping[str, str]
) -> tuple[list[str], Sequence[tuple[object, ...]]]:
    """Headers and rows: per scheme (named by ``labels`` where given), ΔL and explained variance
    averaged over every corpus and layer of ``results`` (corpus → result)."""
    rows = [
        (
            labels.get(s, s),
            f"{finite_mean([v for r in results.values() for v in r.series(s, 'delta_loss')]):.3f}",
            f"{finite_mean([v for r in results.values() for v in r.series(s, 'explained_variance')]):.3f}",
        )
        for s in schemes
    ]
    return ["scheme", "mean ΔL (nats/token)", "mean explained variance"], rows


def loss_split(
    result: ApproximationResult, scheme: str = "match_folded", reference: str = "encdec_current"
) -> tuple[LossSplit, ...]:
    """Split each layer's ΔL of ``scheme`` into ``reference``'s ΔL and the remainder."""
    out = []
    for t in result.layers:
        total = result.row(t, scheme).delta_loss
        rec = result.row(t, reference).delta_loss
        out.append(LossSplit(layer=t, total=total, reconstruction=rec, matching=total - rec))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class SweepRow:
    """One SAE variant (e.g. an L0 target) at the swept layer."""

    variant: str
    row: ApproxRow


@dataclass(frozen=True, kw_only=True)
class L0SweepResult(JsonResult):
    """:func:`l0_sweep` output: rows per (variant, scheme)."""

    kind: ClassVar[str] = "l0_sweep"
    layer: int
    rows: tuple[SweepRow, ...]

    def series(self, scheme: str, metric: str = "delta_loss") -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(measured L0 of SAE ``t``, ``metric``) per variant for ``scheme``, sorted by L0."""
        pts = sorted(
            (r.row.l0_cur, float(getattr(r.row, metric))) for r in self.rows if r.row.scheme == scheme
        )
        return tuple(p[0] for p in pts), tuple(p[1] for p in pts)


def l0_sweep(
    inputs: Inputs,
    config: ApproximationConfig | None = None,
    *,
    layer: int,
    variants: Mapping[str, tuple[SAE, SAE]],
) -> L0SweepResult:
    """Every scheme at one ``layer`` for several SAE pairs ``(SAE t−1, SAE t)``, e.g. one per L0
    target (Fig. 14), each in place of ``inputs.saes``; each variant is cached by :func:`run`."""
    if not variants:
        raise ValueError("variants: expected at least one (SAE t−1, SAE t) pair")
    cfg = replace(ApproximationConfig() if config is None else config, layers=(layer,))
    rows = []
    for name, pair in variants.items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(
                f"variants[{name!r}]: expected a (SAE t−1, SAE t) tuple, got {type(pair).__name__}"
            )
        res = run(inputs.replace(saes={layer - 1: pair[0], layer: pair[1]}), cfg)
        rows.extend(SweepRow(variant=str(name), row=r) for r in res.rows)
    return L0SweepResult(layer=layer, rows=tuple(rows))


# ----------------------------------------------------------------------------------- losses
def _token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """(batch, seq − 1) float64 next-token losses."""
    b, s, v = logits.shape
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none")
    return loss.view(b, s - 1).double()


def _token_kl(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """(batch, seq − 1) KL(clean ‖ replaced) of the next-token distributions, summed in float64
    (the reference for :class:`~saematch_core.experiments.measures.replacement.CleanDist`)."""
    out = []
    # One chunk at a time: (batch, seq, vocab) in float64 would be GBs for a 49k vocabulary.
    for b in range(logits.shape[0]):
        log_p = torch.log_softmax(clean_logits[b, :-1].float(), dim=-1)
        log_q = torch.log_softmax(logits[b, :-1].float(), dim=-1)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1, dtype=torch.float64))
    return torch.stack(out)


# ----------------------------------------------------------------------------------- schemes
@dataclass
class _Prepared:
    """Per-layer material of the schemes: SAEs (folded where asked), matchings, linear maps."""

    prev: SAE | None
    cur: SAE | None
    matched: dict[str, tuple[SAE, SAE, MatchResult]] = field(default_factory=dict)
    linear: tuple[Tensor, Tensor] | None = None


def _well_matched(result: MatchResult, quantile: float) -> Tensor:
    """Bool (F_A,): the round(q·F_A) features with the lowest cost (unmatched ones never)."""
    cost = torch.where(result.perm >= 0, result.cost, torch.full_like(result.cost, math.inf))
    order = torch.sort(cost, stable=True).indices
    n = round(quantile * cost.numel())
    well = torch.zeros(cost.numel(), dtype=torch.bool)
    well[order[:n]] = True
    return well & (result.perm >= 0)


def _scheme_state(scheme: Scheme, prep: _Prepared, h_prev: Tensor | None, h_cur: Tensor) -> Tensor:
    kind = scheme.kind
    if kind == "exact":
        return h_cur
    if kind == "encdec_current":
        assert prep.cur is not None
        return prep.cur(h_cur).recon
    assert h_prev is not None  # needs_previous
    if kind == "drop":
        return h_prev
    if kind == "encdec_previous":
        assert prep.prev is not None
        return prep.prev(h_prev).recon
    if kind == "linear":
        assert prep.linear is not None
        weight, bias = prep.linear
        return (h_prev.double() @ weight + bias).to(h_cur.dtype)
    prev, cur, result = prep.matched[scheme.label]
    perm = result.perm.to(h_prev.device)
    codes = prev.encode(h_prev)
    if kind == "match":
        return cur.decode(permute_codes(codes, perm, cur.d_sae))
    assert scheme.quantile is not None
    well = _well_matched(result, scheme.quantile).to(codes.device)
    moved = permute_codes(codes * well, perm, cur.d_sae) @ cur.W_dec
    return moved + (codes * ~well) @ prev.W_dec + cur.b_dec


def _meds(config: ApproximationConfig, t: int) -> tuple[float | None, float | None]:
    m = config.median_norms
    if m is None:
        return None, None
    return m.get(t - 1), m.get(t)


# ----------------------------------------------------------------------------------- entry point
def _fit_linear(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    layers: Sequence[int],
    config: ApproximationConfig,
    progress: bool,
) -> dict[int, tuple[Tensor, Tensor]]:
    """Least-squares maps h_{t−1} → h_t for every layer, one pass over the fitting tokens."""
    want = sorted({t - 1 for t in layers} | set(layers))
    gram: dict[int, Tensor] = {}
    cross: dict[int, Tensor] = {}
    for start in tqdm(
        range(0, ids.shape[0], config.batch_size), desc="fit linear maps", leave=False, disable=not progress
    ):
        b_ids, b_mask = ids[start : start + config.batch_size], mask[start : start + config.batch_size]
        cap = capture_forward(model, b_ids, b_mask, layers=want)
        for t in layers:
            keep, _ = counted_tokens(
                b_mask, cap.hidden[t - 1], cap.hidden[t], config.outlier_factor, _meds(config, t)
            )
            x = cap.hidden[t - 1][keep].double().cpu()
            y = cap.hidden[t][keep].double().cpu()
            x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
            gram[t] = gram.get(t, 0) + x1.T @ x1
            cross[t] = cross.get(t, 0) + x1.T @ y
    out = {}
    for t in layers:
        g = gram[t]
        n = float(g[-1, -1])
        if n < 1:
            raise ValueError(f"fit_tokens: no counted tokens to fit the linear map of layer {t}")
        if n < 4 * g.shape[0]:
            logger.warning(
                "fit_tokens: %d tokens to fit a %d×%d map at layer %d; the linear baseline will overfit "
                "(use >= 4 × d_model held-out tokens)",
                int(n),
                g.shape[0] - 1,
                g.shape[0] - 1,
                t,
            )
        reg = torch.zeros_like(g)
        d = g.shape[0] - 1
        reg[:d, :d] = torch.eye(d, dtype=torch.float64) * config.ridge * float(g[:d, :d].trace())
        sol = torch.linalg.solve(g + reg, cross[t])
        out[t] = (sol[:-1], sol[-1])
    return out


def run(inputs: Inputs, config: ApproximationConfig | None = None) -> ApproximationResult:
    """ΔL and explained variance of every scheme at every layer (see the module docstring).

    Parameters
    ----------
    inputs : ``model`` (a transformers causal LM in eval mode: Llama, Gemma 2), ``tokens`` (the
        evaluation chunks; position 0 of each is never counted; mask False on padding), ``saes``
        (layer index → SAE of the residual after that block, ``d_in = d_model``), ``fit_tokens``
        (chunks for the ``linear`` scheme's least squares, required with it; keep them disjoint
        from ``tokens``), the result cache (one file per (layer, scheme), so an interrupted run
        resumes and a new scheme costs only itself), ``force`` and ``progress``.
    config : the schemes, the replaced layers (default every ``t ≥ 1`` whose SAEs the schemes
        need) and how the tokens are counted.

    Returns
    -------
    ApproximationResult
        One :class:`ApproxRow` per (layer, scheme).
    """
    config = ApproximationConfig() if config is None else config
    if not isinstance(config, ApproximationConfig):
        raise TypeError(f"config: expected an ApproximationConfig, got {type(config).__name__}")
    model, (tokens, token_mask) = inputs.require_model()
    saes, layers, cache_dir = inputs.saes, config.layers, inputs.cache_dir
    fit_tokens, fit_mask = inputs.fit_tokens if inputs.fit_tokens is not None else (None, None)
    force, progress = inputs.force, inputs.progress
    tokens, token_mask = check_tokens("tokens", tokens, token_mask)
    schemes = config.schemes
    uses_prev = any(s.needs_previous for s in schemes)
    uses_sae_prev = any(s.kind in ("encdec_previous", "match", "hybrid") for s in schemes)
    uses_sae_cur = any(s.kind in ("encdec_current", "match", "hybrid") for s in schemes)
    n_blocks = len(decoder_layers(model))
    if layers is None:
        layers = [
            t
            for t in range(1 if uses_prev else 0, n_blocks)
            if (not uses_sae_cur or t in saes) and (not uses_sae_prev or t - 1 in saes)
        ]
    layers = [int(t) for t in layers]
    for t in layers:
        if not (1 if uses_prev else 0) <= t < n_blocks:
            raise ValueError(f"layers: expected indices in {1 if uses_prev else 0}..{n_blocks - 1}, got {t}")
        for need, idx in ((uses_sae_cur, t), (uses_sae_prev, t - 1)):
            if need and idx not in saes:
                raise ValueError(f"saes: the schemes need an SAE for layer {idx}, got layers {sorted(saes)}")
    if not layers:
        raise ValueError(f"layers: nothing to evaluate with SAEs for layers {sorted(saes)}")
    if any(s.kind == "linear" for s in schemes):
        if fit_tokens is None:
            raise ValueError(
                "fit_tokens: required by the 'linear' scheme (held-out chunks for least squares)"
            )
        fit_tokens, fit_mask = check_tokens("fit_tokens", fit_tokens, fit_mask)

    base_spec = {
        "model": model_digest(model),
        "tokens": tensor_digest(tokens),
        "token_mask": tensor_digest(token_mask),
        "outlier_factor": config.outlier_factor,
    }
    fit_spec = {
        "fit_tokens": None if fit_tokens is None else tensor_digest(fit_tokens),
        "fit_mask": None if fit_mask is None else tensor_digest(fit_mask),
        "ridge": config.ridge,
    }
    state: dict[str, Any] = {
        "linear": None,
        "cache_dir": cache_dir,
        "store": CaptureStore(model, tokens, layers, suffix=config.suffix),
    }

    def compute(t: int, todo: tuple[Scheme, ...]) -> ApproximationResult:
        if any(s.kind == "linear" for s in todo) and state["linear"] is None:
            assert fit_tokens is not None and fit_mask is not None
            state["linear"] = _fit_linear(model, fit_tokens, fit_mask, layers, config, progress)
        return _approximate_layer(
            model, tokens, token_mask, saes, t, replace(config, schemes=todo), state, progress
        )

    rows: list[ApproxRow] = []
    for t in tqdm(layers, desc="approximate layers", disable=not progress):
        meds = _meds(config, t)
        layer_spec = {
            **base_spec,
            "median_norms": None if meds == (None, None) else list(meds),
            "layer": t,
            "sae_prev": sae_digest(saes[t - 1]) if t - 1 in saes else None,
            "sae_cur": sae_digest(saes[t]) if t in saes else None,
        }
        # One file per (layer, scheme): adding a scheme later computes only that scheme. The label
        # is a name, not an input, so it stays out of the key.
        specs = {
            s.label: {
                **layer_spec,
                "scheme": {k: v for k, v in s.to_dict().items() if k != "label"},
                **(fit_spec if s.kind == "linear" else {}),
            }
            for s in schemes
        }
        paths = {label: result_path(ApproximationResult, spec, cache_dir) for label, spec in specs.items()}
        found: dict[str, ApproxRow] = {}
        if not force:
            for label, path in paths.items():
                cached = read_result(ApproximationResult, path)
                if cached is not None and len(cached.rows) == 1:
                    found[label] = replace(cached.rows[0], scheme=label)
        todo = tuple(s for s in schemes if s.label not in found)
        if todo:
            part = compute(t, todo)
            for s in todo:
                row = part.row(t, s.label)
                write_result(ApproximationResult(rows=(row,)), paths[s.label], specs[s.label])
                found[s.label] = row
        rows.extend(found[s.label] for s in schemes)
    return ApproximationResult(rows=tuple(rows))


def _approximate_layer(
    model: nn.Module,
    tokens: Tensor,
    token_mask: Tensor,
    saes: Mapping[int, SAE],
    t: int,
    config: ApproximationConfig,
    state: dict[str, Any],
    progress: bool,
) -> ApproximationResult:
    device = next(model.parameters()).device
    prev = saes[t - 1].to(device=device) if t - 1 in saes else None
    cur = saes[t].to(device=device) if t in saes else None
    prep = _Prepared(prev=prev, cur=cur)
    if state["linear"] is not None and t in state["linear"]:
        w, b = state["linear"][t]
        prep.linear = (w.to(device), b.to(device))
    memo: dict[str, tuple[SAE, SAE, MatchResult]] = {}
    for s in config.schemes:
        if s.match is not None:
            if prev is None or cur is None:
                raise ValueError(f"saes: scheme {s.label!r} needs SAEs for layers {t - 1} and {t}")
            # A grid of hybrid schemes shares one matching.
            key = repr(sorted(s.match.to_dict().items()))
            if key not in memo:
                memo[key] = matched_pair(prev, cur, s.match, state.get("cache_dir"))
            prep.matched[s.label] = memo[key]
    l0 = {"prev": [0.0, 0], "cur": [0.0, 0]}

    def count_l0(h_prev: Tensor | None, h_cur: Tensor, counted: Tensor) -> None:
        for key, sae, h in (("prev", prev, h_prev), ("cur", cur, h_cur)):
            if sae is not None and h is not None:
                l0[key][0] += float((sae.encode(h[counted]) > 0).sum())
                l0[key][1] += int(counted.sum())

    fns = {
        s.label: (lambda h_prev, h_cur, s=s: _scheme_state(s, prep, h_prev, h_cur)) for s in config.schemes
    }
    found = replacement_rows(
        model,
        tokens,
        token_mask,
        t,
        fns,
        batch_size=config.batch_size,
        outlier_factor=config.outlier_factor,
        medians=_meds(config, t),
        need_prev=any(s.needs_previous for s in config.schemes),
        store=state["store"],
        on_batch=count_l0,
        progress=progress,
    )
    l0_prev, l0_cur = (l0[k][0] / l0[k][1] if l0[k][1] else math.nan for k in ("prev", "cur"))
    rows = (replace(found[s.label], l0_prev=l0_prev, l0_cur=l0_cur) for s in config.schemes)
    return ApproximationResult(rows=tuple(rows))
