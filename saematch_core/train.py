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

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
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
    warn_if_emulated_bfloat16,
)
from saematch_core.profiles import SAETrainConfig
from saematch_core.sae import SAE

__all__ = [
    "DeltaLoss",
    "SAEQuality",
    "SAETrainer",
    "StepBuffers",
    "TrainResult",
    "column_quantile",
    "delta_loss",
    "input_scale",
    "sae_quality",
    "sae_replacement",
    "threads_for",
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


def column_quantile(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x, q, dim=0)`` (linear interpolation), bit for bit, for float32 ``x`` of
    shape (n, m) with no NaN, about 20× faster for high ``q``: it sorts only the top ``n − ⌊q(n−1)⌋``
    rows of each column (``torch.quantile`` sorts every column whole, 13 s for 4096 × 2048).

    >>> x = torch.randn(100, 3)
    >>> torch.equal(column_quantile(x, 0.9), torch.quantile(x, 0.9, dim=0))
    True
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x: expected shape (n >= 1, m), got {tuple(x.shape)}")
    if not 0 <= q <= 1:
        raise ValueError(f"q: expected in [0, 1], got {q}")
    n = x.shape[0]
    # ranks in x's dtype, as torch.quantile computes them
    rank = torch.tensor(q, dtype=x.dtype) * (n - 1)
    below, above = int(rank.floor()), int(rank.ceil())
    top = x.topk(n - below, dim=0, largest=True, sorted=True).values  # top[-1] is the value ranked `below`
    return top[-1].lerp(top[n - 1 - above], rank - below)


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
    config : recipe (family, width, token budget, learning rates, sparsity, seed, precision).
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
    from tqdm.auto import tqdm

    x = _as_float_tensor(x)
    n = x.shape[0]
    with threads_for(x.shape[1], config.width):
        gen = torch.Generator().manual_seed(config.seed)
        scale = input_scale(x)
        trainer = SAETrainer(
            config,
            scale=scale,
            mean=x.double().mean(0) * scale,
            generator=gen,
            sample=lambda: x[torch.randperm(n, generator=gen)[: min(n, 4096)]] * scale,
        )
        order = torch.randperm(n, generator=gen)
        cursor = 0
        bar = tqdm(total=trainer.steps * config.batch_size, unit="tok", unit_scale=True, disable=not progress)
        bar.set_description(desc)
        t0 = time.perf_counter()
        while not trainer.done:
            if cursor + config.batch_size > n:
                order = torch.randperm(n, generator=gen)
                cursor = 0
            idx = order[cursor : cursor + config.batch_size]
            cursor += config.batch_size
            trainer.step(x[idx] * scale)
            bar.update(len(idx))
        bar.close()
        return trainer.result(seconds=time.perf_counter() - t0, meta=meta)


@contextlib.contextmanager
def threads_for(d_in: int, width: int) -> Iterator[None]:
    """Within the block, torch runs on one thread if an SAE of this size is too small for two.

    Below ~10^5 weights per matrix a second OpenMP thread only adds synchronisation, and on a busy
    machine its spin-waiting makes each step up to 100x slower.
    """
    small = d_in * width < _SMALL_SAE
    threads = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)


class StepBuffers:
    """Work buffers of the fast step, reused every step and shareable by trainers of one shape
    (fresh multi-megabyte tensors cost page faults on every allocation, as much as the arithmetic).

    Parameters
    ----------
    batch, d_in, width : the step's shape.
    dtype : the dtype of the matrix-product operands.
    """

    def __init__(self, batch: int, d_in: int, width: int, dtype: torch.dtype) -> None:
        self.key = (batch, d_in, width, dtype)

        def low(*shape: int) -> Tensor:
            return torch.empty(shape, dtype=dtype)

        def full(*shape: int) -> Tensor:
            return torch.empty(shape, dtype=torch.float32)

        self.x_low, self.r_low = low(batch, d_in), low(batch, d_in)
        self.w_enc_low, self.g_w_enc_low = low(d_in, width), low(d_in, width)
        self.w_dec_low, self.g_w_dec_low = low(width, d_in), low(width, d_in)
        self.z_low, self.f_low = low(batch, width), low(batch, width)
        self.z, self.d, self.mask, self.window = (full(batch, width) for _ in range(4))
        self.r, self.dec = full(batch, d_in), full(width, d_in)


