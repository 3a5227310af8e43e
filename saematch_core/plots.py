"""Plotly figure builders for the notebooks and the book (the only module that imports plotly).

Every builder takes plain arrays, returns a :class:`plotly.graph_objects.Figure` with both axis
titles set (units belong in the title, e.g. ``"MSE (folded units²)"``) and computes nothing beyond
laying out what it is given. :func:`to_html` / :func:`show` render a figure as an HTML fragment that
does **not** embed or fetch plotly.js: the book loads one local copy of ``plotly.min.js`` on every
page (``_config.yml``, ``html_js_files``), because myst-nb drops plotly's own MIME output and the
CDN default would break the offline build.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from numpy.typing import ArrayLike

__all__ = [
    "PLOTLY_CONFIG",
    "dose_response",
    "grouped_bars",
    "heatmap",
    "histogram",
    "line_per_layer",
    "lines_by_group",
    "matcher_scores",
    "path_explorer",
    "scatter",
    "show",
    "show_table",
    "standalone_html",
    "table_html",
    "to_html",
]

PLOTLY_CONFIG: Mapping[str, Any] = {"displaylogo": False, "responsive": True}
"""The plotly.js ``config`` every figure of the book is rendered with (no links to plotly's servers)."""

_TEMPLATE = "plotly_white"


def _check_title(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: expected a non-empty axis title (with units), got {value!r}")


def _as_1d(name: str, values: ArrayLike, length: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name}: expected length {length} (like x), got {arr.shape[0]}")
    return arr


def _layout(fig: go.Figure, *, title: str, x_title: str, y_title: str) -> go.Figure:
    _check_title("x_title", x_title)
    _check_title("y_title", y_title)
    fig.update_layout(
        template=_TEMPLATE,
        title={"text": title},
        xaxis_title={"text": x_title},
        yaxis_title={"text": y_title},
        # Below the plot: above it, a legend of several entries collides with the title in the
        # book's narrow article column.
        legend={"orientation": "h", "yanchor": "top", "y": -0.22, "xanchor": "left", "x": 0.0},
        margin={"l": 60, "r": 20, "t": 60, "b": 40},
        hovermode="closest",
    )
    return fig


def line_per_layer(
    x: ArrayLike,
    series: Mapping[str, ArrayLike],
    *,
    title: str,
    x_title: str,
    y_title: str,
    log_y: bool = False,
    errors: Mapping[str, ArrayLike] | None = None,
) -> go.Figure:
    """One line per series over layers (or layer pairs), e.g. matching MSE three ways.

    Parameters
    ----------
    x : array, shape (n,)
        Layer index (or any numeric position) of each point.
    series : mapping name → array of shape (n,)
        One trace per entry, in mapping order. NaN values leave a gap.
    title, x_title, y_title : str
        Figure and axis titles; axis titles must be non-empty and should carry units.
    log_y : bool
        Logarithmic y axis (values must then be > 0).
    errors : mapping name → array of shape (n,), optional
        Symmetric error bars (e.g. a 95% interval half-width) for the series of the same name.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    fig = go.Figure(_line_traces("series", x, series, errors))
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, title=title, x_title=x_title, y_title=y_title)


def matcher_scores(
    x: ArrayLike,
    scores: Mapping[str, ArrayLike],
    *,
    wins: Mapping[str, int],
    null: ArrayLike | None = None,
    title: str,
    x_title: str,
    y_title: str,
) -> go.Figure:
    """Several matchers' score per layer pair, each named with its mean and the pairs it wins.

    Parameters
    ----------
    x : array, shape (n,)
        First layer of each pair.
    scores : mapping matcher label → array of shape (n,)
        One line per matcher, in mapping order.
    wins : mapping matcher label → int
        Pairs at which the matcher scores highest, shown in its legend entry; one per matcher.
    null : array of shape (n,), optional
        A reference every matcher should beat (e.g. random partners), drawn dashed and grey.
    title, x_title, y_title : str
        Figure and axis titles; axis titles must be non-empty and should carry units.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    if set(wins) != set(scores):
        raise ValueError(f"wins: expected one count per matcher {sorted(scores)}, got {sorted(wins)}")
    n = len(_as_1d("x", x))
    named = {
        f"{name} (mean {np.nanmean(_as_1d(f'scores[{name!r}]', v, n)):.3f}, best at {wins[name]}/{n})": v
        for name, v in scores.items()
    }
    traces = _line_traces("scores", x, named, None)
    if null is not None:
        ys = _as_1d("null", null, n)
        traces.append(
            go.Scatter(
                x=_as_1d("x", x),
                y=ys,
                mode="lines",
                name=f"random partners (mean {np.nanmean(ys):.3f})",
                line={"dash": "dash", "color": "grey"},
            )
        )
    return _layout(go.Figure(traces), title=title, x_title=x_title, y_title=y_title)


def _line_traces(
    what: str, x: ArrayLike, series: Mapping[str, ArrayLike], errors: Mapping[str, ArrayLike] | None
) -> list[go.Scatter]:
    xs = _as_1d("x", x)
    if not series:
        raise ValueError(f"{what}: expected at least one named series, got none")
    errors = errors or {}
    unknown = sorted(set(errors) - set(series))
    if unknown:
        raise ValueError(f"errors: names {unknown} are not series of {what} ({sorted(series)})")
    traces = []
    for name, values in series.items():
        ys = _as_1d(f"{what}[{name!r}]", values, len(xs))
        err = None
        if name in errors:
            err = {
                "type": "data",
                "array": _as_1d(f"errors[{name!r}]", errors[name], len(xs)),
                "visible": True,
            }
        traces.append(go.Scatter(x=xs, y=ys, mode="lines+markers", name=str(name), error_y=err))
    return traces


def lines_by_group(
    x: ArrayLike,
    groups: Mapping[str, Mapping[str, ArrayLike]],
    *,
    title: str,
    x_title: str,
    y_title: str,
    log_y: bool = False,
) -> go.Figure:
    """:func:`line_per_layer` for several groups (e.g. corpora), one group shown at a time via a dropdown.

    Parameters
    ----------
    x : array, shape (n,)
    groups : mapping group name → (mapping series name → array of shape (n,))
        The first group is shown initially; series may differ between groups.
    """
    if not groups:
        raise ValueError("groups: expected at least one named group, got none")
    fig = go.Figure()
    owner: list[int] = []
    for g, (group, series) in enumerate(groups.items()):
        for trace in _line_traces(f"groups[{group!r}]", x, series, None):
            trace.visible = g == 0
            trace.legendgroup = str(group)
            fig.add_trace(trace)
            owner.append(g)
    buttons = [
        {
            "label": str(group),
            "method": "update",
            "args": [{"visible": [o == g for o in owner]}, {"title.text": f"{title}: {group}"}],
        }
        for g, group in enumerate(groups)
    ]
    first = next(iter(groups))
    fig.update_layout(
        updatemenus=[
            {"type": "dropdown", "buttons": buttons, "x": 0.0, "xanchor": "left", "y": 1.18, "yanchor": "top"}
        ]
    )
    if log_y:
        fig.update_yaxes(type="log")
    fig = _layout(fig, title=f"{title}: {first}", x_title=x_title, y_title=y_title)
    fig.update_layout(margin={"t": 110})
    return fig


def dose_response(
    x: ArrayLike,
    series: Mapping[str, ArrayLike],
    *,
    title: str,
    x_title: str,
    y_title: str,
    lines: Mapping[str, tuple[float, float]] | None = None,
    extend_to: float | None = None,
    errors: Mapping[str, ArrayLike] | None = None,
) -> go.Figure:
    """Measured series against a dose on a log x axis, with straight lines in log(dose) extended
    beyond the data and labelled as predictions.

    Parameters
    ----------
    x : array, shape (n,)
        The doses (> 0), e.g. training tokens per SAE.
    series : mapping name → array of shape (n,)
        Measured values, one trace each (lines and markers).
    lines : mapping name → (intercept, slope), optional
        ``value = intercept + slope · log10(dose)``, drawn dashed from the smallest dose to
        ``extend_to`` and named "PREDICTION: <name>" in the legend; a line with a non-finite
        coefficient is left out.
    extend_to : float, optional
        Where the lines end (default: the largest dose).
    errors : mapping name → array of shape (n,), optional
        Symmetric error bars for the series of the same name.
    """
    xs = _as_1d("x", x)
    if not (xs > 0).all():
        raise ValueError(f"x: expected doses > 0 for a log axis, got {xs.tolist()}")
    fig = go.Figure(_line_traces("series", xs, series, errors))
    end = float(xs.max()) if extend_to is None else float(extend_to)
    if not end >= xs.min():
        raise ValueError(f"extend_to: expected >= the smallest dose {xs.min():g}, got {extend_to!r}")
    grid = np.logspace(math.log10(xs.min()), math.log10(end), 50)
    for name, (intercept, slope) in (lines or {}).items():
        if not (math.isfinite(intercept) and math.isfinite(slope)):
            continue
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=intercept + slope * np.log10(grid),
                mode="lines",
                line={"dash": "dash"},
                name=f"PREDICTION: {name}",
            )
        )
    if extend_to is not None and end > xs.max():
        fig.add_vrect(x0=float(xs.max()), x1=end, fillcolor="grey", opacity=0.08, line_width=0)
    fig.update_xaxes(type="log")
    return _layout(fig, title=title, x_title=x_title, y_title=y_title)


