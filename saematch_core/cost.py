"""Feature vectors and cost matrices between the features of two SAEs.

Each feature ``i`` of an SAE becomes one vector: the concatenation of the chosen parameters
(encoder column ``W_enc[:, i]``, decoder row ``W_dec[i]``, encoder bias ``b_enc[i]``), optionally after
folding JumpReLU thresholds. Costs between features of SAE A (``F_A`` rows) and SAE B (``F_B`` columns):

- ``"mse"``: ``‖a_i − b_j‖² / D``, computed as ``(‖a_i‖² + ‖b_j‖² − 2⟨a_i, b_j⟩) / D`` so one matrix
  product does the work;
- ``"cosine"``: ``1 − ⟨a_i, b_j⟩ / (‖a_i‖ ‖b_j‖)``.

Large widths (F = 65536: a dense float32 F×F matrix is 17 GB) are handled by streaming row blocks
(:func:`iter_cost_chunks`, :func:`iter_score_chunks`); only :func:`cost_matrix` builds the whole matrix,
for tests and small problems.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from saematch_core.errors import SAEValidationError
from saematch_core.fold import fold as fold_sae
from saematch_core.sae import SAE

__all__ = [
    "DEFAULT_PARAMS",
    "DTYPES",
    "METRICS",
    "PARAMS",
    "Metric",
    "check_metric",
    "check_params",
    "cost_matrix",
    "feature_vectors",
    "iter_cost_chunks",
    "iter_score_chunks",
    "normalize_rows",
    "pair_costs",
    "resolve_device",
]

Metric = Literal["mse", "cosine"]
"""How two features' vectors are compared (see the module docstring)."""
METRICS: tuple[str, ...] = get_args(Metric)

