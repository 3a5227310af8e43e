"""Folding (the paper's Eq. 4) is output-preserving and idempotent."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae

from saematch_core import SAEValidationError, fold, is_folded, rescale_features


def test_fold_preserves_reconstruction_and_scales_codes() -> None:
    sae = make_sae(dtype=torch.float64)
    assert sae.threshold is not None
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.d_sae, dtype=torch.float64))
    assert not is_folded(sae)
    original = {k: v.clone() for k, v in sae.tensors().items()}
    x = 3 * torch.randn(512, sae.d_in, dtype=torch.float64)
    folded = fold(sae)
    assert is_folded(folded)
    torch.testing.assert_close(folded(x).recon, sae(x).recon)
    torch.testing.assert_close(folded.encode(x), sae.encode(x) / sae.threshold)
    # the input SAE is untouched
    for name, value in sae.tensors().items():
        assert torch.equal(value, original[name])


def test_fold_is_exact_near_the_threshold() -> None:
    sae = make_sae(d_in=64, d_sae=16, dtype=torch.float64)  # d_in > d_sae: any pre-activation is reachable
    assert sae.threshold is not None
    folded = fold(sae)
    for rel in (1e-9, -1e-9):
        target = sae.threshold * (1 + rel) - sae.b_enc
        x = torch.linalg.lstsq(sae.W_enc.T, target[:, None]).solution.T
        pre = sae.pre_acts(x)
        torch.testing.assert_close(pre, (sae.threshold * (1 + rel))[None], rtol=1e-11, atol=0)
        assert torch.equal(pre > sae.threshold, folded.pre_acts(x) > 1)
        assert bool((pre > sae.threshold).all()) == (rel > 0)
        torch.testing.assert_close(folded(x).recon, sae(x).recon)


def test_fold_is_idempotent() -> None:
    once = fold(make_sae())
    twice = fold(once)
    for name, value in once.tensors().items():
        assert torch.equal(value, twice.tensors()[name]), name


def test_fold_rejects_non_jumprelu() -> None:
    with pytest.raises(SAEValidationError, match="folding is defined for JumpReLU"):
        fold(make_sae(activation="relu"))


def test_rescale_features_keeps_relu_output_and_rejects_topk() -> None:
    relu = make_sae(activation="relu", dtype=torch.float64)
    x = torch.randn(64, relu.d_in, dtype=torch.float64)
    scale = 0.1 + torch.rand(relu.d_sae, dtype=torch.float64)
    torch.testing.assert_close(rescale_features(relu, scale)(x).recon, relu(x).recon)
    with pytest.raises(SAEValidationError, match="TopK"):
        rescale_features(make_sae(activation="topk"), scale)
    with pytest.raises(SAEValidationError, match=r"scale: expected every entry finite and > 0"):
        rescale_features(relu, -scale)
