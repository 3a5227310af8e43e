"""The dose–response of matching on the SAEs' training budget, on tiny SAEs and a tiny model."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import make_sae

from saematch_core.experiments import approximate, persistence, strength
from saematch_core.experiments.approximate import ApproximationConfig, Scheme
from saematch_core.experiments.inputs import Inputs, TokenBatch
from saematch_core.experiments.strength import LogFit, StrengthConfig, StrengthResult
from saematch_core.match import MatchConfig
from saematch_core.models import capture_forward
from saematch_core.profiles import SAETrainConfig

D, N_TRAIN, N_EVAL = 8, 1500, 300
RECIPE = SAETrainConfig(width=16, n_tokens=1024, batch_size=64, init_l0=3.0, l0_coef=0.05, decay_frac=0.2)


def _residuals(n: int, seed: int) -> dict[int, torch.Tensor]:
    """Three 'layers' of sparse-ish residuals sharing a dictionary that drifts with depth."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(24, D, generator=g)
    drift = torch.randn(24, D, generator=g) * 0.2
    codes = torch.relu(torch.randn(n, 24, generator=torch.Generator().manual_seed(seed)) - 1.0) * 3
    return {t: codes @ (atoms + t * drift) for t in range(3)}


def _inputs(tmp_path: Path, **changes: Any) -> Inputs:
    evals = _residuals(N_EVAL, 1)
    base: dict[str, Any] = {
        "saes": {},
        "activations": evals,
        "train_activations": {t: x.numpy() for t, x in _residuals(N_TRAIN, 2).items()},
        "cache_dir": tmp_path,
        "progress": False,
    }
    base.update(changes)
    return Inputs(**base)


def _config(**changes: Any) -> StrengthConfig:
    base: dict[str, Any] = {
        "depths": (1, 2),
        "budgets": (128, 256, 512, 1024),
        "epochs_arm": (512, 128),
        "recipe": RECIPE,
        "n_null": 2,
        "delta_loss": False,
    }
    base.update(changes)
    return StrengthConfig(**base)


def test_config_checks_every_field() -> None:
    for bad, match in [
        ({"budgets": (256, 128)}, "budgets: expected ascending"),
        ({"budgets": (128, 128)}, "budgets: expected ascending"),
        ({"budgets": (0, 128)}, "budgets: expected ascending"),
        ({"budgets": ()}, "budgets: expected ascending"),
        ({"epochs_arm": (128, 512)}, r"epochs_arm: expected \(tokens_seen, distinct\)"),
        ({"epochs_arm": (128, 0)}, r"epochs_arm: expected \(tokens_seen, distinct\)"),
        ({"depths": (0, 2)}, "depths: expected layers >= 1"),
        ({"depths": (2, 2)}, "depths: expected distinct layers"),
        ({"n_null": -1}, "n_null: expected an int >= 0"),
        ({"max_eval_rows": 0}, "max_eval_rows: expected None or an int >= 1"),
        ({"outlier_factor": 1.0}, "outlier_factor: expected a number > 1"),
        ({"median_norms": {1: -1.0}}, "median_norms: expected a mapping"),
    ]:
        with pytest.raises(ValueError, match=f"StrengthConfig.{match}"):
            _config(**bad)
    for bad, match in [
        ({"recipe": {"width": 16}}, "recipe: expected a SAETrainConfig"),
        ({"match": "folded"}, "match: expected a MatchConfig"),
        ({"reuse": 1}, "reuse: expected a bool"),
    ]:
        with pytest.raises(TypeError, match=f"StrengthConfig.{match}"):
            _config(**bad)
    cfg = StrengthConfig.for_recipe(SAETrainConfig(n_tokens=4096))
    assert cfg.budgets == (512, 1024, 2048, 4096) and cfg.epochs_arm == (2048, 512)
    assert StrengthConfig.for_recipe(RECIPE, epochs_arm=None).epochs_arm is None


