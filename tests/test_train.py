"""SAE trainers: planted dictionaries are recovered, scaling is folded back, STE gradients, quality."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from saematch_core import models, train
from saematch_core.models import load_model, native_bfloat16, replace_residual, token_losses
from saematch_core.profiles import SAETrainConfig, get_profile
from saematch_core.train import (
    DeltaLoss,
    SAETrainer,
    _JumpReLU,
    _Step,
    column_quantile,
    delta_loss,
    input_scale,
    sae_quality,
    sae_replacement,
    train_sae,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls: a second OpenMP thread only spins (badly so on a shared 2-core machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


D_IN, N_ATOMS, K = 64, 96, 4
WIDTH = 2 * N_ATOMS  # over-complete, as SAEs are: each atom needs a row, not each row an atom


def _planted(n: int = 8192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x = f D + offset with exactly K active features per token, magnitudes in [1, 2].

    The dictionary D is always the same; ``seed`` draws the codes.
    """
    # Not seed 0: the trainer initialises W_dec from seed 0 and must not start at the answer.
    dictionary = torch.randn(N_ATOMS, D_IN, generator=torch.Generator().manual_seed(1234))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, N_ATOMS, generator=g).argsort(1)[:, :K]
    f = torch.zeros(n, N_ATOMS).scatter(1, idx, 1 + torch.rand(n, K, generator=g))
    return f @ dictionary * 7.0, dictionary


def _best_cosines(w_dec: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """For each ground-truth atom, the best cosine with a learned decoder row."""
    rows = w_dec / w_dec.norm(dim=1, keepdim=True)
    return (rows @ dictionary.T).max(0).values


@pytest.mark.parametrize(
    ("activation", "overrides"),
    [
        ("jumprelu", {"l0_coef": 1.0, "n_tokens": 100_000}),
        ("topk", {"k": K, "n_tokens": 150_000}),
        ("relu", {"l1_coef": 3.0, "n_tokens": 150_000}),
    ],
)
def test_planted_dictionary_is_recovered(activation: str, overrides: dict[str, float]) -> None:
    x, dictionary = _planted()
    config = SAETrainConfig(
        activation=activation,  # type: ignore[arg-type]
        width=WIDTH,
        batch_size=256,
        lr=3e-3,
        init_l0=8,
        **overrides,  # type: ignore[arg-type]
    )
    result = train_sae(x, config, progress=False)
    cos = _best_cosines(result.sae.W_dec, dictionary)
    assert float((cos > 0.9).float().mean()) >= 0.95 and float(cos.mean()) > 0.97
    held_out = sae_quality(result.sae, _planted(n=2048, seed=1)[0])
    if activation != "relu":  # L1 shrinks codes and leaves small extra activations; its L0 runs higher
        assert 3.5 <= held_out.l0 <= 4.5
    assert held_out.fvu < (0.3 if activation == "relu" else 0.1)
    assert torch.allclose(result.sae.W_dec.norm(dim=1), torch.ones(WIDTH), atol=1e-5)


def test_untrained_baseline_does_not_recover() -> None:
    # The cosine criterion above is not met by chance: random unit rows score far lower.
    _, dictionary = _planted()
    random_rows = torch.randn(WIDTH, D_IN, generator=torch.Generator().manual_seed(5))
    assert float(_best_cosines(random_rows, dictionary).mean()) < 0.6


def _small_config(**overrides: object) -> SAETrainConfig:
    base = {"width": 32, "n_tokens": 4096, "batch_size": 128, "init_l0": 4.0, "l0_coef": 0.03, "k": 4}
    return SAETrainConfig(**{**base, **overrides})  # type: ignore[arg-type]


def test_input_scale_is_folded_back() -> None:
    x, _ = _planted(n=1024)
    a = train_sae(x, _small_config(), progress=False)
    b = train_sae(10 * x, _small_config(), progress=False)
    assert b.input_scale == pytest.approx(a.input_scale / 10, rel=1e-6)
    # Training sees identical scaled inputs, so the dictionaries agree and θ, biases scale with x.
    torch.testing.assert_close(b.sae.W_dec, a.sae.W_dec, rtol=1e-4, atol=1e-4)
    assert b.sae.threshold is not None and a.sae.threshold is not None
    torch.testing.assert_close(b.sae.threshold, 10 * a.sae.threshold, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.sae.b_dec, 10 * a.sae.b_dec, rtol=1e-4, atol=1e-4)
    # The saved SAE works on raw inputs: its FVU on raw x equals the one on scaled x.
    assert sae_quality(b.sae, 10 * x).fvu == pytest.approx(sae_quality(a.sae, x).fvu, rel=1e-3)
    assert input_scale(x * a.input_scale) == pytest.approx(1.0, rel=1e-6)


def test_training_is_deterministic() -> None:
    x, _ = _planted(n=1024)
    for activation in ("jumprelu", "topk"):
        a = train_sae(x, _small_config(activation=activation, k=4), progress=False)
        b = train_sae(x, _small_config(activation=activation, k=4), progress=False)
        for name, t in a.sae.tensors().items():
            assert torch.equal(t, b.sae.tensors()[name]), (activation, name)
    c = train_sae(x, _small_config(seed=1), progress=False)
    assert not torch.equal(c.sae.W_dec, a.sae.W_dec)


def test_ste_gradients_match_the_formulas() -> None:
    z = torch.tensor([[0.50, 0.99, 2.0], [1.01, 0.2, 1.0]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    eps = 0.1
    out = _JumpReLU.apply(z, theta, eps)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, 0.0, 2.0], [1.01, 0.0, 0.0]]))
    out.sum().backward()
    assert z.grad is not None and theta.grad is not None
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    # |z - θ| < ε/2 for (0, 1), (1, 0) and (1, 2): each contributes −θ/ε = −10.
    torch.testing.assert_close(theta.grad, torch.tensor([-10.0, -10.0, -10.0]))
    theta.grad = None
    step = _Step.apply(z, theta, eps)
    assert isinstance(step, torch.Tensor)
    step.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-10.0, -10.0, -10.0]))


