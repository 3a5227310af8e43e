"""Training JumpReLU (Gemma Scope recipe), TopK and ReLU SAEs, and their quality report.

JumpReLU, as in Gemma Scope (Rajamanoharan et al. 2024; Lieberum et al. 2024):

- ``f = z · H(z − θ)`` with ``z = x W_enc + b_enc`` and a learned threshold θ per feature;
- loss ``‖x − x̂‖² + λ · L0`` where ``L0 = Σ_i H(z_i − θ_i)``;
- straight-through estimators with a rectangle kernel ``K(u) = 1[|u| < ½]`` of bandwidth ε:
  ``∂f/∂θ ≈ −(θ/ε) K((z−θ)/ε)``, ``∂L0/∂θ ≈ −(1/ε) K((z−θ)/ε)``, and ``∂f/∂z = H(z − θ)``;
- inputs scaled per layer by one constant ``s`` so that ``E‖s x‖² = d_in``; decoder rows kept at
  unit norm (the gradient component along each row is removed before the step, the row is
  renormalised after it); λ ramps up linearly over the first ``warmup_frac`` of the steps;
- Adam with β1 = 0; θ learns ``theta_lr_mult`` times faster; optionally the learning rate decays
  linearly to 0 over the last ``decay_frac`` of the steps.

The settings that work on this machine's budget (width 2048, 200k tokens per layer, batch 512,
lr 1e-3, θ lr ×10, ε = 0.03, λ = 0.3, θ initialised at the quantile that gives L0 ≈ 64) were found
by a pilot; Gemma Scope's own (batch 4096, lr 7e-5, θ₀ = 0.001) stay dense at this budget. On
SmolLM2 layer 15 (Austen) this reaches L0 ≈ 52, FVU ≈ 0.19, 5% dead on held-out tokens.

At the end the input scaling is folded back so the saved SAE works on raw residuals and keeps
unit-norm decoder rows: ``b_enc /= s``, ``θ /= s``, ``b_dec /= s`` (codes are divided by ``s``).
Hence θ grows with the layer's hidden-state norm, as the paper's Fig. 1 shows for Gemma Scope.

TopK keeps the ``k`` largest pre-activations (ReLU'd); ReLU uses an L1 penalty on the codes
(decoder rows are unit norm, so this is the usual ``Σ f_i ‖W_dec,i‖``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saematch_core.models import (
    ForwardCapture,
    capture_forward,
    decoder_layers,
    next_token_losses,
    replace_residual,
    run_suffix,
    suffix_reproduces,
    token_losses,
)
from saematch_core.profiles import SAETrainConfig
from saematch_core.sae import SAE

__all__ = [
    "DeltaLoss",
    "SAEQuality",
    "TrainResult",
    "delta_loss",
    "input_scale",
    "sae_quality",
    "sae_replacement",
    "train_sae",
]

logger = logging.getLogger(__name__)

_MIN_THETA = 1e-4
_SMALL_SAE = 100_000


class _JumpReLU(torch.autograd.Function):
    """``z · H(z − θ)`` with the rectangle-kernel pseudo-derivative for θ."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = (grad * window).sum(0) * (-theta / eps)
        return grad * (z > theta).to(grad.dtype), grad_theta, None


