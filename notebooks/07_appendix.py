# ---
# jupyter:
#   jupytext: {formats: "py:percent"}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # 7. Appendix: environment
#
# The software this book was built with. Inputs: none. Output: a table of versions. Runtime: instant.

# %% tags=["parameters"]
profile = "smoke"  # build profile, recorded in the table

# %%
from saematch_core.book import environment_table
from saematch_core.plots import show_table

rows = [("profile", profile), *environment_table()]
show_table(["component", "version"], rows)

# %%
assert any(name == "saematch" for name, _ in rows)