def test_quality_reference() -> None:
    x, _ = _planted(n=512)
    sae = train_sae(x, _small_config(), progress=False).sae
    q = sae_quality(sae, x, batch_size=100)
    codes, recon = sae(x)
    assert q.n_tokens == 512
    assert q.l0 == pytest.approx(float((codes > 0).sum(1).float().mean()), rel=1e-6)
    fvu = float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert q.fvu == pytest.approx(fvu, rel=1e-4)
    assert q.dead_fraction == pytest.approx(float((codes.max(0).values <= 0).float().mean()))


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"x: expected shape \(n_tokens >= 2, d_in\), got \(5,\)"):
        train_sae(torch.zeros(5), _small_config(), progress=False)
    with pytest.raises(ValueError, match="x: expected inputs with non-zero norm"):
        train_sae(torch.zeros(10, 4), _small_config(), progress=False)
    with pytest.raises(TypeError, match=r"x: expected a torch\.Tensor or numpy array, got list"):
        train_sae([[1.0]], _small_config(), progress=False)  # type: ignore[arg-type]


def test_delta_loss_on_a_tiny_model() -> None:
    model = load_model(get_profile("smoke").model).model
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([12, 8])
    zero, clean = delta_loss(model, ids, lengths, 1, lambda h: h.clone())
    assert zero == 0.0
    x = torch.randn(256, 32) * 0.1
    sae = train_sae(x, _small_config(n_tokens=256), progress=False).sae
    bad, _ = delta_loss(model, ids, lengths, 1, lambda h: torch.zeros_like(h), clean=clean)
    assert bad != 0.0
    # Every token above the norm limit passes through unchanged: no effect at all.
    passthrough, _ = delta_loss(model, ids, lengths, 1, sae_replacement(sae, norm_limit=0.0), clean=clean)
    assert passthrough == 0.0
    replaced, _ = delta_loss(model, ids, lengths, 1, sae_replacement(sae, norm_limit=1e9), clean=clean)
    assert replaced != 0.0
    # Row blocks give the same number as one batch, and only real tokens from position 1 count.
    one_row, _ = delta_loss(model, ids, lengths, 1, sae_replacement(sae, norm_limit=1e9), batch_size=1)
    assert one_row == pytest.approx(replaced, rel=1e-5, abs=1e-7)
    with replace_residual(model, 1, sae_replacement(sae, norm_limit=1e9)):
        hooked = token_losses(model, ids)
    diff = hooked - clean
    reference = torch.cat([diff[0, 1:11], diff[1, 1:7]]).mean()
    assert replaced == pytest.approx(float(reference), rel=1e-5, abs=1e-7)


