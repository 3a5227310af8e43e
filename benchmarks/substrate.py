"""Substrate speed, side by side in one run: float32 vs bfloat16 forward passes and SAE steps.

``python -m benchmarks.substrate`` (from the repository root) loads a profile's model, then in
interleaved repetitions (so a busy machine slows both alike) times

- the forward pass that fills activation caches (``capture_residuals`` over one batch of
  ``data.batch_size`` evaluation chunks), float32 and under bfloat16 autocast, in tokens/s; and the
  per-layer mean relative error of the bfloat16 residuals (positions ≥ 1);
- one SAE optimiser step of the profile's main recipe (width, batch), the float32 reference
  (autograd) and the bfloat16 fast step, in ms, on residuals of the middle layer.

Both also in CPU seconds of the process (``time.process_time``), the cost on dedicated cores.
Results: printed, and written to ``benchmarks/results/substrate.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from saematch_core.data import corpus_chunks
from saematch_core.models import capture_residuals, forward_precision, load_model
from saematch_core.profiles import get_profile
from saematch_core.train import SAETrainer, input_scale

__all__ = ["main", "measure", "save_result"]

_PRECISIONS = ("float32", "bfloat16")


def measure(profile_name: str, *, reps: int = 3, steps: int = 20) -> dict[str, Any]:
    """The measurements described in the module docstring, as a JSON-ready dict."""
    profile = get_profile(profile_name)
    loaded = load_model(profile.model)
    tok = loaded.tokenizer
    chunks = [c for group in corpus_chunks(profile.data, tok.encode, "eval").values() for c in group]
    chunks = sorted(chunks, key=lambda c: -len(c.ids))[: profile.data.batch_size]
    width = min(len(c.ids) for c in chunks)
    ids = torch.stack([torch.from_numpy(c.ids[:width]) for c in chunks])
    forward: dict[str, list[float]] = {p: [] for p in _PRECISIONS}
    forward_cpu: dict[str, list[float]] = {p: [] for p in _PRECISIONS}
    resid: dict[str, torch.Tensor] = {}
    for _ in range(reps):
        for precision in _PRECISIONS:
            t0, c0 = time.perf_counter(), time.process_time()
            with forward_precision(precision):
                resid[precision] = capture_residuals(loaded.model, ids).float()
            forward[precision].append(ids.numel() / (time.perf_counter() - t0))
            forward_cpu[precision].append((time.process_time() - c0) / ids.numel() * 1e3)
    exact, low = resid["float32"][:, :, 1:], resid["bfloat16"][:, :, 1:]
    rel = ((low - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-12)).mean(dim=(1, 2))

    layer = loaded.n_layers // 2
    x = exact[layer].reshape(-1, exact.shape[-1])
    scale = input_scale(x)
    step_ms: dict[str, list[float]] = {p: [] for p in _PRECISIONS}
    step_cpu: dict[str, list[float]] = {p: [] for p in _PRECISIONS}
    g = torch.Generator().manual_seed(0)
    for _ in range(reps):
        for precision in _PRECISIONS:
            config = dataclasses.replace(profile.sae, precision=precision, n_tokens=(steps + 3) * 10**6)
            trainer = SAETrainer(
                config,
                scale=scale,
                mean=x.double().mean(0) * scale,
                generator=torch.Generator().manual_seed(0),
                sample=lambda: x * scale,
            )
            batches = [
                x[torch.randint(0, len(x), (config.batch_size,), generator=g)] * scale
                for _ in range(steps + 3)
            ]
            for xb in batches[:3]:  # warm-up: first allocations, lazy initialisation
                trainer.step(xb)
            t0, c0 = time.perf_counter(), time.process_time()
            for xb in batches[3:]:
                trainer.step(xb)
            step_ms[precision].append((time.perf_counter() - t0) / steps * 1e3)
            step_cpu[precision].append((time.process_time() - c0) / steps * 1e3)
    fwd = {p: statistics.median(v) for p, v in forward.items()}
    sae = {p: statistics.median(v) for p, v in step_ms.items()}
    return {
        "profile": profile_name,
        "threads": torch.get_num_threads(),
        "reps": reps,
        "forward_tokens": ids.numel(),
        "forward_tok_per_s": fwd,
        "forward_speedup": fwd["bfloat16"] / fwd["float32"],
        "forward_rel_err_per_layer": [round(float(v), 6) for v in rel],
        "sae_shape": {"batch": profile.sae.batch_size, "d_in": x.shape[1], "width": profile.sae.width},
        "sae_step_ms": sae,
        "sae_speedup": sae["float32"] / sae["bfloat16"],
        # CPU time (all threads of this process): what the work costs on dedicated cores, far less
        # sensitive to a shared machine than wall time
        "forward_cpu_ms_per_tok": {p: statistics.median(v) for p, v in forward_cpu.items()},
        "sae_step_cpu_ms": {p: statistics.median(v) for p, v in step_cpu.items()},
        "raw": {
            "forward_tok_per_s": forward,
            "sae_step_ms": step_ms,
            "forward_cpu_ms_per_tok": forward_cpu,
            "sae_step_cpu_ms": step_cpu,
        },
    }


def save_result(path: Path, result: dict[str, Any]) -> None:
    """Write a benchmark's JSON result, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Substrate speed: float32 vs bfloat16 forward passes and SAE steps"
    )
    parser.add_argument("--profile", default="default", help="profile whose model and SAE recipe to time")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians reported)")
    parser.add_argument("--steps", type=int, default=20, help="SAE steps timed per repetition")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/substrate.json"))
    args = parser.parse_args(argv)
    if args.reps < 1 or args.steps < 1:
        parser.error(f"--reps and --steps: expected >= 1, got {args.reps} and {args.steps}")
    result = measure(args.profile, reps=args.reps, steps=args.steps)
    fwd, sae = result["forward_tok_per_s"], result["sae_step_ms"]
    rel = result["forward_rel_err_per_layer"]
    print(
        f"profile {result['profile']}, {result['threads']} threads, {result['reps']} interleaved repetitions"
    )
    print(
        f"forward  float32 {fwd['float32']:8.0f} tok/s   bfloat16 {fwd['bfloat16']:8.0f} tok/s   "
        f"× {result['forward_speedup']:.2f}"
    )
    fcpu, scpu = result["forward_cpu_ms_per_tok"], result["sae_step_cpu_ms"]
    print(f"forward  CPU ms/token: float32 {fcpu['float32']:.3f}, bfloat16 {fcpu['bfloat16']:.3f}")
    print(f"SAE step CPU ms: float32 {scpu['float32']:.1f}, bfloat16 {scpu['bfloat16']:.1f}")
    print(f"         bfloat16 residuals, mean relative error: first layer {rel[0]:.4f}, last {rel[-1]:.4f}")
    print(
        f"SAE step float32 {sae['float32']:8.1f} ms      bfloat16 {sae['bfloat16']:8.1f} ms      "
        f"× {result['sae_speedup']:.2f}"
    )
    save_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
