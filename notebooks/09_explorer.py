# ---
# jupyter:
#   jupytext: {formats: "py:percent"}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # 9. Feature path explorer: where does a feature go, layer after layer?
#
# Inputs: the main SAEs of every layer, matched pair by pair with SAE Match (folded encoder, decoder
# and bias), and the evaluation residual stream. A random sample of live features of `layer` (plus
# `feature` when given) is followed forward to the last layer and backward to the first by composing
# the matchings. Outputs: an interactive figure (pick a path in the dropdown, hover a point for the
# feature reached there), the per-layer matching MSE, and top-activating contexts at every step.
# Rerun with other parameters: `make notebook NB=06 PARAMS="-p layer 20 -p feature 123"`.
# Runtime: seconds on `smoke`, about a minute on `default`.

# %% tags=["parameters"]
profile = "smoke"  # build profile: smoke, default or paper
layer: int | None = None  # layer the paths start from (None: the middle layer) [layer]
feature: int | None = None  # a feature of `layer` to follow as well (None: only the sample) [>= 0]
n_paths = 6  # randomly sampled live features of `layer` [>= 1]
n_contexts = 1  # top-activating contexts shown per step [>= 1]
seed = 0  # seed of the feature sample [>= 0]

# %% tags=["hide-input"]
import warnings

# tqdm.auto warns at import when ipywidgets is absent; torch warns on read-only memory maps.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

import numpy as np

from saematch_core.experiments.measures.contexts import sample_features
from saematch_core.experiments.study import load_study, path_contexts, path_table
from saematch_core.plots import line_per_layer, path_explorer, show, show_table

study = load_study(profile, progress=False)
print(study.describe())
start = study.layers[len(study.layers) // 2] if layer is None else int(layer)
starts = sample_features(study.alive(start), n_paths, seed=seed)
if feature is not None and int(feature) not in starts:
    starts.append(int(feature))
print(f"following features {starts} of layer {start} through layers {study.layers[0]}..{study.layers[-1]}")

# %% tags=["hide-input"]
matches = study.consecutive_matches()
paths = study.paths(start, starts)
show(
    path_explorer(
        study.layers,
        {f"feature {f}": np.asarray(p.features) for f, p in paths.items()},
        {f"feature {f}": list(p.step_costs) for f, p in paths.items()},
        title=f"Feature paths from layer {start}",
        x_title="layer (residual stream after block)",
        y_title="per-pair MSE of the step towards the start layer (squared residual units)",
    )
)

# %% [markdown]
# **What this shows.** Each line is one feature of layer `layer`, followed through every layer by
# composing consecutive SAE Match permutations (forward) and their inverses (backward); the start
# layer has no step and no point. A low step MSE means the feature's folded parameters barely changed
# between the two layers; a spike marks a step where the matching had no good partner (a feature
# born, dying or splitting). The paper follows features reliably for about five layers (Section 4).

# %% tags=["hide-input"]
median_cost = [float(np.median(matches[p].cost.numpy())) for p in study.pairs]
show(
    line_per_layer(
        [a for a, _ in study.pairs],
        {
            "median over all features": median_cost,
            **{f"feature {f}": p.pair_costs() for f, p in paths.items()},
        },
        title="Per-layer matching MSE: the sampled paths against all features",
        x_title="layer pair (t → t+1), by t",
        y_title="per-pair MSE of folded W_enc, W_dec, b_enc (squared residual units)",
        log_y=True,
    )
)

# %% [markdown]
# **What this shows.** The cost of each step of each sampled path next to the median over every
# feature of the same layer pair: a path that stays near the median is as well matched as a typical
# feature; one above it is in the tail of the paper's Fig. 5.

# %% [markdown]
# ## Contexts at every step
#
# For each path, the context where the reached feature fires most at every layer (activating token
# between « »).

# %% tags=["hide-input"]
contexts = path_contexts(study, paths.values(), k=n_contexts)
for f, p in paths.items():
    print(f"feature {f} of layer {start}")
    show_table(*path_table(p, contexts))

# %% [markdown]
# **What this shows.** Reading down a table follows one feature's meaning through the depth of the
# model. Where the contexts stay alike the matching kept the feature; where they change abruptly the
# step MSE is usually high too.

# %% tags=["hide-input"]
assert all(len(p.features) == len(study.layers) for p in paths.values()), "every path spans every layer"