def test_delta_loss_probe_agrees_with_full_forward_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(get_profile("smoke").model).model
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([12, 9, 6])
    sae = train_sae(torch.randn(256, 32) * 0.1, _small_config(n_tokens=256), progress=False).sae
    probe = DeltaLoss(model, ids, lengths, batch_size=2)
    for layer in (0, 1, 2):
        for fn in (sae_replacement(sae, norm_limit=1e9), lambda h: 0.5 * h):
            ref, _ = delta_loss(model, ids, lengths, layer, fn, batch_size=2)
            assert probe(layer, fn) == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert probe(1, lambda h: h.clone()) == 0.0
    with pytest.raises(ValueError, match="replacement: expected output shape"):
        probe(1, lambda h: h[..., :3])
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(batch >= 1, seq >= 2\)"):
        DeltaLoss(model, ids[:0], lengths[:0])
    # A model whose suffix cannot be rerun falls back to full passes, with the same numbers.
    for module in (train, models):
        monkeypatch.setattr(module, "run_suffix", lambda *a, **k: None)
    fallback = DeltaLoss(model, ids, lengths, batch_size=2)
    ref, _ = delta_loss(model, ids, lengths, 1, lambda h: 0.5 * h, batch_size=2)
    assert fallback(1, lambda h: 0.5 * h) == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert fallback.suffix_ok is False
    assert probe.suffix_ok is True


