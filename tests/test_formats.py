"""Loaders and savers: every format written in its exact real layout, round trips, bad input.

Each foreign format is checked against a reference forward pass written here the way the original
library computes it (on the raw file tensors), so the conversions at the file boundary (transposes,
folded input shifts and scalings) are tested for what they compute, not only for shapes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import make_sae
from torch import Tensor

from saematch_core.errors import SAEFormatError, SAEValidationError
from saematch_core.fold import fold
from saematch_core.formats import (
    FORMATS,
    GEMMA_SCOPE_2B_RES_16K_L0,
    FormatRegistry,
    detect_format,
    gemma_scope_path,
    load_sae,
    parse_gemma_scope_path,
    parse_hub_spec,
    save_sae,
)
from saematch_core.match import match
from saematch_core.sae import SAE

D_IN, D_SAE = 8, 16


def _x(n: int = 32, d: int = D_IN, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _assert_same_sae(a: SAE, b: SAE) -> None:
    assert a.activation == b.activation and a.k == b.k and a.dtype == b.dtype
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# ---------------------------------------------------------------------------------------- native
@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_native_round_trip_exact(tmp_path: Path, activation: str, dtype: torch.dtype) -> None:
    sae = make_sae(D_IN, D_SAE, activation=activation, dtype=dtype)
    sae = SAE(**{**sae.tensors(), "activation": sae.activation, "k": sae.k, "meta": {"layer": 3, "n": [1.5]}})
    path = save_sae(sae, tmp_path / "a.safetensors")
    assert path == tmp_path / "a.safetensors" and detect_format(path) == "native"
    back = load_sae(path)
    _assert_same_sae(sae, back)
    assert back.meta == {"layer": 3, "n": [1.5]}
    x = _x().to(dtype)
    assert torch.equal(sae(x).recon, back(x).recon)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_native_metadata_layout(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE, activation="topk")
    path = save_sae(sae, tmp_path / "a.safetensors")
    tensors = safetensors.torch.load_file(path)
    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "saematch" and meta["schema_version"] == "1"
    assert (meta["activation"], meta["k"], meta["d_in"], meta["d_sae"]) == ("topk", "4", "8", "16")
    assert json.loads(meta["meta"]) == {}


def test_native_dtype_and_device_override(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    path = save_sae(sae, tmp_path / "a.safetensors")
    back = load_sae(path, dtype="float64", device="cpu")
    assert back.dtype == torch.float64
    torch.testing.assert_close(back.W_enc, sae.W_enc.double())
    with pytest.raises(ValueError, match="dtype: expected one of"):
        load_sae(path, dtype="float8")


def test_native_save_refuses_existing_and_missing_folder(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"a\.safetensors.*force"):
        save_sae(sae, path)
    assert path.read_bytes() == b"old"
    save_sae(sae, path, force=True)
    _assert_same_sae(sae, load_sae(path))
    with pytest.raises(FileNotFoundError, match="missing"):
        save_sae(sae, tmp_path / "missing" / "a.safetensors")
    with pytest.raises(TypeError, match="sae: expected an SAE"):
        save_sae("nope", tmp_path / "b.safetensors")  # type: ignore[arg-type]


def test_native_save_bad_meta_writes_nothing(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE, meta={"bad": object()})
    with pytest.raises(TypeError, match=r"sae\.meta: expected JSON-serialisable"):
        save_sae(sae, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_native_save_failure_mid_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (ENOSPC when the data is flushed) leaves no file, and the error names the target."""

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"No space left on device: '.*a\.safetensors'") as info:
        save_sae(make_sae(D_IN, D_SAE), tmp_path / "a.safetensors")
    assert info.value.errno == errno.ENOSPC and ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_native_save_is_byte_identical_and_follows_the_umask(tmp_path: Path) -> None:
    """Two processes saving equal tensors write equal bytes (safetensors orders its metadata
    differently in every process); the file gets the mode of any new file (0o666 less the umask)."""
    code = textwrap.dedent(
        """
        import sys, torch
        from saematch_core.formats import save_sae
        from saematch_core.sae import SAE
        g = torch.Generator().manual_seed(0)
        sae = SAE(W_enc=torch.randn(4, 6, generator=g), b_enc=torch.zeros(6),
                  W_dec=torch.randn(6, 4, generator=g), b_dec=torch.zeros(4),
                  threshold=torch.full((6,), 0.5), meta={"b": 1, "a": [2, 3]})
        save_sae(sae, sys.argv[1])
        """
    )
    outs = []
    for i in range(3):
        out = tmp_path / f"{i}.safetensors"
        proc = subprocess.run(
            [sys.executable, "-c", f"import os; os.umask(0o027)\n{code}", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    assert stat.S_IMODE(outs[0].stat().st_mode) == 0o640
    old = os.umask(0o022)
    try:
        path = save_sae(make_sae(D_IN, D_SAE), tmp_path / "umask.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    _assert_same_sae(make_sae(D_IN, D_SAE), load_sae(path))


def test_native_corrupt_and_truncated(tmp_path: Path) -> None:
    path = save_sae(make_sae(D_IN, D_SAE), tmp_path / "a.safetensors")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 40])
    with pytest.raises(SAEFormatError, match=r"trunc\.safetensors.*(truncated|corrupt|readable)"):
        load_sae(trunc, format="native")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(SAEFormatError, match=r"garbage\.safetensors"):
        detect_format(garbage)
    with pytest.raises(SAEFormatError, match=r"garbage\.safetensors"):
        load_sae(garbage)


def test_native_wrong_metadata(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    tensors = {k: v.contiguous() for k, v in sae.tensors().items()}
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(tensors, str(other), metadata={"format": "pt"})
    with pytest.raises(SAEFormatError, match="format: expected metadata format='saematch'"):
        load_sae(other, format="native")
    newer = tmp_path / "newer.safetensors"
    meta = {
        "format": "saematch",
        "schema_version": "99",
        "activation": "jumprelu",
        "d_in": "8",
        "d_sae": "16",
    }
    safetensors.torch.save_file(tensors, str(newer), metadata=meta)
    with pytest.raises(SAEFormatError, match=r"schema_version: expected 1\.\.1, got 99"):
        load_sae(newer)
    tensors["W_enc"] = tensors["W_enc"].T.contiguous()
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(bad), metadata={**meta, "schema_version": "1", "meta": "{}"})
    with pytest.raises(SAEFormatError, match=r"bad\.safetensors: W_enc: expected shape.*transposed"):
        load_sae(bad)


# ----------------------------------------------------------------------------------- gemma scope
def _gemma_folder(root: Path, layer: int = 3, width: str = "16k", l0: int = 59) -> Path:
    folder = root / f"layer_{layer}" / f"width_{width}" / f"average_l0_{l0}"
    folder.mkdir(parents=True)
    return folder


def _write_gemma(folder: Path, sae: SAE, **overrides: Any) -> Path:
    arrays = {k: v.numpy() for k, v in sae.tensors().items()}
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(folder / "params.npz", **arrays)
    return folder / "params.npz"


def test_gemma_scope_round_trip_and_meta(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    folder = _gemma_folder(tmp_path)
    file = _write_gemma(folder, sae)
    assert detect_format(folder) == "gemma_scope" and detect_format(file) == "gemma_scope"
    for spec in (folder, file, str(folder)):
        back = load_sae(spec)
        _assert_same_sae(sae, back)
        assert back.meta["layer"] == 3 and back.meta["width"] == "16k" and back.meta["average_l0"] == 59
        assert back.meta["format"] == "gemma_scope"
    # Reference: Gemma Scope's own JumpReLU forward on the raw arrays.
    with np.load(file, allow_pickle=False) as z:
        p = {k: torch.from_numpy(z[k]).double() for k in z.files}
    x = _x()
    pre = x @ p["W_enc"] + p["b_enc"]
    ref = (pre * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"]
    torch.testing.assert_close(load_sae(folder, dtype=torch.float64)(x).recon, ref)


def test_gemma_scope_object_array_is_refused(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    obj = np.empty(D_SAE, dtype=object)
    obj[:] = [float(v) for v in sae.threshold.tolist()]  # type: ignore[union-attr]
    file = _write_gemma(_gemma_folder(tmp_path), sae, threshold=obj)
    with pytest.raises(SAEFormatError, match=r"params\.npz: threshold: cannot load without pickle"):
        load_sae(file)


def test_gemma_scope_truncated_and_corrupt(tmp_path: Path) -> None:
    file = _write_gemma(_gemma_folder(tmp_path), make_sae(D_IN, D_SAE))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match=r"params\.npz.*(truncated|corrupt)"):
        load_sae(file)
    file.write_bytes(b"not a zip at all")
    with pytest.raises(SAEFormatError, match=r"params\.npz"):
        load_sae(file.parent)
    # A zip whose member data is damaged (CRC mismatch) is reported per key, not crashed on.
    good = _write_gemma(_gemma_folder(tmp_path, layer=4), make_sae(D_IN, D_SAE))
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("W_dec.npy")
    raw = bytearray(good.read_bytes())
    name_len, extra_len = (
        int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    data_end = info.header_offset + 30 + name_len + extra_len + info.compress_size
    raw[data_end - 3] ^= 0xFF
    good.write_bytes(bytes(raw))
    with pytest.raises(SAEFormatError, match=r"params\.npz: W_dec: truncated or corrupt entry"):
        load_sae(good)


def test_gemma_scope_missing_key_lists_expected(tmp_path: Path) -> None:
    file = _write_gemma(_gemma_folder(tmp_path), make_sae(D_IN, D_SAE), threshold=None)
    with pytest.raises(SAEFormatError, match=r"missing keys \['threshold'\]; expected keys \['W_enc'"):
        load_sae(file)


def test_gemma_scope_transposed_and_bad_shapes(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    file = _write_gemma(_gemma_folder(tmp_path), sae, W_enc=sae.W_enc.T.numpy())
    with pytest.raises(
        SAEFormatError, match=r"W_enc: expected shape \(d_in, d_sae\) = \(8, 16\), got \(16, 8\)"
    ):
        load_sae(file)
    file = _write_gemma(_gemma_folder(tmp_path, layer=5), sae, threshold=np.ones(D_SAE + 1, np.float32))
    with pytest.raises(SAEFormatError, match=r"threshold: expected shape \(d_sae,\) = \(16,\), got \(17,\)"):
        load_sae(file)
    file = _write_gemma(_gemma_folder(tmp_path, layer=6), sae, b_enc=np.zeros((D_SAE, 1), np.float32))
    with pytest.raises(SAEFormatError, match=r"b_enc: expected a 1-D vector"):
        load_sae(file)


def test_gemma_scope_nan_and_bad_threshold(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    w = sae.W_dec.numpy().copy()
    w[2, 3] = np.nan
    file = _write_gemma(_gemma_folder(tmp_path), sae, W_dec=w)
    with pytest.raises(SAEValidationError, match=r"params\.npz: W_dec: 1 non-finite.*first at \(2, 3\)"):
        load_sae(file)
    theta = sae.threshold.numpy().copy()  # type: ignore[union-attr]
    theta[7] = np.inf
    file = _write_gemma(_gemma_folder(tmp_path, layer=4), sae, threshold=theta)
    with pytest.raises(SAEValidationError, match=r"params\.npz: threshold: 1 non-finite.*\(7,\)"):
        load_sae(file)
    file = _write_gemma(_gemma_folder(tmp_path, layer=5), sae, b_dec=np.arange(D_IN))
    with pytest.raises(SAEFormatError, match=r"b_dec: expected a float array, got dtype int"):
        load_sae(file)


def test_gemma_scope_zero_threshold_and_extra_arrays(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    theta = sae.threshold.numpy().copy()  # type: ignore[union-attr]
    theta[7] = 0.0
    back = load_sae(_write_gemma(_gemma_folder(tmp_path, layer=1), sae, threshold=theta))
    assert back.threshold is not None and float(back.threshold[7]) == 0.0
    ones = np.ones(D_SAE, dtype=np.float32)
    back = load_sae(_write_gemma(_gemma_folder(tmp_path, layer=2), sae, scaling_factor=ones))
    _assert_same_sae(sae, back)
    assert "dropped" in back.meta["scaling_factor"]
    with pytest.raises(SAEFormatError, match="scaling_factor: a per-feature scaling factor that is not"):
        load_sae(_write_gemma(_gemma_folder(tmp_path, layer=4), sae, scaling_factor=2 * ones))
    with pytest.raises(SAEFormatError, match=r"unexpected arrays \['extra'\]"):
        load_sae(_write_gemma(_gemma_folder(tmp_path, layer=5), sae, extra=ones))


def test_gemma_scope_embedding_sae_is_rescaled_as_saelens_does(tmp_path: Path) -> None:
    """SAELens: ``W_enc / √d_in`` and ``W_dec · √d_in`` for the ``embedding/`` SAEs of Gemma Scope."""
    sae = make_sae(D_IN, D_SAE)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "embedding" / "width_4k" / "average_l0_6"
    folder.mkdir(parents=True)
    back = load_sae(_write_gemma(folder, sae))
    root = np.sqrt(D_IN)
    t = {k: v.clone() for k, v in sae.tensors().items()}
    t["W_enc"].data = t["W_enc"].data / root  # SAELens's arithmetic, in float32
    t["W_dec"].data = t["W_dec"].data * root
    torch.testing.assert_close(back.W_enc, t["W_enc"], rtol=2e-7, atol=0)
    torch.testing.assert_close(back.W_dec, t["W_dec"], rtol=2e-7, atol=0)
    assert torch.equal(back.b_enc, t["b_enc"]) and torch.equal(back.b_dec, t["b_dec"])
    assert back.meta["site"] == "embedding" and "layer" not in back.meta
    # A layer's SAE is not rescaled.
    _assert_same_sae(sae, load_sae(_write_gemma(_gemma_folder(tmp_path / "gs", layer=0), sae)))


def test_gemma_scope_path_helpers() -> None:
    assert gemma_scope_path(20) == "layer_20/width_16k/average_l0_71"
    assert gemma_scope_path(3, "65k", 100) == "layer_3/width_65k/average_l0_100"
    with pytest.raises(ValueError, match="l0: required for width '65k'"):
        gemma_scope_path(3, "65k")
    with pytest.raises(ValueError, match=r"layer: expected one of 0\.\.25, got 26"):
        gemma_scope_path(26)
    with pytest.raises(ValueError, match="layer: expected an int >= 0"):
        gemma_scope_path(-1)
    assert sorted(GEMMA_SCOPE_2B_RES_16K_L0) == list(range(26))
    # Paper Table 1 (layers 2..25) as printed.
    paper = [
        141,
        59,
        125,
        68,
        70,
        69,
        71,
        73,
        77,
        80,
        82,
        83,
        83,
        78,
        78,
        77,
        74,
        73,
        71,
        70,
        72,
        75,
        73,
        116,
    ]
    assert [GEMMA_SCOPE_2B_RES_16K_L0[layer] for layer in range(2, 26)] == paper
    with pytest.raises(TypeError):
        GEMMA_SCOPE_2B_RES_16K_L0[0] = 1  # type: ignore[index]
    assert parse_gemma_scope_path("x/layer_12/width_1m/average_l0_9/params.npz") == {
        "layer": 12,
        "width": "1m",
        "average_l0": 9,
    }
    assert parse_gemma_scope_path("elsewhere/params.npz") == {}


# ---------------------------------------------------------------------------------------- saelens
def _write_saelens(folder: Path, tensors: dict[str, Tensor], cfg: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors")
    )
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _saelens_reference(t: dict[str, Tensor], cfg: dict[str, Any], x: Tensor) -> Tensor:
    """SAELens forward on the raw file tensors: optional ``x - b_dec``; the architecture's activation
    (JumpReLU ``relu(z) · 1[z > θ]`` with ``θ = exp(log_threshold)`` for training checkpoints; TopK
    ranking ``z · ‖W_dec‖`` and decoding ``f / ‖W_dec‖`` with ``rescale_acts_by_decoder_norm``); the
    pre-6.0 ``finetuning_scaling_factor`` on the codes; decode."""
    t = {k: v.double() for k, v in t.items()}
    sae_in = x - t["b_dec"] * bool(cfg.get("apply_b_dec_to_input", True))
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    arch = cfg.get("architecture", "standard")
    norms = t["W_dec"].norm(dim=-1)
    rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    if arch == "jumprelu":
        theta = t["threshold"] if "threshold" in t else t["log_threshold"].exp()
        f = torch.relu(pre) * (pre > theta)
    elif arch == "topk" or cfg.get("activation_fn_str") == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        if rescale:
            pre = pre * norms
        vals, idx = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    else:
        f = torch.relu(pre)
    if rescale:
        f = f / norms
    if cfg.get("finetuning_scaling_factor"):
        f = f * t.get("scaling_factor", t.get("finetuning_scaling_factor"))
    return f @ t["W_dec"] + t["b_dec"]


def _random_tensors(jumprelu: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    sae = make_sae(D_IN, D_SAE, dtype=dtype, seed=3)
    t = dict(sae.tensors())
    t["b_dec"] = t["b_dec"] + 0.5  # a clearly non-zero shift so folding it matters
    if not jumprelu:
        del t["threshold"]
    return t


@pytest.mark.parametrize(
    "cfg",
    [
        {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": False},
        {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True},
        {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True},
        {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 3, "apply_b_dec_to_input": True},
        # Pre-6.0 config: no architecture, activation in activation_fn_str, k in activation_fn_kwargs.
        {"d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}},
        {
            "d_in": D_IN,
            "d_sae": D_SAE,
            "hook_point": "blocks.3.hook_resid_post",
            "normalize_activations": False,
        },
    ],
)
def test_saelens_matches_reference_forward(tmp_path: Path, cfg: dict[str, Any]) -> None:
    tensors = _random_tensors(jumprelu=cfg.get("architecture") == "jumprelu")
    folder = _write_saelens(tmp_path / "sae", tensors, cfg)
    assert (
        detect_format(folder) == "saelens" and detect_format(folder / "sae_weights.safetensors") == "saelens"
    )
    sae = load_sae(folder, dtype=torch.float64)
    x = _x(scale=2.0)
    torch.testing.assert_close(sae(x).recon, _saelens_reference(tensors, cfg, x))
    assert sae.meta["format"] == "saelens"
    assert load_sae(folder).dtype == torch.float32
    if "hook_point" in cfg:
        assert sae.meta["hook_name"] == "blocks.3.hook_resid_post"


def test_saelens_round_trip_without_shift_is_exact(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": False}
    back = load_sae(_write_saelens(tmp_path / "s", dict(sae.tensors()), cfg))
    _assert_same_sae(sae, back)


def test_saelens_bad_input(tmp_path: Path) -> None:
    t = _random_tensors()
    base = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE}
    with pytest.raises(SAEFormatError, match=r"cfg\.json: architecture: expected one of .*got 'gated'"):
        load_sae(_write_saelens(tmp_path / "a", t, {**base, "architecture": "gated"}))
    with pytest.raises(SAEFormatError, match="normalize_activations: 'layer_norm'"):
        load_sae(_write_saelens(tmp_path / "b", t, {**base, "normalize_activations": "layer_norm"}))
    with pytest.raises(SAEFormatError, match=r"missing keys \['threshold'\]"):
        load_sae(_write_saelens(tmp_path / "c", {k: v for k, v in t.items() if k != "threshold"}, base))
    with pytest.raises(SAEFormatError, match="d_sae: config says 32, the weights have 16"):
        load_sae(_write_saelens(tmp_path / "d", t, {**base, "d_sae": 32}))
    with pytest.raises(SAEFormatError, match=r"W_dec: expected shape \(d_sae, d_in\).*transposed"):
        load_sae(_write_saelens(tmp_path / "e", {**t, "W_dec": t["W_dec"].T}, base))
    with pytest.raises(SAEFormatError, match="k: expected an int >= 1 for a topk SAE"):
        load_sae(_write_saelens(tmp_path / "f", t, {**base, "architecture": "topk"}))
    folder = _write_saelens(tmp_path / "g", t, base)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match=r"cfg\.json: not valid JSON"):
        load_sae(folder)


def test_saelens_jumprelu_zero_threshold_converts_exactly_and_fold_names_the_features(
    tmp_path: Path,
) -> None:
    """SAELens clamps θ at 0 during training; θ_i = 0 means feature i fires whenever z_i > 0 (and a
    negative θ acts as 0, since SAELens applies relu before the mask)."""
    t = _random_tensors()
    t["threshold"] = (
        t["threshold"].index_fill(0, torch.tensor([2, 5]), 0.0).index_fill(0, torch.tensor([9]), -0.3)
    )
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True}
    folder = _write_saelens(tmp_path / "sae", t, cfg)
    sae = load_sae(folder, dtype=torch.float64)
    x = _x(scale=2.0)
    torch.testing.assert_close(sae(x).recon, _saelens_reference(t, cfg, x))
    codes = sae.encode(x)
    pre = sae.pre_acts(x)
    assert bool((codes[:, 2] > 0).any()) and torch.equal(codes[:, 2] > 0, pre[:, 2] > 0)
    assert sae.threshold is not None and float(sae.threshold[9]) == 0.0
    assert sae.meta["threshold_clamped_to_zero"] == 1
    with pytest.raises(SAEValidationError, match=r"3 features have θ = 0 \(features 2, 5, 9\).*fold=False"):
        fold(sae)
    # Matching still works unfolded.
    assert match(sae, sae, fold=False, solver="scipy").perm.tolist() == list(range(D_SAE))


def test_saelens_log_threshold_checkpoint(tmp_path: Path) -> None:
    """Training checkpoints of JumpReLU SAEs store ``log_threshold``; θ = exp(log_threshold)."""
    t = _random_tensors()
    t["log_threshold"] = t.pop("threshold").log()
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": False}
    sae = load_sae(_write_saelens(tmp_path / "ckpt", t, cfg), dtype=torch.float64)
    x = _x(scale=2.0)
    torch.testing.assert_close(sae(x).recon, _saelens_reference(t, cfg, x))
    assert sae.threshold is not None
    torch.testing.assert_close(sae.threshold, t["log_threshold"].double().exp())
    both = {**t, "threshold": t["log_threshold"].exp()}
    with pytest.raises(SAEFormatError, match="both 'threshold' and 'log_threshold'"):
        load_sae(_write_saelens(tmp_path / "both", both, cfg))


def test_saelens_topk_rescale_acts_by_decoder_norm(tmp_path: Path) -> None:
    t = _random_tensors(jumprelu=False)
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 3,
        "apply_b_dec_to_input": True,
        "rescale_acts_by_decoder_norm": True,
    }
    norms = t["W_dec"].double().norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))  # so that the rescaling matters
    sae = load_sae(_write_saelens(tmp_path / "topk", t, cfg), dtype=torch.float64)
    x = _x(scale=2.0)
    torch.testing.assert_close(sae(x).recon, _saelens_reference(t, cfg, x))
    assert sae.meta["decoder_norm_folded"] is True
    without = load_sae(_write_saelens(tmp_path / "plain", t, {**cfg, "rescale_acts_by_decoder_norm": False}))
    assert not torch.allclose(without(x.float()).recon, sae(x).recon.float())
    # A zero decoder row (SAELens would divide 0 by 0 there) loads as a feature that decodes to 0.
    dead = {**t, "W_dec": t["W_dec"].index_fill(0, torch.tensor([4]), 0.0)}
    sae = load_sae(_write_saelens(tmp_path / "dead", dead, cfg))
    assert torch.equal(sae.W_dec[4], torch.zeros(D_IN)) and torch.equal(sae.W_enc[:, 4], torch.zeros(D_IN))


def test_saelens_scaling_factor_applied_or_refused(tmp_path: Path) -> None:
    t = _random_tensors(jumprelu=False)
    scale = 0.5 + torch.rand(D_SAE, generator=torch.Generator().manual_seed(2))
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "finetuning_scaling_factor": True}
    x = _x(scale=2.0)
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        tensors = {**t, key: scale}
        sae = load_sae(_write_saelens(tmp_path / key, tensors, cfg), dtype=torch.float64)
        torch.testing.assert_close(sae(x).recon, _saelens_reference(tensors, cfg, x))
        assert sae.meta["scaling_factor"] == f"{key}: folded into W_dec"
    no_flag = {**cfg, "finetuning_scaling_factor": False}
    with pytest.raises(SAEFormatError, match="scaling_factor: a per-feature scaling factor that is not all"):
        load_sae(_write_saelens(tmp_path / "refused", {**t, "scaling_factor": scale}, no_flag))
    near_one = torch.ones(D_SAE) + 1e-7
    sae = load_sae(_write_saelens(tmp_path / "ones", {**t, "scaling_factor": near_one}, no_flag))
    assert "dropped" in sae.meta["scaling_factor"]
    with pytest.raises(SAEFormatError, match=r"unexpected tensors \['W_skip'\]"):
        load_sae(_write_saelens(tmp_path / "skip", {**t, "W_skip": torch.zeros(D_IN, D_IN)}, cfg))
    with pytest.raises(SAEFormatError, match=r"unexpected tensors \['threshold'\] for a 'standard'"):
        load_sae(_write_saelens(tmp_path / "thr", {**t, "threshold": torch.ones(D_SAE)}, cfg))


def test_folder_with_two_formats_is_ambiguous(tmp_path: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    folder = _write_saelens(tmp_path / "both", dict(sae.tensors()), {"architecture": "jumprelu"})
    _write_gemma(folder, make_sae(D_IN, D_SAE, seed=1))
    with pytest.raises(SAEFormatError, match="ambiguous") as info:
        load_sae(folder)
    message = str(info.value)
    assert str(folder / "params.npz") in message and str(folder / "sae_weights.safetensors") in message
    assert "--format" in message
    # Pointing at the file, or naming the format, chooses.
    _assert_same_sae(make_sae(D_IN, D_SAE, seed=1), load_sae(folder / "params.npz"))
    assert load_sae(folder / "sae_weights.safetensors").meta["format"] == "saelens"
    assert load_sae(folder, format="saelens").meta["format"] == "saelens"


# --------------------------------------------------------------------------------------- sparsify
def _write_sparsify(folder: Path, t: dict[str, Tensor], cfg: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in t.items()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _sparsify_tensors(dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "encoder.weight": (torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_IN)).to(dtype),
        "encoder.bias": (0.1 * torch.randn(D_SAE, generator=g)).to(dtype),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g).to(dtype),
        "b_dec": (0.5 + torch.randn(D_IN, generator=g)).to(dtype),
    }


def _sparsify_reference(t: dict[str, Tensor], k: int, x: Tensor) -> Tensor:
    """sparsify forward: top-k of relu((x - b_dec) W_eᵀ + b_e), decode with W_dec and b_dec."""
    t = {key: v.double() for key, v in t.items()}
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(k, dim=-1)
    out = torch.zeros(x.shape[0], D_IN, dtype=torch.float64)
    for row in range(x.shape[0]):
        for v, i in zip(vals[row], idx[row], strict=True):
            out[row] += v * t["W_dec"][i]
    return out + t["b_dec"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_matches_reference_forward(tmp_path: Path, dtype: torch.dtype) -> None:
    t = _sparsify_tensors(dtype)
    cfg = {"expansion_factor": 2, "normalize_decoder": True, "num_latents": 0, "k": 4, "d_in": D_IN}
    hook = _write_sparsify(tmp_path / "model" / "layers.6", t, cfg)
    for spec in (hook, hook.parent, hook / "sae.safetensors"):
        assert detect_format(spec) == "sparsify"
        sae = load_sae(spec, dtype=torch.float64)
        assert sae.activation == "topk" and sae.k == 4 and sae.meta["hookpoint"] == "layers.6"
    x = _x()
    torch.testing.assert_close(load_sae(hook, dtype=torch.float64)(x).recon, _sparsify_reference(t, 4, x))
    assert load_sae(hook).dtype == dtype


def test_sparsify_bad_input(tmp_path: Path) -> None:
    t = _sparsify_tensors()
    cfg = {"k": 4, "d_in": D_IN}
    root = tmp_path / "model"
    _write_sparsify(root / "layers.1", t, cfg)
    _write_sparsify(root / "layers.2", t, cfg)
    with pytest.raises(SAEFormatError, match=r"holds 2 sparsify hookpoints \['layers.1', 'layers.2'\]"):
        load_sae(root, format="sparsify")
    with pytest.raises(SAEFormatError, match="k: expected an int >= 1"):
        load_sae(_write_sparsify(tmp_path / "nok", t, {"d_in": D_IN}))
    with pytest.raises(SAEFormatError, match=r"encoder.weight: expected shape \(d_sae, d_in\).*transposed"):
        load_sae(_write_sparsify(tmp_path / "tr", {**t, "encoder.weight": t["encoder.weight"].T}, cfg))
    with pytest.raises(SAEFormatError, match=r"missing keys \['W_dec'\]"):
        load_sae(_write_sparsify(tmp_path / "mk", {k: v for k, v in t.items() if k != "W_dec"}, cfg))
    with pytest.raises(SAEFormatError, match="W_skip"):
        load_sae(_write_sparsify(tmp_path / "sk", {**t, "W_skip": torch.zeros(D_IN, D_IN)}, cfg))
    with pytest.raises(SAEValidationError, match=r"k: expected an int in \[1, d_sae=16\]"):
        load_sae(_write_sparsify(tmp_path / "bigk", t, {"k": 99}))


# ------------------------------------------------------------------------------------ llama scope
def _llama_tensors() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "encoder.weight": (torch.randn(D_SAE, D_IN, generator=g) / math.sqrt(D_IN)).bfloat16(),
        "encoder.bias": (0.1 * torch.randn(D_SAE, generator=g)).bfloat16(),
        # Decoder columns far from unit norm, so including the norm in the gate matters.
        "decoder.weight": (
            torch.randn(D_IN, D_SAE, generator=g) * (0.2 + 2 * torch.rand(D_SAE, generator=g))
        ).bfloat16(),
        "decoder.bias": (0.3 * torch.randn(D_IN, generator=g)).bfloat16(),
    }


def _write_llama(folder: Path, t: dict[str, Tensor], hp: dict[str, Any] | None) -> Path:
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(t, str(folder / "checkpoints" / "final.safetensors"))
    if hp is not None:
        (folder / "hyperparams.json").write_text(json.dumps(hp))
    return folder


def _llama_reference(t: dict[str, Tensor], hp: dict[str, Any], x: Tensor) -> tuple[Tensor, Tensor]:
    """lm-saes forward on model-scale x: normalise, encode, gate with decoder norm, decode, un-normalise."""
    W_E, b_E = t["encoder.weight"].double(), t["encoder.bias"].double()
    W_D, b_D = t["decoder.weight"].double(), t["decoder.bias"].double()
    d = x.shape[-1]
    norms = hp.get("dataset_average_activation_norm", {"in": math.sqrt(d), "out": math.sqrt(d)})
    s_in, s_out = math.sqrt(d) / norms["in"], math.sqrt(d) / norms["out"]
    xn = x * s_in
    if hp.get("apply_decoder_bias_to_pre_encoder", False):
        xn = xn - b_D
    z = xn @ W_E.T + b_E
    gate = z * W_D.norm(dim=0) if hp.get("sparsity_include_decoder_norm", True) else z
    f = z * (gate > hp["jump_relu_threshold"])
    return f, (f @ W_D.T + b_D) / s_out


LLAMA_HP = {
    "d_model": D_IN,
    "d_sae": D_SAE,
    "hook_point_in": "blocks.3.hook_resid_post",
    "hook_point_out": "blocks.3.hook_resid_post",
    "act_fn": "jumprelu",
    "jump_relu_threshold": 0.35,
    "norm_activation": "dataset-wise",
    "dataset_average_activation_norm": {"in": 11.5, "out": 9.25},
    "use_decoder_bias": True,
    "apply_decoder_bias_to_pre_encoder": False,
    "sparsity_include_decoder_norm": True,
    "top_k": 50,
}


@pytest.mark.parametrize(
    "hp",
    [
        LLAMA_HP,
        {**LLAMA_HP, "apply_decoder_bias_to_pre_encoder": True},
        {**LLAMA_HP, "sparsity_include_decoder_norm": False},
        {
            k: v
            for k, v in LLAMA_HP.items()
            if k not in ("norm_activation", "dataset_average_activation_norm")
        },
    ],
)
def test_llama_scope_folds_normalisation_exactly(tmp_path: Path, hp: dict[str, Any]) -> None:
    t = _llama_tensors()
    folder = _write_llama(tmp_path / "Llama3_1-8B-Base-L3R-8x", t, hp)
    assert detect_format(folder) == "llama_scope"
    assert detect_format(folder / "checkpoints" / "final.safetensors") == "llama_scope"
    sae = load_sae(folder, dtype=torch.float64)
    # Inputs at the dataset's own scale, so that a fair share of features fire.
    x = _x(
        64, scale=hp.get("dataset_average_activation_norm", {"in": math.sqrt(D_IN)})["in"] / math.sqrt(D_IN)
    )
    f_ref, recon_ref = _llama_reference(t, hp, x)
    out = sae(x)
    assert 0 < int((f_ref > 0).sum()) < f_ref.numel()
    torch.testing.assert_close(out.codes, f_ref)
    torch.testing.assert_close(out.recon, recon_ref)
    native = load_sae(folder)
    assert native.dtype == torch.bfloat16 and native.activation == "jumprelu"
    assert native.meta["hook_point_in"] == "blocks.3.hook_resid_post"


def test_llama_scope_normalisation_changes_the_answer(tmp_path: Path) -> None:
    """Ignoring the dataset norm or the decoder-norm gate gives other codes (guards the test above)."""
    t = _llama_tensors()
    sae = load_sae(_write_llama(tmp_path / "a", t, LLAMA_HP), dtype=torch.float64)
    x = _x(64, scale=LLAMA_HP["dataset_average_activation_norm"]["in"] / math.sqrt(D_IN))
    for wrong in (
        {k: v for k, v in LLAMA_HP.items() if k != "dataset_average_activation_norm"}
        | {"norm_activation": "inference"},
        {**LLAMA_HP, "sparsity_include_decoder_norm": False},
    ):
        hp_ref = {**wrong}
        if hp_ref.get("norm_activation") == "inference":
            hp_ref.pop("norm_activation")
        f_wrong, _ = _llama_reference(t, hp_ref, x)
        assert not torch.allclose(sae(x).codes, f_wrong)


def test_llama_scope_threshold_sources(tmp_path: Path) -> None:
    t = _llama_tensors()
    hp = {k: v for k, v in LLAMA_HP.items() if k != "jump_relu_threshold"}
    scalar = _write_llama(tmp_path / "s", {**t, "jump_relu_threshold": torch.tensor(0.35).bfloat16()}, hp)
    x = _x(64, scale=LLAMA_HP["dataset_average_activation_norm"]["in"] / math.sqrt(D_IN))
    f_ref, _ = _llama_reference(t, {**hp, "jump_relu_threshold": float(torch.tensor(0.35).bfloat16())}, x)
    torch.testing.assert_close(load_sae(scalar, dtype=torch.float64)(x).codes, f_ref)
    with pytest.raises(SAEFormatError, match="no JumpReLU threshold"):
        load_sae(_write_llama(tmp_path / "none", t, hp))
    # No hyperparams.json at all: only the file's tensors, no normalisation.
    bare = _write_llama(tmp_path / "bare", {**t, "jump_relu_threshold": torch.tensor(0.35).bfloat16()}, None)
    assert load_sae(bare).meta["input_scale"] == 1.0


def test_llama_scope_bad_input(tmp_path: Path) -> None:
    t = _llama_tensors()
    with pytest.raises(SAEFormatError, match=r"decoder.weight: expected shape \(d_in, d_sae\).*transposed"):
        load_sae(
            _write_llama(
                tmp_path / "a", {**t, "decoder.weight": t["decoder.weight"].T.contiguous()}, LLAMA_HP
            )
        )
    with pytest.raises(SAEFormatError, match="d_sae: hyperparams say 99"):
        load_sae(_write_llama(tmp_path / "b", t, {**LLAMA_HP, "d_sae": 99}))
    with pytest.raises(SAEFormatError, match="norm_activation: 'token-wise'"):
        load_sae(_write_llama(tmp_path / "c", t, {**LLAMA_HP, "norm_activation": "token-wise"}))
    with pytest.raises(
        SAEFormatError, match=r"dataset_average_activation_norm.in: expected a finite number > 0"
    ):
        load_sae(
            _write_llama(
                tmp_path / "d", t, {**LLAMA_HP, "dataset_average_activation_norm": {"in": 0, "out": 1}}
            )
        )
    with pytest.raises(SAEFormatError, match=r"missing keys \['decoder.bias'\]"):
        load_sae(_write_llama(tmp_path / "e", {k: v for k, v in t.items() if k != "decoder.bias"}, LLAMA_HP))
    nan = t["encoder.bias"].clone()
    nan[3] = float("nan")
    with pytest.raises(SAEValidationError, match=r"final\.safetensors: b_enc: 1 non-finite"):
        load_sae(_write_llama(tmp_path / "f", {**t, "encoder.bias": nan}, LLAMA_HP))


# ------------------------------------------------------------------------- detection and registry
def test_detect_unknown_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        SAEFormatError, match=r"empty: unknown SAE format; known formats: \['gemma_scope', 'llama_scope'"
    ):
        detect_format(tmp_path / "empty")
    with pytest.raises(SAEFormatError, match="unknown SAE format"):
        load_sae(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(SAEFormatError, match=r"x\.txt: unknown SAE format"):
        detect_format(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_sae(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        detect_format(tmp_path / "nope")
    with pytest.raises(ValueError, match="format: expected one of"):
        load_sae(tmp_path / "x.txt", format="onnx")
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(SAEFormatError, match=r"plain\.safetensors: unknown SAE format"):
        detect_format(plain)


def test_registry_refuses_duplicates() -> None:
    assert set(FORMATS) == {"native", "gemma_scope", "saelens", "sparsify", "llama_scope"}
    with pytest.raises(ValueError, match="format 'native' is already registered"):
        FORMATS.register("native", FORMATS["native"], lambda p: False)
    reg = FormatRegistry()
    reg.register("mine", FORMATS["native"], lambda p: False)
    assert list(reg) == ["mine"] and len(reg) == 1
    with pytest.raises(ValueError, match="already registered"):
        reg.register("mine", FORMATS["native"], lambda p: False)


# --------------------------------------------------------------------------------------------- hub
def _hub_cache_put(cache: Path, repo_id: str, files: dict[str, bytes], *, revision: str = "main") -> str:
    """Lay files out exactly as huggingface_hub's cache does: blobs, refs/<revision>, snapshots/<commit>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repr(sorted(files)).encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub cache in tmp_path (the env vars are read at import, so patch the constants too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _npz_bytes(tmp_path: Path, sae: SAE) -> bytes:
    path = tmp_path / "tmp_params.npz"
    np.savez(path, **{k: v.numpy() for k, v in sae.tensors().items()})
    return path.read_bytes()


def test_hub_gemma_scope_offline(tmp_path: Path, offline_hub: Path) -> None:
    sae = make_sae(D_IN, D_SAE)
    sub = gemma_scope_path(20)
    commit = _hub_cache_put(
        offline_hub, "google/gemma-scope-2b-pt-res", {f"{sub}/params.npz": _npz_bytes(tmp_path, sae)}
    )
    for spec in (
        f"hub:google/gemma-scope-2b-pt-res/{sub}",
        f"hub:google/gemma-scope-2b-pt-res/{sub}@main",
        f"hub:google/gemma-scope-2b-pt-res/{sub}/params.npz@{commit}",
    ):
        back = load_sae(spec)
        _assert_same_sae(sae, back)
        assert back.meta["source"] == spec and back.meta["layer"] == 20 and back.meta["average_l0"] == 71


def _saelens_on_hub(cache: Path, repo_id: str, revision: str = "main") -> dict[str, Tensor]:
    """A SAELens folder ``blocks.3`` in a hub repository of the local hub cache; its tensors."""
    t = _random_tensors()
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": False}
    weights = safetensors.torch.save({k: v.contiguous() for k, v in t.items()})
    files = {"blocks.3/cfg.json": json.dumps(cfg).encode(), "blocks.3/sae_weights.safetensors": weights}
    _hub_cache_put(cache, repo_id, files, revision=revision)
    return t


def test_hub_folder_formats_offline(tmp_path: Path, offline_hub: Path) -> None:
    t = _saelens_on_hub(offline_hub, "someone/saelens-saes", revision="v1")
    back = load_sae("hub:someone/saelens-saes/blocks.3@v1")
    assert back.meta["format"] == "saelens"
    assert torch.equal(back.W_enc, t["W_enc"])
    assert load_sae("hub:someone/saelens-saes/blocks.3/sae_weights.safetensors@v1").d_sae == D_SAE

    lt = _llama_tensors()
    _hub_cache_put(
        offline_hub,
        "fnlp/Llama3_1-8B-Base-LXR-8x",
        {
            "Llama3_1-8B-Base-L3R-8x/checkpoints/final.safetensors": safetensors.torch.save(lt),
            "Llama3_1-8B-Base-L3R-8x/hyperparams.json": json.dumps(LLAMA_HP).encode(),
        },
    )
    sae = load_sae("hub:fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L3R-8x", dtype=torch.float64)
    x = _x(16, scale=LLAMA_HP["dataset_average_activation_norm"]["in"] / math.sqrt(D_IN))
    torch.testing.assert_close(sae(x).recon, _llama_reference(lt, LLAMA_HP, x)[1])

    st = _sparsify_tensors()
    _hub_cache_put(
        offline_hub,
        "EleutherAI/sae-tiny",
        {
            "layers.6/cfg.json": json.dumps({"k": 4, "d_in": D_IN}).encode(),
            "layers.6/sae.safetensors": safetensors.torch.save(st),
        },
    )
    assert load_sae("hub:EleutherAI/sae-tiny/layers.6", format="sparsify").k == 4


def test_hub_missing_offline_is_a_clear_error(offline_hub: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"hub:google/gemma-scope-2b-pt-res/layer_0.*no known SAE layout.*HF_HUB_OFFLINE",
    ):
        load_sae("hub:google/gemma-scope-2b-pt-res/layer_0/width_16k/average_l0_105")


def test_parse_hub_spec() -> None:
    assert parse_hub_spec("hub:a/b") == ("a/b", "", None)
    assert parse_hub_spec("hub:a/b/c/d.npz@rev") == ("a/b", "c/d.npz", "rev")
    for bad in ("a/b", "hub:a", "hub:a/b@", "hub:a/b/../c", "hub:/b"):
        with pytest.raises(ValueError, match="spec:"):
            parse_hub_spec(bad)


class HubCalls(NamedTuple):
    probes: list[str]
    """URL of every probe request."""
    local_only: list[bool]
    """``local_files_only`` of every download attempted."""


@pytest.fixture
def unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubCalls:
    """No network and HF_HUB_OFFLINE unset: the probe's HEAD request fails as an HTTP client does
    without DNS."""
    from huggingface_hub import constants

    from saematch_core.formats import hub

    class ConnectError(Exception):  # what httpx/requests raise without network (not an OSError)
        pass

    class Session:
        def head(self, url: str, timeout: float) -> None:
            probes.append(url)
            raise ConnectError("[Errno -2] Name or service not known")

    probes: list[str] = []
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "get_session", Session)
    monkeypatch.setattr(hub, "_unreachable", {})
    flags: list[bool] = []
    real = hub.hf_hub_download

    def download(*args: Any, **kwargs: Any) -> str:
        flags.append(bool(kwargs.get("local_files_only")))
        return real(*args, **{**kwargs, "cache_dir": str(cache)})

    monkeypatch.setattr(hub, "hf_hub_download", download)
    return HubCalls(probes, flags)


def test_unreachable_hub_fails_fast_naming_repo_file_revision(
    tmp_path: Path, unreachable_hub: HubCalls
) -> None:
    import time

    from saematch_core.formats import hub

    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        load_sae("hub:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71@v2")
    message = str(info.value)
    assert message.startswith("hub:google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71@v2: ")
    assert "cannot be reached (ConnectError: [Errno -2] Name or service not known)" in message
    assert "HF_HUB_OFFLINE" not in message
    with pytest.raises(FileNotFoundError, match=r"^hub:a/b/x/params\.npz@main: no such file in the local"):
        load_sae("hub:a/b/x/params.npz")
    assert time.perf_counter() - start < 5
    assert unreachable_hub.local_only and all(unreachable_hub.local_only)  # never a network retry
    assert len(unreachable_hub.probes) == 1  # the failed probe is remembered
    # What is in the local hub cache still loads.
    sae = make_sae(D_IN, D_SAE)
    _hub_cache_put(Path(hub.constants.HF_HUB_CACHE), "a/b", {"x/params.npz": _npz_bytes(tmp_path, sae)})
    _assert_same_sae(sae, load_sae("hub:a/b/x"))


def test_hub_errors_name_repo_file_and_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    from saematch_core.formats import hub

    def refuse(error: type[Exception]) -> Any:
        def download(*args: Any, **kwargs: Any) -> str:
            exc = error.__new__(error)
            Exception.__init__(exc, "404 Client Error")
            raise exc

        return download

    monkeypatch.setattr(hub, "probe_hub", lambda: None)
    monkeypatch.setattr(hub, "hf_hub_download", refuse(RepositoryNotFoundError))
    with pytest.raises(FileNotFoundError, match=r"^hub:o/r/l3/params\.npz@v1: repository 'o/r' not found"):
        load_sae("hub:o/r/l3@v1")
    monkeypatch.setattr(hub, "hf_hub_download", refuse(RevisionNotFoundError))
    with pytest.raises(FileNotFoundError, match=r"^hub:o/r/l3/cfg\.json@nope: revision 'nope' not found"):
        load_sae("hub:o/r/l3/sae_weights.safetensors@nope")


def test_cli_and_api_resolve_hub_specs_the_same_way(
    tmp_path: Path, offline_hub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saematch_core.cli import main
    from saematch_core.formats import resolve

    _saelens_on_hub(offline_hub, "someone/saes")
    spec = "hub:someone/saes/blocks.3@main"
    found = resolve(spec)
    assert found.format == "saelens" and found.hub and found.source == spec
    assert load_sae(found).meta["source"] == spec == load_sae(spec).meta["source"]
    assert main(["info", spec, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["meta"]["source"] == spec and summary["format"] == "saelens"
    out = tmp_path / "folded.safetensors"
    assert main(["fold", spec, "--out", str(out)]) == 0
    folded = load_sae(out)
    assert folded.meta["source"] == spec and folded.meta["folded_from"] == spec


def test_loaded_sae_does_not_alias_its_file(tmp_path: Path) -> None:
    """safetensors maps the file; a loaded SAE must not change when the file is overwritten in place."""
    sae = make_sae(D_IN, D_SAE)
    path = save_sae(sae, tmp_path / "a.safetensors")
    loaded = load_sae(path)
    with open(path, "r+b") as fh:  # same inode, every tensor byte zeroed
        n = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + n)
        fh.write(b"\x00" * (path.stat().st_size - 8 - n))
    _assert_same_sae(sae, loaded)


def test_loading_a_sealed_file_checks_its_record(tmp_path: Path) -> None:
    """A cached SAE opened directly (saematch info, load_sae) is checked like the cache checks it."""
    from saematch_core.cache import seal

    path = save_sae(make_sae(D_IN, D_SAE), tmp_path / "layer_02.safetensors")
    seal(path)
    load_sae(path)
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(
        SAEFormatError, match=r"layer_02\.safetensors: content differs from when it was written"
    ):
        load_sae(path)
    unsealed = save_sae(make_sae(D_IN, D_SAE), tmp_path / "mine.safetensors")
    load_sae(unsealed)  # no record: nothing to compare with, and none is written by a plain load
    assert not (tmp_path / ".mine.safetensors.record").exists()
