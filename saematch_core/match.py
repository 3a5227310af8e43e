"""The one entry point for matching the features of two SAEs (the paper's SAE Match).

``match(a, b, config)`` folds both SAEs (JumpReLU only), builds one vector per feature from the
chosen parameters (encoder column, decoder row, encoder bias), and solves the linear assignment
problem that minimises the summed squared distance (or cosine distance) between matched features.
Because ``‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩`` and the norms do not depend on the assignment, the
solvers see the inner-product form and maximise ``Σ ⟨a_i, b_P(i)⟩``; the per-pair costs reported in
:class:`MatchResult` are recomputed directly in float64 from the matched vectors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saematch_core.cache import atomic_write_bytes
from saematch_core.cost import (
    DEFAULT_PARAMS,
    DTYPES,
    Metric,
    check_metric,
    check_params,
    feature_vectors,
    normalize_rows,
    pair_costs,
    resolve_device,
)
from saematch_core.lap import DEFAULT_TOL, SOLVERS, Candidates, check_candidates, check_tol, solve
from saematch_core.result_file import RESULT_SCHEMA_VERSION, result_document, write_result_file
from saematch_core.sae import SAE, check_pair
from saematch_core.verify import check_match_result

__all__ = ["MATCH_RESULT_KIND", "MATCH_SCHEMA_VERSION", "MatchConfig", "MatchResult", "match"]

logger = logging.getLogger(__name__)

MATCH_RESULT_KIND = "match_result"
"""Value of the ``kind`` key in a :class:`MatchResult` JSON file."""
MATCH_SCHEMA_VERSION = RESULT_SCHEMA_VERSION
"""Version of the :class:`MatchResult` JSON / safetensors-metadata layout (version 1 is still read)."""


@dataclass(frozen=True, kw_only=True)
class MatchConfig:
    """How to match two SAEs. Every default runs on CPU and follows the paper.

    Examples
    --------
    >>> MatchConfig(params=("W_dec",), metric="cosine").to_dict()["params"]
    ['W_dec']
    >>> MatchConfig.from_dict({"solver": "greedy"}).solver
    'greedy'
    """

    params: tuple[str, ...] = DEFAULT_PARAMS
    """Which parameters form each feature's vector, concatenated in this order: any non-empty subset of
    ``("W_enc", "W_dec", "b_enc")`` (encoder column ``W_enc[:, i]``, decoder row ``W_dec[i]``, bias
    ``b_enc[i]``). The paper's default is all three, folded."""
    metric: Metric = "mse"
    """``"mse"``: per-pair cost is the mean squared difference over the concatenated vector (length D);
    ``"cosine"``: per-pair cost is ``1 − cos(a_i, b_j)``; a feature whose vector is all zeros has no
    direction and raises an error."""
    fold: bool = True
    """Fold JumpReLU thresholds into the weights before matching (paper Eq. 4). Folding is only defined
    for JumpReLU: ReLU/TopK SAEs are used as they are, which :attr:`MatchResult.folded` records."""
    solver: str = "sparse"
    """Any solver registered in ``saematch_core.lap.SOLVERS`` (``lap.register_solver`` adds one).
    Built in: ``"sparse"`` (default): exact, certified sparse solver (``saematch_core.lap_sparse``)
    that never holds the dense matrix; it proves its result optimal for the dense float64 problem, up
    to ``info["gap_bound"]`` (normally 0). ``"scipy"``: exact, ``scipy.optimize.linear_sum_assignment``
    on the dense float64 score matrix (the reference; needs F_A × F_B × 8 bytes of host memory, 34 GB
    at F = 65536). Both give the same optimum. ``"greedy"``: every feature of A takes its best partner
    in B under :attr:`metric`; several A features may share one partner, so the result is a mapping,
    not a permutation (Feature Flow is ``params=("W_dec",), metric="cosine", fold=False,
    solver="greedy"``). ``"identity"``: feature i ↔ i (the unmatched, "vanilla" baseline)."""
    device: str | None = None
    """Where the cost algebra runs: ``None`` (the device of SAE ``a``), ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, or ``"auto"`` (CUDA when available, else CPU). Asking for CUDA without it is an error."""
    dtype: str = "float32"
    """Floating dtype of the feature vectors and score chunks: ``"float32"``, ``"float64"``,
    ``"float16"`` or ``"bfloat16"``. The scipy solver always works in float64 on the host, and reported
    per-pair costs are always recomputed in float64 from the parameters in at least their own precision
    (half-precision settings only affect the search)."""
    chunk_size: int = 4096
    """Rows of the score matrix computed at once (memory ~ chunk_size × F_B × itemsize)."""
    sparse_k: int = 8
    """Initial number of candidate partners per feature; used only by the ``"sparse"`` solver."""
    sparse_candidates: Candidates = "auto"
    """Precision of the ``"sparse"`` solver's candidate search. ``"bfloat16"`` is 3–7× faster where
    bfloat16 GEMMs are native (AMX/AVX512-BF16 CPUs, GPUs of compute capability 8.0 or more) and the
    matching stays exact: the certificate accounts for the rounding and re-checks in float32/float64.
    ``"auto"`` picks bfloat16 exactly there (``lap_sparse.candidate_precision``)."""
    tol: float = DEFAULT_TOL
    """Relative tolerance of the ``"sparse"`` solver's certificate: a pair counts as improving the
    matching when its gain exceeds ``tol`` times the magnitude of the two inner products compared,
    each feature's own (never the largest norm), so outlier features do not loosen it. Whatever is
    left is stated in :attr:`MatchResult.info` ``["gap_bound"]``, in units of
    :attr:`MatchResult.total_cost` (0 = proven optimal; otherwise float64 rounding of the prices)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", check_params(self.params, name="MatchConfig.params"))
        check_metric(self.metric, name="MatchConfig.metric")
        if not isinstance(self.fold, bool):
            raise TypeError(f"MatchConfig.fold: expected a bool, got {self.fold!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"MatchConfig.solver: expected one of {sorted(SOLVERS)}, got {self.solver!r}")
        if self.device is not None:
            if not isinstance(self.device, str):
                raise TypeError(
                    f"MatchConfig.device: expected a str or None, got {type(self.device).__name__}"
                )
            if self.device != "auto":
                try:
                    torch.device(self.device)
                except (RuntimeError, ValueError) as exc:
                    raise ValueError(
                        f"MatchConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
                    ) from exc
        if self.dtype not in DTYPES:
            raise ValueError(f"MatchConfig.dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        check_candidates(self.sparse_candidates, name="MatchConfig.sparse_candidates")
        object.__setattr__(self, "tol", check_tol(self.tol, name="MatchConfig.tol"))
        for name in ("chunk_size", "sparse_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MatchConfig.{name}: expected an int >= 1, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """:attr:`dtype` as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``params`` as a list)."""
        out = asdict(self)
        out["params"] = list(self.params)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MatchConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise TypeError(f"MatchConfig: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MatchConfig: unknown keys {unknown}; expected a subset of {sorted(known)}")
        kwargs = dict(data)
        if "params" in kwargs and isinstance(kwargs["params"], list):
            kwargs["params"] = tuple(kwargs["params"])
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True, eq=False)
class MatchResult:
    """The matching of SAE A's features to SAE B's features.

    Semantics for different widths (``F_A ≠ F_B``): every feature of the smaller side gets a distinct
    partner on the larger side (exact solvers and ``"identity"``); the extra features of the larger side
    stay unmatched. When A is the larger side, its unmatched features have ``perm == -1`` and
    ``cost == nan``. For ``"greedy"`` every feature of A gets a partner and partners may repeat.
    """

    perm: Tensor
    """LongTensor, shape (F_A,): feature ``i`` of A ↔ feature ``perm[i]`` of B; ``-1`` where unmatched."""
    cost: Tensor
    """Float64 tensor, shape (F_A,): per-pair cost under :attr:`MatchConfig.metric` (MSE: mean squared
    difference over the concatenated vector; cosine: ``1 − cos``), ``nan`` where unmatched."""
    total_cost: float
    """Sum of :attr:`cost` over matched pairs (float64)."""
    solver: str
    """Name of the solver that produced :attr:`perm`."""
    is_permutation: bool
    """True when no feature of B is used twice (a one-to-one, possibly partial, matching). Exact solvers
    and ``"identity"`` always give True; ``"greedy"`` usually False."""
    shape: tuple[int, int]
    """``(F_A, F_B)``."""
    timings: Mapping[str, float] = field(default_factory=dict)
    """Wall-clock seconds per stage: ``vectors`` (folding included), ``solve``, ``rescore``, ``total``."""
    config: MatchConfig = field(default_factory=MatchConfig)
    """The configuration that produced this result."""
    folded: tuple[bool, bool] = (False, False)
    """Whether A and B were folded (False for non-JumpReLU SAEs or ``fold=False``)."""
    info: Mapping[str, float] = field(default_factory=dict)
    """Solver diagnostics: for the ``"sparse"`` solver ``gap_bound`` (how far :attr:`total_cost` may
    exceed the optimum, in its units; 0 = proven optimal), ``objective`` (the maximised inner
    product), ``rounds`` and ``n_candidates``; for ``"greedy"`` ``n_collisions``."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Unique id of the run that produced this result."""
    created_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    """Creation time, milliseconds since the epoch."""

    def __post_init__(self) -> None:
        f_a, f_b = (int(s) for s in self.shape)
        object.__setattr__(self, "shape", (f_a, f_b))
        if not isinstance(self.perm, Tensor) or self.perm.dtype != torch.long or self.perm.shape != (f_a,):
            raise ValueError(
                f"MatchResult.perm: expected a LongTensor of shape ({f_a},), got {_describe(self.perm)}"
            )
        if not isinstance(self.cost, Tensor) or self.cost.dtype != torch.float64 or self.cost.shape != (f_a,):
            raise ValueError(
                f"MatchResult.cost: expected a float64 tensor of shape ({f_a},), got {_describe(self.cost)}"
            )
        if f_a and (int(self.perm.min()) < -1 or int(self.perm.max()) >= f_b):
            raise ValueError(f"MatchResult.perm: expected entries in [-1, {f_b}), got values outside")
        object.__setattr__(self, "timings", {str(k): float(v) for k, v in self.timings.items()})
        object.__setattr__(self, "info", {str(k): float(v) for k, v in self.info.items()})
        object.__setattr__(self, "folded", (bool(self.folded[0]), bool(self.folded[1])))

    # ------------------------------------------------------------------ derived values
    @property
    def n_matched(self) -> int:
        """Number of features of A with a partner."""
        return int((self.perm >= 0).sum())

    @property
    def mean_cost(self) -> float:
        """Mean per-pair cost over matched pairs (``nan`` when nothing is matched)."""
        n = self.n_matched
        return self.total_cost / n if n else math.nan

    def metrics(self) -> dict[str, float]:
        """Flat ``str → float`` summary: costs, match count, timings (``time_*_s``) and solver
        diagnostics (``solver_*``), for tables and logs."""
        out = {
            "total_cost": float(self.total_cost),
            "mean_cost": float(self.mean_cost),
            "n_matched": float(self.n_matched),
        }
        out.update({f"time_{k}_s": v for k, v in self.timings.items()})
        out.update({f"solver_{k}": v for k, v in self.info.items()})
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self, *, git_commit: str | None = None) -> dict[str, Any]:
        """The result file's object (:mod:`saematch_core.result_file`): the header, ``config`` (the
        :class:`MatchConfig`) and ``data``, which holds ``solver``, ``shape``, ``is_permutation``,
        ``folded``, ``total_cost``, ``mean_cost``, ``n_matched``, ``timings``, ``info`` and ``pairs``,
        one ``{"a": i, "b": perm[i], "cost": cost[i]}`` per matched feature ``i`` (ascending)."""
        matched = (self.perm >= 0).nonzero().flatten().tolist()
        perm, cost = self.perm.tolist(), self.cost.tolist()
        data = {
            "solver": self.solver,
            "shape": list(self.shape),
            "is_permutation": self.is_permutation,
            "folded": list(self.folded),
            "total_cost": float(self.total_cost),
            "mean_cost": float(self.mean_cost),
            "n_matched": self.n_matched,
            "timings": dict(self.timings),
            "info": dict(self.info),
            "pairs": [{"a": i, "b": perm[i], "cost": cost[i]} for i in matched],
        }
        return result_document(
            kind=MATCH_RESULT_KIND,
            config=self.config.to_dict(),
            data=data,
            run_id=self.run_id,
            created_ms=self.created_ms,
            git_commit=git_commit,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "MatchResult") -> MatchResult:
        """Inverse of :meth:`to_dict`; also reads the version-1 layout (``metrics`` and ``details``
        at the top level). ``source`` names the file in error messages."""
        if data.get("kind") != MATCH_RESULT_KIND:
            raise ValueError(f"{source}: expected kind {MATCH_RESULT_KIND!r}, got {data.get('kind')!r}")
        version = data.get("schema_version")
        if version not in (1, MATCH_SCHEMA_VERSION):
            raise ValueError(
                f"{source}: expected schema_version 1 or {MATCH_SCHEMA_VERSION}, got {version!r}"
            )
        try:
            if version == 1:
                body = dict(data)
                body["total_cost"] = data["metrics"]["total_cost"]
                body["pairs"] = data.get("details", [])
            else:
                body = data["data"]
            f_a, f_b = (int(s) for s in body["shape"])
            perm = torch.full((f_a,), -1, dtype=torch.long)
            cost = torch.full((f_a,), math.nan, dtype=torch.float64)
            for rec in body.get("pairs", []):
                perm[int(rec["a"])] = int(rec["b"])
                cost[int(rec["a"])] = float(rec["cost"])
            return cls(
                perm=perm,
                cost=cost,
                total_cost=float(body["total_cost"]),
                solver=str(body["solver"]),
                is_permutation=bool(body["is_permutation"]),
                shape=(f_a, f_b),
                timings=body.get("timings", {}),
                config=MatchConfig.from_dict(data["config"]),
                folded=tuple(body.get("folded", (False, False))),  # type: ignore[arg-type]
                info=body.get("info", {}),
                run_id=str(data["run_id"]),
                created_ms=int(data["created_ms"]),
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{source}: malformed match result ({type(exc).__name__}: {exc})") from exc

    def to_json(self, path: str | os.PathLike[str], *, git_commit: str | None = None) -> Path:
        """Write :meth:`to_dict` as JSON, atomically (temp file + rename), one matched pair per
        line. Returns the path."""
        return write_result_file(path, self.to_dict(git_commit=git_commit))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> MatchResult:
        """Read a file written by :meth:`to_json` (either layout version)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such match-result file")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        result = cls.from_dict(data, source=str(path))
        body = data.get("data")
        pairs = body.get("pairs") if isinstance(body, dict) else data.get("details")  # layout 2 or 1
        return check_match_result(result, pairs=pairs, source=path)

    # ------------------------------------------------------------------ safetensors
    def save(self, path: str | os.PathLike[str], *, git_commit: str | None = None) -> Path:
        """Write ``perm`` and ``cost`` tensors plus the JSON layout (without ``pairs``) as metadata
        of one ``.safetensors`` file, atomically. Returns the path."""
        from safetensors.torch import save

        meta = self.to_dict(git_commit=git_commit)
        del meta["data"]["pairs"]
        blob = save(
            {"perm": self.perm.detach().cpu().contiguous(), "cost": self.cost.detach().cpu().contiguous()},
            metadata={"saematch": json.dumps(meta, allow_nan=False)},
        )
        return _atomic_write(Path(path), blob)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MatchResult:
        """Read a file written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such match-result file")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta_text = (fh.metadata() or {}).get("saematch")
                keys = set(fh.keys())
                if meta_text is None or not {"perm", "cost"} <= keys:
                    raise ValueError(
                        f"{path}: expected tensors 'perm', 'cost' and metadata 'saematch', "
                        f"got tensors {sorted(keys)}"
                    )
                perm, cost = fh.get_tensor("perm"), fh.get_tensor("cost")
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
        try:
            meta = json.loads(meta_text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: metadata 'saematch' is not valid JSON ({exc})") from exc
        base = cls.from_dict(meta, source=str(path))
        return check_match_result(replace(base, perm=perm, cost=cost), source=path)


def match(
    a: SAE,
    b: SAE,
    config: MatchConfig | None = None,
    *,
    scales: tuple[Tensor, Tensor] | None = None,
    **overrides: Any,
) -> MatchResult:
    """Match the features of SAE ``a`` to those of SAE ``b``.

    Parameters
    ----------
    a, b : SAE
        Same ``d_in``; widths ``F_A = a.d_sae`` and ``F_B = b.d_sae`` may differ.
    config : MatchConfig, optional
        Defaults to ``MatchConfig()`` (folded W_enc + W_dec + b_enc, MSE, exact certified sparse solver).
    scales : (Tensor (F_A,), Tensor (F_B,)), optional
        Per-feature activation scales ``(s_a, s_b)`` for *scaled matching*, a folding analogue for SAEs
        of any family: each feature's vector is built from the raw weights as ``W_enc[:, i] / s_i``,
        ``W_dec[i] · s_i``, ``b_enc[i] / s_i`` (:func:`saematch_core.cost.feature_vectors`), and the
        per-pair costs are on those vectors. Folding a JumpReLU SAE is the case ``s = θ``, so the
        configuration must have ``fold=False``. The scales are data, not configuration: the result's
        ``config`` does not record them.
    **overrides
        Fields of :class:`MatchConfig` to replace, e.g. ``match(a, b, solver="greedy")``.

    Returns
    -------
    MatchResult
        ``perm`` (F_A,) maps A's features to B's; see :class:`MatchResult` for unequal widths. For the
        ``"sparse"`` solver, ``info["gap_bound"]`` bounds how far ``total_cost`` may exceed the optimum
        (in the same units; 0 = proven optimal).

    Notes
    -----
    The exact solvers minimise ``Σ_i cost(a_i, b_P(i))`` over one-to-one assignments covering the smaller
    side. For MSE on equal widths this equals maximising ``Σ ⟨a_i, b_P(i)⟩``; for unequal widths the
    norms of the larger side's chosen features matter, and the solver adds them to the inner product
    (one extra coordinate, in float64) so the optimum is still the minimum-MSE assignment.

    Examples
    --------
    >>> import torch
    >>> from saematch_core.sae import SAE
    >>> g = torch.Generator().manual_seed(0)
    >>> a = SAE(W_enc=torch.randn(4, 6, generator=g), b_enc=torch.zeros(6),
    ...         W_dec=torch.randn(6, 4, generator=g), b_dec=torch.zeros(4), threshold=torch.full((6,), 0.5))
    >>> perm = torch.tensor([2, 0, 1, 5, 3, 4])
    >>> match(a, a.permute(perm)).perm[perm].tolist()
    [0, 1, 2, 3, 4, 5]
    """
    t_start = time.perf_counter()
    if config is None:
        config = MatchConfig()
    elif not isinstance(config, MatchConfig):
        raise TypeError(f"config: expected a MatchConfig or None, got {type(config).__name__}")
    if overrides:
        known = {f.name for f in fields(MatchConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"match: unknown MatchConfig fields {unknown}; expected a subset of {sorted(known)}"
            )
        config = replace(config, **overrides)
    check_pair(a, b)
    if scales is not None:
        if not isinstance(scales, (tuple, list)) or len(scales) != 2:
            raise TypeError(f"scales: expected a pair (s_a, s_b) of tensors, got {type(scales).__name__}")
        if config.fold:
            raise ValueError(
                "scales: scaled matching replaces folding (folding is scales = θ); pass fold=False too"
            )
    scale_a, scale_b = (None, None) if scales is None else scales
    device = resolve_device(config.device, fallback=a.device)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    folded = (config.fold and a.activation == "jumprelu", config.fold and b.activation == "jumprelu")
    if config.fold and not all(folded):
        logger.info(
            "fold=True but folding is JumpReLU-only: a=%s, b=%s; non-JumpReLU SAEs are matched unfolded",
            a.activation,
            b.activation,
        )

    def vectors(dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        return (
            feature_vectors(a, config.params, fold=folded[0], scale=scale_a, device=device, dtype=dtype),
            feature_vectors(b, config.params, fold=folded[1], scale=scale_b, device=device, dtype=dtype),
        )

    a_vecs, b_vecs = vectors(config.torch_dtype)
    timings["vectors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x, y = a_vecs, b_vecs
    if config.metric == "cosine":
        x, y = normalize_rows(x, name="a"), normalize_rows(y, name="b")
    assignment = solve(
        config.solver,
        x,
        y,
        metric=config.metric,
        chunk_size=config.chunk_size,
        k=config.sparse_k,
        candidates=config.sparse_candidates,
        tol=config.tol,
    )
    timings["solve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if config.torch_dtype in (torch.float16, torch.bfloat16):
        # Rescore from the parameters in their own precision, not the half-precision search copies.
        a_vecs, b_vecs = vectors(None)
    perm = torch.as_tensor(assignment.cols, dtype=torch.long)
    cost = pair_costs(a_vecs, b_vecs, perm, metric=config.metric)
    matched = perm >= 0
    total = float(cost[matched].sum()) if bool(matched.any()) else 0.0
    timings["rescore"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    used = perm[matched]
    is_perm = bool(torch.unique(used).numel() == used.numel())
    return MatchResult(
        perm=perm,
        cost=cost,
        total_cost=total,
        solver=config.solver,
        is_permutation=is_perm,
        shape=(a.d_sae, b.d_sae),
        timings=timings,
        config=config,
        folded=folded,
        info=_cost_units(assignment.info, config.metric, x.shape[1]),
    )


def _cost_units(info: Mapping[str, float], metric: Metric, width: int) -> dict[str, float]:
    """The solver's ``gap_bound`` (inner-product units) in units of :attr:`MatchResult.total_cost`:
    the summed MSE is ``const − (2 / D) Σ ⟨a_i, b_P(i)⟩`` (the rectangular norm term included), the
    summed cosine distance ``const − Σ ⟨â_i, b̂_P(i)⟩``."""
    out = dict(info)
    if "gap_bound" in out and metric == "mse":
        out["gap_bound"] *= 2.0 / max(width, 1)
    return out


# ---------------------------------------------------------------------- helpers
def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _atomic_write(path: Path, data: bytes) -> Path:
    atomic_write_bytes(path, data)
    return path
