"""Replacing one layer's output inside the model and scoring the damage: ΔL, KL and explained variance.

Shared by the hidden-state approximation (:mod:`saematch_core.experiments.approximate`, Figs.
10–17) and the objective ablation (:mod:`saematch_core.experiments.objective`): both replace the
residual ``h_t`` after block ``t`` by some ``ĥ_t`` built from ``h_{t−1}`` and ``h_t``, run the rest of
the model on it, and report per replacement one :class:`ApproxRow`:

- ``ΔL``: mean increase of the next-token loss (nats/token) against the clean model;
- ``EV = 1 − Var(ĥ_t − h_t) / Var(h_t)``, where ``Var`` of a set of vectors is the mean squared
  distance to their mean (summed over the ``d_model`` coordinates);
- the mean KL(clean ‖ replaced) of the next-token distributions.

Tokens: position 0 of every chunk (BOS / attention sink), padding, and *outlier* tokens (norm of
``h_{t−1}`` or ``h_t`` above ``outlier_factor`` × the median over the batch's real tokens, or the
given medians) pass through unchanged and are left out of every metric (:func:`counted_tokens`). The
loss term of position ``p`` is the loss of predicting token ``p+1``; it counts when ``p`` counts and
``p+1`` is a real token.

Cost: one clean forward pass per batch records ``h_{t−1}``, ``h_t``, the clean logits and the exact
arguments every block was called with (:class:`CaptureStore` keeps them for the next layer when they
fit in memory); each replacement then runs only blocks ``t+1 …`` and the head on ``ĥ_t``. That
shortcut is checked once against the full model (:func:`saematch_core.models.suffix_reproduces`), and
the full model with a forward hook (:func:`replaced_layer`) is used when they disagree.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saematch_core.models import (
    ForwardCapture,
    capture_forward,
    replace_residual,
    run_suffix,
    suffix_reproduces,
)

__all__ = [
    "ApproxRow",
    "CaptureStore",
    "CleanDist",
    "Replacement",
    "ReplacementAcc",
    "check_tokens",
    "counted_tokens",
    "replaced_layer",
    "replacement_rows",
]

Replacement = Callable[[Tensor | None, Tensor], Tensor]
"""``(h_prev, h_cur) ↦ ĥ``: builds the replacement of ``h_cur`` (batch, seq, d_model); ``h_prev`` is
``None`` when no replacement reads layer ``t−1``."""


@dataclass(frozen=True, kw_only=True)
class ApproxRow:
    """Metrics of one (layer, replacement) on the evaluation tokens."""

    layer: int
    """Index ``t`` of the block whose output was replaced."""
    scheme: str
    """The replacement's label."""
    delta_loss: float
    """Mean (replaced − clean) next-token loss, nats/token."""
    delta_loss_se: float
    """Standard error of :attr:`delta_loss` over tokens (ignores correlation between tokens)."""
    clean_loss: float
    """Mean clean loss on the same tokens."""
    explained_variance: float
    """``1 − Var(ĥ − h) / Var(h)`` over the counted tokens."""
    kl: float
    """Mean KL(clean ‖ replaced) of the next-token distributions (nats/token) on the loss terms; unlike
    ΔL it is never negative, so it also measures damage to models whose loss is far from optimal."""
    n_tokens: int
    """Tokens counted in the explained variance."""
    n_loss_tokens: int
    """Loss terms counted in :attr:`delta_loss`."""
    n_passthrough: int
    """Real tokens at positions ≥ 1 left unchanged as outliers."""
    l0_prev: float = math.nan
    """Mean number of active features of SAE ``t−1`` on the counted tokens (``nan`` without it)."""
    l0_cur: float = math.nan
    """Same for SAE ``t``."""


