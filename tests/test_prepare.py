"""prepare(): the whole substrate for a profile, cached, resumable, and the paper profile's hub wiring."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sae

from saematch_core import data
from saematch_core import prepare as prepare_module
from saematch_core.cache import folder_lock
from saematch_core.data import Document, corpus_chunks
from saematch_core.formats import load_sae
from saematch_core.prepare import _fetch_pretrained, _jobs, _twins, prepare, sae_file
from saematch_core.profiles import Profile, get_profile


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy_corpora(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small synthetic documents in place of the real corpora (those are tested in test_data)."""
    for name in ("austen", "code", "reference"):
        docs = tuple(Document(name, f"{name}{i:02d}", f"{name} text {i}. " * (20 + i)) for i in range(30))
        monkeypatch.setitem(data._READERS, name, lambda docs=docs: docs)


def _tiny(profile: Profile | None = None) -> Profile:
    smoke = profile or get_profile("smoke")
    return dataclasses.replace(
        smoke,
        data=dataclasses.replace(smoke.data, train_tokens=384, eval_tokens=128, chunk_len=32),
        sae=dataclasses.replace(smoke.sae, n_tokens=512, width=32),
        sweep_layers=(1, 2),
        sweep_l0_coefs=(0.05, 0.2),
        family_layers=(2, 3),
        seed_layers=(2,),
        delta_loss_tokens=64,
    )