def test_log_fit_recovers_a_line_and_says_when_it_cannot() -> None:
    tokens = [1e3, 1e4, 1e5, 1e6]
    fit = LogFit.of(tokens, [0.1 + 0.05 * math.log10(t) for t in tokens])
    assert fit.slope == pytest.approx(0.05) and fit.intercept == pytest.approx(0.1)
    assert fit.r2 == pytest.approx(1.0) and fit.n_points == 4
    assert fit.at(1e9) == pytest.approx(0.55)
    assert fit.reaches(0.55) == pytest.approx(1e9, rel=1e-9)
    falling = LogFit.of(tokens, [0.5, 0.4, 0.3, 0.2])
    assert falling.reaches(0.0) == pytest.approx(1e8) and falling.reaches(0.6) == pytest.approx(1e2)
    flat = LogFit.of(tokens, [0.6, 0.6, 0.6, 0.6])
    assert fit.meets(flat) == pytest.approx(1e10) and flat.meets(fit) == math.inf
    assert math.isnan(LogFit.of([1e3, 1e4], [0.1, float("nan")]).slope)
    noisy = LogFit.of(tokens, [0.1, 0.3, 0.2, 0.4])
    assert 0 < noisy.r2 < 1
    with pytest.raises(ValueError, match="tokens: expected > 0"):
        fit.at(0)


def test_run_trains_each_sae_once_caches_rows_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = strength.train_sae

    def counting(x: Any, config: SAETrainConfig, **kw: Any) -> Any:
        calls.append(config.n_tokens)
        return real(x, config, **kw)

    monkeypatch.setattr(strength, "train_sae", counting)
    inputs, cfg = _inputs(tmp_path), _config()
    res = strength.run(inputs, cfg)
    assert res.depths == (1, 2) and res.budgets == cfg.budgets
    assert len(res.rows) == 2 * (4 + 1)
    # depth 1: layer 1 (two seeds) and 0 at 4 budgets, two epochs-arm SAEs; depth 2: layer 2 (two
    # seeds) and layer 1 seed 0, which depth 1 already trained.
    assert len(calls) == (12 + 2) + (8 + 2)
    assert len(list((tmp_path / "strength_sae").glob("*.safetensors"))) == len(calls)
    for r in res.rows:
        assert all(s > 0 for s in r.train_seconds) and r.measure_seconds > 0
        assert 0 <= r.ms_same <= 1 and 0 <= r.ms_same_random <= 1 and math.isfinite(r.ev_swap)
        assert math.isnan(r.dl_neighbour)  # delta_loss off
        if r.arm == "epochs":
            assert (r.tokens_seen, r.distinct_tokens) == (512, 128) and len(r.train_seconds) == 2
            assert math.isnan(r.ms_neighbour) and math.isnan(r.ev_neighbour)
        else:
            assert r.distinct_tokens == r.tokens_seen and len(r.train_seconds) == 3
            assert 0 <= r.ms_neighbour <= 1 and math.isfinite(r.ev_neighbour)
    # SAEs trained longer reconstruct better (the dose of the dose–response acts)
    assert res.series("ev_self")[-1] > res.series("ev_self")[0]
    assert StrengthResult.from_dict(res.to_dict()).to_dict() == res.to_dict()
    comparison = res.epochs_comparison("ms_same")
    assert set(comparison) == {"same_seen", "epochs", "same_distinct"}
    assert all(math.isfinite(v) for v in comparison.values())
    share = res.epochs_share("ms_same")
    gain = comparison["same_seen"] - comparison["same_distinct"]
    assert share * gain == pytest.approx(comparison["epochs"] - comparison["same_distinct"])
    assert sorted(res.train_seconds()) == [128, 256, 512, 1024]
    assert math.isfinite(res.fit("ev_self").slope)

    # A rerun reads every row; nothing is trained.
    calls.clear()
    assert strength.run(inputs, cfg).to_dict() == res.to_dict() and calls == []
    # Resume: with the rows gone, the cached SAEs are read back, not retrained, and give the same rows.
    for f in (tmp_path / "strength_row").glob("*.json"):
        f.unlink()
    again = strength.run(inputs, cfg)
    assert calls == []
    for a, b in zip(again.rows, res.rows, strict=True):
        assert (a.ms_same, a.ev_swap, a.train_seconds) == (b.ms_same, b.ev_swap, b.train_seconds)
    # One budget's SAEs lost: only they are trained again.
    sae_files = sorted((tmp_path / "strength_sae").glob("*.json"))
    lost = [f for f in sae_files if '"n_tokens": 256' in f.read_text()]
    for f in lost:
        f.with_suffix(".safetensors").unlink()
    for f in (tmp_path / "strength_row").glob("*.json"):
        f.unlink()
    strength.run(inputs, cfg)
    assert calls == [256] * len(lost) and len(lost) == 5
    # Another seed is another epochs-arm subset: only those rows and SAEs change.
    calls.clear()
    strength.run(inputs.replace(seed=1), cfg)
    assert sorted(calls) == [512] * 4


