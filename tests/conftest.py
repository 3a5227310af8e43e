"""Shared fixtures: seeded RNGs and tiny SAEs built in code."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from saematch_core.sae import SAE


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Results a test does not send to tmp_path itself land here, never in the user's cache, so no
    # test can pass or fail because of what an earlier run left behind.
    monkeypatch.setenv("SAEMATCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - seeds code that still uses the legacy global RNG
    torch.manual_seed(0)


def make_sae(d_in: int = 16, d_sae: int = 64, seed: int = 0, **overrides: Any) -> SAE:
    """A random JumpReLU SAE (unless ``activation`` is overridden) with non-trivial thresholds.

    Decoder rows are *not* unit norm and thresholds vary per feature, so folding cannot pass by
    doing nothing.
    """
    g = torch.Generator().manual_seed(seed)
    activation = overrides.pop("activation", "jumprelu")
    dtype = overrides.pop("dtype", torch.float32)
    params: dict[str, Any] = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": 0.1 * torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g) * (0.5 + torch.rand(d_sae, 1, generator=g)),
        "b_dec": 0.1 * torch.randn(d_in, generator=g),
    }
    if activation == "jumprelu":
        params["threshold"] = 0.05 + 0.5 * torch.rand(d_sae, generator=g)
    if activation == "topk":
        params["k"] = min(4, d_sae)
    params = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
    params.update(overrides)
    return SAE(activation=activation, **params)


@pytest.fixture
def sae() -> SAE:
    return make_sae()
