"""Compare two SAEs: the exact matching, a calibrated verdict per pair, best matches both ways,
split families, agreement between matchers and, with activations, the data check.

:func:`compare` takes any two SAEs with the same ``d_in`` (two layers, two seeds, two widths, two
L0s, a base and a fine-tuned model, two sites) and returns a :class:`CompareReport`:

- **the matching**: the one-to-one matching of the primary matcher (SAE Match's folded MSE by
  default; see :mod:`saematch_core.matchers`), its per-pair cost;
- **a verdict per pair**: the pair's relative cost (scale free: ``‖a − b‖² / (‖a‖² + ‖b‖²)``, or
  ``1 − cos`` for cosine matchers) against a rotated-partner null (B's residual basis replaced by
  random rotations), Benjamini–Hochberg at level ``alpha``: the pairs called ``matched`` hold at most
  a fraction ``alpha`` of chance pairs in expectation; and the *margin*, the best other partner's
  relative cost minus the pair's;
- **best matches both ways**: for every feature of A its most similar feature of B and the runner-up
  (``similarity = 1 − relative cost``: the cosine for cosine matchers, ``2⟨a, b⟩ / (‖a‖² + ‖b‖²)`` for
  MSE), the same from B to A, and whether the best matches are mutual;
- **families**: every pair whose relative cost is below ``τ``, the ``level`` quantile of the same
  null, is a link; a feature with two or more links is split across the other SAE (a feature of the
  narrow SAE and the features of the wide one that share it when the widths differ);
- **agreement between matchers**: the fraction of A's features given the same partner by each pair
  of matchers (only features with a partner under both count);
- **the data check** (with activations of both SAEs' sites on the same tokens): per pair
  ``P(partner active | feature active)`` and each matcher's Matching Score (its mean), against random
  one-to-one partners.

The report's JSON layout (:meth:`CompareReport.to_json`): the usual header (``kind``,
``schema_version``, ``saematch_version``, ``created_ms``) then the fields of :class:`CompareReport`,
with the matched pairs under ``pairs``, one record per line.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saematch_core._study_api import (
    ArrayLike,
    FeatureLinks,
    Inputs,
    JsonResult,
    MatchDecision,
    MatchingScoreResult,
    cached_match,
    coactivation,
    decide_vectors,
    finite_mean,
    match_path,
    matching_scores,
    pair_metrics,
    random_partners,
    relative_cost_chunks,
    sae_digest,
)
from saematch_core.cache import atomic_write_text, cache_root, content_key
from saematch_core.compose import agreement
from saematch_core.cost import feature_vectors
from saematch_core.match import MatchConfig, MatchResult
from saematch_core.matchers import MATCHERS, Matcher, SinkhornConfig, get_matcher
from saematch_core.sae import SAE, check_pair

__all__ = [
    "COMPARE_REPORT_KIND",
    "BestMatch",
    "CompareConfig",
    "CompareReport",
    "CompareSummary",
    "Family",
    "MatcherRow",
    "MatcherScores",
    "PairRecord",
    "PairScan",
    "SaeInfo",
    "cached_matching",
    "compare",
    "judged_matching",
    "load_activations",
    "matcher_scores_by_layer",
    "matcher_scores_summary",
    "matching_path",
    "sae_info",
    "scan_pairs",
    "write_records_json",
]

COMPARE_REPORT_KIND = "compare_report"
"""Value of the ``kind`` key of a compare report."""
_QUANTILES = (("min", 0.0), ("p10", 0.1), ("median", 0.5), ("p90", 0.9), ("max", 1.0))
_NULL_SAMPLE = 2000


# ---------------------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """What :func:`compare` computes. Every default runs on CPU.

    Examples
    --------
    >>> CompareConfig(others=("greedy",)).others
    ('greedy',)
    """

    matcher: str = "saematch"
    """The primary matcher (a name in :data:`~saematch_core.matchers.MATCHERS`): its matching gets
    the verdicts, and its feature vectors and metric define relative costs, best matches and links."""
    others: tuple[str, ...] = ("cosine", "greedy")
    """Matchers run beside the primary one for the agreement table (``sinkhorn`` needs POT and a
    dense F_A × F_B plan)."""
    alpha: float = 0.05
    """False-discovery rate of the verdicts (Benjamini–Hochberg)."""
    n_null: int = 2
    """Random rotations of B in the null (each gives F_A null samples)."""
    level: float = 0.001
    """Links (families) have a relative cost below the ``level`` quantile of the null: a feature gets
    a spurious link with probability about ``level`` (so about ``level × F_A`` spurious families;
    the book's split analysis uses 0.01)."""
    seed: int = 0
    """Seed of the rotations and of the random partners of the data check."""
    n_random: int = 5
    """Random one-to-one matchings in the data check's null."""
    chunk_size: int = 1024
    """Rows of A's relative costs computed at once (memory ~ chunk_size × F_B × 4 bytes)."""
    data_chunk_size: int = 4096
    """Tokens encoded at once in the data check."""
    device: str | None = None
    """Where every matcher's cost algebra runs (``None``: the SAEs' device; ``"cuda"``, ...)."""
    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)
    """Settings of every entropic (Sinkhorn) matcher in the comparison."""

    def __post_init__(self) -> None:
        if self.matcher not in MATCHERS:
            raise ValueError(
                f"CompareConfig.matcher: expected one of {sorted(MATCHERS)}, got {self.matcher!r}"
            )
        others = self.others
        if isinstance(others, str) or not isinstance(others, (tuple, list)):
            raise TypeError(f"CompareConfig.others: expected a tuple of matcher names, got {others!r}")
        bad = [o for o in others if o not in MATCHERS]
        if bad:
            raise ValueError(f"CompareConfig.others: expected names from {sorted(MATCHERS)}, got {bad}")
        object.__setattr__(self, "others", tuple(dict.fromkeys(o for o in others if o != self.matcher)))
        for name in ("alpha", "level"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"CompareConfig.{name}: expected a number in (0, 1), got {value!r}")
        for name, low in (
            ("n_null", 1),
            ("n_random", 0),
            ("seed", 0),
            ("chunk_size", 1),
            ("data_chunk_size", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"CompareConfig.{name}: expected an int >= {low}, got {value!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"CompareConfig.device: expected a str or None, got {self.device!r}")
        if not isinstance(self.sinkhorn, SinkhornConfig):
            raise TypeError(f"CompareConfig.sinkhorn: expected a SinkhornConfig, got {self.sinkhorn!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """The primary matcher, then the others."""
        return (self.matcher, *self.others)

    def matcher_for(self, name: str) -> Matcher:
        """The registered matcher ``name`` on :attr:`device`, with :attr:`sinkhorn` if entropic."""
        m = get_matcher(name).with_device(self.device)
        return replace(m, sinkhorn=self.sinkhorn) if m.sinkhorn is not None else m


# ---------------------------------------------------------------------------------------- report
@dataclass(frozen=True, kw_only=True)
class SaeInfo:
    """Where one of the two SAEs came from."""

    source: str
    """The path or ``hub:`` spec it was loaded from (``""`` when given as an object)."""
    format: str
    """Its file format (``""`` when unknown)."""
    d_in: int
    d_sae: int
    activation: str
    digest: str
    """Fingerprint of its parameters (the key of cached matchings)."""


@dataclass(frozen=True, kw_only=True)
class PairRecord:
    """One pair of the primary one-to-one matching: feature ``a`` of A and its partner ``b`` of B."""

    a: int
    b: int
    cost: float
    """Per-pair cost under the primary matcher's metric (MSE of the feature vectors, or 1 − cos)."""
    relative_cost: float
    """Scale-free cost the verdict tests (0 identical, 1 orthogonal)."""
    p_value: float
    """Against the rotated-partner null."""
    q_value: float
    """Benjamini–Hochberg adjusted p-value."""
    matched: bool
    """The verdict: a real partner at the report's FDR level."""
    margin: float
    """Best other candidate's relative cost minus the pair's (> 0: the partner is the clear best)."""
    a_to_b_best: bool
    """``b`` is ``a``'s most similar feature of B."""
    b_to_a_best: bool
    """``a`` is ``b``'s most similar feature of A."""
    mutual: bool
    """Both of the above."""
    partners: dict[str, int]
    """``a``'s partner under every other matcher (``-1``: none)."""
    p_partner: float
    """Data check: ``P(b active | a active)`` on the tokens (``nan`` without activations or when
    either feature never fires)."""


@dataclass(frozen=True, kw_only=True)
class BestMatch:
    """A feature's most similar features on the other side."""

    feature: int
    partner: int
    """Most similar feature on the other side (``-1`` if that side is empty)."""
    similarity: float
    """``1 − relative cost`` (cosine for cosine matchers)."""
    second: int
    """Runner-up (``-1`` if the other side has one feature)."""
    second_similarity: float
    mutual: bool
    """The partner's most similar feature is this one."""


@dataclass(frozen=True, kw_only=True)
class Family:
    """A feature linked to two or more features of the other SAE (a split)."""

    side: str
    """``"a"``: a feature of A and the features of B it splits into; ``"b"``: the reverse."""
    feature: int
    parts: tuple[int, ...]
    """Linked features of the other SAE, most similar first."""
    relative_costs: tuple[float, ...]
    """Relative cost of each link (all below the link threshold)."""
    partner: int
    """The feature's partner in the one-to-one matching (``-1``: none)."""


@dataclass(frozen=True, kw_only=True)
class MatcherRow:
    """One matcher of the comparison."""

    name: str
    description: str
    one_to_one: bool
    """By construction (exact solvers); greedy and Sinkhorn may reuse partners."""
    is_permutation: bool
    """No B feature used twice in this result."""
    n_partners: int
    """Features of A with a partner."""
    mean_cost: float
    """Mean per-pair cost under this matcher's own metric."""
    agreement: float
    """Fraction of A's features given the same partner as by the primary matcher."""
    agreement_matched: float
    """Same, over the pairs the verdict calls matched."""
    score: float
    """Data check: Matching Score, the mean ``P(partner active | feature active)`` (``nan`` without data)."""
    n_scored: int
    """Pairs in :attr:`score` (both features fire on the tokens)."""
    seconds: float
    """Wall-clock time of the matching (0 when it came from the cache)."""


@dataclass(frozen=True, kw_only=True)
class CompareSummary:
    """What a person reads first."""

    n_a: int
    n_b: int
    d_in: int
    matcher: str
    n_pairs: int
    """Features of A with a partner in the primary matching."""
    n_matched: int
    """Pairs the verdict calls matched."""
    fraction_matched: float
    """``n_matched / n_pairs``: the fraction confidently matched."""
    alpha: float
    threshold: float
    """Largest relative cost called matched (``nan`` if none)."""
    null_median: float
    """Median relative cost of the best chance partner."""
    cost: dict[str, float]
    """Quantiles (min, p10, median, p90, max) and mean of the per-pair cost."""
    relative_cost: dict[str, float]
    """Same for the relative cost."""
    median_margin: float
    fraction_mutual: float
    """Pairs that are each other's most similar feature."""
    link_threshold: float
    """``τ``: relative cost below which a pair is a link (family member)."""
    n_links: int
    n_split_a: int
    """Features of A linked to two or more features of B."""
    n_split_b: int
    """Features of B linked to two or more features of A."""
    n_tokens: int
    """Tokens of the data check (0 without activations)."""
    score_matched: float
    """Mean ``P(partner active | feature active)`` of the pairs called matched."""
    score_unmatched: float
    """Same for the pairs not called matched."""
    score_random: float
    """Same for random one-to-one partners (the data's chance level)."""
    confirmed_matched: float
    """Fraction of scored matched pairs above the 95th percentile of random pairs."""
    matchers: tuple[MatcherRow, ...]
    agreement: tuple[tuple[float, ...], ...]
    """Agreement between every two matchers, in the order of :attr:`matchers`."""


@dataclass(frozen=True, kw_only=True)
class CompareReport(JsonResult):
    """Everything :func:`compare` found; written with :meth:`to_json` (module docstring)."""

    kind: ClassVar[str] = COMPARE_REPORT_KIND
    config: CompareConfig
    a: SaeInfo
    b: SaeInfo
    summary: CompareSummary
    pairs: tuple[PairRecord, ...]
    """The primary matching's pairs, in A's order."""
    a_to_b: tuple[BestMatch, ...]
    """Every feature of A: its most similar features of B."""
    b_to_a: tuple[BestMatch, ...]
    """Every feature of B: its most similar features of A."""
    families: tuple[Family, ...]
    """Split features, A's first."""
    null_sample: tuple[float, ...]
    """Evenly spaced quantiles of the rotated-partner null (for plots)."""

    @property
    def perm(self) -> Tensor:
        """The primary matching as a LongTensor (F_A,), ``-1`` where unmatched."""
        out = torch.full((self.summary.n_a,), -1, dtype=torch.long)
        for p in self.pairs:
            out[p.a] = p.b
        return out

    @property
    def matched(self) -> Tensor:
        """Bool (F_A,): the verdict (False where unmatched)."""
        out = torch.zeros(self.summary.n_a, dtype=torch.bool)
        for p in self.pairs:
            out[p.a] = p.matched
        return out

    def to_json(self, path: str | Path, config: Mapping[str, Any] | None = None) -> None:
        """Write the report atomically: header, then the fields, long lists one record per line.

        ``config`` is ignored (the report holds its own :attr:`config`); it is accepted for the
        :class:`~saematch_core.experiments.results.JsonResult` interface.
        """
        del config
        from saematch_core import __version__

        head = {
            "kind": self.kind,
            "schema_version": _SCHEMA_VERSION,
            "saematch_version": __version__,
            "created_ms": int(time.time() * 1000),
        }
        write_records_json(Path(path), {**head, **self.to_dict()})

    @classmethod
    def from_json(cls, path: str | Path) -> CompareReport:
        """Read a file written by :meth:`to_json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such compare report")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("kind") != cls.kind:
            got = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"{path}: expected kind {cls.kind!r}, got {got!r}")
        if doc.get("schema_version") != _SCHEMA_VERSION:
            raise ValueError(
                f"{path}: expected schema_version {_SCHEMA_VERSION}, got {doc.get('schema_version')!r}"
            )
        body = {
            k: v
            for k, v in doc.items()
            if k not in ("kind", "schema_version", "saematch_version", "created_ms")
        }
        return cls.from_dict(body)

    def summary_lines(self) -> list[str]:
        """The summary as a few lines of text (what ``saematch compare`` prints)."""
        s = self.summary
        lines = [
            f"A: {self.a.source or '<object>'} ({s.n_a} features)   "
            f"B: {self.b.source or '<object>'} ({s.n_b})",
            f"matcher {s.matcher}: {s.n_pairs} pairs, {s.n_matched} matched at FDR {s.alpha:g} "
            f"({_pct(s.fraction_matched)}), median cost {s.cost['median']:.4g}, "
            f"{_pct(s.fraction_mutual)} mutual best",
            f"families: {s.n_split_a} features of A split in B, {s.n_split_b} features of B split in A",
        ]
        agree = ", ".join(f"{m.name} {_pct(m.agreement)}" for m in s.matchers[1:])
        if agree:
            lines.append(f"agreement with {s.matcher}: {agree}")
        if s.n_tokens:
            scores = ", ".join(f"{m.name} {_num(m.score)}" for m in s.matchers)
            lines.append(
                f"data ({s.n_tokens} tokens): P(partner active) matched {_num(s.score_matched)}, "
                f"not matched {_num(s.score_unmatched)}, random {_num(s.score_random)}; "
                f"Matching Score {scores}"
            )
        return lines


_SCHEMA_VERSION = 1


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def write_records_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as JSON atomically; a top-level list of records or of lists is written one item
    per line and a list of numbers on one line (readable at F = 65536, where one field per line would
    take millions of lines)."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
            rows = ",\n".join("  " + json.dumps(v, allow_nan=False) for v in value)
            parts.append(f" {json.dumps(key)}: [\n{rows}\n ]")
        elif isinstance(value, list):
            parts.append(f" {json.dumps(key)}: {json.dumps(value, allow_nan=False)}")
        else:
            text = json.dumps(value, indent=1, allow_nan=False).replace("\n", "\n ")
            parts.append(f" {json.dumps(key)}: {text}")
    atomic_write_text(path, "{\n" + ",\n".join(parts) + "\n}\n")


# ---------------------------------------------------------------------------------------- matchings
def matching_path(a: SAE, b: SAE, matcher: Matcher, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`cached_matching` stores ``matcher``'s matching of ``a`` to ``b``.

    The key covers both SAEs' parameters and the matcher's config (not the device). Exact and greedy
    matchers share the files of :func:`saematch_core.experiments.results.cached_match`; entropic ones
    add their :class:`SinkhornConfig` to the key.
    """
    if matcher.sinkhorn is None:
        return match_path(a, b, matcher.config, cache_dir)
    spec = {
        "a": sae_digest(a),
        "b": sae_digest(b),
        "config": {k: v for k, v in matcher.config.to_dict().items() if k != "device"},
        "sinkhorn": matcher.sinkhorn.to_dict(),
    }
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "results"
    return root / "match" / f"{content_key(spec)}.json"


def cached_matching(
    a: SAE, b: SAE, matcher: str | Matcher, cache_dir: str | Path | None = None
) -> MatchResult:
    """``matcher(a, b)``, stored in the content-keyed result store (:func:`matching_path`) and reused.

    ``cache_dir`` defaults to ``cache_root()/results``; an unreadable file is recomputed.
    """
    m = get_matcher(matcher)
    if m.sinkhorn is None:
        return cached_match(a, b, m.config, cache_dir)
    path = matching_path(a, b, m, cache_dir)
    if path.is_file():
        try:
            return MatchResult.from_json(path)
        except (ValueError, KeyError, TypeError):
            pass
    result = m(a, b)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.to_json(path)
    return result


def judged_matching(
    a: SAE, b: SAE, matcher: Matcher, cfg: CompareConfig, cache_dir: str | Path | None = None
) -> tuple[MatchResult, MatchDecision, Tensor, Tensor]:
    """``matcher``'s (cached) matching of ``a`` to ``b`` and the calibrated verdict on every pair.

    Returns
    -------
    result, decision, and the feature vectors ``va`` (F_A, D), ``vb`` (F_B, D) the verdict judged
    (the matcher's ``params``, folded as it folds).
    """
    res = cached_matching(a, b, matcher, cache_dir)
    mc = matcher.config
    va = feature_vectors(a, mc.params, fold=mc.fold and a.activation == "jumprelu")
    vb = feature_vectors(b, mc.params, fold=mc.fold and b.activation == "jumprelu")
    dec = decide_vectors(
        va, vb, res.perm, mc.params, metric=mc.metric, alpha=cfg.alpha, n_null=cfg.n_null, seed=cfg.seed,
        chunk_size=cfg.chunk_size,
    )  # fmt: skip
    return res, dec, va, vb


# ---------------------------------------------------------------------------------------- one pass
class PairScan(NamedTuple):
    """Best matches both ways and the link graph, from one pass over the relative costs."""

    row_cost: Tensor
    """Float64 (F_A, 2): the two smallest relative costs of each feature of A, ascending (``nan`` pads)."""
    row_index: Tensor
    """Long (F_A, 2): the features of B they belong to (``-1`` pads)."""
    col_cost: Tensor
    """Float64 (F_B, 2): the same for each feature of B against A."""
    col_index: Tensor
    """Long (F_B, 2)."""
    links: FeatureLinks
    """Pairs with relative cost below the threshold."""


def _pad_top2(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    if vals.shape[1] == 2:
        return vals, idx
    pad = 2 - vals.shape[1]
    return (
        torch.cat([vals, torch.full((vals.shape[0], pad), math.nan, dtype=vals.dtype)], dim=1),
        torch.cat([idx, torch.full((idx.shape[0], pad), -1, dtype=torch.long)], dim=1),
    )


def scan_pairs(va: Tensor, vb: Tensor, *, metric: str, threshold: float, chunk_size: int = 1024) -> PairScan:
    """Row and column top-2 relative costs and every link below ``threshold``, in one pass.

    The reference is :func:`saematch_core.experiments.measures.verdict.smallest_relative_costs` both
    ways plus :func:`saematch_core.experiments.measures.links.link_vectors` (three passes over the
    same ``F_A × F_B`` matrix).

    Parameters
    ----------
    va : Tensor, shape (F_A, D); vb : Tensor, shape (F_B, D)
    threshold : links have relative cost ``< threshold``.
    """
    fa, fb = int(va.shape[0]), int(vb.shape[0])
    k_row, k_col = min(2, fb), min(2, fa)
    row_v, row_i, found, values = [], [], [], []
    col_v = torch.full((k_col, fb), math.inf, dtype=torch.float64)
    col_i = torch.full((k_col, fb), -1, dtype=torch.long)
    for s, rel in relative_cost_chunks(va.detach().cpu(), vb.detach().cpu(), metric, chunk_size=chunk_size):
        if k_row:
            top = torch.topk(rel, k_row, dim=1, largest=False)
            row_v.append(top.values.double())
            row_i.append(top.indices)
        if k_col:
            kc = min(k_col, rel.shape[0])
            ct = torch.topk(rel, kc, dim=0, largest=False)
            both_v = torch.cat([col_v, ct.values.double()])
            both_i = torch.cat([col_i, ct.indices + s])
            # Stable sort keeps the earlier (lower-index) feature first on exact ties.
            order = torch.sort(both_v, dim=0, stable=True).indices[:k_col]
            col_v, col_i = both_v.gather(0, order), both_i.gather(0, order)
        hit = (rel < threshold).nonzero()
        values.append(rel[hit[:, 0], hit[:, 1]].double())
        hit[:, 0] += s
        found.append(hit)
    if row_v:
        rv, ri = torch.cat(row_v), torch.cat(row_i)
    else:
        rv, ri = torch.zeros(fa, 0, dtype=torch.float64), torch.zeros(fa, 0, dtype=torch.long)
    cv, ci = col_v.T.contiguous(), col_i.T.contiguous()
    cv = torch.where(torch.isinf(cv), torch.full_like(cv, math.nan), cv)
    links = torch.cat(found) if found else torch.zeros(0, 2, dtype=torch.long)
    stat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return PairScan(
        *_pad_top2(rv, ri),
        *_pad_top2(cv, ci),
        FeatureLinks(links=links, statistic=stat, threshold=float(threshold), shape=(fa, fb)),
    )


# ---------------------------------------------------------------------------------------- activations
def load_activations(path: str | Path, d_in: int, *, name: str = "--activations") -> np.ndarray:
    """Memory-map an ``.npy`` file of residual activations and check it: shape (n, d_in), a float
    dtype, every value finite. Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} not found")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{name}: {path} is not a readable .npy array ({exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: {path}: expected one .npy array, got {type(arr).__name__}")
    if arr.ndim != 2 or arr.shape[1] != d_in:
        raise ValueError(f"{name}: {path}: expected shape (n_tokens, d_in={d_in}), got {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(f"{name}: {path}: expected a float dtype, got {arr.dtype}")
    step = 65536
    for s in range(0, arr.shape[0], step):
        bad = ~np.isfinite(arr[s : s + step])
        if bool(bad.any()):
            row, col = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"{name}: {path}: non-finite value at row {s + row}, column {col}")
    return arr


# ---------------------------------------------------------------------------------------- compare
def _quantiles(values: Tensor) -> dict[str, float]:
    v = values[torch.isfinite(values)].double()
    if not v.numel():
        return {**{k: math.nan for k, _ in _QUANTILES}, "mean": math.nan}
    out = {k: float(torch.quantile(v, q)) for k, q in _QUANTILES}
    out["mean"] = float(v.mean())
    return out


def sae_info(sae: SAE, source: str = "", fmt: str = "") -> SaeInfo:
    """:class:`SaeInfo` of ``sae`` loaded from ``source`` in format ``fmt``."""
    return SaeInfo(
        source=source,
        format=fmt,
        d_in=sae.d_in,
        d_sae=sae.d_sae,
        activation=sae.activation,
        digest=sae_digest(sae),
    )


def _data_check(
    a: SAE,
    b: SAE,
    acts: tuple[ArrayLike, ArrayLike],
    keep: ArrayLike | None,
    perms: Mapping[str, Tensor],
    matched: Tensor,
    cfg: CompareConfig,
) -> tuple[int, dict[str, Tensor], dict[str, float]]:
    primary = perms[cfg.matcher]
    minus = torch.full_like(primary, -1)
    all_perms = {f"m:{k}": v for k, v in perms.items()}
    all_perms["matched"] = torch.where(matched, primary, minus)
    all_perms["unmatched"] = torch.where(~matched, primary, minus)
    g = torch.Generator().manual_seed(cfg.seed)
    nulls = [f"random{i}" for i in range(cfg.n_random)]
    for k in nulls:
        all_perms[k] = random_partners(a.d_sae, b.d_sae, g)
    stats = coactivation(a, b, acts[0], acts[1], all_perms, keep=keep, chunk_size=cfg.data_chunk_size)
    p = {k: pair_metrics(stats, k)["p_partner"] for k in all_perms}
    rnd = torch.cat([p[k][~torch.isnan(p[k])] for k in nulls]) if nulls else torch.zeros(0)
    cut = float(torch.quantile(rnd, 0.95)) if rnd.numel() else math.nan
    ok = p["matched"][~torch.isnan(p["matched"])]
    scores = {
        "score_matched": finite_mean(p["matched"]),
        "score_unmatched": finite_mean(p["unmatched"]),
        "score_random": finite_mean(rnd),
        "confirmed_matched": float((ok > cut).double().mean()) if ok.numel() and rnd.numel() else math.nan,
    }
    return stats.n_tokens, {k: p[f"m:{k}"] for k in perms}, scores


def compare(
    a: SAE,
    b: SAE,
    config: CompareConfig | None = None,
    *,
    activations: tuple[ArrayLike, ArrayLike] | None = None,
    keep: ArrayLike | None = None,
    sources: tuple[SaeInfo, SaeInfo] | None = None,
    cache_dir: str | Path | None = None,
) -> CompareReport:
    """Compare the features of SAE ``a`` with those of SAE ``b`` (module docstring).

    Parameters
    ----------
    a, b : SAEs with the same ``d_in``; widths may differ.
    config : defaults to :class:`CompareConfig` ``()``.
    activations : ``(acts_a, acts_b)``, each (n_tokens, d_in), the inputs of ``a`` and of ``b`` on the
        same tokens (the same array twice when both SAEs read the same site), optional.
    keep : bool (n_tokens,), optional: tokens the data check uses.
    sources : where ``a`` and ``b`` came from (recorded in the report).
    cache_dir : the result store for the matchings (default ``cache_root()/results``).

    Returns
    -------
    CompareReport

    Examples
    --------
    See ``tests/test_compare.py``: a permuted, noisy copy is matched back with every pair confident,
    and a feature split in two is reported as a family.
    """
    cfg = CompareConfig() if config is None else config
    if not isinstance(cfg, CompareConfig):
        raise TypeError(f"config: expected a CompareConfig or None, got {type(cfg).__name__}")
    check_pair(a, b)
    matchers = {name: cfg.matcher_for(name) for name in cfg.names}
    results: dict[str, MatchResult] = {}
    seconds: dict[str, float] = {}
    for name, m in matchers.items():
        cached = matching_path(a, b, m, cache_dir).is_file()
        t0 = time.perf_counter()
        results[name] = cached_matching(a, b, m, cache_dir)
        seconds[name] = 0.0 if cached else time.perf_counter() - t0
    primary = matchers[cfg.matcher]
    res, dec, va, vb = judged_matching(a, b, primary, cfg, cache_dir)
    mc = primary.config
    # The rule of saematch_core.experiments.measures.links.link_vectors: the level quantile of the same null.
    tau = float(torch.quantile(dec.null, cfg.level))
    scan = scan_pairs(va, vb, metric=mc.metric, threshold=tau, chunk_size=cfg.chunk_size)

    n_tokens, p_partner, data = 0, {}, {}
    if activations is not None:
        perms = {k: r.perm for k, r in results.items()}
        n_tokens, p_partner, data = _data_check(a, b, activations, keep, perms, dec.matched, cfg)

    best_ab, best_ba = scan.row_index[:, 0], scan.col_index[:, 0]
    mutual_a = (best_ab >= 0) & (best_ba[best_ab.clamp(min=0)] == torch.arange(a.d_sae))
    mutual_b = (best_ba >= 0) & (best_ab[best_ba.clamp(min=0)] == torch.arange(b.d_sae))
    perm = res.perm
    pairs = []
    pp = p_partner.get(cfg.matcher)
    for i in (perm >= 0).nonzero().flatten().tolist():
        j = int(perm[i])
        pairs.append(
            PairRecord(
                a=i,
                b=j,
                cost=float(res.cost[i]),
                relative_cost=float(dec.statistic[i]),
                p_value=float(dec.p_value[i]),
                q_value=float(dec.q_value[i]),
                matched=bool(dec.matched[i]),
                margin=float(dec.margin[i]),
                a_to_b_best=int(best_ab[i]) == j,
                b_to_a_best=int(best_ba[j]) == i,
                mutual=int(best_ab[i]) == j and int(best_ba[j]) == i,
                partners={k: int(results[k].perm[i]) for k in cfg.others},
                p_partner=math.nan if pp is None else float(pp[i]),
            )
        )
    a_to_b = _best_matches(scan.row_cost, scan.row_index, mutual_a)
    b_to_a = _best_matches(scan.col_cost, scan.col_index, mutual_b)
    families = _families(scan.links, perm, b.d_sae)

    tested = perm >= 0
    margins = dec.margin[tested & ~torch.isnan(dec.margin)]
    names = list(cfg.names)
    agree = tuple(tuple(agreement(results[x].perm, results[y].perm) for y in names) for x in names)
    rows = []
    for name in names:
        r, m = results[name], matchers[name]
        on_matched = torch.where(dec.matched, perm, torch.full_like(perm, -1))
        sc = p_partner.get(name)
        rows.append(
            MatcherRow(
                name=name,
                description=m.description,
                one_to_one=m.one_to_one,
                is_permutation=r.is_permutation,
                n_partners=r.n_matched,
                mean_cost=r.mean_cost,
                agreement=agreement(r.perm, perm),
                agreement_matched=agreement(r.perm, on_matched),
                score=math.nan if sc is None else finite_mean(sc),
                n_scored=0 if sc is None else int((~torch.isnan(sc)).sum()),
                seconds=seconds[name],
            )
        )
    n_pairs = int(tested.sum())
    summary = CompareSummary(
        n_a=a.d_sae,
        n_b=b.d_sae,
        d_in=a.d_in,
        matcher=cfg.matcher,
        n_pairs=n_pairs,
        n_matched=dec.n_matched,
        fraction_matched=dec.fraction_matched,
        alpha=cfg.alpha,
        threshold=dec.threshold,
        null_median=float(dec.null.median()),
        cost=_quantiles(res.cost[tested]),
        relative_cost=_quantiles(dec.statistic[tested]),
        median_margin=float(margins.median()) if margins.numel() else math.nan,
        fraction_mutual=sum(p.mutual for p in pairs) / n_pairs if n_pairs else math.nan,
        link_threshold=tau,
        n_links=int(scan.links.links.shape[0]),
        n_split_a=int(scan.links.splits.sum()),
        n_split_b=int(scan.links.merges.sum()),
        n_tokens=n_tokens,
        score_matched=data.get("score_matched", math.nan),
        score_unmatched=data.get("score_unmatched", math.nan),
        score_random=data.get("score_random", math.nan),
        confirmed_matched=data.get("confirmed_matched", math.nan),
        matchers=tuple(rows),
        agreement=agree,
    )
    null = dec.null
    picks = torch.linspace(0, null.numel() - 1, min(_NULL_SAMPLE, null.numel())).round().long()
    info_a, info_b = sources if sources is not None else (sae_info(a), sae_info(b))
    return CompareReport(
        config=cfg,
        a=info_a,
        b=info_b,
        summary=summary,
        pairs=tuple(pairs),
        a_to_b=a_to_b,
        b_to_a=b_to_a,
        families=families,
        null_sample=tuple(float(v) for v in null[picks]),
    )


def _best_matches(cost: Tensor, index: Tensor, mutual: Tensor) -> tuple[BestMatch, ...]:
    sim = 1.0 - cost
    return tuple(
        BestMatch(
            feature=i,
            partner=int(index[i, 0]),
            similarity=float(sim[i, 0]),
            second=int(index[i, 1]),
            second_similarity=float(sim[i, 1]),
            mutual=bool(mutual[i]),
        )
        for i in range(index.shape[0])
    )


def _families(links: FeatureLinks, perm: Tensor, f_b: int) -> tuple[Family, ...]:
    inverse = torch.full((f_b,), -1, dtype=torch.long)
    has = perm >= 0
    inverse[perm[has]] = has.nonzero().flatten()
    out = []
    for side, col, other, split, partner in (
        ("a", 0, 1, links.splits, perm),
        ("b", 1, 0, links.merges, inverse),
    ):
        for f in split.nonzero().flatten().tolist():
            mine = links.links[:, col] == f
            order = torch.argsort(links.statistic[mine], stable=True)
            out.append(
                Family(
                    side=side,
                    feature=f,
                    parts=tuple(int(v) for v in links.links[mine, other][order]),
                    relative_costs=tuple(float(v) for v in links.statistic[mine][order]),
                    partner=int(partner[f]),
                )
            )
    return tuple(out)


# ---------------------------------------------------------------------------------------- many pairs
def matcher_scores_by_layer(
    inputs: Inputs,
    matchers: Sequence[str | Matcher] = ("saematch", "cosine", "greedy", "sinkhorn"),
    *,
    n_null: int = 5,
) -> tuple[MatchingScoreResult, ...]:
    """The data-based score of each matcher on every layer pair: Matching Score (mean
    ``P(partner active | feature active)``), Jaccard and Pearson of its pairs, beside random partners.

    Parameters
    ----------
    inputs : SAEs and activations per layer (the same tokens), ``keep``, the layer pairs (default
        consecutive layers with data), ``seed``, ``chunk_size`` and the result cache.
    matchers : names in :data:`~saematch_core.matchers.MATCHERS` or :class:`Matcher` objects.
    n_null : random matchings in the ``random`` row.

    Returns
    -------
    One :class:`MatchingScoreResult` per pair, with a row per matcher (named as the matcher) and a
    ``random`` row; the matchings and each pair's scores are cached.
    """
    ms = [get_matcher(m) for m in matchers]
    out = []
    for la, lb in inputs.layer_pairs(data=True):
        a, b = inputs.saes[la], inputs.saes[lb]
        methods: dict[str, MatchConfig | Tensor] = {
            m.name: cached_matching(a, b, m, inputs.cache_dir).perm for m in ms
        }
        out.append(matching_scores(inputs, (la, lb), methods, n_null=n_null))
    return tuple(out)


class MatcherScores(NamedTuple):
    """Several matchers' data-based score over layer pairs, side by side (see
    :func:`matcher_scores_summary`)."""

    layers: tuple[int, ...]
    """First layer ``t`` of each pair ``t → t'``, in the order of the results."""
    matchers: tuple[str, ...]
    """Matcher names, in the order given."""
    scores: Mapping[str, np.ndarray]
    """Matcher → Matching Score per pair, shape (n_pairs,); ``"random"`` holds the random null."""
    partner_share: Mapping[str, float]
    """Matcher → distinct B partners over A features with a partner, averaged over the pairs (1.0 for
    a one-to-one matching; below 1 when partners repeat)."""
    one_to_one: Mapping[str, bool]
    """Matcher → whether it never gives one B feature to two A features (:attr:`Matcher.one_to_one`)."""

    @property
    def means(self) -> dict[str, float]:
        """Matcher (and ``"random"``) → mean Matching Score over the pairs."""
        return {name: float(np.mean(values)) for name, values in self.scores.items()}

    @property
    def wins(self) -> dict[str, int]:
        """Matcher → pairs at which its score is the highest of the matchers (a tie counts for each)."""
        table = np.stack([self.scores[m] for m in self.matchers])
        best = table.max(axis=0)
        return {m: int((table[i] == best).sum()) for i, m in enumerate(self.matchers)}

    @property
    def best(self) -> str:
        """The matcher with the highest mean Matching Score (the first one given on a tie)."""
        means = self.means
        return max(self.matchers, key=lambda m: means[m])

    @property
    def best_one_to_one(self) -> str | None:
        """The one-to-one matcher with the highest mean Matching Score (None when there is none)."""
        means = self.means
        exact = [m for m in self.matchers if self.one_to_one[m]]
        return max(exact, key=lambda m: means[m]) if exact else None

    def describe(self, labels: Mapping[str, str] | None = None) -> str:
        """The ranking in plain words: mean score, pairs won and partner reuse per matcher, best first.

        ``labels`` maps matcher names to display names (default the names).
        """
        names = {m: m for m in self.matchers} | dict(labels or {})
        means, wins, n = self.means, self.wins, len(self.layers)
        parts = []
        for m in sorted(self.matchers, key=lambda m: -means[m]):
            reuse = self.partner_share[m]
            how = "one-to-one" if reuse >= 1.0 else f"{reuse:.0%} distinct partners"
            parts.append(f"{names[m]} {means[m]:.3f} (highest at {wins[m]} of {n} pairs; {how})")
        text = (
            f"Mean Matching Score over {n} layer pairs: " + ", ".join(parts) + f"; random partners "
            f"{means['random']:.3f}."
        )
        exact = self.best_one_to_one
        others = [m for m in self.matchers if self.one_to_one[m] and m != exact]
        if exact is not None and others:
            table = np.stack([self.scores[m] for m in (exact, *others)])
            ahead = int((table[0] >= table[1:].max(axis=0)).sum())
            text += (
                f" Among the one-to-one matchers, {names[exact]} scores highest "
                f"({means[exact]:.3f}, at least as high at {ahead} of {n} pairs)."
            )
        return text


def matcher_scores_summary(
    inputs: Inputs,
    results: Sequence[MatchingScoreResult],
    matchers: Sequence[str | Matcher] = ("saematch", "cosine", "greedy", "sinkhorn"),
) -> MatcherScores:
    """Side by side, the matchers' rows of :func:`matcher_scores_by_layer`'s results.

    Parameters
    ----------
    inputs : the inputs the results were computed on (their SAEs give each matching's partners,
        read from the result cache).
    results : :func:`matcher_scores_by_layer` ``(inputs, matchers)``, one result per pair.
    matchers : the matchers to compare; each must have a row in every result.

    Raises
    ------
    ValueError
        If ``results`` is empty.
    KeyError
        If a result has no row for one of ``matchers``.
    """
    if not results:
        raise ValueError("results: expected the results of at least one layer pair, got none")
    ms = [get_matcher(m) for m in matchers]
    scores = {
        name: np.array([r.row(name).matching_score for r in results], dtype=np.float64)
        for name in [m.name for m in ms] + ["random"]
    }
    share: dict[str, float] = {}
    for m in ms:
        fractions = []
        for r in results:
            perm = cached_matching(inputs.saes[r.layer_a], inputs.saes[r.layer_b], m, inputs.cache_dir).perm
            matched = perm[perm >= 0]
            fractions.append(len(torch.unique(matched)) / max(1, len(matched)))
        share[m.name] = float(np.mean(fractions))
    return MatcherScores(
        layers=tuple(r.layer_a for r in results),
        matchers=tuple(m.name for m in ms),
        scores=scores,
        partner_share=share,
        one_to_one={m.name: m.one_to_one for m in ms},
    )