def grouped_bars(
    categories: Sequence[str],
    series: Mapping[str, ArrayLike],
    *,
    title: str,
    x_title: str,
    y_title: str,
    log_y: bool = False,
    reference: tuple[float, str] | None = None,
) -> go.Figure:
    """One group of bars per category, one bar (and legend entry) per series; NaN leaves a gap.

    Parameters
    ----------
    categories : sequence of n str
    series : mapping series name → array of shape (n,)
    reference : (y, label), optional
        A dashed horizontal line, e.g. a target.
    """
    if not series:
        raise ValueError("series: expected at least one named series, got none")
    cats = [str(c) for c in categories]
    fig = go.Figure()
    for name, values in series.items():
        ys = _as_1d(f"series[{name!r}]", values, len(cats))
        fig.add_trace(go.Bar(x=cats, y=ys, name=str(name)))
    fig.update_layout(barmode="group")
    if reference is not None:
        y, label = reference
        fig.add_hline(y=y, line_dash="dash", line_color="gray", annotation_text=label)
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, title=title, x_title=x_title, y_title=y_title)


def scatter(
    x: ArrayLike,
    y: ArrayLike,
    *,
    title: str,
    x_title: str,
    y_title: str,
    labels: Sequence[str] | None = None,
    name: str = "",
) -> go.Figure:
    """A scatter plot of ``y`` against ``x``; ``labels`` (one per point) appear on hover.

    Parameters
    ----------
    x, y : array, shape (n,)
    labels : sequence of n str, optional
    """
    xs = _as_1d("x", x)
    ys = _as_1d("y", y, len(xs))
    if labels is not None and len(labels) != len(xs):
        raise ValueError(f"labels: expected {len(xs)} labels (one per point), got {len(labels)}")
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            name=name,
            text=None if labels is None else list(labels),
            hovertemplate="%{text}<br>x=%{x:.4g}<br>y=%{y:.4g}<extra></extra>"
            if labels is not None
            else None,
        )
    )
    return _layout(fig, title=title, x_title=x_title, y_title=y_title)


