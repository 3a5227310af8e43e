"""Figure builders: titles and units are required, inputs are checked, HTML is offline."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest

from saematch_core.plots import (
    dose_response,
    grouped_bars,
    heatmap,
    histogram,
    line_per_layer,
    lines_by_group,
    matcher_scores,
    path_explorer,
    scatter,
    table_html,
    to_html,
)


def test_line_per_layer_one_trace_per_series_with_axis_titles() -> None:
    fig = line_per_layer(
        [0, 1, 2],
        {"a": [1.0, 2.0, 3.0], "b": [3.0, float("nan"), 1.0]},
        title="t",
        x_title="layer",
        y_title="MSE",
    )
    assert [t.name for t in fig.data] == ["a", "b"]
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text == "MSE"
    np.testing.assert_array_equal(np.asarray(fig.data[1].y), [3.0, np.nan, 1.0])
    log = line_per_layer([0], {"a": [1.0]}, title="t", x_title="x", y_title="y", log_y=True)
    assert log.layout.yaxis.type == "log"


def test_builders_reject_missing_titles_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="y_title: expected a non-empty axis title"):
        line_per_layer([0, 1], {"a": [1, 2]}, title="t", x_title="layer", y_title=" ")
    with pytest.raises(ValueError, match=r"series\['a'\]: expected length 2 \(like x\), got 3"):
        line_per_layer([0, 1], {"a": [1, 2, 3]}, title="t", x_title="x", y_title="y")
    with pytest.raises(ValueError, match="series: expected at least one"):
        line_per_layer([0, 1], {}, title="t", x_title="x", y_title="y")
    with pytest.raises(ValueError, match="labels: expected 2 labels"):
        scatter([0, 1], [1, 2], title="t", x_title="x", y_title="y", labels=["one"])
    with pytest.raises(ValueError, match=r"z: expected a 2-D array"):
        heatmap([1, 2, 3], title="t", x_title="x", y_title="y")
    with pytest.raises(ValueError, match="x: expected 3 labels"):
        heatmap(np.zeros((2, 3)), title="t", x_title="x", y_title="y", x=[1, 2])


def test_histogram_shares_bins_and_drops_non_finite_values() -> None:
    fig = histogram(
        {"same": [0.1, 0.2, float("inf")], "different": [0.5, 1.0]}, title="t", x_title="MSE", nbins=9
    )
    assert len(fig.data) == 2
    assert fig.data[0].xbins.start == fig.data[1].xbins.start == pytest.approx(0.1)
    assert fig.data[0].xbins.size == fig.data[1].xbins.size == pytest.approx(0.1)
    assert len(np.asarray(fig.data[0].x)) == 2
    logged = histogram({"a": [0.01, 1.0, 100.0]}, title="t", x_title="MSE", log_x=True)
    np.testing.assert_allclose(np.asarray(logged.data[0].x), [-2, 0, 2])
    assert list(logged.layout.xaxis.ticktext) == ["1e-2", "1e-1", "1e0", "1e1", "1e2"]
    with pytest.raises(ValueError, match=r"groups\['a'\]: log_x needs every value > 0"):
        histogram({"a": [0.0, 1.0]}, title="t", x_title="MSE", log_x=True)


def test_path_explorer_dropdown_shows_one_path_at_a_time() -> None:
    fig = path_explorer(
        [0, 1, 2],
        {"f 3": [3, 7, 1], "f 5": [5, 2, 9]},
        {"f 3": [math.nan, 0.1, 0.2], "f 5": [math.nan, 0.3, 0.4]},
        title="paths",
    )
    assert len(fig.data) == 2
    np.testing.assert_array_equal(np.asarray(fig.data[1].customdata), [5, 2, 9])
    (menu,) = fig.layout.updatemenus
    labels = [b.label for b in menu.buttons]
    assert labels == ["all paths", "f 3", "f 5"]
    assert menu.buttons[2].args[0]["visible"] == [False, True]
    assert menu.buttons[0].args[0]["visible"] == [True, True]
    assert "feature %{customdata}" in fig.data[0].hovertemplate
    with pytest.raises(ValueError, match="costs: expected the same path names"):
        path_explorer([0, 1], {"a": [0, 1]}, {"b": [0.0, 1.0]}, title="t")
    with pytest.raises(ValueError, match=r"features\['a'\]: expected an integer array"):
        path_explorer([0, 1], {"a": [0.5, 1.0]}, {"a": [0.0, 1.0]}, title="t")


def test_to_html_is_a_fragment_without_plotly_js_or_cdn() -> None:
    fig = line_per_layer([0, 1], {"a": [1, 2]}, title="t", x_title="x", y_title="y")
    fragment = to_html(fig)
    assert "Plotly.newPlot(" in fragment
    assert "<html" not in fragment.lower()
    assert "cdn.plot.ly" not in fragment and "<script src" not in fragment
    assert len(fragment) < 50_000, "plotly.js must not be embedded"
    assert '"displaylogo": false' in fragment.replace('"displaylogo":false', '"displaylogo": false')
    with pytest.raises(TypeError, match=r"fig: expected a plotly\.graph_objects\.Figure"):
        to_html({"data": []})  # type: ignore[arg-type]  # the wrong type is the point


def test_table_html_escapes_and_checks_row_lengths() -> None:
    out = table_html(["name", "value"], [("<b>", 1), ("x", 2.5)])
    assert "<td>&lt;b&gt;</td>" in out and "<td>2.5</td>" in out and out.count("<tr>") == 3
    with pytest.raises(ValueError, match=r"rows\[1\]: expected 2 values"):
        table_html(["a", "b"], [(1, 2), (3,)])


def test_heatmap_and_scatter_carry_their_data() -> None:
    hm = heatmap(
        np.arange(6).reshape(2, 3), title="t", x_title="target layer", y_title="start layer", x=[1, 2, 3]
    )
    assert isinstance(hm.data[0], go.Heatmap) and list(hm.data[0].x) == [1, 2, 3]
    sc = scatter([1, 2], [3, 4], title="t", x_title="x", y_title="y", labels=["p", "q"])
    assert list(sc.data[0].text) == ["p", "q"]


def test_line_per_layer_error_bars_belong_to_a_series() -> None:
    fig = line_per_layer(
        [0, 1],
        {"a": [1.0, 2.0], "b": [2.0, 3.0]},
        title="t",
        x_title="x",
        y_title="y",
        errors={"b": [0.1, 0.2]},
    )
    assert fig.data[0].error_y.array is None
    np.testing.assert_allclose(np.asarray(fig.data[1].error_y.array), [0.1, 0.2])
    with pytest.raises(ValueError, match=r"errors: names \['c'\] are not series"):
        line_per_layer([0, 1], {"a": [1, 2]}, title="t", x_title="x", y_title="y", errors={"c": [0, 0]})


def test_lines_by_group_dropdown_switches_whole_groups() -> None:
    fig = lines_by_group(
        [0, 1, 2],
        {"code": {"matched": [1, 2, 3], "drop": [3, 3, 3]}, "prose": {"matched": [0, 1, 1]}},
        title="ΔL",
        x_title="layer",
        y_title="ΔL (nats/token)",
    )
    assert [t.visible for t in fig.data] == [True, True, False]
    (menu,) = fig.layout.updatemenus
    assert [b.label for b in menu.buttons] == ["code", "prose"]
    assert menu.buttons[1].args[0]["visible"] == [False, False, True]
    assert fig.layout.title.text == "ΔL: code"
    with pytest.raises(ValueError, match=r"groups\['prose'\]\['m'\]: expected length 3"):
        lines_by_group([0, 1, 2], {"prose": {"m": [0, 1]}}, title="t", x_title="x", y_title="y")
    with pytest.raises(ValueError, match="groups: expected at least one"):
        lines_by_group([0], {}, title="t", x_title="x", y_title="y")


def test_grouped_bars_one_trace_per_series_with_a_reference_line() -> None:
    fig = grouped_bars(
        ["a", "b"],
        {"float32": [1.5, 2.0], "bfloat16": [0.7, math.nan]},
        title="t",
        x_title="instance",
        y_title="ratio",
        log_y=True,
        reference=(1.5, "target"),
    )
    assert [tr.name for tr in fig.data] == ["float32", "bfloat16"]
    assert list(fig.data[0].x) == ["a", "b"] and fig.data[0].y[1] == 2.0
    assert fig.layout.barmode == "group" and fig.layout.yaxis.type == "log"
    assert fig.layout.shapes[0].y0 == 1.5
    with pytest.raises(ValueError, match=r"series\['x'\]: expected length 2"):
        grouped_bars(["a", "b"], {"x": [1.0]}, title="t", x_title="i", y_title="r")
    with pytest.raises(ValueError, match="at least one named series"):
        grouped_bars(["a"], {}, title="t", x_title="i", y_title="r")


def test_matcher_scores_names_each_line_with_its_mean_and_wins() -> None:
    fig = matcher_scores(
        [0, 1],
        {"SAE Match": [0.2, 0.4], "greedy": [0.5, 0.3]},
        wins={"SAE Match": 1, "greedy": 1},
        null=[0.05, 0.05],
        title="t",
        x_title="layer pair (t → t+1)",
        y_title="Matching Score",
    )
    assert [t.name for t in fig.data] == [
        "SAE Match (mean 0.300, best at 1/2)",
        "greedy (mean 0.400, best at 1/2)",
        "random partners (mean 0.050)",
    ]
    assert fig.data[2].line.dash == "dash"
    np.testing.assert_array_equal(np.asarray(fig.data[0].y), [0.2, 0.4])
    with pytest.raises(ValueError, match=r"wins: expected one count per matcher"):
        matcher_scores([0], {"a": [1.0]}, wins={}, title="t", x_title="x", y_title="y")
    with pytest.raises(ValueError, match=r"scores\['a'\]: expected length 2"):
        matcher_scores([0, 1], {"a": [1.0]}, wins={"a": 0}, title="t", x_title="x", y_title="y")


def test_dose_response_draws_predictions_dashed_on_a_log_axis() -> None:
    fig = dose_response(
        [1e3, 1e4, 1e5],
        {"measured": [0.1, 0.2, 0.3]},
        lines={"measured": (-0.2, 0.1), "undefined": (float("nan"), 0.1)},
        extend_to=1e9,
        title="t",
        x_title="tokens",
        y_title="EV",
    )
    assert fig.layout.xaxis.type == "log"
    names = [t.name for t in fig.data]
    assert names == ["measured", "PREDICTION: measured"]
    line = fig.data[1]
    assert line.line.dash == "dash" and max(line.x) == pytest.approx(1e9)
    assert line.y[-1] == pytest.approx(-0.2 + 0.1 * 9)
    with pytest.raises(ValueError, match="x: expected doses > 0"):
        dose_response([0, 1], {"a": [1, 2]}, title="t", x_title="x", y_title="y")
    with pytest.raises(ValueError, match="extend_to: expected >= the smallest dose"):
        dose_response([10, 100], {"a": [1, 2]}, extend_to=1, title="t", x_title="x", y_title="y")
