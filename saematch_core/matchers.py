"""Feature matchers side by side behind one interface: SAE Match, exact cosine, greedy cosine and
entropic optimal transport (Sinkhorn).

Every matcher maps two SAEs to a :class:`~saematch_core.match.MatchResult` (``perm``: A's feature
``i`` ↔ B's feature ``perm[i]``, per-pair ``cost`` under the matcher's metric), so reports, the
calibrated verdict and the data-based scores treat them alike. :data:`MATCHERS` holds the four named
ones:

``saematch``
    The paper's SAE Match: folded ``W_enc``, ``W_dec``, ``b_enc``, MSE, exact one-to-one assignment
    (``match()``'s default).
``cosine``
    Exact one-to-one assignment on the cosine of the raw decoder rows (Hungarian on cosine, as in
    seed-reproducibility studies).
``greedy``
    Every feature of A takes its top-1 decoder-cosine partner in B (Feature Flow / Neuronpedia);
    partners may repeat.
``sinkhorn``
    Entropic optimal transport between the features on decoder-cosine cost, solved with POT
    (``pip install 'saematch[compare]'``); each A feature takes the B feature that receives most of
    its transported mass (the row argmax of the plan), so partners may repeat.

**How ε is scaled.** The cost matrix ``C`` (``1 − cos`` for the cosine metric, the mean squared
difference for MSE) is divided by its median over all ``F_A × F_B`` pairs before solving, so the
regularisation :attr:`SinkhornConfig.epsilon` is a fraction of the cost of a typical (unrelated)
pair (``ε = 0.01``: cost differences of 1 % of that are blurred). The median, not the mean, so that
a few huge features (heavy-tailed folded norms) do not blur everyone else. Marginals are uniform. As ``ε → 0``
the plan tends to an optimal assignment of the same cost (the ``cosine`` matcher). As ``ε`` grows,
the row argmax tends to a greedy top-1 on costs centred per column (``C_ij − mean_i C_ij``: a B
feature close to everything is discounted), because ``log P_ij = f_i + g_j − C_ij / ε`` and the
column potentials ``g_j`` tend to ``mean_i C_ij / ε``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saematch_core import lap
from saematch_core.cost import feature_vectors, normalize_rows, pair_costs, resolve_device
from saematch_core.errors import SAEValidationError
from saematch_core.match import MatchConfig, MatchResult, match
from saematch_core.sae import SAE

__all__ = [
    "MATCHERS",
    "MATCHER_NAMES",
    "Matcher",
    "SinkhornConfig",
    "get_matcher",
    "register_matcher",
    "sinkhorn_plan",
    "sinkhorn_solver",
]

logger = logging.getLogger(__name__)

# exp(-x) stays a normal float64 up to x ≈ 708; past this the plain iteration would divide by zero.
_PLAIN_SINKHORN_MAX = 600.0


@dataclass(frozen=True, kw_only=True)
class SinkhornConfig:
    """Entropic optimal transport between two SAEs' features (module docstring).

    Examples
    --------
    >>> SinkhornConfig(epsilon=0.05).to_dict()["epsilon"]
    0.05
    """

    epsilon: float = 0.01
    """Entropic regularisation ε in units of the median pair cost (the cost matrix is divided by its
    median before solving). Smaller is closer to the exact assignment and takes more iterations."""
    max_iter: int = 2000
    """Most Sinkhorn iterations."""
    tol: float = 1e-4
    """Stop when the L1 error of the plan's column marginal (of total mass 1) falls below this
    (POT's ``stopThr``); the row argmax settles long before the marginals are exact."""
    max_pairs: int = 2**26
    """Largest ``F_A × F_B`` accepted: the plan and the cost are dense float64 matrices on the
    device (2**26 pairs: ~0.5 GiB each, 8192 × 8192)."""

    def __post_init__(self) -> None:
        if not isinstance(self.epsilon, (int, float)) or not 0 < self.epsilon < math.inf:
            raise ValueError(f"SinkhornConfig.epsilon: expected a number > 0, got {self.epsilon!r}")
        if not isinstance(self.tol, (int, float)) or not 0 < self.tol < math.inf:
            raise ValueError(f"SinkhornConfig.tol: expected a number > 0, got {self.tol!r}")
        for name in ("max_iter", "max_pairs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SinkhornConfig.{name}: expected an int >= 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SinkhornConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        _check_keys(cls, data)
        return cls(**dict(data))


def _check_keys(cls: type, data: Mapping[str, Any]) -> None:
    if not isinstance(data, Mapping):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected a subset of {sorted(known)}")


def _import_ot() -> Any:
    try:
        import ot
    except ImportError as exc:
        raise ImportError(
            "the sinkhorn matcher needs POT (Python Optimal Transport): pip install 'saematch[compare]'"
        ) from exc
    return ot


def sinkhorn_plan(
    x: Tensor, y: Tensor, *, metric: str, config: SinkhornConfig | None = None
) -> tuple[Tensor, dict[str, float]]:
    """The entropic transport plan between feature vectors ``x`` (F_A, D) and ``y`` (F_B, D).

    Parameters
    ----------
    x, y : feature vectors; unit rows for ``metric="cosine"``.
    metric : ``"cosine"`` (cost ``1 − ⟨x_i, y_j⟩``) or ``"mse"`` (mean squared difference).
    config : ε, iterations, tolerance and the size limit.

    Returns
    -------
    plan : Tensor, float64, shape (F_A, F_B), rows summing to ``1 / F_A`` and columns to ``1 / F_B``.
    info : ``epsilon``, ``cost_scale`` (the median cost the matrix was divided by), ``n_iter``,
        ``marginal_error`` and ``log_domain`` (1 when the log-domain iteration was needed).
    """
    cfg = SinkhornConfig() if config is None else config
    if metric not in ("cosine", "mse"):
        raise ValueError(f"metric: expected 'cosine' or 'mse', got {metric!r}")
    n, m = int(x.shape[0]), int(y.shape[0])
    if n * m > cfg.max_pairs:
        raise ValueError(
            f"SinkhornConfig.max_pairs: the plan would hold {n} × {m} = {n * m} pairs, more than "
            f"{cfg.max_pairs}; raise it if the device has the memory (3 dense float64 matrices)"
        )
    ot = _import_ot()
    xd, yd = x.double(), y.double()
    if metric == "cosine":
        cost = 1.0 - xd @ yd.T
    else:
        sq = (xd * xd).sum(1)[:, None] + (yd * yd).sum(1)[None, :]
        cost = (sq - 2.0 * (xd @ yd.T)) / xd.shape[1]
    cost = cost.clamp(min=0.0)
    scale = float(cost.median()) if cost.numel() else 1.0
    if not scale > 0:
        scale = 1.0  # every pair identical: any plan is optimal
    cost = cost / scale
    # The plain iteration multiplies by exp(-C/ε); past ~708 that underflows, and the log-domain one
    # (several times slower) is needed.
    log_domain = float(cost.max()) / cfg.epsilon > _PLAIN_SINKHORN_MAX
    # On the CPU POT's numpy backend: the torch one costs ~10 ms of overhead per iteration here.
    on_cpu = cost.device.type == "cpu"
    m_cost = cost.numpy() if on_cpu else cost
    a = np.full(n, 1.0 / n) if on_cpu else torch.full((n,), 1.0 / n, dtype=torch.float64, device=cost.device)
    b = np.full(m, 1.0 / m) if on_cpu else torch.full((m,), 1.0 / m, dtype=torch.float64, device=cost.device)
    plan, log = ot.sinkhorn(
        a,
        b,
        m_cost,
        cfg.epsilon,
        method="sinkhorn_log" if log_domain else "sinkhorn",
        numItermax=cfg.max_iter,
        stopThr=cfg.tol,
        log=True,
        warn=False,
    )
    plan = torch.as_tensor(plan, dtype=torch.float64, device=cost.device)
    errors = log.get("err", [])
    error = float(errors[-1]) if len(errors) else math.nan
    n_iter = float(log.get("niter", len(errors)))
    if not bool(torch.isfinite(plan).all()):
        raise SAEValidationError(
            f"sinkhorn: the transport plan has non-finite entries at epsilon={cfg.epsilon}; "
            "raise SinkhornConfig.epsilon"
        )
    info = {
        "epsilon": float(cfg.epsilon),
        "cost_scale": scale,
        "n_iter": n_iter,
        "marginal_error": error,
        "log_domain": float(log_domain),
    }
    return plan, info


def sinkhorn_solver(
    x: Tensor,
    y: Tensor,
    *,
    metric: str,
    chunk_size: int,
    k: int,
    candidates: lap.Candidates = "auto",
    tol: float = lap.DEFAULT_TOL,
    config: SinkhornConfig | None = None,
) -> lap.Assignment:
    """A :class:`saematch_core.lap.SolverFn`: each row takes the column of its largest plan entry.

    ``chunk_size``, ``k``, ``candidates`` and ``tol`` (the exact solvers' options) are accepted for
    the solver interface and not used.
    """
    del chunk_size, k, candidates, tol
    if x.shape[0] == 0 or y.shape[0] == 0:
        return lap.Assignment(cols=np.full(x.shape[0], -1, dtype=np.int64), info={})
    plan, info = sinkhorn_plan(x, y, metric=metric, config=config)
    cols = plan.argmax(dim=1).cpu().numpy().astype(np.int64)
    info["n_collisions"] = float(cols.shape[0] - np.unique(cols).shape[0])
    return lap.Assignment(cols=cols, info=info)


if "sinkhorn" not in lap.SOLVERS:
    lap.register_solver("sinkhorn", sinkhorn_solver)


@dataclass(frozen=True, kw_only=True)
class Matcher:
    """A named way of matching two SAEs' features; calling it returns a :class:`MatchResult`.

    Examples
    --------
    >>> MATCHERS["greedy"].one_to_one, MATCHERS["saematch"].one_to_one
    (False, True)
    """

    name: str
    """Registry name (``saematch``, ``cosine``, ``greedy``, ``sinkhorn`` or one of your own)."""
    config: MatchConfig = field(default_factory=MatchConfig)
    """The feature vectors (``params``, ``fold``), ``metric``, device and dtype; for matchers without
    :attr:`sinkhorn`, also the ``solver``."""
    sinkhorn: SinkhornConfig | None = None
    """When set, the assignment is the row argmax of the entropic transport plan
    (:func:`sinkhorn_plan`) and ``config.solver`` is not used."""
    description: str = ""
    """One line for reports."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Matcher.name: expected an identifier-like str, got {self.name!r}")
        if not isinstance(self.config, MatchConfig):
            raise TypeError(f"Matcher.config: expected a MatchConfig, got {type(self.config).__name__}")
        if self.sinkhorn is not None and not isinstance(self.sinkhorn, SinkhornConfig):
            raise TypeError(
                f"Matcher.sinkhorn: expected a SinkhornConfig or None, got {type(self.sinkhorn).__name__}"
            )

    @property
    def one_to_one(self) -> bool:
        """True when the matching never gives one B feature to two A features (exact solvers)."""
        return self.sinkhorn is None and self.config.solver in ("scipy", "sparse", "identity")

    @property
    def solver(self) -> str:
        """The name recorded as :attr:`MatchResult.solver`."""
        return "sinkhorn" if self.sinkhorn is not None else self.config.solver

    def with_device(self, device: str | None) -> Matcher:
        """The same matcher with its cost algebra on ``device``."""
        return replace(self, config=replace(self.config, device=device))

    def __call__(self, a: SAE, b: SAE) -> MatchResult:
        if self.sinkhorn is None:
            return match(a, b, self.config)
        return _match_entropic(a, b, self.config, self.sinkhorn)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "config": self.config.to_dict(),
            "sinkhorn": None if self.sinkhorn is None else self.sinkhorn.to_dict(),
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Matcher:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        _check_keys(cls, data)
        sink = data.get("sinkhorn")
        return cls(
            name=str(data["name"]),
            config=MatchConfig.from_dict(data.get("config", {})),
            sinkhorn=None if sink is None else SinkhornConfig.from_dict(sink),
            description=str(data.get("description", "")),
        )


def _match_entropic(a: SAE, b: SAE, config: MatchConfig, sinkhorn: SinkhornConfig) -> MatchResult:
    """``match()`` with the Sinkhorn readout as the solver: same feature vectors, same per-pair costs.

    ``MatchConfig.solver`` only accepts the exact and baseline solvers, so the few steps of
    ``match()`` are repeated here around :func:`sinkhorn_solver`.
    """
    t_start = time.perf_counter()
    if a.d_in != b.d_in:
        raise SAEValidationError(
            f"a, b: expected the same d_in, got a.d_in={a.d_in} and b.d_in={b.d_in} "
            "(different models or sites?)"
        )
    device = resolve_device(config.device, fallback=a.device)
    folded = (config.fold and a.activation == "jumprelu", config.fold and b.activation == "jumprelu")
    va = feature_vectors(a, config.params, fold=folded[0], device=device)
    vb = feature_vectors(b, config.params, fold=folded[1], device=device)
    x, y = (
        (normalize_rows(va, name="a"), normalize_rows(vb, name="b"))
        if config.metric == "cosine"
        else (va, vb)
    )
    t0 = time.perf_counter()
    assignment = sinkhorn_solver(
        x, y, metric=config.metric, chunk_size=config.chunk_size, k=1, config=sinkhorn
    )
    solve_s = time.perf_counter() - t0
    perm = torch.as_tensor(assignment.cols, dtype=torch.long)
    cost = pair_costs(va, vb, perm, metric=config.metric)
    matched = perm >= 0
    used = perm[matched]
    return MatchResult(
        perm=perm,
        cost=cost,
        total_cost=float(cost[matched].sum()) if bool(matched.any()) else 0.0,
        solver="sinkhorn",
        is_permutation=bool(torch.unique(used).numel() == used.numel()),
        shape=(a.d_sae, b.d_sae),
        timings={"solve": solve_s, "total": time.perf_counter() - t_start},
        config=config,
        folded=folded,
        info=assignment.info,
    )


_DECODER_COSINE = MatchConfig(params=("W_dec",), metric="cosine", fold=False)

MATCHERS: dict[str, Matcher] = {}
"""Matchers by name; :func:`register_matcher` adds one."""


def register_matcher(matcher: Matcher, *, overwrite: bool = False) -> None:
    """Add ``matcher`` to :data:`MATCHERS` under its name (a name only once unless ``overwrite``)."""
    if not isinstance(matcher, Matcher):
        raise TypeError(f"matcher: expected a Matcher, got {type(matcher).__name__}")
    if matcher.name in MATCHERS and not overwrite:
        raise ValueError(f"matcher: {matcher.name!r} is already registered")
    MATCHERS[matcher.name] = matcher


register_matcher(
    Matcher(
        name="saematch",
        config=MatchConfig(),
        description="SAE Match: folded W_enc, W_dec, b_enc; MSE; exact one-to-one assignment",
    )
)
register_matcher(
    Matcher(
        name="cosine",
        config=_DECODER_COSINE,
        description="exact one-to-one assignment on decoder cosine (Hungarian on cosine)",
    )
)
register_matcher(
    Matcher(
        name="greedy",
        config=replace(_DECODER_COSINE, solver="greedy"),
        description="top-1 decoder cosine per feature of A (Feature Flow / Neuronpedia); may repeat",
    )
)
register_matcher(
    Matcher(
        name="sinkhorn",
        config=_DECODER_COSINE,
        sinkhorn=SinkhornConfig(),
        description="entropic OT on decoder cosine (POT), row argmax of the plan; may repeat",
    )
)

MATCHER_NAMES: tuple[str, ...] = tuple(MATCHERS)
"""The four built-in matchers, in the order reports list them."""


def get_matcher(matcher: str | Matcher) -> Matcher:
    """``matcher`` itself, or the registered matcher of that name."""
    if isinstance(matcher, Matcher):
        return matcher
    try:
        return MATCHERS[matcher]
    except (KeyError, TypeError):
        raise ValueError(f"matcher: expected one of {sorted(MATCHERS)}, got {matcher!r}") from None