def histogram(
    groups: Mapping[str, ArrayLike],
    *,
    title: str,
    x_title: str,
    y_title: str = "number of features",
    nbins: int = 40,
    log_x: bool = False,
) -> go.Figure:
    """Overlaid histograms sharing one set of bins, e.g. per-pair matching MSE split by agreement.

    Parameters
    ----------
    groups : mapping name → array of shape (n_g,)
        One histogram per group; non-finite values are dropped.
    nbins : int
        Number of bins over the range of all groups together.
    log_x : bool
        Bin in log10 of the values (which must then be > 0); the axis shows the values.
    """
    if not groups:
        raise ValueError("groups: expected at least one named group, got none")
    if not isinstance(nbins, int) or nbins < 1:
        raise ValueError(f"nbins: expected an int >= 1, got {nbins!r}")
    data = {name: _as_1d(f"groups[{name!r}]", v) for name, v in groups.items()}
    data = {name: v[np.isfinite(v)] for name, v in data.items()}
    if log_x:
        for name, v in data.items():
            if bool((v <= 0).any()):
                raise ValueError(f"groups[{name!r}]: log_x needs every value > 0, got min {float(v.min())}")
        data = {name: np.log10(v) for name, v in data.items()}
    everything = np.concatenate([v for v in data.values()]) if data else np.zeros(0)
    lo, hi = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
    size = (hi - lo) / nbins if hi > lo else 1.0
    fig = go.Figure()
    for name, v in data.items():
        fig.add_trace(
            go.Histogram(
                x=v, name=str(name), opacity=0.6, xbins={"start": lo, "end": hi + size * 1e-9, "size": size}
            )
        )
    fig.update_layout(barmode="overlay")
    if log_x:
        ticks = np.arange(math.floor(lo), math.ceil(hi) + 1)
        fig.update_xaxes(tickvals=ticks, ticktext=[f"1e{int(t)}" for t in ticks])
    return _layout(fig, title=title, x_title=x_title, y_title=y_title)


