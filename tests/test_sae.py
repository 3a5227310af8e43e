"""The SAE container: validation at construction and the forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae

from saematch_core import SAE, SAEValidationError
from saematch_core.sae import nonfinite_summary


def test_forward_matches_definition() -> None:
    sae = make_sae(dtype=torch.float64)
    x = torch.randn(32, sae.d_in, dtype=torch.float64)
    pre = x @ sae.W_enc + sae.b_enc
    assert sae.threshold is not None
    expected = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
    out = sae(x)
    torch.testing.assert_close(out.codes, expected)
    torch.testing.assert_close(out.recon, expected @ sae.W_dec + sae.b_dec)


def test_relu_and_topk() -> None:
    relu = make_sae(activation="relu")
    x = torch.randn(8, relu.d_in)
    torch.testing.assert_close(relu.encode(x), torch.relu(relu.pre_acts(x)))
    topk = make_sae(activation="topk", k=3)
    codes = topk.encode(x)
    assert int((codes != 0).sum(-1).max()) <= 3
    top = torch.topk(topk.pre_acts(x), 3, dim=-1)
    torch.testing.assert_close(codes.gather(-1, top.indices), torch.relu(top.values))


def test_scalar_threshold_is_broadcast() -> None:
    sae = make_sae(threshold=torch.tensor(0.25))
    assert sae.threshold is not None and sae.threshold.shape == (sae.d_sae,)
    assert bool((sae.threshold == 0.25).all())


def test_zero_threshold_feature_fires_whenever_its_pre_activation_is_positive() -> None:
    sae = make_sae(threshold=torch.full((64,), 0.3).index_fill(0, torch.tensor([5]), 0.0))
    x = torch.randn(256, sae.d_in)
    pre, codes = sae.pre_acts(x), sae.encode(x)
    torch.testing.assert_close(codes[:, 5], torch.relu(pre[:, 5]))
    assert bool(((pre[:, 5] > 0) & (pre[:, 5] <= 0.3)).any())  # would be cut by any θ of the others


def test_permute_keeps_reconstruction() -> None:
    sae = make_sae(dtype=torch.float64)
    perm = torch.randperm(sae.d_sae)
    x = torch.randn(16, sae.d_in, dtype=torch.float64)
    permuted = sae.permute(perm)
    torch.testing.assert_close(permuted(x).recon, sae(x).recon)
    torch.testing.assert_close(permuted.encode(x), sae.encode(x)[:, perm])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"W_enc": torch.randn(64, 16)}, r"W_enc: expected shape \(d_in, d_sae\).*transposed"),
        ({"b_enc": torch.zeros(63)}, r"b_enc: expected shape \(64,\)"),
        ({"b_dec": torch.zeros(15)}, r"b_dec: expected shape \(16,\)"),
        ({"W_dec": torch.zeros(64)}, r"W_dec: expected 2-D"),
        (
            {"threshold": torch.full((64,), 0.1).index_fill(0, torch.tensor([7]), -0.5)},
            r"threshold.*first at feature 7",
        ),
        ({"threshold": -torch.ones(())}, r"threshold: expected every entry >= 0"),
        ({"threshold": torch.ones(5)}, r"threshold: expected shape \(64,\)"),
        ({"threshold": None}, r"threshold: required"),
        (
            {"b_enc": torch.zeros(64).index_fill(0, torch.tensor([3]), float("nan"))},
            r"b_enc: 1 non-finite.*\(3,\)",
        ),
        (
            {"W_dec": torch.ones(64, 16).index_fill(1, torch.tensor([2]), float("inf"))},
            r"W_dec: 64 non-finite",
        ),
        ({"b_dec": torch.zeros(16, dtype=torch.float64)}, r"b_dec: expected dtype torch.float32"),
        ({"activation": "gelu"}, r"activation: expected one of"),
        ({"k": 3}, r"k: only valid for activation='topk'"),
    ],
)
def test_bad_input_names_the_field(override: dict, pattern: str) -> None:
    with pytest.raises(SAEValidationError, match=pattern):
        make_sae(**override)


def test_bad_types() -> None:
    with pytest.raises(TypeError, match=r"W_enc: expected a torch\.Tensor"):
        make_sae(W_enc=[[0.0]])
    with pytest.raises(TypeError, match="b_enc: expected a floating dtype"):
        make_sae(b_enc=torch.zeros(64, dtype=torch.long))
    with pytest.raises(SAEValidationError, match=r"k: expected an int in \[1, d_sae=64\]"):
        make_sae(activation="topk", k=0)


def test_bad_forward_input() -> None:
    sae = make_sae()
    with pytest.raises(SAEValidationError, match=r"x: expected shape \(\.\.\., 16\), got \(4, 15\)"):
        sae.encode(torch.zeros(4, 15))
    with pytest.raises(SAEValidationError, match=r"perm: expected a permutation of range\(64\)"):
        sae.permute(torch.zeros(64, dtype=torch.long))


def test_to_changes_dtype_and_keeps_values() -> None:
    sae = make_sae()
    half = sae.to(dtype=torch.float64)
    assert (
        half.dtype == torch.float64 and half.threshold is not None and half.threshold.dtype == torch.float64
    )
    torch.testing.assert_close(half.W_enc.float(), sae.W_enc)
    assert isinstance(half, SAE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_summary_fast_paths(dtype: torch.dtype) -> None:
    # finite entries whose sum overflows the dtype (and float32/float64 alike at their maximum)
    big = torch.full((4, 3), torch.finfo(dtype).max, dtype=dtype)
    assert nonfinite_summary(big) is None
    assert nonfinite_summary(torch.zeros(0, 3, dtype=dtype)) is None
    bad = big.clone()
    bad[2, 1] = float("nan")
    bad[3, 0] = -float("inf")
    assert nonfinite_summary(bad) == "2 non-finite (NaN/inf) entries, first at (2, 1)"
    assert nonfinite_summary(torch.ones(3, dtype=torch.int64)) is None
