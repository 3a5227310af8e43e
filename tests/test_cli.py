"""The ``saematch`` command: flags mirror MatchConfig, commands work end to end, bad input exits 2.

Most checks call :func:`saematch_core.cli.main` in-process (fast); a few run the real command
through a subprocess (``python -m saematch_core``), as a user would.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import make_sae

from saematch_core.cli import build_parser, main, match_config_from_args
from saematch_core.formats import load_sae, save_sae
from saematch_core.match import MatchConfig, MatchResult

D_IN, D_SAE = 8, 12


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


def _pair(tmp_path: Path, seed: int = 0) -> tuple[Path, Path, torch.Tensor]:
    """SAE A and B = A with features permuted; returns the paths and the planted permutation."""
    a = make_sae(D_IN, D_SAE, seed=seed)
    perm = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(seed + 1))
    pa = save_sae(a, tmp_path / "a.safetensors")
    pb = save_sae(a.permute(perm), tmp_path / "b.safetensors")
    return pa, pb, perm


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "saematch_core", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------------------- flags vs config
def test_every_match_config_field_has_a_flag_and_vice_versa() -> None:
    sp = _subparser("match")
    group = next(g for g in sp._action_groups if g.title and "MatchConfig" in g.title)
    flag_dests = {a.dest for a in group._group_actions}
    assert flag_dests == {f.name for f in fields(MatchConfig)}
    for action in group._group_actions:
        assert action.help and len(action.help) > 20, action.dest
        assert f"--{action.dest.replace('_', '-')}" in action.option_strings
    # Nothing else on the command is silently a config field under another name.
    other = {a.dest for a in sp._actions} - flag_dests
    assert other == {"help", "a", "b", "format", "out", "force", "config"}


def test_flags_override_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"metric": "cosine", "solver": "greedy", "chunk_size": 7}))
    parser = build_parser()
    args = parser.parse_args(
        ["match", "a", "b", "--out", "x.json", "--config", str(cfg), "--solver", "identity", "--no-fold"]
    )
    config = match_config_from_args(args)
    assert config == MatchConfig(metric="cosine", solver="identity", chunk_size=7, fold=False)
    args = parser.parse_args(
        ["match", "a", "b", "--out", "x.json", "--objective", "W_dec,b_enc", "--sparse-k", "3"]
    )
    assert match_config_from_args(args) == MatchConfig(params=("W_dec", "b_enc"), sparse_k=3)
    args = parser.parse_args(["match", "a", "b", "--out", "x.json"])
    assert match_config_from_args(args) == MatchConfig()


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["info", "--help"], ["fold", "--help"], ["match", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        assert "usage: saematch" in capsys.readouterr().out


# ---------------------------------------------------------------------------- in-process commands
def test_info_reports_format_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pa, _, _ = _pair(tmp_path)
    assert main(["info", str(pa), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    sae = load_sae(pa)
    assert summary["format"] == "native" and summary["d_in"] == D_IN and summary["d_sae"] == D_SAE
    assert summary["activation"] == "jumprelu" and summary["dtype"] == "float32"
    assert summary["threshold"]["min"] == pytest.approx(float(sae.threshold.min()))  # type: ignore[union-attr]
    assert summary["decoder_norm"]["max"] == pytest.approx(float(sae.W_dec.norm(dim=1).max()))
    assert main(["info", str(pa)]) == 0
    text = capsys.readouterr().out
    assert "format:" in text and "native" in text and "threshold:" in text


def test_fold_writes_native_and_refuses_existing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pa, _, _ = _pair(tmp_path)
    out = tmp_path / "folded.safetensors"
    assert main(["fold", str(pa), "--out", str(out)]) == 0
    folded = load_sae(out)
    assert torch.equal(folded.threshold, torch.ones(D_SAE))  # type: ignore[arg-type]
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(folded(x).recon, load_sae(pa)(x).recon)
    before = out.read_bytes()
    assert main(["fold", str(pa), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["fold", str(pa), "--out", str(out), "--force"]) == 0


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_match_recovers_planted_permutation(tmp_path: Path, suffix: str) -> None:
    pa, pb, perm = _pair(tmp_path)
    out = tmp_path / f"perm{suffix}"
    assert main(["match", str(pa), str(pb), "--out", str(out)]) == 0
    result = MatchResult.from_json(out) if suffix == ".json" else MatchResult.load(out)
    # B's feature j is A's feature perm[j], so A's feature i sits at position inverse(perm)[i] in B.
    assert torch.equal(result.perm, torch.argsort(perm))
    assert result.total_cost == pytest.approx(0.0, abs=1e-9)


def test_match_json_layout(tmp_path: Path) -> None:
    pa, pb, _ = _pair(tmp_path)
    out = tmp_path / "perm.json"
    assert (
        main(["match", str(pa), str(pb), "--out", str(out), "--metric", "cosine", "--objective", "W_dec"])
        == 0
    )
    data = json.loads(out.read_text())
    assert data["config"]["metric"] == "cosine" and data["config"]["params"] == ["W_dec"]
    assert data["data"]["total_cost"] == pytest.approx(0.0, abs=1e-6)
    assert len(data["data"]["pairs"]) == D_SAE
    assert set(data["data"]["pairs"][0]) == {"a", "b", "cost"}
    assert sorted(d["b"] for d in data["data"]["pairs"]) == list(range(D_SAE))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "{tmp}/nope"], "nope: no such file or folder"),
        (["info", "{tmp}/empty"], "unknown SAE format; known formats"),
        (["match", "{a}", "{b}", "--out", "{tmp}/missing/p.json"], "folder {tmp}/missing does not exist"),
        (["match", "{a}", "{b}", "--out", "{tmp}/p.txt"], "expected a file ending in .json or .safetensors"),
        (["match", "{a}", "{b}", "--out", "{tmp}/p.json", "--metric", "l2"], "invalid choice: 'l2'"),
        (["match", "{a}", "{wide}", "--out", "{tmp}/p.json"], "expected the same d_in"),
        (["match", "{a}", "{b}", "--out", "{tmp}/p.json", "--chunk-size", "0"], "MatchConfig.chunk_size"),
        (["fold", "{relu}", "--out", "{tmp}/f.safetensors"], "folding is defined for JumpReLU"),
        (
            ["fold", "{zero}", "--out", "{tmp}/f.safetensors"],
            "{zero}: threshold: 1 feature has θ = 0 (feature 3)",
        ),
        (["info", "{bad}"], "bad.safetensors"),
        (["info"], "required: sae"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    pa, pb, _ = _pair(tmp_path)
    (tmp_path / "empty").mkdir()
    wide = save_sae(make_sae(D_IN + 1, D_SAE), tmp_path / "wide.safetensors")
    relu = save_sae(make_sae(D_IN, D_SAE, activation="relu"), tmp_path / "relu.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    subs = {"tmp": str(tmp_path), "a": str(pa), "b": str(pb), "wide": str(wide), "relu": str(relu)}
    subs["bad"] = str(tmp_path / "bad.safetensors")
    theta = torch.full((D_SAE,), 0.5).index_fill(0, torch.tensor([3]), 0.0)
    subs["zero"] = str(save_sae(make_sae(D_IN, D_SAE, threshold=theta), tmp_path / "zero.safetensors"))
    before = sorted(os.listdir(tmp_path))
    assert main([arg.format(**subs) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saematch: error: "), err
    assert message.format(**subs) in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, not even half a file


# ---------------------------------------------------------------------------- real subprocesses
def test_subprocess_match_json(tmp_path: Path) -> None:
    pa, pb, perm = _pair(tmp_path, seed=3)
    proc = _run("match", str(pa), str(pb), "--out", str(tmp_path / "p.json"), "--solver", "scipy")
    assert proc.returncode == 0, proc.stderr
    assert "total_cost" in proc.stdout
    assert torch.equal(MatchResult.from_json(tmp_path / "p.json").perm, torch.argsort(perm))


@pytest.mark.slow
def test_subprocess_info_fold_and_match_safetensors(tmp_path: Path) -> None:
    """The other commands as real processes (slow: each imports torch; covered in-process above)."""
    pa, pb, perm = _pair(tmp_path, seed=3)
    proc = _run("info", str(pa), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["d_sae"] == D_SAE
    out = tmp_path / "f.safetensors"
    proc = _run("fold", str(pa), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert load_sae(out).meta["folded"] is True
    proc = _run("match", str(pa), str(pb), "--out", str(tmp_path / "p.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(MatchResult.load(tmp_path / "p.safetensors").perm, torch.argsort(perm))


def test_subprocess_bad_input_one_line_no_traceback(tmp_path: Path) -> None:
    proc = _run("info", str(tmp_path / "missing.npz"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("saematch: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_subprocess_hub_offline(tmp_path: Path) -> None:
    """`saematch info hub:...` through the real env vars (HF_HUB_OFFLINE, HF_HUB_CACHE), no network."""
    import hashlib

    import numpy as np

    sae = make_sae(D_IN, D_SAE)
    npz = tmp_path / "params.npz"
    np.savez(npz, **{k: v.numpy() for k, v in sae.tensors().items()})
    repo = tmp_path / "hub" / "models--google--gemma-scope-2b-pt-res"
    commit = hashlib.sha1(b"x").hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit / "layer_5/width_16k/average_l0_68/params.npz"
    target.parent.mkdir(parents=True)
    target.write_bytes(npz.read_bytes())
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf_home")}
    proc = _run("info", "hub:google/gemma-scope-2b-pt-res/layer_5/width_16k/average_l0_68", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "gemma_scope" and summary["meta"]["layer"] == 5 and summary["d_sae"] == D_SAE


def test_prepare_passes_options_and_lists_the_saes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import saematch_core.prepare as prepare_module

    seen: dict[str, object] = {}

    def fake_prepare(profile: str, **kwargs: object) -> object:
        seen.update(profile=profile, **kwargs)
        record = argparse.Namespace(
            family="main", layer=3, setting="", path=tmp_path / "saes" / "layer_03.safetensors"
        )
        return argparse.Namespace(
            profile=profile, folder=tmp_path, records=(record,), cached=True, seconds=0.1
        )

    monkeypatch.setattr(prepare_module, "prepare", fake_prepare)
    assert main(["prepare", "--profile", "smoke", "--cache-dir", str(tmp_path), "--no-progress"]) == 0
    assert seen == {
        "profile": "smoke",
        "cache_dir": tmp_path,
        "force": False,
        "progress": False,
        "device": None,
    }
    out = capsys.readouterr().out
    assert "profile smoke: 1 SAEs (cached)" in out and "layer_03.safetensors" in out


def test_prepare_rejects_unknown_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "--profile", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saematch: error:") and "nope" in err[0]


# ---------------------------------------------------------------------------- I/O faults
def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saematch: error: ") and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize(
    ("code", "reason"), [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only")]
)
@pytest.mark.parametrize("command", ["fold", "match"])
def test_unwritable_out_is_refused_before_any_sae_is_loaded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    reason: str,
    command: str,
) -> None:
    """Permission denied / read-only folder (simulated where the file system is asked: root ignores
    mode bits): one line naming --out, exit 2, and no SAE loaded first."""
    import saematch_core.cache as cache_module
    import saematch_core.cli as cli_module

    pa, pb, _ = _pair(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    loaded: list[str] = []
    monkeypatch.setattr(cli_module, "resolve", lambda spec, format=None: loaded.append(spec))

    def refuse(target: Path) -> tuple[Path, int]:
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(cache_module, "_create_temp", refuse)
    out = out_dir / ("f.safetensors" if command == "fold" else "p.json")
    argv = [command, str(pa), *([str(pb)] if command == "match" else []), "--out", str(out)]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"--out: cannot write {out}: {reason}" in err and ".tmp" not in err
    assert loaded == [] and list(out_dir.iterdir()) == []


@pytest.mark.parametrize("out_name", ["f.safetensors", "p.json", "p.safetensors"])
def test_disk_full_while_writing_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], out_name: str
) -> None:
    """ENOSPC when the written data is flushed: one line naming --out, exit 2, nothing left behind."""
    pa, pb, _ = _pair(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    out = out_dir / out_name
    argv = ["fold", str(pa)] if out_name.startswith("f") else ["match", str(pa), str(pb)]
    assert main([*argv, "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"--out: cannot write {out}: No space left on device; nothing was written" in err
    assert list(out_dir.iterdir()) == []


def test_missing_optional_dependency_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from saematch_core.cli import missing_dependency_hint

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    assert main(["prepare", "--profile", "smoke", "--cache-dir", str(tmp_path), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "'transformers' is not installed" in err and "pip install 'saematch[substrate]'" in err
    assert missing_dependency_hint("plotly.graph_objects") is not None
    assert "saematch[book]" in (missing_dependency_hint("plotly.graph_objects") or "")
    assert missing_dependency_hint("torch") is None and missing_dependency_hint("no_such_module") is None


def test_module_missing_for_another_reason_is_a_bug_with_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import saematch_core.cli as cli_module

    def broken(spec: str, format: str | None = None) -> None:
        raise ModuleNotFoundError("No module named 'saematch_core.nothing'", name="saematch_core.nothing")

    monkeypatch.setattr(cli_module, "resolve", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["info", str(tmp_path)])
