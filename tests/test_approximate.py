"""Hidden-state approximation on tiny random Llama and Gemma 2 models built from config."""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from saematch_core.experiments import approximate
from saematch_core.experiments.approximate import (
    ApproximationConfig,
    ApproximationResult,
    ApproxRow,
    Scheme,
    hybrid_schemes,
    l0_sweep,
    loss_split,
    replaced_layer,
)
from saematch_core.experiments.inputs import Inputs, TokenBatch
from saematch_core.experiments.measures import replacement
from saematch_core.experiments.measures.replacement import CleanDist, counted_tokens
from saematch_core.experiments.measures.swap import permute_codes
from saematch_core.fold import rescale_features
from saematch_core.match import MatchConfig
from saematch_core.models import decoder_layers
from saematch_core.sae import SAE

D, VOCAB, N_LAYERS = 32, 64, 3


def approximate_layers(
    model: nn.Module,
    ids: torch.Tensor,
    saes: dict[int, SAE],
    config: ApproximationConfig | None = None,
    *,
    layers: list[int] | None = None,
    fit_tokens: torch.Tensor | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> ApproximationResult:
    """:func:`approximate.run` on these inputs (the tests' shorthand)."""
    cfg = ApproximationConfig() if config is None else config
    if layers is not None:
        cfg = replace(cfg, layers=tuple(layers))
    inputs = Inputs(
        saes=saes,
        model=model,
        tokens=TokenBatch(ids, None),
        fit_tokens=None if fit_tokens is None else TokenBatch(fit_tokens, None),
        cache_dir=cache_dir,
        progress=progress,
    )
    return approximate.run(inputs, cfg)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
    )
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma2() -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        initializer_range=0.3,
        sliding_window=4,
    )
    torch.manual_seed(2)
    return Gemma2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    return tiny_llama() if request.param == "llama" else tiny_gemma2()


def tokens(n: int = 4, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq), generator=g)


