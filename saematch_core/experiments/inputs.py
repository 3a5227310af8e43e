"""What every experiment takes: one :class:`Inputs` object instead of the same ten keywords.

An experiment is ``run(inputs, config) -> Result``: ``inputs`` says *on what* (SAEs, activations of
their layers on shared tokens, the rows to count, the layer pairs, the language model and token
batches for the experiments that run it) and *how* (seed, chunk size, result cache, progress bars);
the experiment's frozen ``config`` says *what to measure*. The book builds its inputs with
:meth:`saematch_core.experiments.study.Study.inputs`; a user builds them directly:

>>> import torch
>>> from saematch_core.sae import SAE
>>> eye, zero = torch.eye(2), torch.zeros(2)
>>> sae = SAE(W_enc=eye, b_enc=zero, W_dec=eye, b_dec=zero, activation="relu")
>>> Inputs(saes={0: sae, 1: sae, 2: sae}).layer_pairs()
[(0, 1), (1, 2)]
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch import Tensor, nn

from saematch_core.sae import SAE

__all__ = ["ArrayLike", "Inputs", "TokenBatch"]

ArrayLike = Tensor | np.ndarray
"""Activations or a per-row mask: a tensor or numpy array (a ``np.memmap`` is read chunk by chunk)."""


class TokenBatch(NamedTuple):
    """Padded token chunks for the experiments that run the language model."""

    ids: Tensor
    """LongTensor, shape (n_chunks, seq)."""
    mask: Tensor | None
    """BoolTensor, shape (n_chunks, seq): False on padding (``None``: no padding)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Inputs:
    """The data an experiment runs on and how it runs (see the module docstring).

    Every field but ``saes`` is optional; an experiment that needs one it was not given says so.
    """

    saes: Mapping[int, SAE]
    """Layer → SAE (the main family: the one every experiment matches)."""
    activations: Mapping[int, ArrayLike] | None = None
    """Layer → residual activations (n_tokens, d_in), the same tokens (rows) for every layer."""
    train_activations: Mapping[int, ArrayLike] | None = None
    """Layer → residuals to train SAEs on (rows, d_in), position 0 and outliers already removed, for
    experiments that train their own SAEs (a lazy mapping is fine: a layer is read when asked for)."""
    keep: ArrayLike | None = None
    """Bool (n_tokens,): rows counted by data-based measures (False for position 0, outliers)."""
    token_ids: ArrayLike | None = None
    """Int (n_tokens,): token id of every activation row (for top-token overlaps)."""
    pairs: Sequence[tuple[int, int]] | None = None
    """Layer pairs ``(a, b)`` to analyse; ``None``: consecutive layers (:meth:`layer_pairs`)."""
    families: Mapping[str, Mapping[int, SAE]] = field(default_factory=dict)
    """Other SAEs by family name (``topk``, ``relu``, ``seed``, ...), each layer → SAE."""
    model: nn.Module | None = None
    """The language model, for experiments that run it (in eval mode)."""
    tokens: TokenBatch | None = None
    """Evaluation chunks for experiments that run the model."""
    fit_tokens: TokenBatch | None = None
    """Held-out chunks to fit baselines on (disjoint from ``tokens``)."""
    seed: int = 0
    """Seed of every random draw (null matchings, rotations, samples)."""
    chunk_size: int = 4096
    """Activation rows encoded at once (memory ~ chunk_size × d_sae)."""
    cache_dir: Path | None = None
    """Root of the result cache; ``None``: ``cache_root()/results``."""
    force: bool = False
    """Recompute and overwrite cached results."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if not isinstance(self.saes, Mapping):
            raise TypeError(f"Inputs.saes: expected a mapping layer → SAE, got {type(self.saes).__name__}")
        bad = [k for k, v in self.saes.items() if not isinstance(v, SAE)]
        if bad:
            raise TypeError(f"Inputs.saes: expected SAE values, got something else at layers {bad}")
        for name in ("activations", "train_activations"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                got = type(value).__name__
                raise TypeError(f"Inputs.{name}: expected a mapping layer → array, got {got}")
        if self.pairs is not None:
            try:
                pairs = tuple((int(a), int(b)) for a, b in self.pairs)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"Inputs.pairs: expected (layer_a, layer_b) pairs, got {self.pairs!r}"
                ) from exc
            object.__setattr__(self, "pairs", pairs)
        for name in ("seed", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Inputs.{name}: expected an int, got {value!r}")
        if self.chunk_size < 1:
            raise ValueError(f"Inputs.chunk_size: expected an int >= 1, got {self.chunk_size}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        for name in ("tokens", "fit_tokens"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, TokenBatch):
                if not (isinstance(value, tuple) and len(value) == 2):
                    raise TypeError(f"Inputs.{name}: expected a TokenBatch (ids, mask), got {value!r}")
                object.__setattr__(self, name, TokenBatch(*value))
        for name in ("force", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Inputs.{name}: expected a bool, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> Inputs:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def has_data(self, *layers: int) -> bool:
        """Whether activations are given for every one of ``layers``."""
        return self.activations is not None and all(layer in self.activations for layer in layers)

    def acts(self, layer: int) -> ArrayLike:
        """The activations of ``layer``; a clear error when there are none."""
        if self.activations is None or layer not in self.activations:
            have = [] if self.activations is None else sorted(self.activations)
            raise ValueError(f"Inputs.activations: expected activations of layer {layer}, got layers {have}")
        return self.activations[layer]

    def require_model(self) -> tuple[nn.Module, TokenBatch]:
        """``(model, tokens)``, or a clear error for an experiment that runs the model without them."""
        if self.model is None or self.tokens is None:
            raise ValueError("Inputs.model, Inputs.tokens: expected a language model and token chunks")
        return self.model, self.tokens

    def layer_pairs(self, *, data: bool = False) -> list[tuple[int, int]]:
        """The layer pairs to analyse: :attr:`pairs`, or consecutive layers of :attr:`saes` (with
        ``data``, only layers that also have activations)."""
        if self.pairs is not None:
            return list(self.pairs)
        layers = set(self.saes)
        if data:
            layers &= set(self.activations or {})
        return list(itertools.pairwise(sorted(layers)))