def test_inputs_saes_are_reused_at_the_recipes_own_budget(tmp_path: Path) -> None:
    # The recipe's own budget covers every training row: the profile's SAEs are this training.
    recipe = dataclasses.replace(RECIPE, n_tokens=2048)
    cfg = _config(depths=(1,), budgets=(512, 2048), epochs_arm=None, recipe=recipe)
    inputs_a = _inputs(tmp_path / "a")
    trained = strength.run(inputs_a, dataclasses.replace(cfg, reuse=False))
    store = strength._SAEStore(inputs_a, cfg, tmp_path / "a")
    main = {t: store.get(strength._Slot(t, 0, 2048, None))[0] for t in (0, 1)}
    seed = store.get(strength._Slot(1, 1, 2048, None))[0]
    reused = strength.run(_inputs(tmp_path / "b", saes=main, families={"seed": {1: seed}}), cfg)
    assert all(math.isnan(s) for s in reused.row(1, 2048).train_seconds)
    assert all(s > 0 for s in reused.row(1, 512).train_seconds)
    assert len(list((tmp_path / "b" / "strength_sae").glob("*.safetensors"))) == 3  # budget 512 only
    for field in ("ms_same", "ev_swap", "ms_neighbour", "ev_neighbour", "ev_self"):
        assert getattr(reused.row(1, 2048), field) == pytest.approx(getattr(trained.row(1, 2048), field))
    # Default depths: the layers of the second-seed family.
    default = strength.run(
        _inputs(tmp_path / "b", saes=main | {2: main[1]}, families={"seed": {1: seed, 2: seed}}),
        dataclasses.replace(cfg, depths=None, budgets=(512,)),
    )
    assert default.depths == (1, 2)


def test_budget_saes_share_the_store_with_run_and_feed_persistence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    real = strength.train_sae

    def counting(x: Any, config: SAETrainConfig, **kw: Any) -> Any:
        calls.append((kw["meta"]["layer"], config.n_tokens))
        return real(x, config, **kw)

    monkeypatch.setattr(strength, "train_sae", counting)
    recipe = dataclasses.replace(RECIPE, n_tokens=2048)
    cfg = _config(depths=(1,), budgets=(256, 2048), epochs_arm=None, recipe=recipe)
    own = {0: make_sae(d_in=D, d_sae=16, seed=10), 1: make_sae(d_in=D, d_sae=16, seed=11)}
    inputs = _inputs(tmp_path, saes=own)
    strength.run(inputs, cfg)
    calls.clear()
    got = strength.budget_saes(inputs, cfg, [0, 1, 2])
    # Layers 0 and 1 at 256 tokens were trained by the run; at the recipe's budget the inputs' own
    # SAEs are taken; only layer 2 is new (at 2048 there is no own SAE of layer 2 to take).
    assert sorted(calls) == [(2, 256), (2, 2048)]
    assert sorted(got) == [256, 2048] and all(sorted(v) == [0, 1, 2] for v in got.values())
    assert got[2048][0] is own[0] and got[2048][1] is own[1]
    assert got[256][1].d_sae == 16 and got[256][1] is not own[1]
    calls.clear()
    again = strength.budget_saes(inputs, cfg, [2, 1])
    assert calls == [] and torch.equal(again[256][2].W_enc, got[256][2].W_enc)
    # The persistence experiment follows features through one budget's SAEs.
    res = persistence.run(
        inputs.replace(saes=got[256]), persistence.PersistenceConfig(starts=(0,), max_distance=2)
    )
    assert [r.distance for r in res.rows] == [1, 2]
    assert all(0 <= r.score_direct <= 1 and 0 <= r.score_random <= 1 for r in res.rows)
    with pytest.raises(ValueError, match="expected training rows of layer 7"):
        strength.budget_saes(inputs, cfg, [1, 7])
    for bad in ([], [1, 1], [-1], ["1"]):
        with pytest.raises(ValueError, match="layers: expected distinct layers"):
            strength.budget_saes(inputs, cfg, bad)  # type: ignore[arg-type]


