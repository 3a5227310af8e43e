"""The Matching Score of matchings per layer pair, with the random null (Figs. 4/7)."""

from __future__ import annotations

import pytest
from _planted import acts, planted

from saematch_core.experiments import matching_score
from saematch_core.experiments.inputs import Inputs
from saematch_core.experiments.matching_score import MatchingScoreConfig
from saematch_core.experiments.measures.scores import MatchingScoreResult, matching_scores
from saematch_core.match import MatchConfig


def test_planted_matching_scores_folded_one_vanilla_lower(tmp_path) -> None:
    a, b, truth = planted()
    x = acts()
    methods = {"folded": MatchConfig(), "vanilla": MatchConfig(solver="identity"), "truth": truth}
    inputs = Inputs(
        saes={4: a, 5: b, 6: a}, activations={4: x, 5: x, 6: x}, cache_dir=tmp_path, progress=False
    )
    res = matching_scores(inputs, (4, 5), methods, n_null=2)
    assert res.row("folded").matching_score == pytest.approx(1.0)
    assert res.row("truth").matching_score == pytest.approx(1.0)
    assert res.row("vanilla").matching_score < 0.8
    assert (res.layer_a, res.layer_b) == (4, 5)
    cached = MatchingScoreResult.from_json(next((tmp_path / "matching_score").glob("*.json")))
    assert cached == res
    by_layer = matching_score.run(inputs, MatchingScoreConfig(methods={"folded": MatchConfig()}, n_null=0))
    assert [(r.layer_a, r.layer_b) for r in by_layer.pairs] == [(4, 5), (5, 6)]
    assert by_layer.layers == [4, 5]
    assert by_layer.series("folded") == pytest.approx([1.0, 1.0])
    assert by_layer.mean("folded") == pytest.approx(1.0)
    assert by_layer.fraction_better("folded", "folded") == 0.0
    headers, rows = by_layer.dead_table("folded")
    assert headers[-1] == "pairs scored (folded)" and [r[0] for r in rows] == ["4→5", "5→6"]
    assert rows[0][3] == by_layer.pairs[0].row("folded").n_pairs