def heatmap(
    z: ArrayLike,
    *,
    title: str,
    x_title: str,
    y_title: str,
    x: Sequence[float | int | str] | None = None,
    y: Sequence[float | int | str] | None = None,
    colorbar_title: str = "",
) -> go.Figure:
    """A heatmap of a matrix, e.g. agreement between composed and direct matching.

    Parameters
    ----------
    z : array, shape (n_y, n_x)
        Row ``i`` is drawn at ``y[i]``, column ``j`` at ``x[j]``.
    """
    zz = np.asarray(z, dtype=np.float64)
    if zz.ndim != 2:
        raise ValueError(f"z: expected a 2-D array (n_y, n_x), got shape {zz.shape}")
    if x is not None and len(x) != zz.shape[1]:
        raise ValueError(f"x: expected {zz.shape[1]} labels (columns of z), got {len(x)}")
    if y is not None and len(y) != zz.shape[0]:
        raise ValueError(f"y: expected {zz.shape[0]} labels (rows of z), got {len(y)}")
    fig = go.Figure(
        go.Heatmap(
            z=zz,
            x=None if x is None else list(x),
            y=None if y is None else list(y),
            colorscale="Viridis",
            colorbar={"title": {"text": colorbar_title}},
        )
    )
    return _layout(fig, title=title, x_title=x_title, y_title=y_title)


