"""Profiles: one frozen config per name, validated, round-trippable."""

from __future__ import annotations

import dataclasses

import pytest

from saematch_core.profiles import (
    PROFILE_NAMES,
    DataConfig,
    GemmaScopeConfig,
    ModelConfig,
    Profile,
    SAETrainConfig,
    get_profile,
)


def test_names_and_lookup() -> None:
    assert PROFILE_NAMES == ("smoke", "default", "strong", "paper")
    for name in PROFILE_NAMES:
        assert get_profile(name).name == name
    with pytest.raises(
        ValueError, match=r"name: expected one of \['smoke', 'default', 'strong', 'paper'\], got 'papr'"
    ):
        get_profile("papr")
    with pytest.raises(TypeError, match="name: expected a str"):
        get_profile(3)  # type: ignore[arg-type]


def test_profiles_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_profile("smoke").name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_dict_round_trip(name: str) -> None:
    profile = get_profile(name)
    assert Profile.from_dict(profile.to_dict()) == profile


def test_unknown_keys_rejected() -> None:
    data = get_profile("smoke").to_dict()
    data["data"]["chunk_length"] = 3
    with pytest.raises(ValueError, match=r"DataConfig: unknown keys \['chunk_length'\]"):
        Profile.from_dict(data)


def test_default_and_paper_profiles_have_the_sizes_the_book_needs() -> None:
    default = get_profile("default")
    assert default.model.n_layers == 30 and default.model.d_model == 576
    assert len(default.sweep_l0_coefs) >= 5 and len(default.sweep_layers) == 2
    assert default.sweep_layers[1] == default.sweep_layers[0] + 1
    assert len(default.family_layers) >= 6
    assert 2048 <= default.sae.width <= 4096
    assert default.data.chunk_len <= 1024
    paper = get_profile("paper")
    assert paper.sae_source == "gemma_scope" and paper.gemma_scope is not None
    assert len(paper.gemma_scope.canonical_l0) == paper.model.n_layers == 26


def test_strong_is_the_default_on_a_larger_budget() -> None:
    default, strong = get_profile("default"), get_profile("strong")
    # the same layers, sweeps, families and recipe: only the budget and the arithmetic differ
    assert (
        dataclasses.replace(
            strong,
            name=default.name,
            data=dataclasses.replace(strong.data, train_tokens=default.data.train_tokens),
            sae=dataclasses.replace(
                strong.sae, n_tokens=default.sae.n_tokens, precision=default.sae.precision
            ),
            forward_precision=default.forward_precision,
            train_mode=default.train_mode,
        )
        == default
    )
    assert strong.sae.n_tokens >= 2 * default.sae.n_tokens
    assert strong.train_mode == "stream"  # its budget needs no training cache on disk
    assert len(strong.data.corpora) * strong.data.train_tokens >= strong.sae.n_tokens * 0.8  # mostly distinct


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: DataConfig(chunk_len=2048), r"DataConfig.chunk_len: expected 2..1024, got 2048"),
        (lambda: DataConfig(corpora=("wiki",)), r"DataConfig.corpora: expected names among"),  # type: ignore[arg-type]
        (lambda: DataConfig(eval_fraction=1.0), r"DataConfig.eval_fraction"),
        (lambda: SAETrainConfig(width=0), r"SAETrainConfig.width: expected > 0, got 0"),
        (
            lambda: SAETrainConfig(activation="topk", k=100, width=64),
            r"SAETrainConfig.k: expected 1..width=64, got 100",
        ),
        (lambda: SAETrainConfig(k=0), r"SAETrainConfig.k: expected 1..width=2048, got 0"),
        (lambda: SAETrainConfig(betas=(0.9, 1.0)), r"SAETrainConfig.betas"),
        (lambda: SAETrainConfig(decay_frac=1.0), r"SAETrainConfig.decay_frac: expected in \[0, 1\), got 1.0"),
        (lambda: ModelConfig(source="gguf", name="m", n_layers=2, d_model=8), r"gguf_package/gguf_file"),
        (lambda: ModelConfig(source="hub", name="m", n_layers=2, d_model=8), r"ModelConfig.repo_id"),
        (
            lambda: ModelConfig(source="random_llama", name="m", n_layers=2, d_model=10),
            r"multiple of n_heads",
        ),
        (
            lambda: dataclasses.replace(get_profile("smoke"), family_layers=(0, 2)),
            r"Profile.family_layers: expected consecutive layers, got \(0, 2\)",
        ),
        (
            lambda: dataclasses.replace(get_profile("smoke"), sweep_layers=(7,)),
            r"Profile.sweep_layers: expected layers in 0..3, got \[7\]",
        ),
        (
            lambda: dataclasses.replace(get_profile("smoke"), sae_source="gemma_scope"),
            r"Profile.gemma_scope: required",
        ),
        (
            lambda: SAETrainConfig(precision="float16"),  # type: ignore[arg-type]
            r"SAETrainConfig.precision: expected one of \['float32', 'bfloat16'\], got 'float16'",
        ),
        (
            lambda: dataclasses.replace(get_profile("smoke"), forward_precision="half"),
            r"Profile.forward_precision: expected one of \['float32', 'bfloat16'\], got 'half'",
        ),
        (
            lambda: dataclasses.replace(get_profile("smoke"), train_mode="ram"),
            r"Profile.train_mode: expected one of \['disk', 'stream'\], got 'ram'",
        ),
        (
            lambda: dataclasses.replace(get_profile("smoke"), stream_buffer_tokens=100),
            r"Profile.stream_buffer_tokens: expected >= 2 × sae.batch_size = 256, got 100",
        ),
    ],
)
def test_validation(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        build()


def test_gemma_scope_folders() -> None:
    gs = GemmaScopeConfig()
    assert gs.sae_folder(20) == "layer_20/width_16k/average_l0_71"
    assert gs.sae_folder(4) == "layer_4/width_16k/average_l0_125"
    assert gs.sae_folder(0, l0=13) == "layer_0/width_16k/average_l0_13"
    with pytest.raises(ValueError, match=r"layer: expected 0..25, got 26"):
        gs.sae_folder(26)


def test_n_steps() -> None:
    assert SAETrainConfig(n_tokens=1000, batch_size=512).n_steps == 2
