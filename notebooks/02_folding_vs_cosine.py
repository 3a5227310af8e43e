# ---
# jupyter:
#   jupytext: {formats: "py:percent"}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # 2. Does folding help matching, and how do cosine and greedy baselines compare?
#
# Inputs: the profile's main JumpReLU SAEs (every layer) and the residual stream of its evaluation
# split. Every consecutive layer pair is matched seven ways (identity order, unfolded, folded = SAE
# Match, encoder-only, decoder-only, cosine of decoder rows, greedy top-1 cosine = Feature Flow).
# Outputs: the MSE of matched folded parameters per layer pair (Figs. 3 and 12), the Matching Score
# per layer pair (Fig. 7), the SAE Match results as JSON and the measured claims in `out_dir`.
# Runtime: seconds on `smoke`, a few minutes on `default` (results are cached).

# %% tags=["parameters"]
profile = "smoke"  # build profile: smoke, default or paper
n_null = 5  # random matchings for the Matching Score's null
seed = 0  # seed of the random null
out_dir = "results/02_folding_vs_cosine"  # where results are written (set by the build)

# %% tags=["hide-input"]
import warnings

# tqdm.auto warns at import when ipywidgets is absent; torch warns on read-only memory maps.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
from pathlib import Path

import numpy as np

from saematch_core.evaluate import default_methods, matching_scores_by_layer, parameter_mse
from saematch_core.plots import line_per_layer, show, show_table
from saematch_core.study import PAPER, Claim, early_late_split, load_study, write_claims

study = load_study(profile, progress=False)
print(study.describe())
Path(out_dir).mkdir(parents=True, exist_ok=True)
for (a, b), result in study.consecutive_matches().items():
    result.to_json(Path(out_dir) / f"match_{a:02d}_{b:02d}.json")

# %% [markdown]
# ## Parameter MSE three ways (Fig. 3)
#
# Every matching is scored the same way, on the *folded* `W_enc`, `W_dec` and `b_enc` of the matched
# pairs: identity order ("vanilla"), exact matching of the raw weights ("unfolded"), and exact
# matching of the folded weights (SAE Match).

# %% tags=["hide-input"]
methods = default_methods()
mse = parameter_mse(study.saes, methods=methods, cache_dir=study.results_dir, progress=False)
pairs = study.pairs
x = [a for a, _ in pairs]
series = {name: np.asarray(mse.series(name)) for name in methods}
show(
    line_per_layer(
        x,
        {
            "vanilla (identity order)": series["vanilla"],
            "matched, unfolded": series["unfolded"],
            "folded + matched (SAE Match)": series["folded"],
        },
        title="MSE of matched folded parameters per layer pair (Fig. 3)",
        x_title="layer pair (t → t+1), by t",
        y_title="mean per-pair MSE of folded W_enc, W_dec, b_enc (squared residual units)",
        log_y=True,
    )
)
folded_best = float(np.mean(series["folded"] <= series["unfolded"] + 1e-12))
folded_vs_vanilla = float(np.median(series["folded"] / series["vanilla"]))
print(f"paper: {PAPER['fig3_folded_beats_unfolded']}")
print(
    f"ours: folded ≤ unfolded on {folded_best:.0%} of {len(pairs)} pairs; "
    f"median MSE ratio folded / vanilla = {folded_vs_vanilla:.3f}"
)

# %% [markdown]
# **What this shows.** The matched schemes must lie below identity order (any optimal matching can
# only lower the MSE it minimises); the question the paper asks is whether matching the *folded*
# weights beats matching the raw ones when both are scored on folded weights. The printed line puts
# the paper's claim beside our fraction of layer pairs where it holds. Part of the gap is circular
# (folded matching minimises exactly this score), which is why Fig. 7 below and Section 5 check it
# against data.

# %% [markdown]
# ## Objective variants and baselines (Fig. 12, reviewers' baselines)

# %% tags=["hide-input"]
show(
    line_per_layer(
        x,
        {
            "all parameters (SAE Match)": series["folded"],
            "decoder only": series["decoder_only"],
            "encoder only": series["encoder_only"],
            "cosine of decoder rows (exact)": series["cosine"],
            "greedy top-1 cosine (Feature Flow)": series["greedy_cosine"],
        },
        title="Objective variants and baselines, scored on folded parameters (Fig. 12)",
        x_title="layer pair (t → t+1), by t",
        y_title="mean per-pair MSE of folded W_enc, W_dec, b_enc (squared residual units)",
        log_y=True,
    )
)
dec_ratio = float(np.median(series["decoder_only"] / series["folded"]))
enc_ratio = float(np.median(series["encoder_only"] / series["folded"]))
print(f"paper: {PAPER['fig12_decoder_only']}")
print(f"ours: median MSE ratio to SAE Match: decoder-only {dec_ratio:.3f}, encoder-only {enc_ratio:.3f}")
show_table(
    ["method", "mean MSE over pairs", "mean fraction matched to the same index", "one-to-one"],
    [
        (
            name,
            f"{np.mean(series[name]):.4g}",
            f"{np.mean(mse.series(name, 'identity_fraction')):.3f}",
            all(r.is_permutation for r in mse.rows if r.method == name),
        )
        for name in methods
    ],
)

