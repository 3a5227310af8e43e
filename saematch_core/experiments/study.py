"""Study: the one place that turns a profile name into what the book's notebooks need.

:func:`load_study` calls :func:`saematch_core.prepare.prepare` (instant when the cache is warm),
loads the language model, every main SAE and the evaluation activation cache, and returns a
:class:`Study`. Its methods and the functions below are the glue the notebooks would otherwise
write inline: token batches per corpus for the hidden-state experiments, the keep mask shared by
several layers, consecutive matchings, feature paths through every layer, top-activating contexts
from the flat activation cache, summaries of experiment results, and the reproduction table
(each notebook records its claims with :func:`write_claims`; the last notebook collects them with
:func:`read_claims` and renders :func:`claims_table_html`).

The activation cache is flat: rows are tokens of consecutive chunks (``chunk_ids``, ``positions``).
Functions that show contexts turn rows back into padded ``(n_chunks, seq)`` arrays.
"""

from __future__ import annotations

import html
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saematch_core.activations import ActivationCache, open_activation_cache
from saematch_core.cache import atomic_write_text, cache_root
from saematch_core.compose import invert
from saematch_core.contexts import Context, top_contexts
from saematch_core.data import corpus_chunks
from saematch_core.formats import load_sae
from saematch_core.match import MatchConfig, MatchResult
from saematch_core.models import LoadedModel, load_model
from saematch_core.prepare import PrepareResult, prepare
from saematch_core.profiles import Profile, get_profile
from saematch_core.results import cached_matches
from saematch_core.sae import SAE

__all__ = [
    "BENCHMARK_COLUMNS",
    "CLAIMS_FILE",
    "PAPER",
    "Claim",
    "Study",
    "agreement_groups",
    "alive_features",
    "benchmark_series",
    "benchmark_table",
    "chunk_batch",
    "claims_table_html",
    "correlation",
    "curves_by_start",
    "early_late_split",
    "feature_contexts",
    "feature_path",
    "feature_values",
    "first_below",
    "load_study",
    "pad_rows",
    "pair_step_costs",
    "paper_layer",
    "pick_by_mse",
    "read_claims",
    "sample_features",
    "write_claims",
]

logger = logging.getLogger(__name__)

CLAIMS_FILE = "claims.json"
"""File name, inside a notebook's ``out_dir``, of the claims it measured (see :func:`write_claims`)."""

PAPER: Mapping[str, str] = {
    "fig1_theta_norm": "mean θ grows with depth like the hidden-state norm (Fig. 1)",
    "fig3_folded_beats_unfolded": "folded + matched: lowest parameter MSE at every layer pair (Fig. 3)",
    "fig12_decoder_only": "decoder-only ≈ all parameters; encoder-only much worse (Fig. 12)",
    "fig7_folded_score": "Matching Score: folded ≥ unfolded (Fig. 7)",
    "fig7_early_layers": "layers 0–9 of 26 (first 38% of depth) match much worse than 10–25 (Fig. 7)",
    "fig5_low_mse_agree": "low-MSE pairs are mostly SAME; a long tail of high-MSE failures (Figs. 5/6)",
    "fig8_persistence": "composed ≈ direct matching for about 5 layers (Fig. 8)",
    "fig10_match_vs_drop": "SAE Match approximates h_t better than dropping the layer (Figs. 10/11)",
    "fig10_folded_vs_unfolded": "folded matching approximates h_t better than unfolded (Figs. 10/11)",
    "fig14_best_l0": "the approximation is best around L0 ≈ 70 (Fig. 14, layers 20/21)",
    "fig16_quantile": "explained variance rises as q falls toward the well-matched features (Figs. 16/17)",
}
"""The paper's claims as stated in ``shared/PAPER.md`` (the "paper" column of the reproduction table)."""

_EARLY_FRACTION = 10 / 26
"""The paper's early layers are 0–9 of Gemma 2 2B's 26: this fraction of the depth."""
_PAPER_N_LAYERS = 26
"""Gemma 2 2B's depth, for mapping the paper's layer indices to another model's."""