class _Step(torch.autograd.Function):
    """``H(z − θ)`` with the rectangle-kernel pseudo-derivative for θ (none for z)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        return None, (grad * window).sum(0) * (-1.0 / eps), None


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """A trained SAE and how training went."""

    sae: SAE
    """The SAE, working on raw (unscaled) inputs."""
    input_scale: float
    """The constant ``s`` with ``E‖s x‖² = d_in`` used during training (already folded back)."""
    steps: int
    """Optimiser steps taken."""
    seconds: float
    """Wall time of the training loop."""
    final_l0: float
    """Mean L0 over the last 10% of steps (training batches)."""
    final_fvu: float
    """Fraction of variance unexplained over the last 10% of steps (training batches)."""


@dataclass(frozen=True, kw_only=True)
class SAEQuality:
    """Quality of an SAE on held-out tokens (outliers and position 0 already removed)."""

    n_tokens: int
    """Tokens evaluated."""
    l0: float
    """Mean number of active features per token."""
    fvu: float
    """Fraction of variance unexplained: ``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²``."""
    dead_fraction: float
    """Fraction of features never active on these tokens."""
    delta_loss: float | None = None
    """Increase in next-token loss (nats/token) when the layer is replaced by its reconstruction;
    ``None`` when not measured."""

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "n_tokens": self.n_tokens,
            "l0": self.l0,
            "fvu": self.fvu,
            "dead_fraction": self.dead_fraction,
            "delta_loss": self.delta_loss,
        }


def input_scale(x: Tensor) -> float:
    """The constant ``s`` such that ``mean(‖s x‖²) = d_in``, for ``x`` of shape (n, d_in)."""
    mean_sq = float(x.double().pow(2).sum(-1).mean())
    if not mean_sq > 0:
        raise ValueError("x: expected inputs with non-zero norm, got mean ‖x‖² = 0")
    return math.sqrt(x.shape[1] / mean_sq)


def _as_float_tensor(x: Tensor | np.ndarray) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x, dtype=np.float32))
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x: expected shape (n_tokens >= 2, d_in), got {tuple(x.shape)}")
    return x.float()


def train_sae(
    x: Tensor | np.ndarray,
    config: SAETrainConfig,
    *,
    progress: bool = True,
    desc: str = "",
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train one SAE on residual vectors.

    Parameters
    ----------
    x : shape (n_tokens, d_in): training inputs, already without position 0 and outliers.
    config : recipe (family, width, token budget, learning rates, sparsity, seed).
    progress : show a tqdm bar with tokens/s.
    desc : label of the progress bar.
    meta : extra provenance stored in ``sae.meta``.

    Returns
    -------
    TrainResult
        Deterministic for a given ``x``, ``config`` and thread count on CPU.

    Examples
    --------
    >>> x = torch.randn(256, 8)
    >>> cfg = SAETrainConfig(width=16, n_tokens=512, batch_size=64, init_l0=4)
    >>> train_sae(x, cfg, progress=False).sae.W_dec.shape
    torch.Size([16, 8])
    """
    x = _as_float_tensor(x)
    # Below ~10^5 weights per matrix a second OpenMP thread only adds synchronisation, and on a
    # busy machine its spin-waiting makes each step up to 100x slower: run such SAEs on one thread.
    small = x.shape[1] * config.width < _SMALL_SAE
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        return _train(x, config, progress=progress, desc=desc, meta=meta)
    finally:
        if small:
            torch.set_num_threads(threads)