def test_max_eval_rows_thins_the_kept_rows_evenly(tmp_path: Path) -> None:
    keep = np.ones(N_EVAL, dtype=bool)
    keep[::7] = False
    inputs = _inputs(tmp_path, keep=keep)
    thin = strength._thinned(inputs, 50)
    assert thin.sum() == 50 and not (thin & ~keep).any()
    assert strength._thinned(inputs, 10_000).tolist() == keep.tolist()
    few = strength.run(inputs, _config(depths=(1,), budgets=(128,), epochs_arm=None, max_eval_rows=50))
    full = strength.run(inputs, _config(depths=(1,), budgets=(128,), epochs_arm=None))
    assert few.rows[0].ev_self != full.rows[0].ev_self  # measured on other rows, cached apart
    assert few.rows[0].train_seconds == full.rows[0].train_seconds  # the same SAEs


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Inputs\.train_activations: expected the training rows"):
        strength.run(_inputs(tmp_path, train_activations=None), _config())
    with pytest.raises(ValueError, match=r"Inputs.model, Inputs.tokens"):
        strength.run(_inputs(tmp_path), _config(delta_loss=True))
    with pytest.raises(ValueError, match=r"Inputs\.activations: expected activations of layer 3"):
        strength.run(_inputs(tmp_path), _config(depths=(3,)))
    with pytest.raises(ValueError, match="epochs_arm: expected distinct <= 1500"):
        strength.run(_inputs(tmp_path), _config(depths=(1,), epochs_arm=(4000, 2000)))


def test_delta_loss_agrees_with_the_approximation_experiment(tmp_path: Path) -> None:
    from test_approximate import tiny_llama

    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    train_ids = torch.randint(0, 64, (40, 32), generator=g)
    eval_ids = torch.randint(0, 64, (6, 32), generator=g)

    def rows(ids: torch.Tensor) -> dict[int, np.ndarray]:
        cap = capture_forward(model, ids, layers=[0, 1, 2])
        return {t: cap.hidden[t][:, 1:].reshape(-1, cap.hidden[t].shape[-1]).numpy() for t in (0, 1, 2)}

    evals = {t: torch.from_numpy(x) for t, x in rows(eval_ids).items()}
    inputs = Inputs(
        saes={},
        activations=evals,
        train_activations=rows(train_ids),
        model=model,
        tokens=TokenBatch(eval_ids, None),
        cache_dir=tmp_path,
        progress=False,
    )
    recipe = dataclasses.replace(RECIPE, width=48, init_l0=8.0)
    cfg = _config(
        depths=(2,), budgets=(256, 512), epochs_arm=None, recipe=recipe, delta_loss=True, outlier_factor=1e9
    )
    res = strength.run(inputs, cfg)
    store = strength._SAEStore(inputs, cfg, tmp_path)
    for budget in cfg.budgets:
        prev = store.get(strength._Slot(1, 0, budget, None))[0]
        cur = store.get(strength._Slot(2, 0, budget, None))[0]
        scheme = Scheme(kind="match", match=MatchConfig(fold=True))
        ref = approximate.run(
            Inputs(saes={1: prev, 2: cur}, model=model, tokens=TokenBatch(eval_ids, None), progress=False),
            ApproximationConfig(schemes=(scheme,), outlier_factor=1e9, layers=(2,)),
        )
        row = ref.rows[0]
        assert res.row(2, budget).dl_neighbour == pytest.approx(row.delta_loss, rel=1e-4, abs=1e-6)
        # Section 5's explained variance removes the mean of the error, the seed ceiling's (used here)
        # does not: it can only be lower.
        assert res.row(2, budget).ev_neighbour <= row.explained_variance + 1e-9


@pytest.mark.slow
def test_the_profiles_saes_are_the_recipe_at_its_own_budget(tmp_path: Path) -> None:
    """What ``reuse`` relies on: retraining with the recipe at the profile's budget gives its SAEs."""
    from saematch_core.experiments.study import load_study

    study = load_study("smoke", cache_dir=tmp_path)
    inputs = study.inputs(
        families={"seed": study.family("seed")}, train_activations=study.train_activations()
    )
    cfg = StrengthConfig(recipe=study.profile.sae, budgets=(study.profile.sae.n_tokens,), reuse=False)
    store = strength._SAEStore(inputs, cfg, tmp_path / "retrained")
    for layer, replica, given in ((1, 0, study.saes[1]), (1, 1, study.family("seed")[1])):
        again, seconds = store.get(strength._Slot(layer, replica, study.profile.sae.n_tokens, None))
        assert seconds > 0
        for name, t in given.tensors().items():
            torch.testing.assert_close(again.tensors()[name], t, rtol=1e-5, atol=1e-6)
