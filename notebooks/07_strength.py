# ---
# jupyter:
#   jupytext: {formats: "py:percent"}
#   kernelspec: {name: python3, display_name: Python 3, language: python}
#   saematch: {requires: [training_rows]}
# ---

# %% [markdown]
# # 7. How strong must SAEs be? Matching against the SAEs' training budget
#
# Our SAEs are trained on about two hundred thousand tokens per layer; the paper's Gemma Scope SAEs on
# billions. Section 9's seed ceiling shows that two of our SAEs of the *same* layer, trained from
# different seeds, are barely interchangeable. So when SAE Match fails here, is it the method or the
# SAEs? This section measures how the answer moves with the training budget.
#
# Inputs: the profile's training activations and recipe, and the evaluation residual stream. At a
# few depths ``t`` (the layers with a second-seed SAE), SAEs are trained with the profile's own
# recipe at several budgets (tokens seen per SAE): two seeds at layer ``t`` and one at ``t − 1``. At
# the profile's own budget the profile's SAEs are reused (they are exactly this training). Per budget:
# the **seed ceiling** (Matching Score and swap explained variance of the two seeds of layer ``t``),
# **SAE Match from the neighbour** ``t − 1 → t`` (Matching Score, the approximation's explained
# variance on the stored residuals and its ΔL when it replaces the residual in the model), and the
# SAEs' own quality. One arm trains at equal tokens seen on fewer distinct tokens (several epochs), to
# tell whether distinct tokens or training steps matter. The curves are fitted by a straight line in
# log-budget and extended, as a **prediction**, to SAEs trained on billions of tokens.
#
# The **persistence length** (paper Fig. 8) needs SAEs of many consecutive layers, so it is measured
# at one depth only: from a start layer, seed-0 SAEs of the next `persistence_distance` layers are
# trained at every budget, and features are followed through them as in section 4.
#
# Left out: budgets beyond one epoch over the stored activations.
# Runtime: a minute on `smoke`; on `default` 5.5 minutes cold on a 2-core Xeon, 7.3 on a 2-core AMD
# EPYC (measured 2026-12-07: 33
# SAEs of at most 25,000 tokens and 18 measured rows, then 28 more SAEs and 5 persistence runs for
# the persistence arm; every SAE and every result is cached, so a rerun takes seconds). The measures
# use 4,096 evaluation rows (`max_eval_rows`), so the dead fraction counts features never active on
# those rows.

# %% tags=["parameters"]
profile = "smoke"  # build profile: smoke, default or paper
budget_fractions: list[float] = [0.015625, 0.03125, 0.0625, 0.125, 1.0]  # of the profile's budget [> 0]
epochs_fractions: list[float] | None = [0.0625, 0.015625]  # epochs arm: (seen, distinct); None: no arm
depths: list[int] | None = None  # layers t (None: the layers with a second-seed SAE) [layer]
n_null = 2  # random matchings of the Matching Score's null
max_eval_rows: int | None = 4096  # evaluation rows the measures use (None: all); most of the cost [>= 1]
delta_loss_tokens = 512  # evaluation tokens of the ΔL pass
persistence_distance = 8  # persistence arm: layers followed from its start (0: no arm) [>= 0]
persistence_start: int | None = None  # its start layer (None: the middle depth's t − 1) [layer]
predict_at = 1e9  # training tokens per SAE at which the fitted lines are read as a prediction
seed = 0  # seed of the epochs arm's token subset and of the nulls
out_dir = "results/07_strength"  # where the result is written (set by the build)

# %% tags=["hide-input"]
import warnings

# tqdm.auto warns at import when ipywidgets is absent; torch warns on read-only memory maps.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
from pathlib import Path

from IPython.display import Markdown, display

from saematch_core.experiments import persistence, strength
from saematch_core.experiments.claims import PERSIST_CHANCE, measure_persistence
from saematch_core.experiments.study import load_study
from saematch_core.plots import dose_response, line_per_layer, show, show_table

study = load_study(profile, progress=False)
print(study.describe())
if not study.profile.keeps_training_rows:
    raise ValueError(
        f"profile {profile!r}: this section trains SAEs on stored training rows, which it does not keep"
    )
config = strength.StrengthConfig.for_recipe(
    study.profile.sae,
    fractions=tuple(budget_fractions),
    epochs_arm=None if epochs_fractions is None else (epochs_fractions[0], epochs_fractions[1]),
    depths=None if depths is None else tuple(depths),
    n_null=n_null,
    max_eval_rows=max_eval_rows,
    median_norms=study.median_norms(),
)
inputs = study.inputs(
    families={"seed": study.family("seed")},
    train_activations=study.train_activations(),
    tokens=study.eval_batch(delta_loss_tokens),
    seed=seed,
)
result = strength.run(inputs, config)
out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
result.to_json(out / "strength.json")
budgets = list(result.budgets)
print(f"depths {list(result.depths)}, budgets {budgets} tokens per SAE, epochs arm {config.epochs_arm}")


