"""Planted SAE pairs for the comparison tools, and writers for every file format.

``planted_pair`` builds SAE B from SAE A: every feature of A survives into B as a noisy copy at a
random position, one feature of A is split (a second noisy copy, so two features of B share it), and
B has extra unrelated features. ``write_sae`` writes an SAE in any format, in the real layout each
loader reads (the writers of ``test_formats``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from conftest import make_sae
from test_formats import _write_gemma, _write_llama, _write_saelens, _write_sparsify

from saematch_core.formats import save_sae
from saematch_core.sae import SAE

FORMATS = ("native", "gemma_scope", "saelens", "sparsify", "llama_scope")


class Planted(NamedTuple):
    a: SAE
    b: SAE
    truth: torch.Tensor
    """(F_A,): feature ``i`` of A lives on as feature ``truth[i]`` of B."""
    split: tuple[int, tuple[int, int]]
    """``(i, (j1, j2))``: feature ``i`` of A is split into features ``j1`` and ``j2`` of B."""


def planted_pair(
    d_in: int = 16, f_a: int = 48, extra: int = 15, noise: float = 0.05, seed: int = 0, split: int = 5
) -> Planted:
    """A (F_A features) and B (F_A + 1 + extra features) as the module docstring says."""
    a = make_sae(d_in, f_a, seed=seed)
    other = make_sae(d_in, max(extra, 1), seed=seed + 100)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.cat([torch.arange(f_a), torch.tensor([split])])
    f_b = f_a + 1 + extra

    def jitter(t: torch.Tensor) -> torch.Tensor:
        return t * (1 + noise * torch.randn(t.shape, generator=g))

    W_enc = torch.cat([jitter(a.W_enc[:, idx]), other.W_enc[:, :extra]], dim=1)
    W_dec = torch.cat([jitter(a.W_dec[idx]), other.W_dec[:extra]])
    b_enc = torch.cat([a.b_enc[idx], other.b_enc[:extra]])
    assert a.threshold is not None and other.threshold is not None
    theta = torch.cat([a.threshold[idx], other.threshold[:extra]])
    b = SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=a.b_dec.clone(), threshold=theta)
    order = torch.randperm(f_b, generator=g)  # B's feature t is the built feature order[t]
    b = b.permute(order)
    where = torch.argsort(order)  # built feature → its position in B
    truth = where[:f_a]
    return Planted(a=a, b=b, truth=truth, split=(split, (int(where[split]), int(where[f_a]))))


def as_format(sae: SAE, fmt: str) -> SAE:
    """``sae`` as the format can hold it exactly (loading the written file gives this SAE back).

    sparsify holds TopK SAEs and llama_scope one scalar threshold; both shift the input by the
    decoder bias, so it is set to zero here.
    """
    if fmt == "sparsify":
        return SAE(W_enc=sae.W_enc, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=torch.zeros_like(sae.b_dec),
                   activation="topk", k=4)  # fmt: skip
    if fmt == "llama_scope":
        theta = torch.full_like(sae.b_enc, 0.2)
        return SAE(W_enc=sae.W_enc, b_enc=sae.b_enc, W_dec=sae.W_dec, b_dec=torch.zeros_like(sae.b_dec),
                   threshold=theta)  # fmt: skip
    return sae


def write_sae(sae: SAE, fmt: str, root: Path) -> Path:
    """Write ``as_format(sae, fmt)`` under ``root`` in format ``fmt``; returns the path to load."""
    s = as_format(sae, fmt)
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "native":
        return save_sae(s, root / "sae.safetensors")
    if fmt == "gemma_scope":
        _write_gemma(root, s)
        return root
    if fmt == "saelens":
        cfg = {"architecture": "jumprelu", "d_in": s.d_in, "d_sae": s.d_sae, "apply_b_dec_to_input": False}
        return _write_saelens(root, dict(s.tensors()), cfg)
    if fmt == "sparsify":
        t = {
            "encoder.weight": s.W_enc.T.contiguous(),
            "encoder.bias": s.b_enc,
            "W_dec": s.W_dec,
            "b_dec": s.b_dec,
        }
        return _write_sparsify(root / "layers.3", t, {"k": 4, "d_in": s.d_in})
    if fmt == "llama_scope":
        t = {
            "encoder.weight": s.W_enc.T.contiguous(),
            "encoder.bias": s.b_enc,
            "decoder.weight": s.W_dec.T.contiguous(),
            "decoder.bias": s.b_dec,
        }
        d = float(s.d_in) ** 0.5
        hp = {
            "jump_relu_threshold": 0.2,
            "sparsity_include_decoder_norm": False,
            "dataset_average_activation_norm": {"in": d, "out": d},
        }
        return _write_llama(root, t, hp)
    raise ValueError(f"fmt: unknown format {fmt!r}")
