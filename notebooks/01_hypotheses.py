# ---
# jupyter:
#   jupytext: {formats: "py:percent"}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # 1. Hypotheses: do thresholds grow with depth like the hidden state?
#
# Inputs: the profile's main JumpReLU SAEs (one per layer) and the residual stream of its evaluation
# split. Outputs: mean threshold θ and mean hidden-state norm ‖h‖ per layer (the paper's Fig. 1), and
# the measured claim for the reproduction table in `out_dir`. Runtime: seconds on `smoke`; on
# `default` 3.5 minutes cold on 2 cores (2026-12-07), nearly all of it the exact matchings of every
# layer pair under five objectives (Fig. 3), which the later sections reuse from the cache.

# %% tags=["parameters"]
profile = "smoke"  # build profile: smoke, default or paper
out_dir = "results/01_hypotheses"  # where the measured claims are written (set by the build)

# %% tags=["hide-input"]
import warnings

# tqdm.auto warns at import when ipywidgets is absent; torch warns on read-only memory maps.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
from IPython.display import Markdown

from saematch_core.experiments import parameter_mse, scale
from saematch_core.experiments.claims import (
    PAPER_CLAIMS,
    finding_markdown,
    measure_norm_follow,
    measure_theta_norm,
    write_claims,
)
from saematch_core.experiments.study import load_study
from saematch_core.plots import line_per_layer, scatter, show, show_table

study = load_study(profile, progress=False)
print(study.describe())

# %% [markdown]
# ## The three hypotheses (Section 3 of the paper)
#
# - **H1** — parameter closeness implies semantic similarity: when the folded weights of feature *i*
#   of layer *t* and feature *j* of layer *t+1* are close (low MSE), the two features mean the same
#   thing. Tested in {doc}`03_feature_matching` against data (co-activation, top contexts).
# - **H2** — folding improves matching: a JumpReLU threshold θ carries its feature's scale, and the
#   scale of the residual stream changes with depth, so matching raw weights compares features at
#   different scales; folding θ into the weights removes that. Tested in {doc}`02_folding_vs_cosine`
#   and {doc}`05_hidden_state`.
# - **H3** — composing consecutive matchings approximates matching distant layers directly, and
#   degrades with distance. Tested in {doc}`04_persistence`.
#
# The motivation for H2 is the paper's Fig. 1: the mean θ per layer grows with depth like the norm of
# the hidden state. Here is the same measurement on this profile.

# %% tags=["hide-input"]
# The norms come from the activation cache, each layer counting its own usable rows.
result = scale.run(study.inputs(activations=None), norms=study.norms(), layer_keep=study.usable())
layers = [r.layer for r in result.rows]
theta = [r.theta_mean for r in result.rows]
norm = [r.norm_mean for r in result.rows]
measured = measure_theta_norm(result)
claim = PAPER_CLAIMS["fig1_theta_norm"]

show(
    line_per_layer(
        layers,
        {
            "mean θ / mean θ of the first layer": [t / theta[0] for t in theta],
            "mean ‖h‖ / mean ‖h‖ of the first layer": [n / norm[0] for n in norm],
        },
        title="Threshold and hidden-state norm by depth (Fig. 1)",
        x_title="layer (residual stream after block)",
        y_title="growth relative to the first layer (ratio, log scale)",
        log_y=True,
    )
)

# %% tags=["hide-input"]
theta_norm = claim.evaluate(measured)
Markdown(
    f"**What this shows.** Both curves are divided by their first-layer value so that they share an axis. "
    f"Across the {measured.n_layers} layers the rank correlation of mean θ with depth is "
    f"{measured.rho_theta_depth:+.2f}, of mean ‖h‖ with depth {measured.rho_norm_depth:+.2f}, and of the two "
    f"with each other {measured.rho_theta_norm:+.2f}.\n\n" + finding_markdown(theta_norm)
)

# %% tags=["hide-input"]
show(
    scatter(
        norm,
        theta,
        labels=[f"layer {layer}" for layer in layers],
        title="Mean threshold against mean hidden-state norm, one point per layer",
        x_title="mean ‖h‖ over evaluation tokens (residual-stream units)",
        y_title="mean JumpReLU threshold θ (pre-activation units)",
    )
)
show_table(*result.table())

# %% [markdown]
# ## Matched decoder rows after folding (Fig. 1, right)
#
# After folding, a feature's decoder row is `θ_i W_dec[i]`. For every consecutive layer pair, SAE Match
# pairs the features, and the median over matched pairs of how much longer the partner's folded row
# is, `‖θ_B W_dec,B[P i]‖ − ‖θ_A W_dec,A[i]‖`, is compared with how much the mean hidden-state norm
# grows between the two layers.

# %% tags=["hide-input"]
mse = parameter_mse.run(study.inputs(activations=None))
follow = measure_norm_follow(mse, result)
pair_rows = [r for r in mse.rows if r.method == "folded"]
norm_by_layer = {r.layer: r.norm_mean for r in result.rows}
show(
    scatter(
        [norm_by_layer[r.layer_b] - norm_by_layer[r.layer_a] for r in pair_rows],
        [r.dec_norm_diff for r in pair_rows],
        labels=[f"{r.layer_a}→{r.layer_b}" for r in pair_rows],
        title="Growth of matched folded decoder rows against growth of ‖h‖ (Fig. 1, right)",
        x_title="mean ‖h‖ at t+1 − mean ‖h‖ at t (residual-stream units)",
        y_title="median ‖θ W_dec‖ of the partner − of the feature (residual-stream units)",
    )
)
norm_diff = PAPER_CLAIMS["fig1_folded_norm_diff"].evaluate(follow)
Markdown(
    f"**What this shows.** One point per layer pair: the Pearson correlation across the {follow.n_pairs} "
    f"pairs between the growth of matched folded decoder rows and the growth of the hidden-state norm is "
    f"{follow.r:+.2f}.\n\n" + finding_markdown(norm_diff)
)

# %% tags=["hide-input"]
write_claims(out_dir, "01_hypotheses", [theta_norm, norm_diff])
assert len(result.rows) == len(study.layers)