def test_delta_loss_from_another_layer_agrees_with_full_forward_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = load_model(get_profile("smoke").model).model
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([12, 10, 7])
    probe = DeltaLoss(model, ids, lengths, batch_size=2, layers=(0, 1, 2))

    def mix(h_source: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * h_source + 0.25 * h

    # The same layer as its own source is the one-layer replacement.
    assert probe.from_source(1, 1, mix) == pytest.approx(probe(1, lambda h: 0.75 * h), rel=1e-5, abs=1e-7)
    # Without the suffix shortcut (full passes with a hook, the slow reference) the numbers agree.
    fast = [probe.from_source(2, 0, mix), probe.from_source(1, 0, lambda hs, h: hs)]
    for module in (train, models):
        monkeypatch.setattr(module, "run_suffix", lambda *a, **k: None)
    slow = DeltaLoss(model, ids, lengths, batch_size=2, layers=(0, 1, 2))
    assert slow.suffix_ok is False
    assert fast == pytest.approx(
        [slow.from_source(2, 0, mix), slow.from_source(1, 0, lambda hs, h: hs)], rel=1e-5
    )
    assert fast[1] != 0  # skipping block 1 changes the loss
    with pytest.raises(ValueError, match=r"layer: expected one of the recorded layers \[0, 1, 2\], got 3"):
        probe.from_source(3, 2, mix)


def test_small_saes_train_single_threaded_and_restore_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = torch.Tensor.backward

    def spy(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        seen.append(torch.get_num_threads())
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    torch.set_num_threads(2)
    monkeypatch.setattr(torch.Tensor, "backward", spy)
    x, _ = _planted(n=256)
    train_sae(x, _small_config(n_tokens=256), progress=False)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def _trainer(x: torch.Tensor, config: SAETrainConfig, *, fast: bool | None = None) -> SAETrainer:
    scale = input_scale(x)
    gen = torch.Generator().manual_seed(config.seed)
    return SAETrainer(
        config,
        scale=scale,
        mean=x.double().mean(0) * scale,
        generator=gen,
        sample=lambda: x[:512] * scale,
        fast=fast,
    )


def _run(trainer: SAETrainer, x: torch.Tensor) -> train.TrainResult:
    g = torch.Generator().manual_seed(7)
    while not trainer.done:
        trainer.step(x[torch.randint(0, len(x), (trainer.config.batch_size,), generator=g)] * trainer.scale)
    return trainer.result()


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
def test_hand_written_step_equals_autograd(activation: str) -> None:
    # The fast step's gradients, written out by hand, are autograd's: in float32 the two trainers
    # stay within rounding of each other for 40 steps (decay and warm-up included).
    x, _ = _planted(n=2048)
    config = _small_config(activation=activation, n_tokens=40 * 128, decay_frac=0.2, l1_coef=0.5)
    ref = _run(_trainer(x, config, fast=False), x)
    fast = _run(_trainer(x, config, fast=True), x)
    for name, t in ref.sae.tensors().items():
        torch.testing.assert_close(fast.sae.tensors()[name], t, rtol=1e-4, atol=1e-5, msg=name)
    assert fast.final_l0 == pytest.approx(ref.final_l0, rel=1e-4)
    assert fast.final_fvu == pytest.approx(ref.final_fvu, rel=1e-4)
    # The comparison can fail: another seed's trainer is far away after the same steps.
    other = _run(_trainer(x, dataclasses.replace(config, seed=3), fast=True), x)
    assert not torch.allclose(other.sae.W_dec, ref.sae.W_dec, atol=1e-2)


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
def test_bfloat16_steps_stay_near_float32(activation: str) -> None:
    # bfloat16 products round each operand to 8 significant bits: after 40 steps the weights differ
    # by ~1e-3 and the training loss by well under 1%.
    x, _ = _planted(n=2048)
    config = _small_config(activation=activation, n_tokens=40 * 128, l1_coef=0.5)
    ref = _run(_trainer(x, config), x)
    low = _run(_trainer(x, dataclasses.replace(config, precision="bfloat16")), x)
    assert float((low.sae.W_dec - ref.sae.W_dec).abs().max()) < 2e-2
    assert low.final_fvu == pytest.approx(ref.final_fvu, rel=0.02)
    assert low.final_l0 == pytest.approx(ref.final_l0, rel=0.05)


def test_bfloat16_training_recovers_the_planted_dictionary() -> None:
    x, dictionary = _planted()
    config = SAETrainConfig(
        width=WIDTH, batch_size=256, lr=3e-3, init_l0=8, l0_coef=1.0, n_tokens=100_000, precision="bfloat16"
    )
    result = train_sae(x, config, progress=False)
    cos = _best_cosines(result.sae.W_dec, dictionary)
    # Where bfloat16 is emulated (AVX2, no AMX / AVX512-BF16) its products round differently: there
    # 91 of 96 atoms reach cosine > 0.9 (mean 0.985), against all of them with AMX or in float32.
    recovered = 0.95 if native_bfloat16("cpu") else 0.9
    assert float((cos > 0.9).float().mean()) >= recovered and float(cos.mean()) > 0.97
    held_out = sae_quality(result.sae, _planted(n=2048, seed=1)[0])
    assert 3.5 <= held_out.l0 <= 4.5 and held_out.fvu < 0.1
    assert result.sae.W_dec.dtype == torch.float32


def test_trainer_misuse() -> None:
    x, _ = _planted(n=256)
    config = _small_config(n_tokens=128)
    with pytest.raises(ValueError, match="sample: required for activation='jumprelu'"):
        SAETrainer(config, scale=1.0, mean=x.double().mean(0), generator=torch.Generator())
    with pytest.raises(ValueError, match=r"mean: expected shape \(d_in,\), got \(2, 64\)"):
        SAETrainer(config, scale=1.0, mean=x[:2], generator=torch.Generator(), sample=lambda: x)
    trainer = _trainer(x, config)
    trainer.step(x[:128])
    with pytest.raises(RuntimeError, match="step: all 1 steps are already taken"):
        trainer.step(x[:128])


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_column_quantile_is_torch_quantile(n: int) -> None:
    x = torch.randn(n, 9, generator=torch.Generator().manual_seed(n))
    x[:, 0] = 1.0  # ties
    for q in (0.0, 0.3, 1 - 64 / 2048, 1 - 3 / 7, 1.0):
        assert torch.equal(column_quantile(x, q), torch.quantile(x, q, dim=0)), q
    with pytest.raises(ValueError, match=r"q: expected in \[0, 1\], got 1.5"):
        column_quantile(x, 1.5)
    with pytest.raises(ValueError, match=r"x: expected shape \(n >= 1, m\), got \(3,\)"):
        column_quantile(x[0, :3], 0.5)