def check_tokens(name: str, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` checked: a LongTensor (n_chunks ≥ 1, seq ≥ 2) and a bool mask of the same
    shape (all True when ``None``). The error names ``name``."""
    if (
        not isinstance(ids, Tensor)
        or ids.dtype != torch.long
        or ids.ndim != 2
        or min(ids.shape) < 1
        or ids.shape[1] < 2
    ):
        got = (
            f"{ids.dtype} tensor of shape {tuple(ids.shape)}"
            if isinstance(ids, Tensor)
            else type(ids).__name__
        )
        raise ValueError(f"{name}: expected a LongTensor of shape (n_chunks >= 1, seq >= 2), got {got}")
    if mask is None:
        return ids, torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name}_mask: expected shape {tuple(ids.shape)} like {name}, got {got}")
    return ids, mask.bool()


def counted_tokens(
    mask: Tensor,
    h_prev: Tensor | None,
    h_cur: Tensor,
    factor: float | None,
    medians: tuple[float | None, float | None] = (None, None),
) -> tuple[Tensor, Tensor]:
    """(counted, outlier) bool masks of shape (batch, seq); ``medians`` (of ‖h_{t−1}‖, ‖h_t‖) replace
    the batch medians when given. Position 0 and padding are neither."""
    base = mask.clone()
    base[:, 0] = False
    outlier = torch.zeros_like(base)
    if factor is not None and bool(base.any()):
        for h, med in zip((h_prev, h_cur), medians, strict=True):
            if h is None:
                continue
            norms = torch.linalg.vector_norm(h.float(), dim=-1)
            ref = norms[base].median() if med is None else med
            outlier |= norms > factor * ref
    return base & ~outlier, base & outlier


class CleanDist:
    """Clean next-token log-probabilities of one batch, normalised once for every replacement.

    :meth:`compare` gives the per-token loss and KL of replaced logits with one log-softmax each.
    """

    def __init__(self, clean_logits: Tensor, ids: Tensor) -> None:
        self.log_p = torch.log_softmax(clean_logits[:, :-1].float(), dim=-1)
        self.targets = ids[:, 1:, None]
        self.loss = -self.log_p.gather(-1, self.targets).squeeze(-1).double()

    def compare(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, kl), each (batch, seq − 1) float64, of the replaced ``logits``."""
        loss, kl = [], []
        # One chunk at a time: (batch, seq, vocab) in float64 would be GBs for a 49k vocabulary.
        for b in range(logits.shape[0]):
            log_q = torch.log_softmax(logits[b, :-1].float(), dim=-1)
            loss.append(-log_q.gather(-1, self.targets[b]).squeeze(-1))
            log_p = self.log_p[b]
            kl.append((log_p.exp() * (log_p - log_q)).sum(-1, dtype=torch.float64))
        return torch.stack(loss).double(), torch.stack(kl)


class ReplacementAcc:
    """Streaming sums (float64) for ΔL, KL and EV of one (layer, replacement)."""

    def __init__(self, d: int) -> None:
        self.n = 0
        self.sum_h = torch.zeros(d, dtype=torch.float64)
        self.sq_h = 0.0
        self.sum_e = torch.zeros(d, dtype=torch.float64)
        self.sq_e = 0.0
        self.n_loss = 0
        self.clean = 0.0
        self.diff = 0.0
        self.diff_sq = 0.0
        self.kl = 0.0
        self.passthrough = 0

    def add_state(self, h: Tensor, h_hat: Tensor, keep: Tensor) -> None:
        """Add the counted tokens (``keep``) of one batch of true ``h`` and replaced ``h_hat``."""
        x = h[keep].double().cpu()
        e = h_hat[keep].double().cpu() - x
        self.n += x.shape[0]
        self.sum_h += x.sum(0)
        self.sq_h += float((x * x).sum())
        self.sum_e += e.sum(0)
        self.sq_e += float((e * e).sum())

    def add_loss(self, clean: Tensor, replaced: Tensor, kl: Tensor, keep: Tensor) -> None:
        """Add the counted loss terms (``keep``, (batch, seq − 1)) of one batch."""
        c, d = clean[keep], (replaced - clean)[keep]
        self.kl += float(kl[keep].sum())
        self.n_loss += int(keep.sum())
        self.clean += float(c.sum())
        self.diff += float(d.sum())
        self.diff_sq += float((d * d).sum())

    def row(self, layer: int, label: str) -> ApproxRow:
        """The metrics so far as an :class:`ApproxRow` (``nan`` where nothing was counted)."""
        n, nl = max(self.n, 1), max(self.n_loss, 1)
        var_h = self.sq_h / n - float((self.sum_h / n).square().sum())
        var_e = self.sq_e / n - float((self.sum_e / n).square().sum())
        mean_d = self.diff / nl
        var_d = max(self.diff_sq / nl - mean_d**2, 0.0)
        return ApproxRow(
            layer=layer,
            scheme=label,
            delta_loss=mean_d if self.n_loss else math.nan,
            delta_loss_se=math.sqrt(var_d / nl) if self.n_loss else math.nan,
            clean_loss=self.clean / nl if self.n_loss else math.nan,
            explained_variance=1.0 - var_e / var_h if self.n and var_h > 0 else math.nan,
            kl=self.kl / nl if self.n_loss else math.nan,
            n_tokens=self.n,
            n_loss_tokens=self.n_loss,
            n_passthrough=self.passthrough,
        )


@contextlib.contextmanager
def replaced_layer(
    model: nn.Module, layer: int, replacement: Tensor, passthrough: Tensor | None = None
) -> Iterator[None]:
    """Within the block, block ``layer``'s output is ``replacement`` except where ``passthrough``.

    Parameters
    ----------
    model : transformers causal LM (Llama, Gemma 2, ...).
    layer : index of the decoder block.
    replacement : Tensor, shape (batch, seq, d_model)
    passthrough : BoolTensor, shape (batch, seq), optional
        Tokens that keep the model's own hidden state (outliers, position 0, padding).

    The hook is removed on exit, also on error (it is registered through
    :func:`saematch_core.models.replace_residual`).
    """

    def fn(h: Tensor) -> Tensor:
        if replacement.shape != h.shape:
            raise ValueError(f"replacement: expected shape {tuple(h.shape)}, got {tuple(replacement.shape)}")
        new = replacement.to(device=h.device, dtype=h.dtype)
        if passthrough is None:
            return new
        return torch.where(passthrough.to(h.device)[..., None], h, new)

    with replace_residual(model, layer, fn):
        yield


# Clean passes of all batches are kept for the next layer when they fit in this much memory.
_CAPTURE_BUDGET = 2 << 30


class CaptureStore:
    """Clean forward passes of every batch, kept between layers when they fit in memory, and the
    once-per-run check that running only the suffix of the model reproduces it.

    Parameters
    ----------
    model : the language model.
    tokens : the evaluation chunks (n_chunks, seq).
    layers : the layers ``t`` that will be replaced (the store records ``t−1`` and ``t``).
    suffix : run only blocks ``t+1 …`` on ``ĥ_t`` (checked once); ``False`` always runs the full model
        with a forward hook (the slow reference).
    """

    def __init__(
        self, model: nn.Module, tokens: Tensor, layers: Sequence[int], *, suffix: bool = True
    ) -> None:
        self.want = sorted({t - 1 for t in layers} | set(layers))
        self.by_start: dict[int, ForwardCapture] | None = {}
        self.checked = not suffix
        self.suffix_ok = False
        head = getattr(model, "get_output_embeddings", lambda: None)()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor):
            self.by_start = None
            return
        per_token = (weight.shape[0] + len(self.want) * weight.shape[1]) * weight.element_size()
        if tokens.numel() * per_token > _CAPTURE_BUDGET:
            self.by_start = None

    def capture(
        self, model: nn.Module, ids: Tensor, mask: Tensor, start: int, want: Sequence[int]
    ) -> ForwardCapture:
        """The clean pass of the batch starting at chunk ``start`` (recorded once when it fits)."""
        if self.by_start is None:
            return capture_forward(model, ids, mask, layers=want)
        if start not in self.by_start:
            self.by_start[start] = capture_forward(model, ids, mask, layers=self.want)
        return self.by_start[start]

    def use_suffix(self, model: nn.Module, cap: ForwardCapture, start_block: int, ids: Tensor) -> bool:
        """Whether the suffix shortcut may be used (checked on the first call)."""
        if not self.checked:
            self.suffix_ok = suffix_reproduces(model, cap, start_block, ids)
            self.checked = True
        return self.suffix_ok


def replacement_rows(
    model: nn.Module,
    tokens: Tensor,
    token_mask: Tensor,
    layer: int,
    replacements: Mapping[str, Replacement],
    *,
    batch_size: int = 8,
    outlier_factor: float | None = 10.0,
    medians: tuple[float | None, float | None] = (None, None),
    need_prev: bool = True,
    store: CaptureStore | None = None,
    on_batch: Callable[[Tensor | None, Tensor, Tensor], Any] | None = None,
    progress: bool = False,
) -> dict[str, ApproxRow]:
    """ΔL, KL and EV of every replacement of block ``layer``'s output (see the module docstring).

    Parameters
    ----------
    model : a transformers causal LM in eval mode.
    tokens, token_mask : evaluation chunks (n_chunks, seq) and their padding mask (:func:`check_tokens`).
    layer : ``t``, the block whose output is replaced.
    replacements : label → ``(h_prev, h_cur) ↦ ĥ`` (:data:`Replacement`).
    batch_size : chunks per forward pass.
    outlier_factor, medians : the outlier rule of :func:`counted_tokens`.
    need_prev : record ``h_{t−1}`` (``False`` when no replacement reads it).
    store : clean passes shared between calls (default: one for this call only).
    on_batch : called as ``on_batch(h_prev, h_cur, counted)`` once per batch (e.g. to count L0).
    progress : a progress bar over batches.

    Returns
    -------
    label → :class:`ApproxRow`, in the order of ``replacements``.
    """
    device = next(model.parameters()).device
    store = CaptureStore(model, tokens, [layer]) if store is None else store
    accs: dict[str, ReplacementAcc] = {}
    want = [layer - 1, layer] if need_prev else [layer]
    n = tokens.shape[0]
    for start in tqdm(range(0, n, batch_size), desc=f"layer {layer}", leave=False, disable=not progress):
        ids = tokens[start : start + batch_size].to(device)
        mask = token_mask[start : start + batch_size].to(device)
        cap = store.capture(model, ids, mask, start, want)
        h_prev = cap.hidden.get(layer - 1) if need_prev else None
        h_cur = cap.hidden[layer]
        clean = CleanDist(cap.logits, ids)
        counted, outlier = counted_tokens(mask, h_prev, h_cur, outlier_factor, medians)
        if not accs:
            accs = {label: ReplacementAcc(h_cur.shape[-1]) for label in replacements}
        if on_batch is not None:
            with torch.no_grad():
                on_batch(h_prev, h_cur, counted)
        passthrough = ~counted
        loss_keep = counted[:, :-1] & mask[:, 1:]
        use_suffix = store.use_suffix(model, cap, layer + 1, ids)
        for label, fn in replacements.items():
            with torch.no_grad():
                h_hat = fn(h_prev, h_cur).to(h_cur.dtype)
                h_hat = torch.where(passthrough[..., None], h_cur, h_hat)
                if use_suffix:
                    logits = run_suffix(model, cap, layer + 1, h_hat)
                    assert logits is not None  # suffix_reproduces succeeded
                else:
                    with replaced_layer(model, layer, h_hat):
                        logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
            acc = accs[label]
            acc.add_state(h_cur, h_hat, counted)
            acc.add_loss(clean.loss, *clean.compare(logits), loss_keep)
            acc.passthrough += int(outlier.sum())
    return {label: accs[label].row(layer, label) for label in replacements}