def exact_sae(center: torch.Tensor, seed: int = 0) -> SAE:
    """A JumpReLU SAE that reconstructs any input almost exactly: features ±u_k of an orthonormal
    basis, with per-feature scales so that folding matters."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    w_dec = torch.cat([basis.T, -basis.T])  # (2D, D)
    sae = SAE(
        W_enc=w_dec.T.contiguous(),
        b_enc=-(center @ w_dec.T),
        W_dec=w_dec,
        b_dec=center.clone(),
        threshold=torch.full((2 * D,), 1e-4),
    )
    return rescale_features(sae, 0.2 + 3 * torch.rand(2 * D, generator=g))


def sae_set(model: nn.Module) -> dict[int, SAE]:
    with torch.no_grad():
        hs = model(input_ids=tokens(), output_hidden_states=True).hidden_states
    return {t: exact_sae(hs[t + 1][:, 1:].reshape(-1, D).mean(0), seed=t) for t in range(N_LAYERS)}


def no_linear() -> tuple[Scheme, ...]:
    return (
        Scheme(kind="exact"),
        Scheme(kind="drop"),
        Scheme(kind="encdec_current"),
        Scheme(kind="encdec_previous"),
        Scheme(kind="match", match=MatchConfig(fold=True)),
        Scheme(kind="match", match=MatchConfig(fold=False)),
    )


def test_exact_replacement_has_zero_delta_loss_and_unit_ev(model: nn.Module, tmp_path) -> None:
    cfg = ApproximationConfig(schemes=(Scheme(kind="exact"), Scheme(kind="drop")))
    res = approximate_layers(model, tokens(), sae_set(model), cfg, cache_dir=tmp_path, progress=False)
    assert res.layers == (1, 2)
    for t in res.layers:
        row = res.row(t, "exact")
        assert abs(row.delta_loss) < 1e-6 and abs(row.kl) < 1e-9
        assert row.explained_variance == pytest.approx(1.0, abs=1e-9)
        assert row.n_tokens == 4 * 11  # position 0 of each chunk is not counted
        assert row.n_loss_tokens == 4 * 10
        # dropping a random block does change the loss: the metric is not trivially zero
        assert abs(res.row(t, "drop").delta_loss) > 1e-4
        assert res.row(t, "drop").explained_variance < 1


def test_suffix_run_agrees_with_full_model_hooks(model: nn.Module, tmp_path) -> None:
    saes = sae_set(model)
    ids = tokens(n=2, seq=8)
    fast = approximate_layers(
        model,
        ids,
        saes,
        ApproximationConfig(schemes=no_linear()),
        layers=[1],
        cache_dir=tmp_path / "a",
        progress=False,
    )
    slow = approximate_layers(
        model,
        ids,
        saes,
        ApproximationConfig(schemes=no_linear(), suffix=False),
        layers=[1],
        cache_dir=tmp_path / "b",
        progress=False,
    )
    assert len(fast.rows) == len(no_linear())
    for a, b in zip(fast.rows, slow.rows, strict=True):
        assert (a.layer, a.scheme) == (b.layer, b.scheme)
        assert a.delta_loss == pytest.approx(b.delta_loss, abs=1e-5)
        assert a.explained_variance == pytest.approx(b.explained_variance, abs=1e-6)
        assert a.kl == pytest.approx(b.kl, abs=1e-5)


def test_shared_clean_passes_give_the_same_rows(model: nn.Module, tmp_path, monkeypatch) -> None:
    # Several layers and batches: the shared clean passes must be reused, not mixed up between batches.
    saes = sae_set(model)
    ids = tokens(n=5, seq=9, seed=3)
    run = functools.partial(
        approximate_layers,
        model,
        ids,
        saes,
        ApproximationConfig(schemes=no_linear(), batch_size=2),
        layers=[1, 2],
        progress=False,
    )
    calls = []
    real = replacement.capture_forward
    monkeypatch.setattr(replacement, "capture_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = run(cache_dir=tmp_path / "a")
    assert len(calls) == 3  # one clean pass per batch, for both layers
    monkeypatch.setattr(replacement, "_CAPTURE_BUDGET", 0)
    alone = run(cache_dir=tmp_path / "b")
    assert len(calls) == 3 + 2 * 3
    for a, b in zip(shared.rows, alone.rows, strict=True):
        assert (a.layer, a.scheme) == (b.layer, b.scheme)
        assert a.delta_loss == b.delta_loss and a.explained_variance == b.explained_variance


def test_planted_permutation_matching_beats_identity_order(model: nn.Module, tmp_path) -> None:
    saes = sae_set(model)
    perm = torch.randperm(2 * D, generator=torch.Generator().manual_seed(3))
    saes[2] = saes[1].permute(perm)
    cfg = ApproximationConfig(
        schemes=(
            Scheme(kind="encdec_previous"),
            Scheme(kind="match", match=MatchConfig(fold=True)),
            Scheme(kind="match", match=MatchConfig(solver="identity"), label="identity_order"),
        )
    )
    res = approximate_layers(model, tokens(), saes, cfg, layers=[2], cache_dir=tmp_path, progress=False)
    matched, ident = res.row(2, "match_folded"), res.row(2, "identity_order")
    # SAE 2 is SAE 1 reordered: the matching undoes the reordering, i.e. it reproduces SAE 1's reconstruction
    assert matched.explained_variance == pytest.approx(
        res.row(2, "encdec_previous").explained_variance, abs=1e-5
    )
    assert matched.explained_variance > ident.explained_variance + 0.5
    # a random model's loss is far from optimal, so ΔL may have either sign; KL to the clean model may not
    assert 0 < matched.kl < ident.kl


def test_replaced_layer_passthrough_leaves_logits_and_no_hooks(model: nn.Module) -> None:
    ids = tokens()
    block = decoder_layers(model)[1]
    # transformers may install its own output-capturing hooks: compare with what was there before
    before = [dict(b._forward_hooks) for b in decoder_layers(model)]
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        garbage = torch.randn(ids.shape[0], ids.shape[1], D)
        with replaced_layer(model, 1, garbage, passthrough=torch.ones(ids.shape, dtype=torch.bool)):
            assert len(block._forward_hooks) == len(before[1]) + 1
            same = model(input_ids=ids).logits
        with replaced_layer(model, 1, garbage):
            changed = model(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="boom"), replaced_layer(model, 1, garbage):
            raise RuntimeError("boom")
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert not torch.allclose(changed, clean)
    assert [dict(b._forward_hooks) for b in decoder_layers(model)] == before


def test_hybrid_endpoints_match_plain_schemes(tmp_path) -> None:
    model = tiny_llama()
    saes = sae_set(model)
    cfg = MatchConfig(fold=True)
    schemes = (Scheme(kind="match", match=cfg), *hybrid_schemes([0.0, 0.5, 1.0], cfg))
    res = approximate_layers(
        model, tokens(), saes, ApproximationConfig(schemes=schemes), cache_dir=tmp_path, progress=False
    )
    for t in res.layers:
        assert res.row(t, "hybrid_q1").delta_loss == pytest.approx(
            res.row(t, "match_folded").delta_loss, abs=1e-6
        )
        assert res.row(t, "hybrid_q1").explained_variance == pytest.approx(
            res.row(t, "match_folded").explained_variance, abs=1e-9
        )
    # q = 0: SAE t−1's own reconstruction, shifted to SAE t's decoder bias
    prev, cur = saes[0], saes[1]
    with torch.no_grad():
        hs = model(input_ids=tokens(), output_hidden_states=True).hidden_states
    h_prev, h_cur = hs[1][:, 1:].reshape(-1, D), hs[2][:, 1:].reshape(-1, D)
    h_hat = prev(h_prev).recon - prev.b_dec + cur.b_dec
    err = h_hat - h_cur
    ev = 1 - ((err - err.mean(0)) ** 2).sum(1).mean() / ((h_cur - h_cur.mean(0)) ** 2).sum(1).mean()
    assert res.row(1, "hybrid_q0").explained_variance == pytest.approx(float(ev), abs=1e-4)


def test_linear_map_fitted_on_same_tokens_beats_drop(tmp_path) -> None:
    model = tiny_llama()
    ids = tokens(n=6, seq=16)
    cfg = ApproximationConfig(schemes=(Scheme(kind="drop"), Scheme(kind="linear")), outlier_factor=None)
    res = approximate_layers(model, ids, {}, cfg, fit_tokens=ids, cache_dir=tmp_path, progress=False)
    for t in res.layers:
        # identity is one of the affine maps least squares chooses from
        assert res.row(t, "linear").explained_variance >= res.row(t, "drop").explained_variance - 1e-9
        assert res.row(t, "linear").explained_variance > 0.5
    with pytest.raises(ValueError, match="fit_tokens"):
        approximate_layers(model, ids, {}, cfg, cache_dir=tmp_path, progress=False)


def test_results_are_cached_per_layer_and_scheme(tmp_path, monkeypatch) -> None:
    import saematch_core.experiments.approximate as approx

    model = tiny_llama()
    cfg = ApproximationConfig(schemes=(Scheme(kind="drop"),))
    first = approximate_layers(model, tokens(), {}, cfg, cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "approximation").glob("*.json"))) == 2  # layers 1 and 2

    seen: list[tuple[int, tuple[str, ...]]] = []
    real = approx._approximate_layer

    def spy(model, tokens, mask, saes, t, config, state, progress):  # type: ignore[no-untyped-def]
        seen.append((t, tuple(s.label for s in config.schemes)))
        return real(model, tokens, mask, saes, t, config, state, progress)

    monkeypatch.setattr(approx, "_approximate_layer", spy)
    again = approximate_layers(model, tokens(), {}, cfg, cache_dir=tmp_path, progress=False)
    assert seen == []
    assert again.to_dict() == first.to_dict()  # (NaN != NaN, so compare the encoded form)
    # a new scheme is computed alone; a relabelled old one is read back under its new name
    more = (Scheme(kind="drop", label="skip"), Scheme(kind="exact"))
    both = approximate_layers(
        model, tokens(), {}, replace(cfg, schemes=more), cache_dir=tmp_path, progress=False
    )
    assert seen == [(1, ("exact",)), (2, ("exact",))]
    assert both.row(2, "skip").delta_loss == first.row(2, "drop").delta_loss
    # other tokens are other inputs
    approximate_layers(model, tokens(seed=1), {}, cfg, cache_dir=tmp_path, progress=False)
    assert seen[-1] == (2, ("drop",))
    assert ApproximationResult.from_dict(first.to_dict()).to_dict() == first.to_dict()
    assert math.isnan(ApproximationResult.from_dict(first.to_dict()).rows[0].l0_cur)


def test_outliers_pass_through_and_are_notcounted_tokens() -> None:
    h = torch.randn(2, 6, D)
    h[1, 3] *= 1000
    counted, outlier = counted_tokens(torch.ones(2, 6, dtype=torch.bool), None, h, 10.0)
    assert outlier.sum() == 1 and bool(outlier[1, 3])
    assert not counted[:, 0].any() and not counted[1, 3]
    assert int(counted.sum()) == 2 * 5 - 1
    # a given median (as in an activation cache's manifest) replaces the batch median
    _, none = counted_tokens(torch.ones(2, 6, dtype=torch.bool), None, h, 10.0, (None, 1e6))
    assert not none.any()


def test_permute_codes_moves_and_sums() -> None:
    codes = torch.tensor([[1.0, 2.0, 3.0]])
    out = permute_codes(codes, torch.tensor([2, 0, -1]), 4)
    assert out.tolist() == [[2.0, 0.0, 1.0, 0.0]]
    assert permute_codes(codes, torch.tensor([1, 1, 1]), 2).tolist() == [[0.0, 6.0]]


def test_scheme_means_average_over_corpora_and_layers() -> None:
    def row(t: int, s: str, dl: float) -> ApproxRow:
        return ApproxRow(
            layer=t, scheme=s, delta_loss=dl, delta_loss_se=0.0, clean_loss=2.0, explained_variance=1 - dl,
            kl=0.0, n_tokens=1, n_loss_tokens=1, n_passthrough=0,
        )  # fmt: skip

    web = ApproximationResult(rows=(row(1, "drop", 0.1), row(2, "drop", 0.3)))
    code = ApproximationResult(rows=(row(1, "drop", math.nan), row(2, "drop", 0.5)))
    headers, rows = approximate.scheme_means({"web": web, "code": code}, ["drop"], {"drop": "layer drop"})
    assert headers[0] == "scheme" and rows == [("layer drop", "0.300", "0.700")]


def test_loss_split_adds_up() -> None:
    rows = (
        ApproxRow(layer=1, scheme="match_folded", delta_loss=0.5, delta_loss_se=0.0, clean_loss=2.0,
                  explained_variance=0.8, kl=0.0, n_tokens=1, n_loss_tokens=1, n_passthrough=0),
        ApproxRow(layer=1, scheme="encdec_current", delta_loss=0.2, delta_loss_se=0.0, clean_loss=2.0,
                  explained_variance=0.9, kl=0.0, n_tokens=1, n_loss_tokens=1, n_passthrough=0),
    )  # fmt: skip
    (split,) = loss_split(ApproximationResult(rows=rows))
    assert split.reconstruction == 0.2 and split.matching == pytest.approx(0.3)
    assert split.total == split.reconstruction + split.matching


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"Scheme\.kind"):
        Scheme(kind="bogus")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Scheme\.match"):
        Scheme(kind="match")
    with pytest.raises(ValueError, match=r"Scheme\.quantile"):
        Scheme(kind="hybrid", quantile=1.5, match=MatchConfig())
    with pytest.raises(ValueError, match=r"Scheme\.quantile"):
        Scheme(kind="drop", quantile=0.5)
    with pytest.raises(ValueError, match="duplicates"):
        ApproximationConfig(schemes=(Scheme(kind="drop"), Scheme(kind="drop")))
    with pytest.raises(ValueError, match="batch_size"):
        ApproximationConfig(batch_size=0)
    with pytest.raises(ValueError, match="tokens"):
        approximate_layers(tiny_llama(), torch.zeros(3, dtype=torch.long), {})
    assert replace(Scheme(kind="drop"), label="x").label == "x"
    assert math.isfinite(ApproximationConfig().ridge)


def test_l0_sweep_reports_measured_l0_per_variant(tmp_path) -> None:
    model = tiny_llama()
    saes = sae_set(model)
    dense = (saes[0], saes[1])
    # a sparser variant of SAE 1: raise the thresholds so fewer features fire
    assert saes[1].threshold is not None
    sparse = (saes[0], replace(saes[1], threshold=saes[1].threshold + 0.5))
    cfg = ApproximationConfig(
        schemes=(Scheme(kind="encdec_current"), Scheme(kind="match", match=MatchConfig()))
    )
    inputs = Inputs(
        saes={}, model=model, tokens=TokenBatch(tokens(), None), cache_dir=tmp_path, progress=False
    )
    res = l0_sweep(inputs, cfg, layer=1, variants={"dense": dense, "sparse": sparse})
    assert [(r.variant, r.row.scheme) for r in res.rows] == [
        ("dense", "encdec_current"),
        ("dense", "match_folded"),
        ("sparse", "encdec_current"),
        ("sparse", "match_folded"),
    ]
    l0s, ev = res.series("encdec_current", "explained_variance")
    assert l0s[0] < l0s[1] == pytest.approx(D, abs=0.5)  # ±u_k: one of each pair fires
    assert ev[0] < ev[1] == pytest.approx(1.0, abs=1e-4)
    assert res.rows[0].row.l0_prev == pytest.approx(D, abs=0.5)


def test_outlier_tokens_are_passed_through_and_counted_apart(tmp_path) -> None:
    model = tiny_llama()
    ids = tokens()
    # a factor barely above 1 flags about half of the tokens as "outliers"
    cfg = ApproximationConfig(schemes=(Scheme(kind="drop"),), outlier_factor=1.01)
    res = approximate_layers(model, ids, {}, cfg, layers=[1], cache_dir=tmp_path, progress=False)
    row = res.row(1, "drop")
    assert row.n_passthrough > 0 and row.n_tokens > 0
    assert row.n_tokens + row.n_passthrough == 4 * 11
    full = approximate_layers(
        model, ids, {}, replace(cfg, outlier_factor=None), layers=[1], cache_dir=tmp_path, progress=False
    )
    assert full.row(1, "drop").n_passthrough == 0 and full.row(1, "drop").n_tokens == 4 * 11
    # fewer replaced tokens, less damage
    assert row.kl < full.row(1, "drop").kl
    # medians from an activation cache replace the batch medians (here: huge, so no outliers)
    given = replace(cfg, median_norms={0: 1e9, 1: 1e9})
    res2 = approximate_layers(model, ids, {}, given, layers=[1], cache_dir=tmp_path, progress=False)
    assert res2.row(1, "drop").n_passthrough == 0
    assert res2.row(1, "drop").kl == pytest.approx(full.row(1, "drop").kl)


def test_clean_distribution_gives_the_reference_loss_and_kl() -> None:
    from saematch_core.experiments.approximate import _token_kl, _token_loss

    g = torch.Generator().manual_seed(4)
    clean, logits = torch.randn(3, 7, 50, generator=g), torch.randn(3, 7, 50, generator=g)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    dist = CleanDist(clean, ids)
    loss, kl = dist.compare(logits)
    torch.testing.assert_close(dist.loss, _token_loss(clean, ids))
    torch.testing.assert_close(loss, _token_loss(logits, ids))
    torch.testing.assert_close(kl, _token_kl(clean, logits))
    assert float(dist.compare(clean)[1].abs().max()) < 1e-6  # no change, no divergence
