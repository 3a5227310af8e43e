"""The study: the one place that turns a profile name into what the book's notebooks need.

:func:`load_study` calls :func:`saematch_core.prepare.prepare` (instant when the cache is warm),
loads the language model, every main SAE and the evaluation activation cache, and returns a
:class:`Study`. Its :meth:`~Study.inputs` are what every experiment takes
(:class:`~saematch_core.experiments.inputs.Inputs`); its other methods are views the notebooks
show: token batches per corpus for the hidden-state experiments, the keep mask shared by several
layers, consecutive matchings, feature paths through every layer with their top-activating contexts
(:func:`path_contexts`, :func:`path_table`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saematch_core.activations import ActivationCache, open_activation_cache
from saematch_core.cache import cache_root
from saematch_core.compose import FeaturePath, path
from saematch_core.data import corpus_chunks
from saematch_core.experiments.inputs import ArrayLike, Inputs, TokenBatch
from saematch_core.experiments.measures.contexts import (
    Context,
    alive_features,
    feature_values,
    pad_rows,
    top_contexts,
)
from saematch_core.experiments.results import cached_matches
from saematch_core.formats import load_sae
from saematch_core.match import MatchConfig, MatchResult
from saematch_core.models import LoadedModel, load_model
from saematch_core.prepare import PrepareResult, prepare
from saematch_core.profiles import Profile, get_profile
from saematch_core.sae import SAE

__all__ = [
    "NEVER_ACTIVE",
    "Study",
    "chunk_batch",
    "contexts_side_by_side",
    "load_study",
    "path_contexts",
    "path_table",
]

logger = logging.getLogger(__name__)

NEVER_ACTIVE = "(never active on the evaluation tokens)"
"""What a path table shows for a feature without any top-activating context."""


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

    def norms(self) -> dict[int, np.ndarray]:
        """Layer → ‖h‖ of every evaluation row (from the activation cache), shape (n_tokens,)."""
        return {layer: self.evals.norms[layer] for layer in self.layers}

    def usable(self) -> dict[int, np.ndarray]:
        """Layer → rows usable at that layer alone (:meth:`ActivationCache.usable`), shape (n_tokens,)."""
        return {layer: self.evals.usable(layer) for layer in self.layers}

    def train_activations(self) -> Mapping[int, np.ndarray]:
        """Layer → the training residuals the profile's SAEs were trained on (usable rows only,
        float32), read from the training activation cache when a layer is asked for; the last layer
        read is kept. For experiments that train SAEs (``Inputs.train_activations``)."""
        folder = self.prepared.activation_folders.get("train")
        cache = open_activation_cache(folder) if folder is not None else None
        if cache is None:
            raise FileNotFoundError(
                f"profile {self.profile.name!r}: no training activation cache (pretrained SAEs have none)"
            )
        return _TrainRows(cache, self.layers)

    def inputs(self, *, keep: ArrayLike | None = None, **changes: Any) -> Inputs:
        """What the experiments take, over this study (:class:`~saematch_core.experiments.inputs.Inputs`).

        The main SAEs, every layer's evaluation activations, the rows usable at every layer
        (:meth:`keep`; pass ``keep`` for another mask), the rows' token ids, the language model, the
        result cache under :attr:`results_dir`, and no progress bars; ``changes`` sets any other
        field (``pairs``, ``families``, ``tokens``, ``seed``, ...).
        """
        base: dict[str, Any] = {
            "saes": self.saes,
            "activations": self.activations(),
            "keep": self.keep() if keep is None else keep,
            "token_ids": self.token_ids(),
            "model": self.loaded.model,
            "cache_dir": self.results_dir,
            "progress": False,
        }
        base.update(changes)
        return Inputs(**base)

    def contexts(
        self,
        layer: int,
        features: Sequence[int],
        *,
        sae: SAE | None = None,
        k: int = 5,
        before: int = 8,
        after: int = 2,
    ) -> dict[int, tuple[Context, ...]]:
        """Top-activating evaluation contexts of some features of ``layer``'s SAE (default the main one).

        Rows excluded by :meth:`keep` (position 0, outliers) never count as top activations.

        Returns
        -------
        feature → up to ``k`` contexts, highest activation first.
        """
        model_sae = self.saes[layer] if sae is None else sae
        values = feature_values(model_sae, self.acts(layer), features)
        cid, pos = np.asarray(self.evals.chunk_ids), np.asarray(self.evals.positions)
        ids = pad_rows(self.token_ids(), cid, pos)
        keep = pad_rows(torch.from_numpy(self.keep(layer)), cid, pos)
        out = {}
        for j, f in enumerate(features):
            vals = pad_rows(values[:, j], cid, pos)
            out[int(f)] = top_contexts(vals, ids, self.decode, k=k, before=before, after=after, keep=keep)
        return out

    def paths(
        self, start: int, features: Iterable[int], layers: Sequence[int] | None = None
    ) -> dict[int, FeaturePath]:
        """Feature → its :class:`~saematch_core.compose.FeaturePath` through ``layers`` (default every
        layer; consecutive, containing ``start``) under the paper's consecutive matchings, with the
        per-pair MSE of every step."""
        chain = list(self.layers if layers is None else layers)
        matches = self.consecutive_matches()
        steps = list(itertools.pairwise(chain))
        perms = [matches[p].perm for p in steps]
        costs = [matches[p].cost for p in steps]
        return {int(f): path(perms, start, int(f), costs=costs, layers=chain) for f in features}

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
    def corpus_batch(self, corpus: str, max_tokens: int | None = None) -> TokenBatch:
        """Evaluation chunks of one corpus as padded ``(ids, mask)``, at most ``max_tokens`` tokens.

        Returns
        -------
        ids : LongTensor, shape (n_chunks, seq); mask : BoolTensor, same shape (False on padding).
        """
        if corpus not in self.evals.corpus_ranges:
            raise ValueError(f"corpus: expected one of {list(self.corpora)}, got {corpus!r}")
        chunks = [i for i, c in enumerate(self.evals.chunks) if c["corpus"] == corpus]
        return chunk_batch(self.evals, chunks, max_tokens)

    def mixed_batch(self, tokens_per_corpus: int) -> TokenBatch:
        """Evaluation chunks of every corpus, at most ``tokens_per_corpus`` tokens of each (whole
        chunks, at least one per corpus), one corpus after the other, as one padded batch."""
        chunks: list[int] = []
        for corpus in self.corpora:
            total = 0
            for i, c in enumerate(self.evals.chunks):
                if c["corpus"] != corpus:
                    continue
                if total and total + int(c["length"]) > tokens_per_corpus:
                    break
                chunks.append(i)
                total += int(c["length"])
        return chunk_batch(self.evals, chunks)

    def eval_batch(self, max_tokens: int) -> TokenBatch:
        """Evaluation chunks taken round-robin over corpora, at most ``max_tokens`` tokens, padded."""
        return chunk_batch(self.evals, _round_robin(self.evals), max_tokens)

    def fit_batch(self, max_tokens: int) -> TokenBatch:
        """Training-split chunks (disjoint from the evaluation documents), round-robin over corpora.

        For the ``linear`` baseline's least squares. Read from the training activation cache when
        there is one, else tokenised from the corpora (pretrained-SAE profiles have no training cache).
        """
        folder = self.prepared.activation_folders.get("train")
        cache = open_activation_cache(folder) if folder is not None else None
        if cache is not None:
            return chunk_batch(cache, _round_robin(cache), max_tokens)
        tok = self.loaded.tokenizer
        per = corpus_chunks(self.profile.data, tok.encode, "train", bos_id=tok.bos_id)
        pieces = [c.ids for group in itertools.zip_longest(*per.values()) for c in group if c is not None]
        return _pad_pieces(pieces, max_tokens)


def _round_robin(cache: ActivationCache) -> list[int]:
    """Chunk indices of ``cache`` alternating between corpora (first of each, second of each, ...)."""
    by_corpus: dict[str, list[int]] = {}
    for i, c in enumerate(cache.chunks):
        by_corpus.setdefault(c["corpus"], []).append(i)
    return [i for group in itertools.zip_longest(*by_corpus.values()) for i in group if i is not None]


class _TrainRows(Mapping[int, np.ndarray]):
    """A read-on-demand layer → usable training rows mapping (one layer held at a time)."""

    def __init__(self, cache: ActivationCache, layers: Sequence[int]) -> None:
        self._cache = cache
        self._layers = tuple(layers)
        self._held: tuple[int, np.ndarray] | None = None

    def __getitem__(self, layer: int) -> np.ndarray:
        if layer not in self._layers:
            raise KeyError(layer)
        if self._held is None or self._held[0] != layer:
            self._held = None  # free the previous layer first
            rows = np.asarray(self._cache.layer(layer)[self._cache.usable(layer)], dtype=np.float32)
            self._held = (layer, rows)
        return self._held[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


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
def _pad_pieces(pieces: Sequence[np.ndarray], max_tokens: int | None) -> TokenBatch:
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
    return TokenBatch(ids, mask)


def chunk_batch(cache: ActivationCache, chunks: Sequence[int], max_tokens: int | None = None) -> TokenBatch:
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


# ============================================================================================ paths
def path_contexts(
    study: Study, paths: Iterable[FeaturePath], *, k: int = 1
) -> dict[int, dict[int, tuple[Context, ...]]]:
    """Layer → feature → top ``k`` contexts (:meth:`Study.contexts`), for every feature the paths reach."""
    by_layer: dict[int, set[int]] = {}
    for p in paths:
        for t, f in zip(p.layers, p.features, strict=True):
            if f >= 0:
                by_layer.setdefault(t, set()).add(f)
    return {t: study.contexts(t, sorted(fs), k=k) for t, fs in sorted(by_layer.items())}


def path_table(
    p: FeaturePath, contexts: Mapping[int, Mapping[int, Sequence[Context]]]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """A feature path as a table: per layer the feature, the MSE of the step towards the start
    (``start`` at the start layer) and the top-activating contexts (joined by ``‖``).

    Returns
    -------
    headers, rows : for :func:`saematch_core.plots.show_table`.
    """
    rows: list[tuple[Any, ...]] = []
    for t, f, cost in zip(p.layers, p.features, p.step_costs, strict=True):
        ctx = contexts.get(t, {}).get(f, ())
        text = " ‖ ".join(c.text for c in ctx) if ctx else NEVER_ACTIVE
        rows.append((t, f, "start" if t == p.start else f"{cost:.4g}", text))
    return ["layer", "feature", "step MSE", "top-activating contexts"], rows


def contexts_side_by_side(
    left: Sequence[Context], right: Sequence[Context], layers: tuple[int, int]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Two features' top contexts as one table: rank, then text and activation of each side.

    Returns
    -------
    headers, rows : for :func:`saematch_core.plots.show_table`.
    """
    rows = [
        (
            i + 1,
            left[i].text if i < len(left) else "",
            f"{left[i].activation:.3g}" if i < len(left) else "",
            right[i].text if i < len(right) else "",
            f"{right[i].activation:.3g}" if i < len(right) else "",
        )
        for i in range(max(len(left), len(right)))
    ]
    return ["#", f"layer {layers[0]} context", "act.", f"layer {layers[1]} context", "act."], rows