def _train(
    x: Tensor, config: SAETrainConfig, *, progress: bool, desc: str, meta: dict[str, Any] | None
) -> TrainResult:
    from tqdm.auto import tqdm

    n, d = x.shape
    width = config.width
    gen = torch.Generator().manual_seed(config.seed)
    scale = input_scale(x)

    w_dec = torch.randn(width, d, generator=gen)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_enc = w_dec.T.clone()
    b_dec = (x.double().mean(0) * scale).float()
    b_enc = -(b_dec @ w_enc)
    params = [p.requires_grad_() for p in (w_enc, b_enc, w_dec, b_dec)]
    groups: list[dict[str, Any]] = [{"params": params, "lr": config.lr}]
    theta: Tensor | None = None
    if config.activation == "jumprelu":
        sample = x[torch.randperm(n, generator=gen)[: min(n, 4096)]] * scale
        with torch.no_grad():
            pre = sample @ w_enc + b_enc
            q = 1.0 - min(config.init_l0 / width, 1.0)
            theta = torch.quantile(pre, q, dim=0).clamp_min(10 * _MIN_THETA).requires_grad_()
        groups.append({"params": [theta], "lr": config.lr * config.theta_lr_mult})
    opt = torch.optim.Adam(groups, betas=config.betas)

    steps = config.n_steps
    warmup = max(1, int(config.warmup_frac * steps))
    decay_from = steps - int(config.decay_frac * steps)
    base_lrs = [group["lr"] for group in opt.param_groups]
    tail_from = steps - max(1, steps // 10)
    tail_l0 = tail_err = tail_var = 0.0
    order = torch.randperm(n, generator=gen)
    cursor = 0
    bar = tqdm(total=steps * config.batch_size, unit="tok", unit_scale=True, disable=not progress, desc=desc)
    t0 = time.perf_counter()
    for step in range(steps):
        if cursor + config.batch_size > n:
            order = torch.randperm(n, generator=gen)
            cursor = 0
        idx = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        xb = x[idx] * scale
        z = xb @ w_enc + b_enc
        if config.activation == "jumprelu":
            assert theta is not None  # set above for jumprelu
            f = _JumpReLU.apply(z, theta, config.bandwidth)
            sparsity = _Step.apply(z, theta, config.bandwidth).sum(-1).mean()
            coef = config.l0_coef
        elif config.activation == "topk":
            values, top = torch.topk(z, config.k, dim=-1)
            f = torch.zeros_like(z).scatter(-1, top, torch.relu(values))
            sparsity = torch.zeros(())
            coef = 0.0
        else:
            f = torch.relu(z)
            sparsity = f.sum(-1).mean()
            coef = config.l1_coef
        assert isinstance(f, Tensor)
        recon = f @ w_dec + b_dec
        err = (recon - xb).pow(2).sum(-1)
        ramp = min(1.0, (step + 1) / warmup)
        loss = err.mean() + coef * ramp * sparsity
        if step >= decay_from:
            factor = (steps - step) / (steps - decay_from)
            for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            assert w_dec.grad is not None
            # Keep rows on the unit sphere: drop the radial part of the gradient, renormalise after.
            w_dec.grad -= (w_dec.grad * w_dec).sum(1, keepdim=True) * w_dec
            opt.step()
            w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if theta is not None:
                theta.clamp_(min=_MIN_THETA)
            if step >= tail_from:
                tail_l0 += float((f > 0).sum()) / len(idx)
                tail_err += float(err.sum())
                tail_var += float((xb - xb.mean(0)).pow(2).sum())
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        sae = SAE(
            W_enc=w_enc.detach().clone(),
            b_enc=(b_enc / scale).detach(),
            W_dec=w_dec.detach().clone(),
            b_dec=(b_dec / scale).detach(),
            activation=config.activation,
            threshold=None if theta is None else (theta / scale).detach(),
            k=config.k if config.activation == "topk" else None,
            meta={
                "source": "saematch.train",
                "activation": config.activation,
                "input_scale": scale,
                "train_steps": steps,
                **(meta or {}),
            },
        )
    n_tail = steps - tail_from
    return TrainResult(
        sae=sae,
        input_scale=scale,
        steps=steps,
        seconds=seconds,
        final_l0=tail_l0 / n_tail,
        final_fvu=tail_err / max(tail_var, 1e-30),
    )


def sae_quality(sae: SAE, x: Tensor | np.ndarray, *, batch_size: int = 4096) -> SAEQuality:
    """L0, FVU and dead fraction of ``sae`` on held-out inputs ``x`` of shape (n_tokens, d_in)."""
    x = _as_float_tensor(x)
    sae = sae.to(dtype=torch.float32)
    mean = x.double().mean(0)
    active = torch.zeros(sae.d_sae, dtype=torch.bool)
    l0 = err = var = 0.0
    with torch.no_grad():
        for lo in range(0, x.shape[0], batch_size):
            xb = x[lo : lo + batch_size]
            codes, recon = sae(xb)
            on = codes > 0
            active |= on.any(0)
            l0 += float(on.sum())
            err += float((recon - xb).double().pow(2).sum())
            var += float((xb.double() - mean).pow(2).sum())
    n = x.shape[0]
    return SAEQuality(n_tokens=n, l0=l0 / n, fvu=err / var, dead_fraction=1.0 - float(active.float().mean()))


def sae_replacement(sae: SAE, *, norm_limit: float) -> Callable[[Tensor], Tensor]:
    """A function ``h ↦ ĥ`` for :func:`saematch_core.models.replace_residual`: the SAE's
    reconstruction everywhere except position 0 and tokens with ``‖h‖ > norm_limit`` (outliers),
    which pass through unchanged.

    ``h`` has shape (batch, seq, d_in).
    """

    on_device: dict[torch.device, SAE] = {}

    def fn(h: Tensor) -> Tensor:
        # Move the SAE to the model's device once, not on every forward pass.
        local = on_device.get(h.device)
        if local is None:
            local = on_device[h.device] = sae.to(device=h.device)
        recon = local(h.to(local.dtype)).recon.to(h.dtype)
        keep = h.norm(dim=-1, keepdim=True) > norm_limit
        keep[:, :1] = True
        return torch.where(keep, h, recon)

    return fn


def delta_loss(
    model: torch.nn.Module,
    input_ids: Tensor,
    lengths: Tensor,
    layer: int,
    replacement: Callable[[Tensor], Tensor],
    *,
    clean: Tensor | None = None,
    batch_size: int = 8,
) -> tuple[float, Tensor]:
    """Mean increase in next-token loss when the residual after ``layer`` is replaced.

    Parameters
    ----------
    input_ids : LongTensor, shape (batch, seq), right-padded.
    lengths : LongTensor, shape (batch,): real tokens per row.
    replacement : ``h ↦ ĥ`` (e.g. :func:`sae_replacement`).
    clean : per-token clean losses from a previous call (shape (batch, seq - 1)), to skip recomputing.
    batch_size : rows per forward pass (the logits of a large vocabulary are big).

    Returns
    -------
    (ΔL, clean) : ΔL in nats/token over the predictions made from positions 1 .. length-2 (the
        prediction made at position 0, the attention sink, is excluded), and the clean losses.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")

    def losses() -> Tensor:
        blocks = [
            token_losses(model, input_ids[i : i + batch_size]) for i in range(0, len(input_ids), batch_size)
        ]
        return torch.cat(blocks).cpu()

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if clean is None:
        clean = losses()
    with replace_residual(model, layer, replacement):
        replaced = losses()
    return _mean_increase(replaced, clean, lengths), clean


def _mean_increase(replaced: Tensor, clean: Tensor, lengths: Tensor) -> float:
    pos = torch.arange(clean.shape[1])[None]
    mask = (pos >= 1) & (pos < (lengths[:, None] - 1))
    if not bool(mask.any()):
        raise ValueError("lengths: expected at least one row with 3 or more tokens")
    return float((replaced - clean)[mask].mean())


class DeltaLoss:
    """:func:`delta_loss` for many replacements on the same chunks, without rerunning the prefix.

    The clean forward pass runs once and records every block's output; a replacement after block
    ``L`` then reruns only blocks ``L+1 …`` and the head. The recorded hidden states take
    ``n_layers × batch × seq × d_model`` floats. Models whose blocks cannot be rerun from the
    recorded arguments fall back to full forward passes (checked once, on the clean states).

    Parameters
    ----------
    model, input_ids, lengths, batch_size : as for :func:`delta_loss`.
    layers : the layers that will be replaced (default all), the only outputs kept.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_ids: Tensor,
        lengths: Tensor,
        *,
        batch_size: int = 8,
        layers: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
            raise ValueError(
                f"input_ids: expected shape (batch >= 1, seq >= 2), got {tuple(input_ids.shape)}"
            )
        self.model = model
        self.lengths = lengths
        self.batch_size = batch_size
        device = next(model.parameters()).device
        self.input_ids = input_ids.to(device)
        n_blocks = len(decoder_layers(model))
        self.layers = tuple(range(n_blocks)) if layers is None else tuple(int(i) for i in layers)
        self.captures: list[ForwardCapture] = []
        clean = []
        self.suffix_ok = False
        for i in range(0, len(self.input_ids), batch_size):
            ids = self.input_ids[i : i + batch_size]
            cap = capture_forward(model, ids, layers=self.layers)
            clean.append(next_token_losses(cap.logits, ids).cpu())
            if i == 0 and self.layers:
                self.suffix_ok = suffix_reproduces(model, cap, self.layers[0] + 1, ids)
            cap.logits = cap.logits[:, :0]  # only the losses are needed
            self.captures.append(cap)
        self.clean = torch.cat(clean)

    def __call__(self, layer: int, replacement: Callable[[Tensor], Tensor]) -> float:
        """ΔL in nats/token when the residual after ``layer`` is replaced by ``replacement(h)``."""
        self._check(layer)
        if not self.suffix_ok:
            return delta_loss(
                self.model,
                self.input_ids,
                self.lengths,
                layer,
                replacement,
                clean=self.clean,
                batch_size=self.batch_size,
            )[0]
        return self._suffix_losses(layer, lambda cap: replacement(cap.hidden[layer]))

    def from_source(self, layer: int, source: int, replacement: Callable[[Tensor, Tensor], Tensor]) -> float:
        """ΔL in nats/token when the residual after ``layer`` is replaced by a function of the
        residual after block ``source`` (both recorded): ``replacement(h_source, h_layer) → ĥ_layer``.

        SAE Match's replacement (encode ``h_{t−1}``, permute, decode with layer ``t``'s SAE) is one;
        ``h_layer`` is given so that the function can pass tokens through unchanged (outliers,
        position 0). Without the suffix shortcut each batch runs the full model with a hook.
        """
        self._check(layer)
        self._check(source)
        if self.suffix_ok:
            return self._suffix_losses(layer, lambda cap: replacement(cap.hidden[source], cap.hidden[layer]))
        start, replaced = 0, []
        for cap in self.captures:
            ids = self.input_ids[start : start + cap.hidden[layer].shape[0]]
            h_source = cap.hidden[source]
            with replace_residual(self.model, layer, lambda h, h_source=h_source: replacement(h_source, h)):
                replaced.append(token_losses(self.model, ids).cpu())
            start += ids.shape[0]
        return _mean_increase(torch.cat(replaced), self.clean, self.lengths)

    def _check(self, layer: int) -> None:
        if layer not in self.layers:
            raise ValueError(f"layer: expected one of the recorded layers {list(self.layers)}, got {layer}")

    def _suffix_losses(self, layer: int, new_state: Callable[[ForwardCapture], Tensor]) -> float:
        start, replaced = 0, []
        for cap in self.captures:
            h = cap.hidden[layer]
            new = new_state(cap)
            if new.shape != h.shape:
                raise ValueError(
                    f"replacement: expected output shape {tuple(h.shape)}, got {tuple(new.shape)}"
                )
            logits = run_suffix(self.model, cap, layer + 1, new.to(h.dtype))
            assert logits is not None  # checked by suffix_reproduces
            ids = self.input_ids[start : start + h.shape[0]]
            replaced.append(next_token_losses(logits, ids).cpu())
            start += h.shape[0]
        return _mean_increase(torch.cat(replaced), self.clean, self.lengths)