BENCHMARK_COLUMNS: tuple[str, ...] = (
    "F",
    "d",
    "noise",
    "solver",
    "candidates",
    "chain_layers",
    "gemm_s",
    "scipy_s",
    "ours_s",
    "lap_speedup_vs_scipy",
    "e2e_over_gemm",
    "scipy_peak_rss_mb",
    "ours_peak_rss_mb",
    "same_optimum",
    "max_violation",
    "errors",
)
"""Columns of ``benchmarks/results/results.json`` records shown in the appendix, when present."""


# ============================================================================================ the study
@dataclass(frozen=True, eq=False)
class Study:
    """Everything one profile provides to the notebooks, loaded once.

    Examples
    --------
    ``study = load_study("smoke")`` then ``study.saes[2]``, ``study.acts(2)``, ``study.keep(1, 2)``.
    """

    profile: Profile
    """The profile."""
    prepared: PrepareResult
    """What ``prepare`` produced (SAE records, quality, folders)."""
    loaded: LoadedModel
    """The language model and its tokenizer (eval mode)."""
    saes: Mapping[int, SAE]
    """Layer → main JumpReLU SAE (every layer)."""
    evals: ActivationCache
    """Residual stream of the evaluation split, every layer."""
    results_dir: Path
    """Root of the experiment result cache (pass as ``cache_dir`` to the experiment functions)."""
    _matches: dict[tuple[int, int, str], MatchResult] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------ basic views
    @property
    def layers(self) -> tuple[int, ...]:
        """Layers with a main SAE, ascending."""
        return tuple(sorted(self.saes))

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """Consecutive layer pairs ``(t, t+1)``."""
        return tuple(itertools.pairwise(self.layers))

    @property
    def corpora(self) -> tuple[str, ...]:
        """Corpora of the evaluation cache, in storage order."""
        return tuple(self.evals.corpus_ranges)

    def describe(self) -> str:
        """One line: profile, model, layers, SAE width, evaluation tokens."""
        sae = self.saes[self.layers[0]]
        return (
            f"profile {self.profile.name!r}: model {self.profile.model.name} ({len(self.layers)} layers, "
            f"d_model {self.profile.model.d_model}), SAEs of width {sae.d_sae}, "
            f"{self.evals.n_tokens} evaluation tokens over {', '.join(self.corpora)}"
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids → text, with the profile's tokenizer."""
        return self.loaded.tokenizer.decode(ids)

    def acts(self, layer: int) -> np.ndarray:
        """Evaluation residuals after block ``layer``, shape (n_tokens, d_model), float16, memory-mapped."""
        return self.evals.layer(layer)

    def activations(self, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
        """Layer → :meth:`acts` for ``layers`` (default all)."""
        return {layer: self.acts(layer) for layer in (self.layers if layers is None else layers)}

    def keep(self, *layers: int) -> np.ndarray:
        """Rows usable at every one of ``layers`` (default all), shape (n_tokens,), bool.

        Position 0 and each layer's outliers are excluded (:meth:`ActivationCache.usable`).
        """
        mask = np.ones(self.evals.n_tokens, dtype=bool)
        for layer in layers or self.layers:
            mask &= self.evals.usable(layer)
        return mask

    def token_ids(self) -> np.ndarray:
        """Token id of every evaluation row, shape (n_tokens,), int64."""
        return np.asarray(self.evals.tokens, dtype=np.int64)

    def median_norms(self) -> dict[int, float]:
        """Layer → median residual norm (positions ≥ 1) of the evaluation cache."""
        return {i: float(v) for i, v in enumerate(self.evals.median_norms)}

    def quality(self, family: str = "main") -> dict[int, Any]:
        """Layer → :class:`~saematch_core.train.SAEQuality` of one family's SAEs."""
        return {r.layer: r.quality for r in self.prepared.records if r.family == family}

    # ------------------------------------------------------------------------------ other SAEs
    def family(self, name: str) -> dict[int, SAE]:
        """Layer → SAE of another family (``topk``, ``relu``, ``seed``); empty when the profile has none."""
        return {layer: load_sae(p, dtype=torch.float32) for layer, p in self.prepared.saes(name).items()}

    def sweep(self) -> dict[int, dict[str, SAE]]:
        """Layer → setting → SAE of the L0 sweep (empty when the profile has none)."""
        out: dict[int, dict[str, SAE]] = {}
        for (layer, setting), p in sorted(self.prepared.sweep().items()):
            out.setdefault(layer, {})[setting] = load_sae(p, dtype=torch.float32)
        return out

    def alive(self, layer: int, sae: SAE | None = None, *, chunk_size: int = 4096) -> np.ndarray:
        """Features of ``layer``'s SAE (default the main one) active on at least one kept evaluation
        token, shape (d_sae,), bool."""
        model_sae = self.saes[layer] if sae is None else sae
        return alive_features(model_sae, self.acts(layer), self.keep(layer), chunk_size=chunk_size)

    def sweep_variants(self) -> tuple[int, dict[str, tuple[SAE, SAE]]] | None:
        """``(layer t, setting → (SAE t−1, SAE t))`` for the L0 sweep at two adjacent layers.

        Both SAEs of a variant share the setting. ``None`` when the profile has no such pair.
        """
        sweep = self.sweep()
        for t in sorted(sweep):
            if t - 1 in sweep:
                common = [s for s in sweep[t] if s in sweep[t - 1]]
                if common:
                    return t, {s: (sweep[t - 1][s], sweep[t][s]) for s in common}
        return None

    # ------------------------------------------------------------------------------ matchings
    def consecutive_matches(self, config: MatchConfig | None = None) -> dict[tuple[int, int], MatchResult]:
        """``(t, t+1)`` → matching of SAE ``t`` to SAE ``t+1`` (default: the paper's).

        Memoised in memory and cached on disk under ``results_dir/match/``, keyed by both SAEs'
        parameters and the config, so a notebook rerun does not solve the assignments again.
        """
        cfg = MatchConfig() if config is None else config
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        todo = [(a, b) for a, b in self.pairs if (a, b, key) not in self._matches]
        solved = cached_matches([(self.saes[a], self.saes[b], cfg) for a, b in todo], self.results_dir)
        for (a, b), result in zip(todo, solved, strict=True):
            self._matches[(a, b, key)] = result
        return {(a, b): self._matches[(a, b, key)] for a, b in self.pairs}

    # ------------------------------------------------------------------------------ token batches
    def corpus_batch(self, corpus: str, max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
        """Evaluation chunks of one corpus as padded ``(ids, mask)``, at most ``max_tokens`` tokens.

        Returns
        -------
        ids : LongTensor, shape (n_chunks, seq); mask : BoolTensor, same shape (False on padding).
        """
        if corpus not in self.evals.corpus_ranges:
            raise ValueError(f"corpus: expected one of {list(self.corpora)}, got {corpus!r}")
        chunks = [i for i, c in enumerate(self.evals.chunks) if c["corpus"] == corpus]
        return chunk_batch(self.evals, chunks, max_tokens)

    def fit_batch(self, max_tokens: int) -> tuple[Tensor, Tensor]:
        """Training-split chunks (disjoint from the evaluation documents), round-robin over corpora.

        For the ``linear`` baseline's least squares. Read from the training activation cache when
        there is one, else tokenised from the corpora (pretrained-SAE profiles have no training cache).
        """
        folder = self.prepared.activation_folders.get("train")
        cache = open_activation_cache(folder) if folder is not None else None
        if cache is not None:
            by_corpus: dict[str, list[int]] = {}
            for i, c in enumerate(cache.chunks):
                by_corpus.setdefault(c["corpus"], []).append(i)
            order = [
                i for group in itertools.zip_longest(*by_corpus.values()) for i in group if i is not None
            ]
            return chunk_batch(cache, order, max_tokens)
        tok = self.loaded.tokenizer
        per = corpus_chunks(self.profile.data, tok.encode, "train", bos_id=tok.bos_id)
        pieces = [c.ids for group in itertools.zip_longest(*per.values()) for c in group if c is not None]
        return _pad_pieces(pieces, max_tokens)


def load_study(
    profile: str | Profile, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = False
) -> Study:
    """Prepare (cached) and load everything a profile provides.

    Parameters
    ----------
    profile : a profile or its name (``smoke``, ``default``, ``paper``).
    cache_dir : cache root (default :func:`saematch_core.cache.cache_root`); experiment results go
        to ``<cache_dir>/results``.
    progress : progress bars while preparing (a cold ``prepare`` takes minutes on ``default``).
    """
    prof = get_profile(profile) if isinstance(profile, str) else profile
    if not isinstance(prof, Profile):
        raise TypeError(f"profile: expected a Profile or a profile name, got {type(profile).__name__}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    prepared = prepare(prof, cache_dir=root, progress=progress)
    loaded = load_model(prof.model, cache_dir=root)
    saes = {layer: load_sae(p, dtype=torch.float32) for layer, p in sorted(prepared.saes("main").items())}
    if not saes:
        raise ValueError(f"profile {prof.name!r}: prepare produced no main SAEs")
    folder = prepared.activation_folders.get("eval")
    evals = open_activation_cache(folder) if folder is not None else None
    if evals is None:
        raise FileNotFoundError(f"{folder}: no finished evaluation activation cache (rerun prepare)")
    return Study(
        profile=prof, prepared=prepared, loaded=loaded, saes=saes, evals=evals, results_dir=root / "results"
    )


# ============================================================================================ tokens
def _pad_pieces(pieces: Sequence[np.ndarray], max_tokens: int | None) -> tuple[Tensor, Tensor]:
    chosen: list[np.ndarray] = []
    total = 0
    for piece in pieces:
        if max_tokens is not None and chosen and total + len(piece) > max_tokens:
            break
        chosen.append(np.asarray(piece, dtype=np.int64))
        total += len(piece)
    if not chosen:
        raise ValueError("chunks: expected at least one chunk, got none")
    seq = max(len(p) for p in chosen)
    ids = torch.zeros((len(chosen), seq), dtype=torch.long)
    mask = torch.zeros((len(chosen), seq), dtype=torch.bool)
    for row, piece in enumerate(chosen):
        ids[row, : len(piece)] = torch.from_numpy(piece)
        mask[row, : len(piece)] = True
    return ids, mask


def chunk_batch(
    cache: ActivationCache, chunks: Sequence[int], max_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """Chunks of an activation cache (by index, in the given order) as padded token ids and a mask.

    Whole chunks are taken while the total stays within ``max_tokens`` (at least one chunk).

    Returns
    -------
    ids : LongTensor, shape (n_chunks, seq); mask : BoolTensor, same shape (False on padding).
    """
    lengths = [int(c["length"]) for c in cache.chunks]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.asarray(cache.tokens)
    pieces = [tokens[starts[i] : starts[i + 1]] for i in chunks]
    return _pad_pieces(pieces, max_tokens)


def pad_rows(values: np.ndarray | Tensor, chunk_ids: np.ndarray, positions: np.ndarray) -> Tensor:
    """Flat per-token values → padded per-chunk layout.

    Parameters
    ----------
    values : array, shape (n_tokens,) or (n_tokens, d)
    chunk_ids, positions : int arrays, shape (n_tokens,): the chunk and position of every row.

    Returns
    -------
    Tensor, shape (n_chunks, seq) or (n_chunks, seq, d), zeros where a chunk is shorter.
    """
    v = values if isinstance(values, Tensor) else torch.from_numpy(np.asarray(values))
    cid = torch.from_numpy(np.asarray(chunk_ids, dtype=np.int64))
    pos = torch.from_numpy(np.asarray(positions, dtype=np.int64))
    if v.shape[0] != cid.shape[0] or cid.shape != pos.shape:
        raise ValueError(
            f"values, chunk_ids, positions: expected the same number of rows, got {v.shape[0]}, "
            f"{cid.shape[0]}, {pos.shape[0]}"
        )
    n_chunks = int(cid.max()) + 1 if cid.numel() else 0
    seq = int(pos.max()) + 1 if pos.numel() else 0
    out = torch.zeros((n_chunks, seq, *v.shape[1:]), dtype=v.dtype)
    out[cid, pos] = v
    return out


# ============================================================================================ features
def feature_values(
    sae: SAE, acts: np.ndarray | Tensor, features: Sequence[int], *, chunk_size: int = 4096
) -> Tensor:
    """Activations of some features of ``sae`` on every row of ``acts``.

    Parameters
    ----------
    acts : array, shape (n_tokens, d_in) (a memory map is read in chunks).
    features : indices into the SAE's d_sae features.

    Returns
    -------
    Tensor, shape (n_tokens, len(features)), float32.
    """
    idx = torch.as_tensor(list(features), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= sae.d_sae):
        raise ValueError(f"features: expected indices in [0, {sae.d_sae}), got {idx.tolist()}")
    n = int(acts.shape[0])
    parts = []
    with torch.no_grad():
        for s in range(0, n, chunk_size):
            part = acts[s : s + chunk_size]
            x = part if isinstance(part, Tensor) else torch.from_numpy(np.array(part, dtype=np.float32))
            parts.append(sae.encode(x.to(sae.dtype))[:, idx].float())
    return torch.cat(parts) if parts else torch.zeros((0, idx.numel()))


def feature_contexts(
    study: Study,
    layer: int,
    features: Sequence[int],
    *,
    sae: SAE | None = None,
    k: int = 5,
    before: int = 8,
    after: int = 2,
) -> dict[int, tuple[Context, ...]]:
    """Top-activating evaluation contexts of some features of ``layer``'s SAE (default: the main one).

    Rows excluded by :meth:`Study.keep` (position 0, outliers) never count as top activations.

    Returns
    -------
    feature → up to ``k`` contexts, highest activation first.
    """
    model_sae = study.saes[layer] if sae is None else sae
    values = feature_values(model_sae, study.acts(layer), features)
    cid, pos = np.asarray(study.evals.chunk_ids), np.asarray(study.evals.positions)
    ids = pad_rows(study.token_ids(), cid, pos)
    keep = pad_rows(torch.from_numpy(study.keep(layer)), cid, pos)
    out = {}
    for j, f in enumerate(features):
        vals = pad_rows(values[:, j], cid, pos)
        out[int(f)] = top_contexts(vals, ids, study.decode, k=k, before=before, after=after, keep=keep)
    return out


def sample_features(alive: np.ndarray | Tensor, n: int, seed: int = 0) -> list[int]:
    """``n`` distinct features drawn uniformly (seeded) among those marked alive, sorted.

    Parameters
    ----------
    alive : bool array, shape (d_sae,)

    >>> sample_features(np.array([True, False, True, True]), 2, seed=0)
    [2, 3]
    """
    a = np.asarray(alive, dtype=bool)
    pool = np.flatnonzero(a)
    if n < 0:
        raise ValueError(f"n: expected >= 0, got {n}")
    rng = np.random.default_rng(seed)
    picked = rng.choice(pool, size=min(n, pool.size), replace=False)
    return sorted(int(i) for i in picked)


def feature_path(
    perms: Mapping[tuple[int, int], Tensor],
    costs: Mapping[tuple[int, int], Tensor],
    layers: Sequence[int],
    start_layer: int,
    feature: int,
) -> tuple[list[int], list[float]]:
    """Follow a feature forward and backward from ``start_layer`` through every layer.

    Parameters
    ----------
    perms : ``(t, t+1)`` → LongTensor (F,), the matching of layer t's features to layer t+1's.
    costs : ``(t, t+1)`` → per-pair cost (F,) of that matching (indexed by layer t's feature).
    layers : consecutive layers, ascending; ``start_layer`` among them.

    Returns
    -------
    features : the feature occupied at each layer (``-1`` once a step has no partner);
    step_costs : the cost of the matched pair linking each layer to its neighbour towards the
        start (``nan`` at the start layer and after a lost step).

    >>> p = {(0, 1): torch.tensor([1, 0]), (1, 2): torch.tensor([0, 1])}
    >>> c = {k: torch.tensor([0.5, 0.25]) for k in p}
    >>> feature_path(p, c, [0, 1, 2], 1, 0)
    ([1, 0, 0], [0.25, nan, 0.5])
    """
    ls = list(layers)
    if start_layer not in ls:
        raise ValueError(f"start_layer: expected one of {ls}, got {start_layer}")
    i0 = ls.index(start_layer)
    feats = [-1] * len(ls)
    step = [math.nan] * len(ls)
    feats[i0] = int(feature)
    for i in range(i0 + 1, len(ls)):
        prev = feats[i - 1]
        if prev < 0:
            break
        key = (ls[i - 1], ls[i])
        feats[i] = int(perms[key][prev])
        step[i] = float(costs[key][prev]) if feats[i] >= 0 else math.nan
    for i in range(i0 - 1, -1, -1):
        nxt = feats[i + 1]
        if nxt < 0:
            break
        key = (ls[i], ls[i + 1])
        back = invert(perms[key], size=max(int(perms[key].max()) + 1, int(perms[key].shape[0])))
        feats[i] = int(back[nxt])
        step[i] = float(costs[key][feats[i]]) if feats[i] >= 0 else math.nan
    return feats, step


def pair_step_costs(step_costs: Sequence[float], layers: Sequence[int], start_layer: int) -> list[float]:
    """A path's step costs (from :func:`feature_path`) re-indexed by layer pair ``(t, t+1)``.

    After the start a step is stored at its target layer ``t+1``, before the start at its source ``t``.

    >>> pair_step_costs([0.25, float("nan"), 0.5], [0, 1, 2], 1)
    [0.25, 0.5]
    """
    ls = list(layers)
    if len(step_costs) != len(ls) or start_layer not in ls:
        raise ValueError(
            f"step_costs, start_layer: expected {len(ls)} costs and a start among {ls}, "
            f"got {len(step_costs)} and {start_layer}"
        )
    i0 = ls.index(start_layer)
    return [float(step_costs[i + 1] if i + 1 > i0 else step_costs[i]) for i in range(len(ls) - 1)]


# ============================================================================================ summaries
def first_below(distances: Sequence[int], values: Sequence[float], threshold: float) -> float:
    """The first distance at which ``values`` drops below ``threshold`` (``inf`` if it never does).

    >>> first_below([1, 2, 3], [0.9, 0.6, 0.4], 0.5)
    3.0
    """
    for d, v in zip(distances, values, strict=True):
        if v < threshold:
            return float(d)
    return math.inf


def early_late_split(layers: Sequence[int], values: Sequence[float], n_layers: int) -> tuple[float, float]:
    """Mean of ``values`` over the paper's "early" layers (the first 10/26 of the depth) and the rest.

    ``layers`` are the first layers of the pairs the values belong to; NaN values are ignored.

    >>> early_late_split([0, 1, 2, 3], [0.1, 0.2, 0.5, 0.7], 4)
    (0.15000000000000002, 0.6)
    """
    cut = _EARLY_FRACTION * n_layers
    v = np.asarray(values, dtype=np.float64)
    early = np.array([layer < cut for layer in layers])
    if len(v) != len(early):
        raise ValueError(f"values: expected {len(early)} values (one per layer), got {len(v)}")

    def mean(sel: np.ndarray) -> float:
        x = v[sel & ~np.isnan(v)]
        return float(x.mean()) if x.size else math.nan

    return mean(early), mean(~early)


# ============================================================================================ claims
@dataclass(frozen=True, kw_only=True)
class Claim:
    """One row of the reproduction table, measured by one notebook."""

    key: str
    """Key into :data:`PAPER` (the claim as the paper states it)."""
    ours: str
    """Our measurement, formatted for the table."""
    holds: bool | None
    """Whether our measurement supports the claim (``None``: not measurable on this profile)."""
    section: str = ""
    """Notebook stem that measured it (filled in by :func:`write_claims`)."""

    def __post_init__(self) -> None:
        if self.key not in PAPER:
            raise ValueError(f"Claim.key: expected one of {sorted(PAPER)}, got {self.key!r}")

    @property
    def paper(self) -> str:
        """The paper's statement of the claim."""
        return PAPER[self.key]


def write_claims(out_dir: str | os.PathLike[str], section: str, claims: Sequence[Claim]) -> Path:
    """Store a notebook's measured claims as ``out_dir/claims.json`` (atomically)."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"key": c.key, "ours": c.ours, "holds": c.holds, "section": section}
        for c in claims
        if isinstance(c, Claim)
    ]
    if len(rows) != len(claims):
        raise TypeError("claims: expected a sequence of Claim")
    path = folder / CLAIMS_FILE
    atomic_write_text(path, json.dumps({"section": section, "claims": rows}, indent=1) + "\n")
    return path


def read_claims(results_root: str | os.PathLike[str]) -> list[Claim]:
    """Every claim recorded under ``results_root/*/claims.json``, in the order of :data:`PAPER`."""
    root = Path(results_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: results folder does not exist")
    found: dict[str, Claim] = {}
    for path in sorted(root.glob(f"*/{CLAIMS_FILE}")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        for row in doc.get("claims", []):
            found[row["key"]] = Claim(
                key=row["key"], ours=str(row["ours"]), holds=row["holds"], section=str(row["section"])
            )
    order = list(PAPER)
    return sorted(found.values(), key=lambda c: order.index(c.key))


def claims_table_html(claims: Sequence[Claim], link_prefix: str = "") -> str:
    """The reproduction table as HTML: claim (paper), ours, verdict, link to the section.

    ``link_prefix`` is prepended to ``<section>.html`` (e.g. ``"../notebooks/"`` from the intro page).
    """
    verdict = {True: "reproduced", False: "not reproduced", None: "not measurable here"}
    body = []
    for c in claims:
        link = f'<a href="{html.escape(link_prefix + c.section)}.html">{html.escape(c.section)}</a>'
        body.append(
            "<tr>"
            f"<td>{html.escape(c.paper)}</td><td>{html.escape(c.ours)}</td>"
            f"<td>{verdict[c.holds]}</td><td>{link}</td>"
            "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("paper's claim", "ours", "verdict", "section"))
    return (
        f'<table class="saematch-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def alive_features(
    sae: SAE, acts: np.ndarray | Tensor, keep: np.ndarray | None = None, *, chunk_size: int = 4096
) -> np.ndarray:
    """Features active (code > 0) on at least one kept row of ``acts`` (n_tokens, d_in), shape (d_sae,)."""
    n = int(acts.shape[0])
    mask = np.ones(n, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"keep: expected shape ({n},), got {mask.shape}")
    alive = torch.zeros(sae.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for s in range(0, n, chunk_size):
            rows = np.flatnonzero(mask[s : s + chunk_size]) + s
            if rows.size == 0:
                continue
            part = acts[rows] if isinstance(acts, Tensor) else np.asarray(acts[rows], dtype=np.float32)
            x = part if isinstance(part, Tensor) else torch.from_numpy(part)
            alive |= (sae.encode(x.to(sae.dtype)) > 0).any(0).cpu()
    return alive.numpy()


def paper_layer(layer: int, n_layers: int) -> int:
    """The layer of an ``n_layers``-deep model at the same relative depth as Gemma 2 2B's ``layer``.

    >>> paper_layer(20, 26), paper_layer(20, 30), paper_layer(0, 4), paper_layer(25, 4)
    (20, 23, 0, 3)
    """
    if not 0 <= layer < _PAPER_N_LAYERS:
        raise ValueError(f"layer: expected a Gemma 2 2B layer in 0..{_PAPER_N_LAYERS - 1}, got {layer}")
    if n_layers < 1:
        raise ValueError(f"n_layers: expected >= 1, got {n_layers}")
    return round(layer / (_PAPER_N_LAYERS - 1) * (n_layers - 1))


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equal-length series, ignoring positions where either is NaN.

    ``nan`` when fewer than two points remain or either series is constant.

    >>> round(correlation([1, 2, 3, float("nan")], [2, 4, 7, 1]), 4)
    0.9934
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x, y: expected two 1-D series of equal length, got {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def agreement_groups(
    pairs: Sequence[Any], metric: str = "p_partner", cuts: tuple[float, float] = (0.1, 0.5)
) -> dict[str, np.ndarray]:
    """Per-pair MSE of matched pairs grouped by their data-based agreement (Figs. 5/6 offline).

    Parameters
    ----------
    pairs : :class:`~saematch_core.evaluate.PairRecord` items (``mse``, ``included`` and ``metric``).
    cuts : ``(lo, hi)``: agreement ≥ hi is "agree", in [lo, hi) "partly", below lo "disagree";
        excluded pairs (a dead member) form "dead".

    Returns
    -------
    label → array of per-pair MSE (labels always present, possibly empty).
    """
    lo, hi = cuts
    if not 0 <= lo <= hi:
        raise ValueError(f"cuts: expected 0 <= lo <= hi, got {cuts}")
    names = (f"agree (≥ {hi:g})", f"partly ({lo:g}–{hi:g})", f"disagree (< {lo:g})", "dead member")
    groups: dict[str, list[float]] = {n: [] for n in names}
    for p in pairs:
        value = float(getattr(p, metric))
        if not p.included or math.isnan(value):
            groups[names[3]].append(p.mse)
        elif value >= hi:
            groups[names[0]].append(p.mse)
        elif value >= lo:
            groups[names[1]].append(p.mse)
        else:
            groups[names[2]].append(p.mse)
    return {k: np.asarray(v, dtype=np.float64) for k, v in groups.items()}


def pick_by_mse(pairs: Sequence[Any]) -> dict[str, Any]:
    """The included pairs with the lowest, the median and the highest MSE (by ``mse``).

    Returns
    -------
    ``{"low": pair, "median": pair, "high": pair}`` (empty when no pair is included).
    """
    inc = sorted((p for p in pairs if p.included), key=lambda p: p.mse)
    if not inc:
        return {}
    return {"low": inc[0], "median": inc[len(inc) // 2], "high": inc[-1]}


def curves_by_start(result: Any, metric: str = "agreement") -> tuple[list[int], dict[int, list[float]]]:
    """Persistence curves on a shared distance axis, NaN where a start reaches fewer layers.

    Parameters
    ----------
    result : :class:`~saematch_core.persistence.PersistenceResult`.

    Returns
    -------
    distances : 1..max distance; curves : start layer → values of ``metric`` per distance.
    """
    starts = sorted({r.start for r in result.rows})
    max_d = max((r.distance for r in result.rows), default=0)
    distances = list(range(1, max_d + 1))
    curves = {}
    for s in starts:
        ds, vs = result.curve(s, metric)
        by_d = dict(zip(ds, vs, strict=True))
        curves[s] = [float(by_d.get(d, math.nan)) for d in distances]
    return distances, curves


def _benchmark_records(path: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The records of ``make bench``'s ``results.json``, or ``None`` when the file is absent."""
    p = Path(path)
    if not p.is_file():
        return None
    doc = json.loads(p.read_text(encoding="utf-8"))
    records = doc.get("records", []) if isinstance(doc, dict) else []
    return [r for r in records if isinstance(r, dict)]


def benchmark_series(
    path: str | os.PathLike[str], column: str
) -> tuple[list[str], dict[str, list[float]]] | None:
    """``column`` of every planted instance in ``make bench``'s ``results.json``, for a grouped bar chart:
    categories ``"F=… d=… noise"`` (in file order) and one series per candidate precision (NaN where a
    precision was not run or the value is missing). ``None`` when the file or the column is absent."""
    records = [
        r for r in _benchmark_records(path) or [] if r.get("noise") is not None and r.get(column) is not None
    ]
    if not records:
        return None
    labels = [f"F={r.get('F')} d={r.get('d')} {r['noise']}" for r in records]
    cats = list(dict.fromkeys(labels))
    series: dict[str, list[float]] = {}
    for r, label in zip(records, labels, strict=True):
        values = series.setdefault(str(r.get("candidates") or "float32"), [math.nan] * len(cats))
        values[cats.index(label)] = float(r[column])
    return cats, series


def benchmark_table(path: str | os.PathLike[str]) -> tuple[list[str], list[list[str]]] | None:
    """Headers and formatted rows of ``make bench``'s ``results.json`` (``None`` when absent).

    Only the :data:`BENCHMARK_COLUMNS` that some record has are shown.
    """
    records = _benchmark_records(path)
    if records is None:
        return None
    headers = [c for c in BENCHMARK_COLUMNS if any(c in r for r in records)]

    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    return headers, [[fmt(r.get(c)) for c in headers] for r in records]
