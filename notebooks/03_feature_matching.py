# ---
# jupyter:
#   jupytext: {formats: "py:percent"}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # 3. Feature matching up close: does low matching MSE mean the same feature?
#
# Inputs: the main SAEs of the paper's three layer pairs 11 → 12, 19 → 20 and 23 → 24 (mapped to the
# same relative depth; the figures show the middle one) and the evaluation residual stream. The paper asks an LLM judge whether matched features
# are the SAME; offline we measure agreement from data (how often the partner fires with the feature,
# overlap of their top-activating tokens) and show the evidence itself, top-activating contexts.
# Outputs: per-pair MSE histograms split by agreement (Figs. 5/6), agreement per MSE bin, contexts of
# low-, median- and high-MSE pairs, and the measured claim in `out_dir`. Runtime: seconds.

# %% tags=["parameters"]
profile = "smoke"  # build profile: smoke, default or paper
layer: int | None = None  # first layer of the pair (None: the paper's 19 at the same relative depth) [pair]
n_bins = 10  # equal-count MSE bins [>= 1]
top_k = 20  # top activations per feature for the overlap measures [>= 1]
n_contexts = 5  # contexts shown per feature [>= 1]
out_dir = "results/03_feature_matching"  # where the measured claims are written (set by the build)

# %% tags=["hide-input"]
import warnings

# tqdm.auto warns at import when ipywidgets is absent; torch warns on read-only memory maps.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

from IPython.display import Markdown

from saematch_core.experiments import agreement
from saematch_core.experiments.claims import CLAIMS, finding_markdown, measure_agreement, write_claims
from saematch_core.experiments.measures.summary import paper_layer
from saematch_core.experiments.study import contexts_side_by_side, load_study
from saematch_core.plots import histogram, line_per_layer, show, show_table

study = load_study(profile, progress=False)
print(study.describe())
a = paper_layer(19, len(study.layers)) if layer is None else int(layer)
a = min(a, study.layers[-2])
b = a + 1
paper_pairs = sorted({min(paper_layer(t, len(study.layers)), study.layers[-2]) for t in (11, 19, 23)} | {a})
print(f"layer pairs {[(t, t + 1) for t in paper_pairs]}; shown: {a} → {b}")

# %% tags=["hide-input"]
config = agreement.AgreementConfig(n_bins=n_bins, top_k=top_k)
by_pair = {
    t: agreement.run(study.inputs(pairs=[(t, t + 1)], keep=study.keep(t, t + 1)), config) for t in paper_pairs
}
binned = by_pair[a]
groups = agreement.agreement_groups(binned.pairs, "p_partner")
positive = {k: v[v > 0] for k, v in groups.items() if (v > 0).any()}
show(
    histogram(
        positive,
        title=f"Per-pair matching MSE, layers {a} → {b}, by agreement on data (Figs. 5/6)",
        x_title="per-pair MSE of folded W_enc, W_dec, b_enc (squared residual units, log scale)",
        y_title="number of matched pairs",
        log_x=True,
    )
)
print(
    "pairs per agreement group (P(partner active | feature active)):", {k: len(v) for k, v in groups.items()}
)

# %% tags=["hide-input"]
mids = [(r.lo * r.hi) ** 0.5 if r.lo > 0 else r.hi / 2 for r in binned.bins]
show(
    line_per_layer(
        mids,
        {
            "P(partner active | feature active)": [r.p_partner for r in binned.bins],
            "Jaccard of active tokens": [r.jaccard for r in binned.bins],
            "top-token overlap (Jaccard)": [r.top_token_overlap for r in binned.bins],
            "Pearson correlation of activations": [r.pearson for r in binned.bins],
        },
        title=f"Agreement per MSE bin, layers {a} → {b}",
        x_title="per-pair MSE, bin centre (squared residual units)",
        y_title="mean agreement in the bin (probability / correlation)",
    )
)
measured = measure_agreement([by_pair[t] for t in paper_pairs])
low_similar = CLAIMS["fig5_low_mse_similar"].evaluate(measured)
scale_differs = CLAIMS["fig5_scale_differs"].evaluate(measured)
show_table(
    ["layer pair", "lowest-MSE bin", "highest-MSE bin", "random partners", "median per-pair MSE"],
    [
        (
            f"{p.layer_a}→{p.layer_b}",
            f"{p.low:.3f}",
            f"{p.high:.3f}",
            f"{p.random:.3f}",
            f"{p.median_mse:.4g}",
        )
        for p in measured.pairs
    ],
)
shown = next(p for p in measured.pairs if p.layer_a == a)
Markdown(
    f"**What this shows.** At layers {a} → {b}, matched pairs in the lowest-MSE bin (1/{n_bins} of the "
    f"pairs) co-fire with probability {shown.low:.2f}, those in the highest-MSE bin {shown.high:.2f}, "
    f"random partners {shown.random:.3f}; the table gives the {len(measured.pairs)} pairs, with "
    "P(partner active | feature active) per bin and the median per-pair MSE.\n\n"
    + finding_markdown(low_similar)
    + "\n\n"
    + finding_markdown(scale_differs)
)

# %% [markdown]
# ## Side by side: top-activating contexts of three pairs
#
# The activating token is between « ». Left: the feature at layer *t*; right: its matched partner at
# layer *t+1*.

# %% tags=["hide-input"]
picked = agreement.pick_by_mse(binned.pairs)
ctx_a = study.contexts(a, [p.feature for p in picked.values()], k=n_contexts)
ctx_b = study.contexts(b, [p.partner for p in picked.values()], k=n_contexts)
for label, pair in picked.items():
    print(
        f"{label} MSE: feature {pair.feature} (layer {a}) ↔ {pair.partner} (layer {b}), MSE {pair.mse:.4g}, "
        f"P(partner active | feature active) {pair.p_partner:.3f}"
    )
    show_table(*contexts_side_by_side(ctx_a[pair.feature], ctx_b[pair.partner], (a, b)))

# %% [markdown]
# **What this shows.** The evidence an LLM judge would read, without the judge, for the lowest-, the
# median- and the highest-MSE pair of layers the pair shown; each header gives the pair's MSE and how
# often the partner fires with the feature.

# %% tags=["hide-input"]
write_claims(out_dir, "03_feature_matching", [low_similar, scale_differs])
assert len(binned.pairs) == study.saes[a].d_sae
