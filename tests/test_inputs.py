"""Inputs: what every experiment takes, checked where it is built."""

from __future__ import annotations

import pytest
import torch
from conftest import make_sae

from saematch_core.experiments.inputs import Inputs, TokenBatch


def test_layer_pairs_default_to_consecutive_layers() -> None:
    saes = {t: make_sae(4, 8, seed=t) for t in (3, 1, 2)}
    x = torch.randn(5, 4)
    inputs = Inputs(saes=saes, activations={1: x, 2: x})
    assert inputs.layer_pairs() == [(1, 2), (2, 3)]
    assert inputs.layer_pairs(data=True) == [(1, 2)]
    assert Inputs(saes=saes, pairs=[("3", 1)]).layer_pairs() == [(3, 1)]  # type: ignore[list-item]
    assert inputs.has_data(1, 2) and not inputs.has_data(2, 3)
    assert inputs.acts(1) is x
    with pytest.raises(ValueError, match=r"Inputs\.activations: expected activations of layer 3"):
        inputs.acts(3)


def test_replace_and_token_batches() -> None:
    inputs = Inputs(saes={0: make_sae(4, 8)})
    ids = torch.zeros(2, 3, dtype=torch.long)
    changed = inputs.replace(tokens=(ids, torch.ones(2, 3, dtype=torch.bool)), seed=3)
    assert isinstance(changed.tokens, TokenBatch) and changed.seed == 3 and inputs.tokens is None
    with pytest.raises(ValueError, match=r"Inputs\.model, Inputs\.tokens"):
        changed.require_model()


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"saes": [make_sae(4, 8)]}, TypeError, r"Inputs\.saes: expected a mapping"),
        ({"saes": {0: "sae"}}, TypeError, r"Inputs\.saes: expected SAE values"),
        ({"pairs": [(0,)]}, ValueError, r"Inputs\.pairs"),
        ({"chunk_size": 0}, ValueError, r"Inputs\.chunk_size"),
        ({"seed": 1.5}, TypeError, r"Inputs\.seed"),
        ({"tokens": "ids"}, TypeError, r"Inputs\.tokens"),
        ({"progress": 1}, TypeError, r"Inputs\.progress"),
    ],
)
def test_bad_fields_are_named(changes: dict[str, object], error: type[Exception], match: str) -> None:
    fields: dict[str, object] = {"saes": {0: make_sae(4, 8)}, **changes}
    with pytest.raises(error, match=match):
        Inputs(**fields)  # type: ignore[arg-type]
