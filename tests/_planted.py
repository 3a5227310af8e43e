"""Planted SAE pairs and activations shared by the experiment tests."""

from __future__ import annotations

import torch
from conftest import make_sae

from saematch_core.fold import rescale_features
from saematch_core.sae import SAE

D_IN, D_SAE, N_TOK = 16, 48, 600


def acts(n: int = N_TOK, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, D_IN, generator=g)


def planted(seed: int = 0) -> tuple[SAE, SAE, torch.Tensor]:
    """SAE B is SAE A reordered by ``perm`` with every feature rescaled: folded weights agree exactly
    at the planted partner, unfolded ones do not."""
    a = make_sae(D_IN, D_SAE, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    perm = torch.randperm(D_SAE, generator=g)
    b = rescale_features(a.permute(perm), 0.2 + 5 * torch.rand(D_SAE, generator=g))
    return a, b, torch.argsort(perm)  # feature i of A is feature argsort(perm)[i] of B
