"""MSE of matched folded parameters per layer pair and method (Figs. 3, 12)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _planted import D_SAE, planted

from saematch_core.experiments import parameter_mse
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.parameter_mse import ParameterMSEResult


def test_parameter_mse_planted_permutation(tmp_path) -> None:
    a, b, _ = planted()
    inputs = Inputs(saes={4: a, 5: b}, cache_dir=tmp_path, progress=False)
    res = parameter_mse.run(inputs)
    rows = rows_by = {r.method: r for r in res.rows}
    assert {r.layer_a for r in res.rows} == {4} and {r.layer_b for r in res.rows} == {5}
    assert rows["folded"].mse == pytest.approx(0.0, abs=1e-10)
    assert rows["decoder_only"].mse == pytest.approx(0.0, abs=1e-10)
    assert rows["vanilla"].mse > 0.1 and rows["vanilla"].identity_fraction == 1.0
    # folded all-parameter matching minimises exactly the evaluated MSE: no method can beat it
    assert all(r.mse >= rows["folded"].mse - 1e-12 for r in res.rows)
    assert rows["folded"].mse_W_enc == pytest.approx(0.0, abs=1e-10)
    # the planted pair is a pure permutation: matched folded decoder rows have the same length
    assert rows["folded"].dec_norm_diff == pytest.approx(0.0, abs=1e-6)  # float32 weights
    assert rows["greedy_cosine"].n_matched == D_SAE
    assert res.series("folded") == (rows["folded"].mse,)
    # cached: the second call reads the file
    again = parameter_mse.run(inputs)
    assert again == res
    assert ParameterMSEResult.from_dict(res.to_dict()) == res
    headers, rows = res.table(["folded", "greedy_cosine"])
    assert len(headers) == 4 and rows[0][:2] == ("folded", f"{rows_by['folded'].mse:.4g}")
    assert rows[0][3] is True and rows[1][0] == "greedy_cosine"


def test_decoder_norm_difference_follows_the_scale(tmp_path) -> None:
    a, _, _ = planted()
    assert a.threshold is not None
    # Layer B is A with twice the thresholds: in identity order every folded decoder row of B is
    # twice as long as its partner's, so the difference is A's own row length.
    b2 = replace(a, threshold=a.threshold * 2)
    res = parameter_mse.run(Inputs(saes={0: a, 1: b2}, cache_dir=tmp_path, progress=False))
    row = next(r for r in res.rows if r.method == "vanilla")
    norm_a = torch.linalg.vector_norm(a.W_dec * a.threshold[:, None], dim=1)
    assert row.dec_norm_diff == pytest.approx(float(norm_a.median()), rel=1e-6)  # float32 weights