def spread(metric: str) -> list[float]:
    """Half the range over depths at each budget (the error bars)."""
    per = [result.series(metric, t) for t in result.depths]
    return [(max(v) - min(v)) / 2 for v in zip(*per, strict=True)]


fits = {
    m: result.fit(m)
    for m in ("ms_same", "ms_neighbour", "ev_self", "ev_swap", "ev_neighbour", "dl_neighbour")
}

# %% [markdown]
# ## Matching Score against the budget

# %% tags=["hide-input"]
labels = {
    "ms_same": "same layer, another seed (the ceiling)",
    "ms_neighbour": "SAE Match from layer t−1",
    "ms_same_random": "random partners (same layer)",
}
show(
    dose_response(
        budgets,
        {labels[m]: result.series(m) for m in labels},
        errors={labels[m]: spread(m) for m in ("ms_same", "ms_neighbour")},
        lines={labels[m]: (fits[m].intercept, fits[m].slope) for m in ("ms_same", "ms_neighbour")},
        extend_to=predict_at,
        title="Matching Score against training tokens (mean over depths; bars: half the range)",
        x_title="training tokens per SAE (log)",
        y_title="P(partner active | feature active) (probability)",
    )
)

# %% [markdown]
# ## Explained variance and ΔL of the swaps against the budget

# %% tags=["hide-input"]
ev_labels = {
    "ev_self": "own reconstruction",
    "ev_swap": "same layer, another seed, matched",
    "ev_neighbour": "SAE Match from layer t−1 (the approximation)",
}
show(
    dose_response(
        budgets,
        {ev_labels[m]: result.series(m) for m in ev_labels},
        errors={ev_labels[m]: spread(m) for m in ev_labels},
        lines={ev_labels[m]: (fits[m].intercept, fits[m].slope) for m in ev_labels},
        extend_to=predict_at,
        title="Explained variance of h_t against training tokens (mean over depths)",
        x_title="training tokens per SAE (log)",
        y_title="1 − Σ‖ĥ − h‖² / Σ‖h − mean h‖² (fraction)",
    )
)
if all(v == v for v in result.series("dl_neighbour")):
    show(
        dose_response(
            budgets,
            {"SAE Match from layer t−1": result.series("dl_neighbour")},
            errors={"SAE Match from layer t−1": spread("dl_neighbour")},
            lines={"SAE Match from layer t−1": (fits["dl_neighbour"].intercept, fits["dl_neighbour"].slope)},
            extend_to=predict_at,
            title="Loss increase when the approximation replaces h_t (mean over depths)",
            x_title="training tokens per SAE (log)",
            y_title="ΔL (nats/token)",
        )
    )

# %% tags=["hide-input"]
seconds = result.train_seconds()
show_table(
    [
        "tokens per SAE",
        "L0",
        "dead (on the measured rows)",
        "EV own",
        "MS ceiling",
        "MS t−1 → t",
        "MS random",
        "EV swap (same layer)",
        "EV SAE Match",
        "ΔL SAE Match (nats)",
        "training s / SAE",
    ],
    [
        [
            f"{b:,}",
            *(f"{v:.3f}" for v in (result.series(m)[i] for m in ("l0", "dead_fraction", "ev_self"))),
            *(
                f"{result.series(m)[i]:.3f}"
                for m in (
                    "ms_same",
                    "ms_neighbour",
                    "ms_same_random",
                    "ev_swap",
                    "ev_neighbour",
                    "dl_neighbour",
                )
            ),
            f"{sum(seconds[b]) / len(seconds[b]):.1f}" if seconds.get(b) else "reused",
        ]
        for i, b in enumerate(budgets)
    ],
)

# %% [markdown]
# ## Distinct tokens or epochs?

# %% tags=["hide-input"]
if config.epochs_arm is not None:
    seen, distinct = config.epochs_arm
    rows = []
    for m, name in (("ms_same", "MS ceiling"), ("ev_swap", "EV swap"), ("ev_self", "EV own"), ("l0", "L0")):
        c = result.epochs_comparison(m)
        rows.append([name, f"{c['same_distinct']:.3f}", f"{c['epochs']:.3f}", f"{c['same_seen']:.3f}"])
    show_table(
        [
            "measure (mean over depths)",
            f"{distinct:,} distinct × 1 epoch",
            f"{distinct:,} distinct × {seen // distinct} epochs",
            f"{seen:,} distinct × 1 epoch",
        ],
        rows,
    )

