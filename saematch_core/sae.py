"""The SAE container: weights, activation function, encode / decode.

One weight layout everywhere: ``W_enc`` is ``(d_in, d_sae)`` and ``W_dec`` is ``(d_sae, d_in)``;
loaders convert other layouts at the file boundary. The encoder computes

    pre  = x @ W_enc + b_enc
    f    = act(pre)              # jumprelu: pre * 1[pre > threshold]; relu; topk(k) of relu(pre)
    x̂    = f @ W_dec + b_dec

Any centring of the input by ``b_dec`` (SAELens ``apply_b_dec_to_input``, sparsify) is folded into
``b_enc`` by the loaders, so this container never needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor

from saematch_core.errors import SAEValidationError

__all__ = ["SAE", "Activation", "ForwardOutput", "check_pair", "nonfinite_summary"]

Activation = Literal["jumprelu", "relu", "topk"]
_ACTIVATIONS: tuple[str, ...] = get_args(Activation)


class ForwardOutput(NamedTuple):
    """Result of :meth:`SAE.forward`."""

    codes: Tensor
    """Feature activations ``f``, shape ``(..., d_sae)``."""
    recon: Tensor
    """Reconstruction ``x̂``, shape ``(..., d_in)``."""


def nonfinite_summary(t: Tensor) -> str | None:
    """``"N non-finite (NaN/inf) entries, first at (i, j)"`` when ``t`` has any, else ``None``.

    A finite sum proves every entry finite (a NaN or inf propagates): the common case costs one
    reduction in the tensor's own dtype (30× cheaper than in float64), then one in float64 if that
    overflowed, instead of a boolean mask (SAEs are re-validated by every fold and permute).

    >>> nonfinite_summary(torch.tensor([[1.0, float("nan")], [float("inf"), 0.0]]))
    '2 non-finite (NaN/inf) entries, first at (0, 1)'
    """
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return None
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return None  # the native sum overflowed (e.g. float16), the entries are fine
    bad = ~torch.isfinite(t)
    n_bad = int(bad.sum())
    if not n_bad:
        return None  # the sum overflowed, the entries are fine
    first = tuple(int(i) for i in bad.nonzero()[0])
    return f"{n_bad} non-finite (NaN/inf) entries, first at {first}"


def _check_finite(name: str, t: Tensor) -> None:
    problem = nonfinite_summary(t)
    if problem is not None:
        raise SAEValidationError(f"{name}: {problem}")


@dataclass(frozen=True, eq=False)
class SAE:
    """A sparse autoencoder with a JumpReLU, ReLU or TopK activation.

    Parameters
    ----------
    W_enc : Tensor, shape (d_in, d_sae)
    b_enc : Tensor, shape (d_sae,)
    W_dec : Tensor, shape (d_sae, d_in)
    b_dec : Tensor, shape (d_in,)
    activation : {"jumprelu", "relu", "topk"}
    threshold : Tensor, shape (d_sae,) or scalar, only for ``jumprelu``; must be >= 0.
        A scalar (0-d tensor or float) is broadcast to every feature. A feature with ``θ_i = 0``
        fires whenever its pre-activation is > 0 (a ReLU feature); such features cannot be folded
        (:func:`~saematch_core.fold.fold` divides by θ).
    k : int, only for ``topk``: number of active features per token.
    meta : free-form provenance (``source``, ``layer``, ``hookpoint``, ...), JSON-serialisable.

    All tensors must share one floating dtype and one device. The container is immutable;
    methods that change weights return a new SAE.

    Examples
    --------
    >>> import torch
    >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2), b_dec=torch.zeros(2),
    ...           activation="jumprelu", threshold=torch.tensor(0.5))
    >>> sae.encode(torch.tensor([1.0, 0.2])).tolist()
    [1.0, 0.0]
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    activation: Activation = "jumprelu"
    threshold: Tensor | None = None
    k: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        if self.W_dec.ndim != 2:
            raise SAEValidationError(
                f"W_dec: expected 2-D (d_sae, d_in), got shape {tuple(self.W_dec.shape)}"
            )
        d_sae, d_in = self.W_dec.shape
        if self.W_enc.shape != (d_in, d_sae):
            hint = " (transposed?)" if self.W_enc.shape == (d_sae, d_in) else ""
            raise SAEValidationError(
                f"W_enc: expected shape (d_in, d_sae) = {(d_in, d_sae)} to match W_dec {(d_sae, d_in)}, "
                f"got {tuple(self.W_enc.shape)}{hint}"
            )
        if self.b_enc.shape != (d_sae,):
            raise SAEValidationError(f"b_enc: expected shape ({d_sae},), got {tuple(self.b_enc.shape)}")
        if self.b_dec.shape != (d_in,):
            raise SAEValidationError(f"b_dec: expected shape ({d_in},), got {tuple(self.b_dec.shape)}")
        dtype, device = self.W_dec.dtype, self.W_dec.device
        for name in ("W_enc", "b_enc", "b_dec"):
            t = getattr(self, name)
            if t.dtype != dtype or t.device != device:
                raise SAEValidationError(
                    f"{name}: expected dtype {dtype} on {device} like W_dec, got {t.dtype} on {t.device}"
                )
            _check_finite(name, t)
        _check_finite("W_dec", self.W_dec)

        if self.activation not in _ACTIVATIONS:
            raise SAEValidationError(
                f"activation: expected one of {list(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.activation == "jumprelu":
            self._init_threshold(d_sae, dtype, device)
        elif self.threshold is not None:
            raise SAEValidationError(
                f"threshold: only valid for activation='jumprelu', got {self.activation!r}"
            )
        if self.activation == "topk":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= d_sae:
                raise SAEValidationError(f"k: expected an int in [1, d_sae={d_sae}] for topk, got {self.k!r}")
        elif self.k is not None:
            raise SAEValidationError(f"k: only valid for activation='topk', got k={self.k!r}")
        object.__setattr__(self, "meta", dict(self.meta))

    def _init_threshold(self, d_sae: int, dtype: torch.dtype, device: torch.device) -> None:
        theta = self.threshold
        if theta is None:
            raise SAEValidationError(
                "threshold: required for activation='jumprelu' (shape (d_sae,) or scalar)"
            )
        if not isinstance(theta, Tensor):
            theta = torch.tensor(float(theta))
        if theta.ndim == 0 or theta.shape == (1,):
            theta = theta.reshape(()).expand(d_sae).clone()
        if theta.shape != (d_sae,):
            raise SAEValidationError(
                f"threshold: expected shape ({d_sae},) or a scalar, got {tuple(theta.shape)}"
            )
        theta = theta.to(dtype=dtype, device=device)
        _check_finite("threshold", theta)
        bad = theta < 0
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise SAEValidationError(
                f"threshold: expected every entry >= 0, got {int(bad.sum())} entries < 0, "
                f"first at feature {first} (value {float(theta[first])})"
            )
        object.__setattr__(self, "threshold", theta)

    # ------------------------------------------------------------------ shape and conversion
    @property
    def d_in(self) -> int:
        """Width of the input / residual stream."""
        return int(self.W_dec.shape[1])

    @property
    def d_sae(self) -> int:
        """Number of features (dictionary size)."""
        return int(self.W_dec.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def tensors(self) -> dict[str, Tensor]:
        """The parameters by name (``threshold`` only for JumpReLU)."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        """A copy on ``device`` and/or in ``dtype``."""
        moved = {name: t.to(device=device, dtype=dtype) for name, t in self.tensors().items()}
        return replace(self, **moved)

    def permute(self, perm: Tensor) -> SAE:
        """Reorder features: feature ``i`` of the result is feature ``perm[i]`` of this SAE.

        Every reconstruction is unchanged; codes are permuted the same way.
        """
        perm = torch.as_tensor(perm, dtype=torch.long, device=self.device)
        if perm.shape != (self.d_sae,) or not torch.equal(
            torch.sort(perm).values, torch.arange(self.d_sae, device=self.device)
        ):
            raise SAEValidationError(
                f"perm: expected a permutation of range({self.d_sae}), got shape {tuple(perm.shape)}"
            )
        theta = None if self.threshold is None else self.threshold[perm]
        return replace(
            self, W_enc=self.W_enc[:, perm], b_enc=self.b_enc[perm], W_dec=self.W_dec[perm], threshold=theta
        )

    # ------------------------------------------------------------------ computation
    def _check_input(self, name: str, x: Tensor, width: int) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != width:
            raise SAEValidationError(f"{name}: expected shape (..., {width}), got {tuple(x.shape)}")
        return x.to(device=self.device, dtype=self.dtype)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``x @ W_enc + b_enc``, shape ``(..., d_sae)``."""
        x = self._check_input("x", x, self.d_in)
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Apply the activation function to pre-activations."""
        if self.activation == "jumprelu":
            assert self.threshold is not None  # guaranteed by __post_init__
            return pre * (pre > self.threshold)
        if self.activation == "relu":
            return torch.relu(pre)
        assert self.k is not None  # guaranteed by __post_init__
        values, idx = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(values))

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``f``, shape ``(..., d_sae)``."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``f @ W_dec + b_dec``, shape ``(..., d_in)``."""
        f = self._check_input("f", f, self.d_sae)
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> ForwardOutput:
        codes = self.encode(x)
        return ForwardOutput(codes=codes, recon=self.decode(codes))

    __call__ = forward

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        return (
            f"SAE(d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation!r}{extra}, "
            f"dtype={self.dtype}, device={self.device}, meta={dict(self.meta)})"
        )


def check_pair(a: object, b: object) -> None:
    """Raise unless ``a`` and ``b`` are SAEs that read the same residual width (``d_in``), the
    precondition of every comparison of two SAEs' features."""
    for name, sae in (("a", a), ("b", b)):
        if not isinstance(sae, SAE):
            raise TypeError(f"{name}: expected an SAE, got {type(sae).__name__}")
    assert isinstance(a, SAE) and isinstance(b, SAE)  # for the type checker
    if a.d_in != b.d_in:
        raise SAEValidationError(
            f"a, b: expected the same d_in, got a.d_in={a.d_in} and b.d_in={b.d_in} "
            "(different models or sites?)"
        )