class SAETrainer:
    """The training state of one SAE, advanced one batch at a time.

    :func:`train_sae` drives one trainer from a tensor of rows; :mod:`saematch_core.stream` drives
    many from one streamed forward pass. The recipe (initialisation, schedules, Adam, decoder rows on
    the unit sphere) is the module's; ``config.precision`` picks the step:

    - ``float32``: the reference, autograd through :class:`_JumpReLU` / :class:`_Step` and
      ``torch.optim.Adam`` (foreach);
    - ``bfloat16``: the same gradients written out by hand (no autograd graph), every matrix product
      with bfloat16 operands (float32 accumulation inside the kernel, results rounded to bfloat16
      and widened to float32), reused buffers, fused Adam. Master weights, θ, biases, Adam state,
      the error ``x̂ − x`` and the straight-through estimators stay float32.

    Parameters
    ----------
    config : the recipe.
    scale : the input scale ``s``; :meth:`step` receives inputs already multiplied by it.
    mean : mean of the scaled inputs, shape (d_in,): ``b_dec`` starts there.
    generator : draws the initial dictionary.
    sample : JumpReLU only, called once after the dictionary is drawn: scaled inputs whose
        pre-activation quantiles set the initial θ (L0 ≈ ``config.init_l0``).
    scratch : work buffers of the fast step to share with other trainers of the same shape.
    fast : force the hand-written step on or off (default: on iff ``config.precision`` is not
        ``float32``); the hand-written step in float32 is what tests compare with the reference.
    """

    def __init__(
        self,
        config: SAETrainConfig,
        *,
        scale: float,
        mean: Tensor,
        generator: torch.Generator,
        sample: Callable[[], Tensor] | None = None,
        scratch: StepBuffers | None = None,
        fast: bool | None = None,
    ) -> None:
        if mean.ndim != 1:
            raise ValueError(f"mean: expected shape (d_in,), got {tuple(mean.shape)}")
        self.config = config
        self.scale = scale
        d, width = mean.shape[0], config.width
        self.fast = config.precision != "float32" if fast is None else fast
        w_dec = torch.randn(width, d, generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        # The fast step wants W_enc row-major: its casts and fused Adam crawl on transposed strides.
        w_enc = w_dec.T.contiguous() if self.fast else w_dec.T.clone()
        b_dec = mean.float()
        b_enc = -(b_dec @ w_enc)
        self.params = [p.requires_grad_() for p in (w_enc, b_enc, w_dec, b_dec)]
        groups: list[dict[str, Any]] = [{"params": self.params, "lr": config.lr}]
        self.theta: Tensor | None = None
        if config.activation == "jumprelu":
            if sample is None:
                raise ValueError("sample: required for activation='jumprelu' (it sets the initial θ)")
            with torch.no_grad():
                pre = sample() @ w_enc + b_enc
                q = 1.0 - min(config.init_l0 / width, 1.0)
                self.theta = column_quantile(pre, q).clamp_min(10 * _MIN_THETA).requires_grad_()
            groups.append({"params": [self.theta], "lr": config.lr * config.theta_lr_mult})
        self._gemm_dtype = getattr(torch, config.precision)
        if config.precision == "bfloat16":
            warn_if_emulated_bfloat16("SAETrainConfig.precision", mean.device)
        self.scratch = scratch
        if self.fast:
            for p in self._all_params():
                p.grad = torch.zeros_like(p)  # written in place by every fast step
        self.opt = torch.optim.Adam(groups, betas=config.betas, fused=self.fast or None)
        self.steps = config.n_steps
        self.step_index = 0
        self._warmup = max(1, int(config.warmup_frac * self.steps))
        self._decay_from = self.steps - int(config.decay_frac * self.steps)
        self._base_lrs = [group["lr"] for group in self.opt.param_groups]
        self._tail_from = self.steps - max(1, self.steps // 10)
        self._tail = [0.0, 0.0, 0.0]  # L0 per token, squared error, variance over the last 10% of steps
        self.seconds = 0.0

    def _all_params(self) -> list[Tensor]:
        return self.params if self.theta is None else [*self.params, self.theta]

    @property
    def done(self) -> bool:
        """True once ``config.n_steps`` steps are taken."""
        return self.step_index >= self.steps

    def step(self, xb: Tensor) -> None:
        """One optimiser step on a batch of scaled inputs ``xb``, shape (batch, d_in), float32."""
        if self.done:
            raise RuntimeError(f"step: all {self.steps} steps are already taken")
        t0 = time.perf_counter()
        step = self.step_index
        ramp = min(1.0, (step + 1) / self._warmup)
        if step >= self._decay_from:
            factor = (self.steps - step) / (self.steps - self._decay_from)
            for group, lr in zip(self.opt.param_groups, self._base_lrs, strict=True):
                group["lr"] = lr * factor
        with torch.no_grad():
            stats = self._fast_step(xb, ramp) if self.fast else self._reference_step(xb, ramp)
            w_dec = self.params[2]
            w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if self.theta is not None:
                self.theta.clamp_(min=_MIN_THETA)
            if step >= self._tail_from:
                l0, err = stats
                self._tail[0] += float(l0) / len(xb)
                self._tail[1] += float(err)
                self._tail[2] += float((xb - xb.mean(0)).pow(2).sum())
        self.step_index += 1
        self.seconds += time.perf_counter() - t0

    def _reference_step(self, xb: Tensor, ramp: float) -> tuple[Tensor, Tensor]:
        config, theta = self.config, self.theta
        w_enc, b_enc, w_dec, b_dec = self.params
        with torch.enable_grad():
            z = xb @ w_enc + b_enc
            if config.activation == "jumprelu":
                assert theta is not None  # set in __init__ for jumprelu
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
            loss = err.mean() + coef * ramp * sparsity
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        assert w_dec.grad is not None
        # Keep rows on the unit sphere: drop the radial part of the gradient, renormalise after.
        w_dec.grad -= (w_dec.grad * w_dec).sum(1, keepdim=True) * w_dec
        self.opt.step()
        return (f > 0).sum(), err.sum()

    def _fast_step(self, xb: Tensor, ramp: float) -> tuple[Tensor, Tensor]:
        config, theta = self.config, self.theta
        w_enc, b_enc, w_dec, b_dec = self.params
        g_w_enc, g_b_enc, g_w_dec, g_b_dec = (p.grad for p in self.params)
        assert g_w_enc is not None and g_b_enc is not None and g_w_dec is not None and g_b_dec is not None
        batch = xb.shape[0]
        s = self.scratch
        if s is None or s.key != (batch, xb.shape[1], config.width, self._gemm_dtype):
            s = self.scratch = StepBuffers(batch, xb.shape[1], config.width, self._gemm_dtype)
        s.x_low.copy_(xb)
        s.w_enc_low.copy_(w_enc)
        s.w_dec_low.copy_(w_dec)
        torch.mm(s.x_low, s.w_enc_low, out=s.z_low)
        z = s.z.copy_(s.z_low).add_(b_enc)
        mask = s.mask  # 1.0 where a feature is active (and passes gradient to z), else 0.0
        if config.activation == "jumprelu":
            assert theta is not None  # set in __init__ for jumprelu
            torch.gt(torch.sub(z, theta, out=s.d), 0, out=mask)  # s.d = z − θ
            s.f_low.copy_(z.mul_(mask))  # one dtype per kernel: mixed-dtype outputs are slower
        elif config.activation == "topk":
            values, top = torch.topk(z, config.k, dim=-1)
            values.relu_()
            s.f_low.zero_().scatter_(-1, top, values.to(s.f_low.dtype))
            mask.zero_().scatter_(-1, top, (values > 0).float())
        else:
            torch.gt(z, 0, out=mask)
            s.f_low.copy_(z.mul_(mask))
        # reconstruction error r = x̂ − x and its gradient g = 2r / batch (of mean ‖x̂ − x‖²)
        torch.mm(s.f_low, s.w_dec_low, out=s.r_low)
        r = s.r.copy_(s.r_low).add_(b_dec).sub_(xb)
        err = r.square().sum()
        g = r.mul_(2.0 / batch)
        g_b_dec.copy_(g.sum(0))
        s.r_low.copy_(g)
        torch.mm(s.f_low.T, s.r_low, out=s.g_w_dec_low)
        g_w_dec.copy_(s.g_w_dec_low)
        # gradient with respect to the codes f (dense), reusing the buffer of z
        torch.mm(s.r_low, s.w_dec_low.T, out=s.z_low)
        g_f = s.z.copy_(s.z_low)
        if config.activation == "jumprelu":
            assert theta is not None and theta.grad is not None
            # rectangle kernel: window = 1[|z − θ| < ε/2]; ∂f/∂θ ≈ −(θ/ε)·window, ∂L0/∂θ ≈ −window/ε
            eps = config.bandwidth
            window = torch.lt(s.d.abs_(), eps / 2, out=s.window)
            through_f = torch.mul(g_f, window, out=s.d).sum(0).mul_(-theta / eps)
            count = window.sum(0).mul_(config.l0_coef * ramp / (batch * eps))
            theta.grad.copy_(through_f.sub_(count))
            g_z = g_f.mul_(mask)
        elif config.activation == "relu":
            g_z = g_f.add_(config.l1_coef * ramp / batch).mul_(mask)
        else:
            g_z = g_f.mul_(mask)
        g_b_enc.copy_(g_z.sum(0))
        s.f_low.copy_(g_z)
        torch.mm(s.x_low.T, s.f_low, out=s.g_w_enc_low)
        g_w_enc.copy_(s.g_w_enc_low)
        # Keep rows on the unit sphere: drop the radial part of the gradient, renormalise after.
        radial = torch.mul(g_w_dec, w_dec, out=s.dec).sum(1, keepdim=True)
        g_w_dec.addcmul_(w_dec, radial, value=-1.0)
        self.opt.step()
        return mask.sum(), err

    _NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything a resumed trainer needs: tensors (weights, θ, Adam moments) and JSON-ready
        scalars (step, tail statistics, optimiser settings); :meth:`load_state` restores them.

        The tensors are the live ones, not copies (a stream's checkpoint would otherwise double its
        memory): write them out before the next step."""
        tensors = {name: p.detach() for name, p in zip(self._NAMES, self.params, strict=True)}
        if self.theta is not None:
            tensors["threshold"] = self.theta.detach()
        opt = self.opt.state_dict()
        for index, moments in opt["state"].items():
            for name, value in moments.items():
                tensors[f"adam.{index}.{name}"] = torch.as_tensor(value)
        scalars = {
            "step_index": self.step_index,
            "tail": list(self._tail),
            "seconds": self.seconds,
            "scale": self.scale,
            "param_groups": opt["param_groups"],
        }
        return tensors, scalars

    def load_state(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        """Continue from a :meth:`state` of a trainer with the same config and input scale."""
        if scalars["scale"] != self.scale:
            raise ValueError(
                f"scalars['scale']: expected this trainer's {self.scale}, got {scalars['scale']!r}"
            )
        with torch.no_grad():
            for name, p in zip(self._NAMES, self.params, strict=True):
                p.copy_(tensors[name])
            if self.theta is not None:
                self.theta.copy_(tensors["threshold"])
        moments: dict[int, dict[str, Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("adam."):
                _, index, key = name.split(".", 2)
                moments.setdefault(int(index), {})[key] = value.clone()
        self.opt.load_state_dict({"state": moments, "param_groups": scalars["param_groups"]})
        self.step_index = int(scalars["step_index"])
        self._tail = [float(v) for v in scalars["tail"]]
        self.seconds = float(scalars["seconds"])

    def result(self, *, seconds: float | None = None, meta: dict[str, Any] | None = None) -> TrainResult:
        """The trained SAE with the input scaling folded back (``seconds`` defaults to the time spent
        in :meth:`step`)."""
        config, scale = self.config, self.scale
        w_enc, b_enc, w_dec, b_dec = (p.detach() for p in self.params)
        theta = self.theta
        sae = SAE(
            W_enc=w_enc.clone(),
            b_enc=b_enc / scale,
            W_dec=w_dec.clone(),
            b_dec=b_dec / scale,
            activation=config.activation,
            threshold=None if theta is None else (theta.detach() / scale),
            k=config.k if config.activation == "topk" else None,
            meta={
                "source": "saematch.train",
                "activation": config.activation,
                "input_scale": scale,
                "train_steps": self.step_index,
                **(meta or {}),
            },
        )
        n_tail = max(1, self.step_index - self._tail_from)
        l0, err, var = self._tail
        return TrainResult(
            sae=sae,
            input_scale=scale,
            steps=self.step_index,
            seconds=self.seconds if seconds is None else seconds,
            final_l0=l0 / n_tail,
            final_fvu=err / max(var, 1e-30),
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
        # The SAE runs at its own precision even when the model runs under bfloat16 autocast.
        with torch.autocast(h.device.type, enabled=False):
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