def path_explorer(
    layers: ArrayLike,
    features: Mapping[str, ArrayLike],
    costs: Mapping[str, ArrayLike],
    *,
    title: str,
    y_title: str = "matching cost of the step into this layer",
    x_title: str = "layer",
) -> go.Figure:
    """Interactive view of feature paths through a chain of layers, one path per start feature.

    A dropdown shows all paths or one; hovering a point shows which feature the path has reached
    at that layer and the cost of the step that led there.

    Parameters
    ----------
    layers : array, shape (n_layers,)
        Layer index of each step.
    features : mapping path name → int array, shape (n_layers,)
        Feature index the path occupies at each layer.
    costs : mapping path name → array, shape (n_layers,)
        Cost of the step into each layer (NaN for the start layer, which has no incoming step).
        Same keys as ``features``.
    """
    xs = _as_1d("layers", layers)
    if not features:
        raise ValueError("features: expected at least one path, got none")
    if set(features) != set(costs):
        raise ValueError(
            f"costs: expected the same path names as features, got {sorted(costs)} vs {sorted(features)}"
        )
    fig = go.Figure()
    names = list(features)
    for name in names:
        feats = np.asarray(features[name])
        if feats.shape != xs.shape or not np.issubdtype(feats.dtype, np.integer):
            raise ValueError(
                f"features[{name!r}]: expected an integer array of shape {xs.shape}, "
                f"got {feats.dtype} {feats.shape}"
            )
        ys = _as_1d(f"costs[{name!r}]", costs[name], len(xs))
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=str(name),
                customdata=feats,
                hovertemplate=f"{html.escape(str(name))}<br>layer %{{x}}: feature %{{customdata}}"
                "<br>cost %{y:.4g}<extra></extra>",
            )
        )
    n = len(names)
    buttons = [
        {"label": "all paths", "method": "update", "args": [{"visible": [True] * n}, {"title.text": title}]}
    ]
    for i, name in enumerate(names):
        visible = [j == i for j in range(n)]
        buttons.append(
            {
                "label": str(name),
                "method": "update",
                "args": [{"visible": visible}, {"title.text": f"{title}: {name}"}],
            }
        )
    fig.update_layout(
        updatemenus=[
            {"type": "dropdown", "buttons": buttons, "x": 0.0, "xanchor": "left", "y": 1.18, "yanchor": "top"}
        ]
    )
    fig = _layout(fig, title=title, x_title=x_title, y_title=y_title)
    fig.update_layout(margin={"t": 110})
    return fig


def to_html(fig: go.Figure) -> str:
    """An HTML fragment (a ``div`` and a script) drawing ``fig`` with an already loaded plotly.js.

    The fragment neither embeds plotly.js nor references a CDN: the page must load
    ``plotly.min.js`` itself (the book does, from its ``_static`` folder).
    """
    if not isinstance(fig, go.Figure):
        raise TypeError(f"fig: expected a plotly.graph_objects.Figure, got {type(fig).__name__}")
    return fig.to_html(
        include_plotlyjs=False, include_mathjax=False, full_html=False, config=dict(PLOTLY_CONFIG)
    )


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain HTML table (values escaped), for small result tables in the book.

    Parameters
    ----------
    headers : sequence of n_cols str
    rows : sequence of rows, each a sequence of n_cols values (rendered with ``str``)
    """
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"rows[{i}]: expected {len(headers)} values (one per header), got {len(row)}")
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="saematch-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table.saematch-table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
table.saematch-table th, table.saematch-table td {
  border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left;
}
table.saematch-table th { background: #f3f3f3; }
"""


def standalone_html(title: str, body: str) -> str:
    """A complete HTML page that works offline: plotly.js inline (from the installed plotly package,
    the same file the book serves), a small style sheet, then ``body`` (fragments of :func:`to_html`
    and :func:`table_html`, or any HTML). The page requests nothing from the network.
    """
    js = Path(go.__file__).parent.parent / "package_data" / "plotly.min.js"
    if not js.is_file():
        raise FileNotFoundError(f"{js}: plotly.min.js is missing from the installed plotly package")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_PAGE_STYLE}</style>\n"
        f"<script>{js.read_text(encoding='utf-8')}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _display_html(fragment: str) -> None:
    # IPython is present wherever notebooks run (ipykernel); imported here so that the library
    # itself never needs it.
    from IPython.display import HTML, display

    display(HTML(fragment))


def show(fig: go.Figure) -> None:
    """Display ``fig`` in a notebook as offline HTML (see :func:`to_html`)."""
    _display_html(to_html(fig))


def show_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Display a small table in a notebook (see :func:`table_html`)."""
    _display_html(table_html(headers, rows))
