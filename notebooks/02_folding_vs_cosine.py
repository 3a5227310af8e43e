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
n_null = 5  # random matchings for the Matching Score's null [>= 1]
seed = 0  # seed of the random null [>= 0]
out_dir = "results/02_folding_vs_cosine"  # where results are written (set by the build)

# %% tags=["hide-input"]
import warnings

# tqdm.auto warns at import when ipywidgets is absent; torch warns on read-only memory maps.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
from pathlib import Path

import numpy as np

from saematch_core.experiments import matching_score, parameter_mse
from saematch_core.experiments.claims import (
    PAPER_CLAIMS,
    measure_decoder_only,
    measure_early_late,
    measure_folded_mse,
    measure_folded_score,
    write_claims,
)
from saematch_core.experiments.measures.scores import default_methods
from saematch_core.experiments.study import load_study
from saematch_core.plots import line_per_layer, show, show_table

study = load_study(profile, progress=False)
print(study.describe())
inputs = study.inputs(seed=seed)
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
mse = parameter_mse.run(inputs, parameter_mse.ParameterMSEConfig(methods=methods))
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
folded_mse = measure_folded_mse(mse)
print(f"paper: {PAPER_CLAIMS['fig3_folded_beats_unfolded'].text}")
print(
    f"ours: folded ≤ unfolded on {folded_mse.folded_best:.0%} of {len(pairs)} pairs; "
    f"median MSE ratio folded / vanilla = {folded_mse.folded_vs_vanilla:.3f}"
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
parts = measure_decoder_only(mse)
print(f"paper: {PAPER_CLAIMS['fig12_decoder_only'].text}")
print(
    f"ours: median MSE ratio to SAE Match: decoder-only {parts.decoder_ratio:.3f}, "
    f"encoder-only {parts.encoder_ratio:.3f}"
)
show_table(*mse.table(list(methods)))

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
scores = matching_score.run(inputs, matching_score.MatchingScoreConfig(methods=score_methods, n_null=n_null))
score_labels = {
    "folded": "folded (SAE Match)",
    "unfolded": "unfolded",
    "cosine": "cosine",
    "greedy_cosine": "greedy top-1 cosine",
    "random": "random partners",
}
score_series = {label: scores.series(name) for name, label in score_labels.items()}
show(
    line_per_layer(
        scores.layers,
        score_series,
        title="Matching Score per layer pair (Fig. 7)",
        x_title="layer pair (t → t+1), by t",
        y_title="P(partner active | feature active) (probability)",
    )
)
folded_score = measure_folded_score(scores)
early_late = measure_early_late(scores, len(study.layers))
print(f"paper: {PAPER_CLAIMS['fig7_folded_score'].text}")
print(f"ours: mean Matching Score folded {folded_score.folded:.3f}, unfolded {folded_score.unfolded:.3f}")
print(f"paper: {PAPER_CLAIMS['fig7_early_layers'].text}")
print(
    f"ours: folded Matching Score, first 38% of layers {early_late.early:.3f}, the rest {early_late.late:.3f}"
)
print(
    "reviewers' baselines: mean Matching Score "
    + ", ".join(f"{label} {scores.mean(name):.3f}" for name, label in score_labels.items())
    + f"; exact cosine beats folded on {scores.fraction_better('cosine', 'folded'):.0%} of pairs"
)
show_table(*scores.dead_table("folded"))

# %% [markdown]
# **What this shows.** Folding cannot change which features are active (it divides codes by θ > 0),
# so any difference between the folded and unfolded curves comes from the matching itself. The
# random-partner curve is the chance level. The paper reports that early layers match much worse
# than later ones; the printed early/late means are ours, with the paper's early block (layers 0–9
# of 26) mapped to the same fraction of this model's depth. The reproduction table counts "much
# worse" as reproduced only when the early layers score at least 25 % lower (the claim's rule in
# `saematch_core.experiments.claims`).
#
# The reviewers asked for cosine and greedy baselines; the printed means answer them on this build.
# Greedy top-1 cosine is not one-to-one (several features may take the same partner, each its best),
# so its score is an optimistic per-feature ceiling, not a matching. Exact cosine matching of decoder
# rows is the fair competitor: where it scores as high as folded matching, the data favour neither
# objective, and folding's advantage is over the *unfolded* parameters, which is the paper's claim.
# Dead features (never active on the evaluation tokens) cannot be scored; the table counts them, and
# a pair whose layer has many of them scores lower for that reason alone.

# %% tags=["hide-input"]
findings = [
    PAPER_CLAIMS["fig3_folded_beats_unfolded"].evaluate(folded_mse),
    PAPER_CLAIMS["fig12_decoder_only"].evaluate(parts),
    PAPER_CLAIMS["fig7_folded_score"].evaluate(folded_score),
    PAPER_CLAIMS["fig7_early_layers"].evaluate(early_late),
]
write_claims(out_dir, "02_folding_vs_cosine", findings)
assert (series["folded"] <= series["vanilla"] + 1e-9).all(), "matching must not be worse than identity order"