# %% [markdown]
# ## Persistence length against the budget
#
# **Why.** The paper follows features for about five layers (its Fig. 8); section 4 measures the
# horizon on the profile's SAEs. Here the same measure is taken on SAEs of every budget: from one start
# layer, the direct matching to each later layer is scored on data, and the **horizon** is the largest
# distance up to which its Matching Score stays at least the section-4 factor times random partners'
# at every distance (capped by the layers followed).

# %% tags=["hide-input"]
horizon: dict[int, int] = {}
if persistence_distance > 0:
    p_start = (
        persistence_start if persistence_start is not None else result.depths[len(result.depths) // 2] - 1
    )
    window = [u for u in study.layers if p_start <= u <= p_start + persistence_distance]
    if len(window) < 2:
        raise ValueError(
            f"persistence_start: layer {p_start} has no later layer to follow to in {list(study.layers)}"
        )
    window_saes = strength.budget_saes(inputs, config, window)
    followed = {
        b: persistence.run(
            inputs.replace(saes=saes),
            persistence.PersistenceConfig(starts=(p_start,), max_distance=len(window) - 1),
        )
        for b, saes in window_saes.items()
    }
    measured_p = {b: measure_persistence(r) for b, r in followed.items()}
    horizon = {b: m.horizons[p_start] for b, m in measured_p.items()}
    for b, r in followed.items():
        r.to_json(out / f"persistence_{b}.json")
    p_distances = list(range(1, len(window)))
    show(
        line_per_layer(
            p_distances,
            {
                **{f"{b:,} tokens": list(r.curve(p_start, "score_direct")[1]) for b, r in followed.items()},
                "random partners (largest budget)": list(
                    followed[budgets[-1]].curve(p_start, "score_random")[1]
                ),
            },
            title=f"Direct matching from layer {p_start}, scored on data, per training budget (Fig. 8)",
            x_title="distance from the start layer (layers)",
            y_title="P(partner active | feature active) (probability)",
        )
    )
    show_table(
        [
            "tokens per SAE",
            f"horizon (of {len(window) - 1} followed)",
            "MS at distance 1",
            f"MS at distance {len(window) - 1}",
            f"random at distance {len(window) - 1}",
            "composed / direct MS at distance 2",
            "same partner at distance 2",
        ],
        [
            [
                f"{b:,}",
                f"{horizon[b]}",
                f"{followed[b].curve(p_start, 'score_direct')[1][0]:.3f}",
                f"{followed[b].curve(p_start, 'score_direct')[1][-1]:.3f}",
                f"{followed[b].curve(p_start, 'score_random')[1][-1]:.3f}",
                f"{measured_p[b].ratio_near:.2f}",
                f"{measured_p[b].agreement_near:.2f}",
            ]
            for b in budgets
        ],
    )

# %% [markdown]
# ## What the curves predict (a PREDICTION, not a measurement)
#
# Each measure's depth mean is fitted by a straight line in log10(training tokens) and read at the
# budget below. This assumes the trend seen over our budgets continues unchanged for several more
# decades: bounded measures must bend before their bound (a Matching Score cannot exceed 1, an
# explained variance cannot exceed the own SAE's), and training on more *distinct* tokens, a wider
# dictionary or another model may change the slope. Read the numbers as the direction and rough size
# of the effect, not as what Gemma Scope would give.

# %% tags=["hide-input"]
names = {**labels, **ev_labels, "dl_neighbour": "ΔL of SAE Match (nats)"}


def predicted(metric: str) -> str:
    """The line's value at ``predict_at``, flagged where a straight line has left the possible range."""
    v = fits[metric].at(predict_at)
    if metric == "dl_neighbour":
        return f"{v:.3f}" + (" (below 0: the line cannot hold)" if v < 0 else "")
    return f"{v:.3f}" + (" (past the bound of 1: the line cannot hold)" if v > 1 else "")


show_table(
    ["measure", "per tenfold budget", "r²", f"at {budgets[-1]:,} (fit)", f"PREDICTED at {predict_at:.0e}"],
    [
        [names[m], f"{f.slope:+.3f}", f"{f.r2:.2f}", f"{f.at(budgets[-1]):.3f}", predicted(m)]
        for m, f in fits.items()
    ],
)


# %% tags=["hide-input"]
own_now = result.series("ev_self")[-1]
ratio = [n / c for n, c in zip(result.series("ms_neighbour"), result.series("ms_same"), strict=True)]
own_dl = [q.delta_loss for t, q in study.quality().items() if t in result.depths and q.delta_loss is not None]
first, last = budgets[0], budgets[-1]
text = f"""
**Conclusion (measured).** From {first:,} to {last:,} training tokens per SAE ({last / first:.0f}×), the
seed ceiling's Matching Score went from {result.series("ms_same")[0]:.3f} to {result.series("ms_same")[-1]:.3f}
({fits["ms_same"].slope:+.3f} per tenfold budget, r² {fits["ms_same"].r2:.2f}) and SAE Match's from layer t−1
from {result.series("ms_neighbour")[0]:.3f} to {result.series("ms_neighbour")[-1]:.3f}
({fits["ms_neighbour"].slope:+.3f} per tenfold), against {result.series("ms_same_random")[-1]:.3f} for random
partners: at every budget the neighbour reaches {min(ratio):.0%}–{max(ratio):.0%} of the same-layer ceiling,
so matching across layers loses little beyond what two trainings of one layer disagree on. The explained
variance of the same-layer swap went from {result.series("ev_swap")[0]:.2f} to
{result.series("ev_swap")[-1]:.2f} ({fits["ev_swap"].slope:+.3f} per tenfold) while each SAE's own went from
{result.series("ev_self")[0]:.2f} to {own_now:.2f}; the approximation from layer t−1 went
from {result.series("ev_neighbour")[0]:.2f} to {result.series("ev_neighbour")[-1]:.2f}
({fits["ev_neighbour"].slope:+.3f} per tenfold), with ΔL from {result.series("dl_neighbour")[0]:.2f} to
{result.series("dl_neighbour")[-1]:.2f} nats/token.
"""
if config.epochs_arm is not None:
    seen, distinct = config.epochs_arm
    text += f"""
**Distinct tokens or epochs.** Training {distinct:,} distinct tokens for {seen // distinct} epochs recovers
{result.epochs_share("ev_self"):.0%} of the own reconstruction's gain from {distinct:,} to {seen:,} distinct
tokens, {result.epochs_share("ms_same"):.0%} of the seed ceiling's Matching Score gain, and
{result.epochs_share("ev_swap"):.0%} of the same-layer swap's: near 100% means the training steps carry
the gain, near 0% that it needs new tokens.
"""
if horizon:
    hs = [horizon[b] for b in budgets]
    cap = len(window) - 1
    text += f"""
**Persistence.** From layer {p_start}, the direct matching stays at least {PERSIST_CHANCE:g}× random partners
for {hs[0]} of {cap} layers at {first:,} tokens and {hs[-1]} at {last:,} (per budget: {", ".join(map(str, hs))}).
"""
    if hs[0] == cap:
        text += "Even the smallest budget reaches the cap: over this window the horizon does not separate the budgets.\n"
    elif hs[-1] > hs[0]:
        text += "The horizon grows with the budget: a short persistence is partly the SAEs' weakness.\n"
    else:
        text += "The horizon does not grow with the budget: the SAEs' training does not limit it here.\n"
text += f"""
**PREDICTION (extrapolated, not measured).** Continued log-linearly to {predict_at:.0e} tokens per SAE, the
ceiling's Matching Score would be {fits["ms_same"].at(predict_at):.2f} and SAE Match's
{fits["ms_neighbour"].at(predict_at):.2f}; the same-layer swap would explain
{fits["ev_swap"].at(predict_at):.2f} of the variance and the approximation from layer t−1
{fits["ev_neighbour"].at(predict_at):.2f}. The swap's line reaches today's own-SAE explained variance
({own_now:.2f}) at {fits["ev_swap"].reaches(own_now):.1e} tokens, the approximation's at
{fits["ev_neighbour"].reaches(own_now):.1e}. The ΔL line reaches 0 at {fits["dl_neighbour"].reaches(0.0):.1e}
tokens, which only says that it must bend: the SAEs' own ΔL at the profile's budget
({min(own_dl, default=float("nan")):.2f}–{max(own_dl, default=float("nan")):.2f} nats/token at these depths) is
a floor the approximation cannot go below. These are straight lines through {len(budgets)} budgets, carried
{predict_at / last:.0e}× beyond the largest: a direction and a rough size, not what Gemma Scope's SAEs give.
"""
display(Markdown(text))

# %% tags=["hide-input"]
assert len(result.rows) == len(result.depths) * (len(budgets) + (config.epochs_arm is not None))
assert all(0 <= r.ms_same <= 1 and 0 <= r.dead_fraction <= 1 for r in result.rows)
assert not horizon or (
    sorted(horizon) == budgets and all(0 <= h <= len(window) - 1 for h in horizon.values())
)
