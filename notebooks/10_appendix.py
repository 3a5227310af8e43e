# ---
# jupyter:
#   jupytext: {formats: "py:percent"}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
# ---

# %% [markdown]
# # 10. Appendix: SAE quality, performance and environment
#
# Inputs: the profile's prepared SAEs (their quality report), solver benchmark results (`make
# bench`'s `benchmarks/results/results.json`, or the quick run the book build makes when that file
# is absent), and the installed software. Outputs: four tables and two figures. Runtime: seconds
# (the quick benchmark, run once by the build before this section: about a minute).

# %% tags=["parameters"]
profile = "smoke"  # build profile, recorded in the environment table
bench_results: str | None = None  # benchmark results (None: benchmarks/results/results.json here)

# %% tags=["hide-input"]
import warnings

# tqdm.auto warns at import when ipywidgets is absent; torch warns on read-only memory maps.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
from pathlib import Path

import saematch_core
from saematch_core.experiments.appendix import (
    benchmark_meta,
    benchmark_series,
    benchmark_table,
    environment_table,
    quality_table,
)
from saematch_core.experiments.study import load_study
from saematch_core.plots import grouped_bars, show, show_table

study = load_study(profile, progress=False)
print(study.describe())

# %% [markdown]
# ## Quality of the SAEs
#
# Measured by `prepare` on held-out tokens (position 0 and outliers removed): mean number of active
# features (L0), fraction of variance unexplained (FVU), fraction of features never active (dead),
# and the increase in next-token loss when the layer is replaced by its reconstruction (ΔL).

# %% tags=["hide-input"]
show_table(*quality_table(study.prepared.records))

# %% [markdown]
# ## Performance of the matching solvers
#
# Measured side by side, each in its own process: the dense score matrix (GEMM), scipy's exact
# solver on it, and the certified sparse solver with its candidate search in float32 or bfloat16
# (`candidates`), on planted instances. The full run is `make bench` (`python -m benchmarks.run`;
# with `--chain` a synthetic 30-layer chain, with `--substrate default` every consecutive pair of
# the profile's trained SAEs). When it has not been run, the book build runs the quick version
# (`python -m benchmarks.run --quick`: F = 4096, d = 576, easy and hard noise, the machine's default
# candidate precision); the first table says which run this is, on which machine and when.
# `lap_speedup_vs_scipy` compares the assignment step alone, `e2e_over_gemm` our whole solve with
# one dense float32 GEMM of the same shapes; `same_optimum` checks the objective against scipy's,
# and `gap_bound_rel` is the most our answer can fall short of the optimum by the solver's own
# certificate, as a fraction of the objective (0: proven optimal).

# %% tags=["hide-input"]
bench_path = (
    Path(saematch_core.__file__).resolve().parents[1] / "benchmarks" / "results" / "results.json"
    if bench_results is None
    else Path(bench_results)
)
bench = benchmark_table(bench_path)
measured_on = benchmark_meta(bench_path)
if bench is None or measured_on is None:
    print(
        f"no benchmark results at {bench_path}: run `make bench`, or build the book, which runs a quick one"
    )
else:
    show_table(["measured on", ""], measured_on)
    show_table(*bench)

# %% [markdown]
# **End to end against one GEMM.** Our whole certified solve (candidate search, sparse solves,
# certificate) divided by the time of one dense float32 `F × F × d` GEMM of the same shapes, per
# planted instance and candidate precision. Our target is ≤ 1.5 at F = 16384 (dashed);
# the paper reports no solver timings. bfloat16 candidates pay off where bfloat16 GEMMs are native;
# the certificate re-checks in float32, so both precisions reach the same optimum.

# %% tags=["hide-input"]
e2e = benchmark_series(bench_path, "e2e_over_gemm")
if e2e is not None:
    show(
        grouped_bars(
            *e2e,
            title="Certified solve, end to end, over one dense GEMM",
            x_title="planted instance",
            y_title="time / GEMM time",
            reference=(1.5, "target 1.5"),
        )
    )

# %% [markdown]
# **The assignment step against scipy.** scipy's `linear_sum_assignment` on the dense matrix divided
# by our sparse solves plus certificate (log scale; target ≥ 10 at F = 16384, dashed). Harder noise
# means more certificate rounds and more rows whose bounds do not prove them, so the ratio falls.

# %% tags=["hide-input"]
lap = benchmark_series(bench_path, "lap_speedup_vs_scipy")
if lap is not None:
    show(
        grouped_bars(
            *lap,
            title="Assignment step: scipy time over ours",
            x_title="planted instance",
            y_title="speed-up over scipy (×)",
            log_y=True,
            reference=(10.0, "target 10×"),
        )
    )

# %% [markdown]
# ## Environment

# %% tags=["hide-input"]
env_rows = [("profile", profile), *environment_table()]
show_table(["component", "version"], env_rows)

# %% tags=["hide-input"]
assert any(name == "saematch" for name, _ in env_rows)
assert bench is not None and measured_on is not None, "the appendix must show measured performance"