# %% [markdown]
# **What this shows.** Which parameters enter the objective matters: the paper finds decoder-only
# nearly as good as all parameters and encoder-only much worse; the ratios printed above are ours.
# Cosine matching ignores each feature's scale, and greedy top-1 lets several features share one
# partner (the last column says whether the result is a permutation).

# %% [markdown]
# ## Matching Score per layer (Fig. 7)
#
# The data-based check: over the evaluation tokens, the probability that a feature's matched partner
# is active when the feature is (dead features excluded), against random partners.

# %% tags=["hide-input"]
score_methods = {k: methods[k] for k in ("folded", "unfolded", "cosine", "greedy_cosine")}
scores = matching_scores_by_layer(
    study.saes,
    study.activations(),
    score_methods,
    keep=study.keep(),
    n_null=n_null,
    seed=seed,
    cache_dir=study.results_dir,
    progress=False,
)
score_series = {
    label: [r.row(name).matching_score for r in scores]
    for name, label in (
        ("folded", "folded (SAE Match)"),
        ("unfolded", "unfolded"),
        ("cosine", "cosine"),
        ("greedy_cosine", "greedy top-1 cosine"),
        ("random", "random partners"),
    )
}
show(
    line_per_layer(
        [r.layer_a for r in scores],
        score_series,
        title="Matching Score per layer pair (Fig. 7)",
        x_title="layer pair (t → t+1), by t",
        y_title="P(partner active | feature active) (probability)",
    )
)
folded_score = float(np.nanmean(score_series["folded (SAE Match)"]))
unfolded_score = float(np.nanmean(score_series["unfolded"]))
early, late = early_late_split(
    [r.layer_a for r in scores], score_series["folded (SAE Match)"], len(study.layers)
)
print(f"paper: {PAPER['fig7_folded_score']}")
print(f"ours: mean Matching Score folded {folded_score:.3f}, unfolded {unfolded_score:.3f}")
print(f"paper: {PAPER['fig7_early_layers']}")
print(f"ours: folded Matching Score, first 38% of layers {early:.3f}, the rest {late:.3f}")
means = {label: float(np.nanmean(v)) for label, v in score_series.items()}
cosine_wins = float(
    np.nanmean(np.asarray(score_series["cosine"]) > np.asarray(score_series["folded (SAE Match)"]))
)
print(
    "reviewers' baselines: mean Matching Score "
    + ", ".join(f"{label} {value:.3f}" for label, value in means.items())
    + f"; exact cosine beats folded on {cosine_wins:.0%} of pairs"
)
show_table(
    ["pair", "dead in t", "dead in t+1", "pairs scored (folded)"],
    [
        (
            f"{r.layer_a}→{r.layer_b}",
            r.row("folded").n_dead_a,
            r.row("folded").n_dead_b,
            r.row("folded").n_pairs,
        )
        for r in scores
    ],
)

# %% [markdown]
# **What this shows.** Folding cannot change which features are active (it divides codes by θ > 0),
# so any difference between the folded and unfolded curves comes from the matching itself. The
# random-partner curve is the chance level. The paper reports that early layers match much worse
# than later ones; the printed early/late means are ours, with the paper's early block (layers 0–9
# of 26) mapped to the same fraction of this model's depth. The reproduction table counts "much
# worse" as reproduced only when the early layers score at least 25 % lower.
#
# The reviewers asked for cosine and greedy baselines; the printed means answer them on this build.
# Greedy top-1 cosine is not one-to-one (several features may take the same partner, each its best),
# so its score is an optimistic per-feature ceiling, not a matching. Exact cosine matching of decoder
# rows is the fair competitor: where it scores as high as folded matching, the data favour neither
# objective, and folding's advantage is over the *unfolded* parameters, which is the paper's claim.
# Dead features (never active on the evaluation tokens) cannot be scored; the table counts them, and
# a pair whose layer has many of them scores lower for that reason alone.

# %% tags=["hide-input"]
claims = [
    Claim(
        key="fig3_folded_beats_unfolded",
        ours=f"folded ≤ unfolded on {folded_best:.0%} of pairs; folded/vanilla MSE {folded_vs_vanilla:.2f}",
        holds=folded_best == 1.0,
    ),
    Claim(
        key="fig12_decoder_only",
        ours=f"MSE ratio to all-params: decoder-only {dec_ratio:.2f}, encoder-only {enc_ratio:.2f}",
        holds=bool(dec_ratio < enc_ratio),
    ),
    Claim(
        key="fig7_folded_score",
        ours=f"Matching Score folded {folded_score:.3f} vs unfolded {unfolded_score:.3f}",
        holds=bool(folded_score >= unfolded_score),
    ),
    Claim(
        # "much worse": we count it as reproduced only when the early layers score ≥ 25 % lower
        key="fig7_early_layers",
        ours=f"folded Matching Score early {early:.3f} vs later {late:.3f} ({early / late - 1:+.0%})",
        holds=None if np.isnan(early) or np.isnan(late) else bool(early < 0.75 * late),
    ),
]
write_claims(out_dir, "02_folding_vs_cosine", claims)
assert (series["folded"] <= series["vanilla"] + 1e-9).all(), "matching must not be worse than identity order"
