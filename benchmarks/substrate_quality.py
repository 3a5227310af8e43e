"""What the bfloat16 speed-ups cost in SAE quality, measured on a prepared profile's own data.

``python -m benchmarks.substrate_quality --layers 4 14 24`` (from the repository root; the profile,
``default`` unless ``--profile`` says otherwise, must have been prepared with its float32 training
activation cache: ``saematch prepare --profile default``) trains, at each layer, the profile's main
SAE recipe (same rows, same layer seed as ``prepare``) five times:

==================  =======================================================================
``float32``         float32 forward passes, float32 steps: the reference (what ``prepare``
                    trains today)
``float32_seed2``   the same with another seed (seed + 500): how much a seed alone changes
``bf16_step``       float32 forward passes, bfloat16 steps with float32 master weights
``bf16_step_seed2`` the same with seed + 500
``bf16_fwd_step``   the training rows recomputed under bfloat16 autocast, and bfloat16 steps
==================  =======================================================================

and reports for each, on the evaluation split: L0, FVU, the dead fraction, ΔL (nats per token,
float32 forward) and the mean over the reference's features of the best cosine with this SAE's
decoder rows (1 for the reference itself; two float32 seeds give the yardstick). Also the mean
relative error of the bfloat16 training rows per layer. Results: printed, and written to
``benchmarks/results/substrate_quality.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.substrate import save_result
from saematch_core.activations import ActivationCache, open_activation_cache
from saematch_core.models import LoadedModel, capture_residuals, forward_precision, load_model
from saematch_core.prepare import _delta_batch, _rows, layer_seed, prepare
from saematch_core.profiles import Profile, SAETrainConfig, get_profile
from saematch_core.sae import SAE
from saematch_core.train import DeltaLoss, sae_quality, sae_replacement, train_sae

__all__ = ["VARIANTS", "bfloat16_rows", "main", "measure"]

_SEED_OFFSET = 500

VARIANTS: dict[str, tuple[str, str, int]] = {
    "float32": ("float32", "float32", 0),
    "float32_seed2": ("float32", "float32", _SEED_OFFSET),
    "bf16_step": ("float32", "bfloat16", 0),
    "bf16_step_seed2": ("float32", "bfloat16", _SEED_OFFSET),
    "bf16_fwd_step": ("bfloat16", "bfloat16", 0),
}
"""Variant name → (forward precision of the training rows, step precision, seed offset)."""


def bfloat16_rows(
    loaded: LoadedModel, cache: ActivationCache, layers: Sequence[int], *, batch_size: int
) -> dict[int, Tensor]:
    """The usable rows of ``cache`` at ``layers``, recomputed under bfloat16 autocast (float32 out).

    Same chunks in the same order as the cache, and the cache's own usable mask, so row ``i`` here
    is the bfloat16 twin of row ``i`` of the cache's float32 rows.
    """
    records = cache.chunks
    starts = np.concatenate([[0], np.cumsum([c["length"] for c in records])])
    tokens = np.asarray(cache.tokens)
    parts: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for lo in range(0, len(records), batch_size):
        picked = range(lo, min(lo + batch_size, len(records)))
        lengths = [int(records[i]["length"]) for i in picked]
        ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
        for row, i in enumerate(picked):
            ids[row, : lengths[row]] = torch.from_numpy(tokens[starts[i] : starts[i + 1]].astype(np.int64))
        with forward_precision("bfloat16"):
            resid = capture_residuals(loaded.model, ids, layers=layers).float()
        for k, layer in enumerate(layers):
            parts[layer] += [resid[k, row, :n].to(torch.float16) for row, n in enumerate(lengths)]
    return {layer: torch.cat(parts[layer])[torch.from_numpy(cache.usable(layer))].float() for layer in layers}


def _mean_best_cosine(reference: SAE, other: SAE) -> float:
    a = torch.nn.functional.normalize(reference.W_dec, dim=1)
    b = torch.nn.functional.normalize(other.W_dec, dim=1)
    return float((a @ b.T).max(dim=1).values.mean())


def measure(
    profile: Profile | str,
    layers: Sequence[int],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    n_tokens: int | None = None,
) -> dict[str, Any]:
    """The measurements described in the module docstring, as a JSON-ready dict.

    ``profile`` must be prepared in ``cache_dir``; ``n_tokens`` overrides the recipe's training
    tokens per SAE (for quick runs).
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    profile_name = profile.name
    if profile.train_mode != "disk" or profile.forward_precision != "float32":
        raise ValueError(
            f"profile {profile_name!r}: expected a float32 disk profile (its training cache is the "
            f"reference), got train_mode={profile.train_mode!r}, "
            f"forward_precision={profile.forward_precision!r}"
        )
    bad = [layer for layer in layers if not 0 <= layer < profile.model.n_layers]
    if bad or not layers:
        raise ValueError(f"layers: expected some of 0..{profile.model.n_layers - 1}, got {list(layers)}")
    done = prepare(profile, cache_dir=cache_dir, cached_only=True, progress=False)
    train = open_activation_cache(done.activation_folders["train"])
    evals = open_activation_cache(done.activation_folders["eval"])
    if train is None or evals is None:
        raise FileNotFoundError(f"activation caches of {profile_name!r}: incomplete; run saematch prepare")
    loaded = load_model(profile.model, cache_dir=cache_dir)
    low_rows = bfloat16_rows(loaded, train, layers, batch_size=profile.data.batch_size)
    ids, lengths = _delta_batch(evals, profile.delta_loss_tokens)
    probe = DeltaLoss(loaded.model, ids, lengths, batch_size=profile.data.batch_size, layers=layers)
    per_layer: dict[str, Any] = {}
    for layer in layers:
        exact = _rows(train, layer)
        low = low_rows.pop(layer)
        rel = float(((low - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-12)).mean())
        base: SAETrainConfig = layer_seed(profile.sae, layer)
        if n_tokens is not None:
            base = dataclasses.replace(base, n_tokens=n_tokens)
        held_out = _rows(evals, layer)
        limit = evals.outlier_factor * float(evals.median_norms[layer])
        saes: dict[str, SAE] = {}
        rows: dict[str, dict[str, float]] = {}
        for name, (forward, step, offset) in VARIANTS.items():
            config = dataclasses.replace(base, precision=step, seed=base.seed + offset)
            result = train_sae(low if forward == "bfloat16" else exact, config, progress=False)
            saes[name] = result.sae
            q = sae_quality(result.sae, held_out)
            rows[name] = {
                "l0": q.l0,
                "fvu": q.fvu,
                "dead": q.dead_fraction,
                "delta_loss": probe(layer, sae_replacement(result.sae, norm_limit=limit)),
                "train_s": result.seconds,
            }
        for name, sae in saes.items():
            rows[name]["best_cos_vs_float32"] = _mean_best_cosine(saes["float32"], sae)
        per_layer[str(layer)] = {"rows_rel_err_bf16_forward": rel, "variants": rows}
    return {
        "profile": profile_name,
        "threads": torch.get_num_threads(),
        "n_tokens": profile.sae.n_tokens if n_tokens is None else n_tokens,
        "layers": per_layer,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SAE quality of the bfloat16 speed-ups vs float32")
    parser.add_argument("--profile", default="default", help="a prepared float32 disk profile")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="layers to train at")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: saematch's)")
    parser.add_argument("--n-tokens", type=int, default=None, help="tokens per SAE (default: the recipe's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/substrate_quality.json"))
    args = parser.parse_args(argv)
    if args.n_tokens is not None and args.n_tokens < 1:
        parser.error(f"--n-tokens: expected >= 1, got {args.n_tokens}")
    result = measure(args.profile, args.layers, cache_dir=args.cache_dir, n_tokens=args.n_tokens)
    print(f"profile {result['profile']}, {result['n_tokens']} tokens per SAE, {result['threads']} threads")
    for layer, entry in result["layers"].items():
        rel = entry["rows_rel_err_bf16_forward"]
        print(f"layer {layer}: bfloat16 training rows, mean relative error {rel:.4f}")
        for name, row in entry["variants"].items():
            print(
                f"  {name:16s} L0 {row['l0']:6.1f}  FVU {row['fvu']:.4f}  dead {row['dead']:.3f}  "
                f"ΔL {row['delta_loss']:.4f}  best cos vs float32 {row['best_cos_vs_float32']:.3f}"
            )
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