def test_prepare_builds_caches_and_reuses_them(
    toy_corpora: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = _tiny()
    reads: list[int] = []
    real_rows = prepare_module._rows
    monkeypatch.setattr(prepare_module, "_rows", lambda c, layer: reads.append(layer) or real_rows(c, layer))
    result = prepare(profile, cache_dir=tmp_path, progress=False)
    # Trained layer by layer: each layer's training rows are read once (plus once per SAE for the
    # evaluation rows), and the records still come in job order.
    assert len(reads) == len(set(r.layer for r in result.records)) + len(result.records)
    assert [(r.family, r.layer) for r in result.records] == [(j.family, j.layer) for j in _jobs(profile)]
    assert not result.cached and result.folder == tmp_path / "smoke"
    assert [r.family for r in result.records].count("main") == 4
    assert len(result.records) == 4 + 2 * 2 + 2 * 2 + 1
    assert result.saes() == {
        layer: tmp_path / "smoke" / "saes" / f"layer_{layer:02d}.safetensors" for layer in range(4)
    }
    assert set(result.sweep()) == {(layer, f"l0_coef={c:g}") for layer in (1, 2) for c in (0.05, 0.2)}
    assert set(result.saes("topk")) == {2, 3} and set(result.saes("relu")) == {2, 3}
    assert set(result.saes("seed")) == {2}
    for record in result.records:
        sae = load_sae(record.path)
        assert sae.d_in == 32 and sae.d_sae == 32
        assert sae.activation == {"main": "jumprelu", "sweep": "jumprelu", "seed": "jumprelu"}.get(
            record.family, record.family
        )
        q = record.quality
        assert q.n_tokens > 0 and 0 <= q.dead_fraction <= 1 and np.isfinite(q.fvu)
        assert q.delta_loss is not None and np.isfinite(q.delta_loss)
        assert sae.meta["layer"] == record.layer and sae.meta["family"] == record.family
    # The sweep's λ equal to the main λ (0.05) is the main SAE itself: copied, not trained again.
    for layer in (1, 2):
        twin = result.sweep()[(layer, "l0_coef=0.05")]
        side = json.loads(twin.with_suffix(".json").read_text())
        assert side["same_as"] == f"saes/layer_{layer:02d}.safetensors"
        assert torch.equal(load_sae(twin).W_dec, load_sae(result.saes()[layer]).W_dec)
    copies = [r for r in result.records if r.train_seconds is None]
    assert [(r.family, r.layer) for r in copies] == [("sweep", 1), ("sweep", 2)]
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["records"]) == len(result.records)
    assert (result.folder / "activations" / "train" / "manifest.json").is_file()

    # Warm: answered from the manifest alone, without even loading the model.
    def no_model(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the warm path must not load the model")

    monkeypatch.setattr(prepare_module, "load_model", no_model)
    warm = prepare(profile, cache_dir=tmp_path, progress=False)
    assert warm.cached
    assert warm.records == result.records
    # The cache folder can move: paths are stored relative to it.
    moved_root = tmp_path / "moved"
    (tmp_path / "smoke").rename(tmp_path / "moved_smoke")
    moved_root.mkdir()
    (tmp_path / "moved_smoke").rename(moved_root / "smoke")
    moved = prepare(profile, cache_dir=moved_root, progress=False)
    assert moved.cached and moved.saes()[0] == moved_root / "smoke" / "saes" / "layer_00.safetensors"


def test_prepare_resumes_per_sae(toy_corpora: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = _tiny()
    first = prepare(profile, cache_dir=tmp_path, progress=False)
    victim = sae_file(first.folder, "topk", 3)
    victim.unlink()
    (first.folder / "manifest.json").write_text("{not json")
    trained: list[int] = []
    real_train = prepare_module.train_sae

    def counting_train(*args: object, **kwargs: object) -> object:
        trained.append(1)
        return real_train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare_module, "train_sae", counting_train)

    def no_corpora(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("finished activation caches must not re-read the corpora")

    monkeypatch.setattr(prepare_module, "corpus_chunks", no_corpora)
    again = prepare(profile, cache_dir=tmp_path, progress=False)
    assert len(trained) == 1 and victim.is_file() and not again.cached
    # Another recipe is another spec: everything is retrained, nothing stale is reused.
    monkeypatch.setattr(prepare_module, "corpus_chunks", corpus_chunks)
    changed = dataclasses.replace(profile, sae=dataclasses.replace(profile.sae, width=24))
    trained.clear()
    prepare(changed, cache_dir=tmp_path, progress=False)
    assert len(trained) == 4 + 2 * 2 + 2 * 2 + 1 - 2  # the two sweep twins of main SAEs are copied


def test_second_prepare_waits_for_the_first(
    toy_corpora: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = _tiny()
    done = prepare(profile, cache_dir=tmp_path, progress=False)
    manifest_path = done.folder / "manifest.json"
    manifest = manifest_path.read_text()
    manifest_path.unlink()
    holding = threading.Event()

    def other_process() -> None:  # holds the lock, finishes its run, releases
        with folder_lock(done.folder):
            holding.set()
            time.sleep(0.5)
            manifest_path.write_text(manifest)

    def no_model(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the waiting run must reuse the other run's results")

    monkeypatch.setattr(prepare_module, "load_model", no_model)
    thread = threading.Thread(target=other_process)
    thread.start()
    holding.wait(5)
    t0 = time.perf_counter()
    waited = prepare(profile, cache_dir=tmp_path, progress=False)
    thread.join()
    assert waited.cached and waited.records == done.records
    assert time.perf_counter() - t0 >= 0.3


def test_cached_only_never_builds(toy_corpora: None, tmp_path: Path) -> None:
    profile = _tiny()
    with pytest.raises(
        FileNotFoundError, match=r"profile 'smoke' is not prepared.*saematch prepare --profile smoke"
    ):
        prepare(profile, cache_dir=tmp_path, cached_only=True)
    assert not (tmp_path / "smoke").exists()
    built = prepare(profile, cache_dir=tmp_path, progress=False)
    assert prepare(profile, cache_dir=tmp_path, cached_only=True).records == built.records


def _fast(profile: Profile) -> Profile:
    """The profile streamed, with bfloat16 forward passes and SAE steps."""
    return dataclasses.replace(
        profile,
        train_mode="stream",
        stream_buffer_tokens=256,
        forward_precision="bfloat16",
        sae=dataclasses.replace(profile.sae, precision="bfloat16"),
    )


def test_stream_mode_prepares_without_a_training_cache(
    toy_corpora: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = _fast(_tiny())
    streamed: list[int] = []
    real_stream = prepare_module.train_streamed

    def counting_stream(*args: object, **kwargs: object) -> object:
        streamed.append(len(args[2]))  # type: ignore[arg-type]
        return real_stream(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(prepare_module, "train_streamed", counting_stream)
    monkeypatch.setattr(prepare_module, "train_sae", None)  # nothing is trained from disk
    result = prepare(profile, cache_dir=tmp_path, progress=False)
    # one stream for every SAE but the two sweep twins of main SAEs, which are copies
    assert streamed == [len(result.records) - 2] == [4 + 2 * 2 + 2 * 2 + 1 - 2]
    assert set(result.activation_folders) == {"eval"}
    assert not (result.folder / "activations" / "train").exists()
    assert not list((result.folder / "saes").glob("stream-checkpoint*"))  # removed once done
    evals = json.loads((result.folder / "activations" / "eval" / "manifest.json").read_text())
    assert evals["spec"]["forward_precision"] == "bfloat16"
    for record in result.records:
        q = record.quality
        assert np.isfinite(q.fvu) and q.delta_loss is not None and np.isfinite(q.delta_loss)
        assert (record.train_seconds is None) == (record.family == "sweep" and "0.05" in record.setting)
        assert load_sae(record.path).meta["family"] == record.family
    assert prepare(profile, cache_dir=tmp_path, progress=False).cached
    # A lost SAE is retrained alone: the stream runs for the missing one only.
    sae_file(result.folder, "relu", 2).unlink()
    (result.folder / "manifest.json").unlink()
    streamed.clear()
    prepare(profile, cache_dir=tmp_path, progress=False)
    assert streamed == [1]


def test_precision_and_mode_are_in_the_keys_only_when_chosen() -> None:
    # float32 disk training is what every cache held before these choices existed: its keys must not
    # change, or every cached activation and SAE would be rebuilt for nothing.
    plain = _tiny()
    job = _jobs(plain)[0]
    assert job.config is not None
    assert "forward_precision" not in prepare_module._data_spec(plain, "train")
    assert "precision" not in prepare_module._config_spec(job.config)
    fast = _fast(plain)
    assert prepare_module._data_spec(fast, "eval")["forward_precision"] == "bfloat16"
    keys = {
        prepare_module._job_key(p, j)
        for p in (plain, fast, dataclasses.replace(plain, train_mode="stream"))
        for j in (job, dataclasses.replace(job, config=dataclasses.replace(job.config, precision="bfloat16")))
    }
    assert len(keys) == 6


def test_prepare_rejects_bad_profile(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name: expected one of"):
        prepare("nope", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="profile: expected a Profile or a profile name, got int"):
        prepare(3, cache_dir=tmp_path)  # type: ignore[arg-type]


@pytest.mark.slow
def test_smoke_profile_end_to_end(tmp_path: Path) -> None:
    # Its speed (a minute cold on 2 cores) is measured by `saematch prepare`'s manifest, not asserted.
    result = prepare("smoke", cache_dir=tmp_path, progress=False)
    assert len(result.saes()) == 4
    assert prepare("smoke", cache_dir=tmp_path, progress=False).cached


# ------------------------------------------------------------------------ paper profile: hub wiring
def _hub_put(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Files laid out as huggingface_hub's cache does: blobs, refs/main, snapshots/<commit>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, payload in files.items():
        blob = repo / "blobs" / hashlib.sha256(payload).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(payload)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def test_paper_profile_fetches_gemma_scope_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    paper = dataclasses.replace(get_profile("paper"), sweep_l0s=(20, 71))
    gs = paper.gemma_scope
    assert gs is not None
    jobs = _jobs(paper)
    assert [j.hub_path for j in jobs if j.family == "main"] == [gs.sae_folder(layer) for layer in range(26)]
    assert jobs[20].hub_path == "layer_20/width_16k/average_l0_71"
    assert {(j.layer, j.hub_path) for j in jobs if j.family == "sweep"} == {
        (layer, f"layer_{layer}/width_16k/average_l0_{l0}") for layer in (20, 21) for l0 in (20, 71)
    }
    saes = {20: make_sae(8, 16, seed=1), 21: make_sae(8, 16, seed=2)}
    files = {}
    for layer, sae in saes.items():
        buf = tmp_path / f"p{layer}.npz"
        np.savez(buf, **{k: v.numpy() for k, v in sae.tensors().items()})
        files[f"{gs.sae_folder(layer)}/params.npz"] = buf.read_bytes()
    _hub_put(cache, gs.repo_id, files)
    for layer in (20, 21):
        got = _fetch_pretrained(paper, jobs[layer])
        for name, tensor in saes[layer].tensors().items():
            assert torch.equal(got.tensors()[name], tensor), name
        assert got.meta["layer"] == layer and got.meta["average_l0"] == gs.canonical_l0[layer]
    with pytest.raises(FileNotFoundError):
        _fetch_pretrained(paper, jobs[3])


def test_paper_sweep_discovers_every_l0_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    paper = get_profile("paper")
    assert paper.sweep_l0s == () and paper.gemma_scope is not None
    with pytest.raises(FileNotFoundError, match="no snapshot in the local hub cache"):
        _jobs(paper)
    names = [
        f"layer_{layer}/width_{w}/average_l0_{l0}/params.npz"
        for layer in (20, 21, 22)
        for w in ("16k", "65k")
        for l0 in (11, 71, 300)
    ]
    _hub_put(cache, paper.gemma_scope.repo_id, dict.fromkeys([*names, "layer_20/width_16k/README.md"], b"x"))
    sweep = [(j.layer, j.setting, j.hub_path) for j in _jobs(paper) if j.family == "sweep"]
    assert sweep == [
        (layer, f"average_l0={l0}", f"layer_{layer}/width_16k/average_l0_{l0}")
        for layer in (20, 21)
        for l0 in (11, 71, 300)
    ]


def _tiny_gemma_repo(tmp_path: Path, words: list[str]) -> dict[str, bytes]:
    """Files of a tiny random Gemma 2 model repository, tokenizer included (word level)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<unk>", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<pad>"
    )
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    folder = tmp_path / "gemma_repo"
    Gemma2ForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_paper_pipeline_offline_on_a_tiny_gemma(
    toy_corpora: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole paper path (hub model, hub SAEs, eval cache, quality) against a fake hub cache."""
    from huggingface_hub import constants

    from saematch_core.profiles import GemmaScopeConfig

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    paper = get_profile("paper")
    words = [
        w.strip(".")
        for name in ("austen", "code", "reference")
        for w in f"{name} text 0 1 2 3 4 5 6 7 8 9".split()
    ]
    # Vocabulary under 64 ids: the toy documents use "<name> text <i>." words only.
    words += [f"{i}." for i in range(30)]
    _hub_put(cache, paper.model.repo_id, _tiny_gemma_repo(tmp_path, words))
    gs = GemmaScopeConfig(canonical_l0=(5, 6, 7))
    profile = dataclasses.replace(
        paper,
        model=dataclasses.replace(paper.model, n_layers=3, d_model=16),
        data=dataclasses.replace(paper.data, chunk_len=24, eval_tokens=96, batch_size=4),
        gemma_scope=gs,
        sweep_layers=(1, 2),
        sweep_l0s=(9,),
        delta_loss_tokens=48,
    )
    files = {}
    for layer, l0 in [(0, 5), (1, 6), (2, 7), (1, 9), (2, 9)]:
        buf = tmp_path / "p.npz"
        sae = make_sae(16, 32, seed=layer + l0)
        np.savez(buf, **{k: v.numpy() for k, v in sae.tensors().items()})
        files[f"{gs.sae_folder(layer, l0)}/params.npz"] = buf.read_bytes()
    _hub_put(cache, gs.repo_id, files)

    result = prepare(profile, cache_dir=tmp_path / "cache", progress=False)
    assert set(result.saes()) == {0, 1, 2}
    assert set(result.sweep()) == {(1, "average_l0=9"), (2, "average_l0=9")}
    assert result.activation_folders == {"eval": tmp_path / "cache" / "paper" / "activations" / "eval"}
    tokens = np.load(result.activation_folders["eval"] / "tokens.npy")
    positions = np.load(result.activation_folders["eval"] / "positions.npy")
    assert (tokens[positions == 0] == 1).all()  # every chunk starts with Gemma's BOS
    for record in result.records:
        assert record.train_seconds is None and record.quality.delta_loss is not None
        assert load_sae(record.path).d_in == 16
    assert prepare(profile, cache_dir=tmp_path / "cache", progress=False).cached


def test_every_trained_layer_gets_its_own_seed() -> None:
    # Same-seed SAEs at neighbouring layers share their initial dictionary, so the identity order
    # would already match features: each (family, layer) must start from a different seed.
    jobs = [job for job in _jobs(get_profile("default")) if job.config is not None]
    for family in {job.family for job in jobs}:
        seeds = {
            job.layer: job.config.seed for job in jobs if job.family == family and job.config is not None
        }
        assert len(set(seeds.values())) == len(seeds) > 1, family
    main = {job.config.seed for job in jobs if job.family == "main" and job.config is not None}
    second = {job.config.seed for job in jobs if job.family == "seed" and job.config is not None}
    assert second and not second & main, "a seed-control SAE must not repeat any main SAE's seed"


def test_only_a_sweep_setting_equal_to_the_main_recipe_is_a_twin() -> None:
    jobs = _jobs(get_profile("default"))
    twins = {(jobs[i].family, jobs[i].layer, jobs[i].setting): jobs[j] for i, j in _twins(jobs).items()}
    assert set(twins) == {("sweep", 14, "l0_coef=0.3"), ("sweep", 15, "l0_coef=0.3")}
    assert all(job.family == "main" and job.config is not None for job in twins.values())
    assert [job.layer for job in twins.values()] == [14, 15]


def test_hub_listing_falls_back_to_the_local_cache_when_the_hub_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from saematch_core.formats import hub

    class ConnectError(Exception):  # what an HTTP client raises without network (not an OSError)
        pass

    def unreachable(*_args: object, **_kwargs: object) -> list[str]:
        raise ConnectError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "probe_hub", lambda: None)  # the hub answers, then the listing fails
    monkeypatch.setattr(hub, "list_repo_files", unreachable)
    with pytest.raises(FileNotFoundError, match=r"could not be asked.*ConnectError: Name or service"):
        hub.list_hub_files("org/repo")
    _hub_put(tmp_path, "org/repo", {"a/b.npz": b"x"})
    assert hub.list_hub_files("org/repo") == ["a/b.npz"]
