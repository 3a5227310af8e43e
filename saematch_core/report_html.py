"""The HTML page of a :class:`~saematch_core.compare.CompareReport`: one self-contained offline file.

The figures are built by :mod:`saematch_core.plots` (the book's builders) and the page embeds
plotly.js inline (:func:`saematch_core.plots.standalone_html`), so it opens anywhere without a network.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import numpy as np

from saematch_core.cache import atomic_write_text
from saematch_core.compare import CompareReport, _pct

__all__ = ["MAX_POINTS", "report_html", "write_html_report"]

MAX_POINTS = 4000
"""Most pairs drawn in the scatter plot (evenly spaced over A's features beyond that)."""


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def report_html(report: CompareReport) -> str:
    """The report as a complete HTML page (summary, figures, matcher and family tables)."""
    from saematch_core import plots

    s = report.summary
    pairs = report.pairs
    rel = np.array([p.relative_cost for p in pairs], dtype=np.float64)
    margin = np.array([p.margin for p in pairs], dtype=np.float64)
    ok = np.array([p.matched for p in pairs], dtype=bool)
    a_name, b_name = html.escape(report.a.source or "A"), html.escape(report.b.source or "B")
    parts = [
        f"<h1>saematch compare: {a_name} vs {b_name}</h1>",
        "<p>" + "<br>".join(html.escape(line) for line in report.summary_lines()) + "</p>",
    ]
    summary_rows = [
        ("features of A / B", f"{s.n_a} / {s.n_b}"),
        ("matcher", s.matcher),
        ("pairs", s.n_pairs),
        (f"matched at FDR {s.alpha:g}", f"{s.n_matched} ({_pct(s.fraction_matched)})"),
        ("largest relative cost called matched", s.threshold),
        ("median best chance relative cost (null)", s.null_median),
        ("median cost", s.cost["median"]),
        ("median margin", s.median_margin),
        ("mutual best pairs", s.fraction_mutual),
        ("A features split in B / B features split in A", f"{s.n_split_a} / {s.n_split_b}"),
    ]
    if s.n_tokens:
        summary_rows += [
            ("tokens in the data check", s.n_tokens),
            (
                "P(partner active): matched / not matched / random",
                f"{_fmt(s.score_matched)} / {_fmt(s.score_unmatched)} / {_fmt(s.score_random)}",
            ),
            ("matched pairs above the random 95th percentile", s.confirmed_matched),
        ]
    parts.append("<h2>Summary</h2>")
    parts.append(plots.table_html(["", "value"], [(k, _fmt(v)) for k, v in summary_rows]))

    parts.append("<h2>Verdicts</h2>")
    null = np.array(report.null_sample, dtype=np.float64)
    groups = {"matched": rel[ok], "not matched": rel[~ok], "best chance partner (null)": null}
    parts.append(
        plots.to_html(
            plots.histogram(
                {k: v for k, v in groups.items() if v.size},
                title="Relative cost of the matched pairs against chance",
                x_title="relative cost (0 identical, 1 orthogonal)",
                y_title="number of pairs",
            )
        )
    )
    keep = np.arange(len(pairs))
    if keep.size > MAX_POINTS:
        keep = np.linspace(0, len(pairs) - 1, MAX_POINTS).round().astype(int)
    labels = [
        f"A {pairs[i].a} ↔ B {pairs[i].b}, {'matched' if pairs[i].matched else 'not matched'}" for i in keep
    ]
    if keep.size:
        parts.append(
            plots.to_html(
                plots.scatter(
                    rel[keep],
                    np.nan_to_num(margin[keep], nan=0.0),
                    title="Cost and margin to the second-best partner",
                    x_title="relative cost of the pair",
                    y_title="margin (relative cost)",
                    labels=labels,
                    name="pairs",
                )
            )
        )
    sim_ab = np.array([m.similarity for m in report.a_to_b], dtype=np.float64)
    sim_ba = np.array([m.similarity for m in report.b_to_a], dtype=np.float64)
    parts.append("<h2>Best matches both ways</h2>")
    parts.append(
        plots.to_html(
            plots.histogram(
                {"A → B": sim_ab, "B → A": sim_ba},
                title="Similarity of each feature's most similar feature on the other side",
                x_title="similarity (1 − relative cost)",
                y_title="number of features",
            )
        )
    )

    parts.append("<h2>Matchers</h2>")
    names = [m.name for m in s.matchers]
    series = {"agreement with " + s.matcher: np.array([m.agreement for m in s.matchers])}
    if s.n_tokens:
        series["Matching Score (data)"] = np.array([m.score for m in s.matchers])
    parts.append(
        plots.to_html(
            plots.grouped_bars(
                names, series, title="Matchers side by side", x_title="matcher", y_title="fraction"
            )
        )
    )
    if len(names) > 1:
        parts.append(
            plots.to_html(
                plots.heatmap(
                    np.array(s.agreement, dtype=np.float64),
                    x=names,
                    y=names,
                    title="Agreement between matchers",
                    x_title="matcher",
                    y_title="matcher",
                    colorbar_title="same partner",
                )
            )
        )
    parts.append(
        plots.table_html(
            ["matcher", "what", "one-to-one", "pairs", "mean cost", "agreement", "Matching Score", "seconds"],
            [
                (
                    m.name,
                    m.description,
                    m.one_to_one,
                    m.n_partners,
                    _fmt(m.mean_cost),
                    _fmt(m.agreement),
                    _fmt(m.score),
                    _fmt(m.seconds),
                )
                for m in s.matchers
            ],
        )
    )

    parts.append(f"<h2>Families ({len(report.families)})</h2>")
    parts.append(
        "<p>A feature linked to two or more features of the other SAE (relative cost below "
        f"{_fmt(s.link_threshold)}, the {report.config.level:g} quantile of the null).</p>"
    )
    if report.families:
        parts.append(
            plots.table_html(
                ["feature of", "feature", "split into", "relative costs", "one-to-one partner"],
                [
                    (
                        f.side.upper(),
                        f.feature,
                        ", ".join(map(str, f.parts)),
                        ", ".join(_fmt(c) for c in f.relative_costs),
                        f.partner,
                    )
                    for f in sorted(report.families, key=lambda f: -len(f.parts))[:200]
                ],
            )
        )
    return plots.standalone_html(
        f"saematch compare: {report.a.source} vs {report.b.source}", "\n".join(parts)
    )


def write_html_report(report: CompareReport, path: str | Path) -> Path:
    """Write :func:`report_html` to ``path`` atomically."""
    atomic_write_text(path, report_html(report))
    return Path(path)
