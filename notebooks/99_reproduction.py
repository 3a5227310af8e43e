# ---
# jupyter:
#   jupytext: {formats: "py:percent"}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # Reproduction table
#
# Inputs: the claims every other section measured and recorded in its results folder (the sibling
# folders of `out_dir`). Output: the table of the paper's claims beside our measurements, also shown
# on the introduction page. Runtime: instant. It runs last, after the sections it summarises.

# %% tags=["parameters"]
profile = "smoke"  # build profile the measurements were made with
out_dir = "results/99_reproduction"  # its parent holds every section's results (set by the build)

# %% tags=["hide-input"]
import warnings

# tqdm.auto warns at import when ipywidgets is absent; torch warns on read-only memory maps.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
from pathlib import Path

from IPython.display import HTML
from myst_nb import glue

from saematch_core.experiments.claims import CLAIMS, claims_table_html, read_claims

claims = read_claims(Path(out_dir).parent)
print(f"profile {profile!r}: {len(claims)} of {len(CLAIMS)} claims measured")
# The introduction page (book/intro.md) pastes this table; its links are relative to that page.
glue("reproduction_table", HTML(claims_table_html(claims, link_prefix="../notebooks/")), display=False)
HTML(claims_table_html(claims))

# %% [markdown]
# **What this shows.** Each row is one claim as the paper states it, our measurement on this
# build's profile, whether it supports the claim, and the section that measured it; comparisons of
# our own that the paper does not make follow under "Beyond the paper". Each verdict follows the
# claim's rule (its threshold included) in `saematch_core.experiments.claims`. On `smoke` the
# model is random and the SAEs tiny: the table checks the pipeline, not the science; the `default`
# and `paper` builds are the reproduction.

# %% tags=["hide-input"]
missing = sorted(set(CLAIMS) - {c.key for c in claims})
assert not missing, f"claims nobody measured: {missing}"