PARAMS: tuple[str, ...] = ("W_enc", "W_dec", "b_enc")
"""Parameters that can form a feature's vector."""
DEFAULT_PARAMS: tuple[str, ...] = ("W_enc", "W_dec", "b_enc")
"""The paper's choice: folded encoder column, decoder row and encoder bias."""
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Dtype names accepted by the configs, and their torch dtypes."""


def resolve_device(
    device: str | torch.device | None, *, fallback: torch.device | str = "cpu"
) -> torch.device:
    """Turn a device request into a ``torch.device``: the one device policy of the matching code
    (feature vectors, cost chunks, the solvers' score blocks).

    ``None`` gives ``fallback`` (itself a device or ``"auto"``); ``"auto"`` gives CUDA when available,
    else CPU. Asking for CUDA when it is not available raises a ``ValueError`` rather than silently
    using the CPU.

    >>> resolve_device(None).type, resolve_device("cpu").type
    ('cpu', 'cpu')
    """
    if device is None:
        device = fallback
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {str(dev)!r} requested but CUDA is not available (torch {torch.__version__})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {str(dev)!r} requested but only {torch.cuda.device_count()} CUDA devices exist"
            )
    return dev


def check_params(params: Sequence[str], name: str = "params") -> tuple[str, ...]:
    """``params`` as a tuple if it is a non-empty subset of :data:`PARAMS` without repeats; otherwise a
    ``TypeError`` (not a sequence of names) or ``ValueError`` whose message starts with ``name``."""
    if isinstance(params, str) or not isinstance(params, Sequence):
        raise TypeError(f"{name}: expected a sequence of names from {list(PARAMS)}, got {params!r}")
    out = tuple(params)
    if not out or any(p not in PARAMS for p in out) or len(set(out)) != len(out):
        raise ValueError(
            f"{name}: expected a non-empty subset of {list(PARAMS)} without repeats, got {list(out)}"
        )
    return out


def check_metric(metric: object, name: str = "metric") -> Metric:
    """``metric`` if it is one of :data:`METRICS`, else a ``ValueError`` naming ``name``."""
    if metric not in METRICS:
        raise ValueError(f"{name}: expected one of {list(METRICS)}, got {metric!r}")
    return metric  # type: ignore[return-value]


def feature_vectors(
    sae: SAE,
    params: Sequence[str] = DEFAULT_PARAMS,
    fold: bool = True,
    *,
    scale: Tensor | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """One vector per feature: the chosen parameters concatenated in the order given.

    Parameters
    ----------
    sae : SAE
    params : subset of ``("W_enc", "W_dec", "b_enc")``
        ``W_enc`` contributes column ``W_enc[:, i]`` (d_in values), ``W_dec`` row ``W_dec[i]`` (d_in),
        ``b_enc`` the scalar ``b_enc[i]`` (1).
    fold : bool
        Fold the thresholds of a JumpReLU SAE first (paper Eq. 4). Other activations have no threshold
        to fold and are used as they are.
    scale : Tensor, shape (d_sae,), optional
        Per-feature activation scales ``s`` (every entry finite and > 0), for SAEs of any family: the
        raw weights become ``W_enc[:, i] / s_i``, ``W_dec[i] · s_i``, ``b_enc[i] / s_i`` (computed in
        float64). Folding is the case ``s = θ``, so ``fold`` must be False with a scale. For ReLU SAEs
        this preserves the output; for TopK it does not (the vectors are for matching only).
    device, dtype :
        Where and in which floating dtype to return the result (default: the SAE's).

    Returns
    -------
    Tensor, shape (d_sae, D)
        ``D = d_in · (#W_enc + #W_dec) + #b_enc``.

    Examples
    --------
    >>> sae = SAE(W_enc=torch.eye(2), b_enc=torch.ones(2), W_dec=2 * torch.eye(2), b_dec=torch.zeros(2),
    ...           threshold=torch.tensor([1.0, 2.0]))
    >>> feature_vectors(sae, ("W_dec", "b_enc")).tolist()
    [[2.0, 0.0, 1.0], [0.0, 4.0, 0.5]]
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae: expected an SAE, got {type(sae).__name__}")
    params = check_params(params)
    if fold and sae.activation == "jumprelu" and scale is None:
        sae = fold_sae(sae)
    parts = {"W_enc": sae.W_enc.T, "W_dec": sae.W_dec, "b_enc": sae.b_enc[:, None]}
    if scale is not None:
        if fold:
            raise ValueError("fold, scale: scaling replaces folding (folding is scale = θ); pass fold=False")
        s = _check_scale(sae, scale)[:, None]
        parts = {
            "W_enc": parts["W_enc"].double() / s,
            "W_dec": parts["W_dec"].double() * s,
            "b_enc": parts["b_enc"].double() / s,
        }
    dev = resolve_device(device, fallback=sae.device)
    dtype = sae.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    return torch.cat([parts[p].to(device=dev, dtype=dtype) for p in params], dim=1)


def _check_scale(sae: SAE, scale: Tensor) -> Tensor:
    s = torch.as_tensor(scale).to(sae.device, torch.float64)
    if s.shape != (sae.d_sae,):
        raise ValueError(f"scale: expected shape ({sae.d_sae},), got {tuple(s.shape)}")
    if not bool((torch.isfinite(s) & (s > 0)).all()):
        n_bad = int((~(torch.isfinite(s) & (s > 0))).sum())
        raise ValueError(f"scale: expected every entry finite and > 0, got {n_bad} that are not")
    return s


def _check_pair(a: Tensor, b: Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name}: expected 2-D feature vectors (F, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a, b: expected feature vectors of the same length D, "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )


def normalize_rows(x: Tensor, *, name: str = "x") -> Tensor:
    """Rows scaled to unit L2 norm, for the cosine metric.

    An all-zero row (e.g. a dead feature with zero weights) has no direction: it raises a
    ``SAEValidationError`` that names ``name``, the count and the first such feature.
    """
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = norms[:, 0] == 0
    n_zero = int(zero.sum())
    if n_zero:
        first = int(zero.nonzero()[0, 0])
        raise SAEValidationError(
            f"{name}: {n_zero} features have an all-zero vector (first at feature {first}); "
            "the cosine metric is undefined for them: drop those features or use metric='mse'"
        )
    return x / norms


def _chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    for start in range(0, n, chunk_size):
        yield start, min(start + chunk_size, n)


def _place(
    a: Tensor, b: Tensor, device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    dev = resolve_device(device, fallback=a.device)
    dtype = a.dtype if dtype is None else dtype
    return a.to(device=dev, dtype=dtype), b.to(device=dev, dtype=dtype)


def iter_score_chunks(
    a: Tensor,
    b: Tensor,
    *,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Stream the inner products ``a @ b.T`` by row blocks: yields ``(row_start, Tensor [rows, F_B])``.

    This is the quantity the exact solvers maximise. Peak extra memory is one block.
    """
    _check_pair(a, b)
    a, b = _place(a, b, device, dtype)
    bt = b.T
    for start, end in _chunks(a.shape[0], chunk_size):
        yield start, a[start:end] @ bt


def iter_cost_chunks(
    a: Tensor,
    b: Tensor,
    metric: Metric = "mse",
    *,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Stream the cost matrix by row blocks: yields ``(row_start, Tensor [rows, F_B])``.

    Parameters
    ----------
    a : Tensor, shape (F_A, D)
    b : Tensor, shape (F_B, D)
        Feature vectors (:func:`feature_vectors`), not normalised.
    metric : {"mse", "cosine"}
        MSE is ``‖a_i − b_j‖² / D`` (clamped at 0 against rounding); cosine is ``1 − cos``.
    chunk_size : int
        Rows per block; the peak extra memory is about ``chunk_size × F_B`` elements.
    device, dtype :
        Where and in which dtype the algebra runs (default: ``a``'s).
    """
    _check_pair(a, b)
    check_metric(metric)
    a, b = _place(a, b, device, dtype)
    width = a.shape[1]
    if metric == "cosine":
        a, b = normalize_rows(a, name="a"), normalize_rows(b, name="b")
        for start, block in iter_score_chunks(a, b, chunk_size=chunk_size):
            yield start, block.neg_().add_(1.0)
        return
    a_sq = (a * a).sum(dim=1)
    b_sq = (b * b).sum(dim=1)
    scale = 1.0 / max(width, 1)
    for start, block in iter_score_chunks(a, b, chunk_size=chunk_size):
        end = start + block.shape[0]
        # In place, so the peak stays at one block of chunk_size × F_B.
        dist = block.mul_(-2.0).add_(a_sq[start:end, None]).add_(b_sq[None, :])
        yield start, dist.clamp_(min=0.0).mul_(scale)


def cost_matrix(
    a: Tensor,
    b: Tensor,
    metric: Metric = "mse",
    *,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The dense cost matrix, shape (F_A, F_B), assembled from :func:`iter_cost_chunks`.

    For tests and small problems: at F = 65536 in float32 this is 17 GB.

    Examples
    --------
    >>> a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> cost_matrix(a, a).tolist()
    [[0.0, 2.5], [2.5, 0.0]]
    """
    _check_pair(a, b)
    parts = [
        block
        for _, block in iter_cost_chunks(a, b, metric, chunk_size=chunk_size, device=device, dtype=dtype)
    ]
    if not parts:
        dev = resolve_device(device, fallback=a.device)
        return torch.empty((0, b.shape[0]), device=dev, dtype=a.dtype if dtype is None else dtype)
    return torch.cat(parts, dim=0)


def pair_costs(
    a: Tensor, b: Tensor, perm: Tensor, metric: Metric = "mse", *, chunk_size: int = 4096
) -> Tensor:
    """Cost of each matched pair ``(i, perm[i])``, computed directly in float64.

    No cost matrix is formed: the matched vectors are subtracted (MSE) or their cosine taken row by row.

    Parameters
    ----------
    a : Tensor, shape (F_A, D)
    b : Tensor, shape (F_B, D)
    perm : LongTensor, shape (F_A,)
        ``perm[i]`` in ``[0, F_B)``, or ``-1`` for an unmatched feature.

    Returns
    -------
    Tensor, float64, shape (F_A,), on the CPU; ``nan`` where ``perm == -1``.
    """
    _check_pair(a, b)
    check_metric(metric)
    perm = torch.as_tensor(perm)
    if perm.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"perm: expected an integer tensor, got {perm.dtype}")
    if perm.shape != (a.shape[0],):
        raise ValueError(f"perm: expected shape ({a.shape[0]},), got {tuple(perm.shape)}")
    perm = perm.to(device=a.device, dtype=torch.long)
    if perm.numel() and (int(perm.min()) < -1 or int(perm.max()) >= b.shape[0]):
        raise ValueError(
            f"perm: expected entries in [-1, {b.shape[0]}), got min {int(perm.min())}, max {int(perm.max())}"
        )
    out = torch.full((a.shape[0],), math.nan, dtype=torch.float64)
    width = max(a.shape[1], 1)
    b = b.to(a.device)
    for start, end in _chunks(a.shape[0], chunk_size):
        p = perm[start:end]
        rows = (p >= 0).nonzero().flatten()
        if rows.numel() == 0:
            continue
        x = a[start:end][rows].double()
        y = b[p[rows]].double()
        if metric == "mse":
            val = ((x - y) ** 2).sum(dim=1) / width
        else:
            nx = torch.linalg.vector_norm(x, dim=1)
            ny = torch.linalg.vector_norm(y, dim=1)
            if bool((nx == 0).any()) or bool((ny == 0).any()):
                raise SAEValidationError(
                    "a, b: a matched feature has an all-zero vector; cosine is undefined"
                )
            val = 1.0 - (x * y).sum(dim=1) / (nx * ny)
        out[(rows + start).cpu()] = val.cpu()
    return out
