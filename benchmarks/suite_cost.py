"""Per-match cost of a suite job: SAE Match's default objective on planted Gemma-shaped SAE pairs.

``python -m benchmarks.suite_cost --F 2048 16384 --d 2304`` times, for each width, what one job of
``saematch suite`` does after loading: ``match(a, b)`` with the defaults (fold θ into the weights,
folded ``W_enc``, ``W_dec``, ``b_enc``, MSE, the certified sparse solver), end to end. Each width
runs in a fresh subprocess (its own peak memory). Instances: SAE A has random unit directions with
log-uniform norms in [0.5, 2] for its decoder rows and encoder columns and log-uniform thresholds;
SAE B is A with features permuted, every row and column perturbed by ``noise · ‖row‖ · z / √d``
(``benchmarks.planted.noise_for(level, d)``) and every feature rescaled by a log-uniform factor.
The results are written to ``benchmarks/results/suite_cost.json`` with the fitted exponent of
time against F.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.planted import noise_for
from saematch_core.match import match
from saematch_core.sae import SAE

RESULTS = Path(__file__).resolve().parent / "results" / "suite_cost.json"


def _log_uniform(rng: np.random.Generator, size: int, lo: float = 0.5, hi: float = 2.0) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size)).astype(np.float32)


def planted_saes(F: int, d: int, level: str, seed: int = 0) -> tuple[SAE, SAE]:
    """SAE A and its permuted, perturbed, rescaled copy B (module docstring)."""
    rng = np.random.default_rng([seed, F, d])

    def rows() -> np.ndarray:
        x = rng.standard_normal((F, d), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True) * _log_uniform(rng, F)[:, None]

    dec, enc = rows(), rows()
    theta, bias = _log_uniform(rng, F, 0.05, 2.0), (0.1 * rng.standard_normal(F)).astype(np.float32)
    sigma = noise_for(level, d)
    perm = rng.permutation(F)

    def noisy(x: np.ndarray) -> np.ndarray:
        z = rng.standard_normal(x.shape, dtype=np.float32) * (sigma / math.sqrt(d))
        return x + z * np.linalg.norm(x, axis=1, keepdims=True)

    scale = _log_uniform(rng, F)
    b_dec, b_enc = np.empty_like(dec), np.empty_like(enc)
    b_dec[perm], b_enc[perm] = noisy(dec) * scale[:, None], noisy(enc) / scale[:, None]
    b_theta, b_bias = np.empty_like(theta), np.empty_like(bias)
    b_theta[perm], b_bias[perm] = theta / scale, bias / scale
    zeros = torch.zeros(d)

    def sae(dec_: np.ndarray, enc_: np.ndarray, theta_: np.ndarray, bias_: np.ndarray) -> SAE:
        return SAE(
            W_enc=torch.from_numpy(enc_.T.copy()),
            b_enc=torch.from_numpy(bias_),
            W_dec=torch.from_numpy(dec_),
            b_dec=zeros,
            threshold=torch.from_numpy(theta_),
        )

    return sae(dec, enc, theta, bias), sae(b_dec, b_enc, b_theta, b_bias)


def _child(F: int, d: int, level: str) -> dict[str, Any]:
    a, b = planted_saes(F, d, level)
    t0 = time.perf_counter()
    res = match(a, b)
    total = time.perf_counter() - t0
    return {
        "F": F,
        "d": d,
        "noise": level,
        "match_s": total,
        "timings": dict(res.timings),
        "info": dict(res.info),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--F", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--noise", default="medium", choices=["easy", "medium", "hard"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.F[0], args.d, args.noise)))
        return 0
    rows = []
    for F in args.F:
        cmd = [sys.executable, "-m", "benchmarks.suite_cost", "--child", "--F", str(F), "--d", str(args.d)]
        out = subprocess.run([*cmd, "--noise", args.noise], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"F={F:>6} d={args.d}: match {row['match_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MB")
    fit = None
    if len(rows) >= 2:
        logs = np.log([[r["F"], r["match_s"]] for r in rows])
        slope = float(np.polyfit(logs[:, 0], logs[:, 1], 1)[0])
        fit = {"exponent": slope, "from_F": [r["F"] for r in rows]}
        print(f"time ∝ F^{slope:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": platform.processor() or platform.machine(),
        "created": time.time(),
        "rows": rows,
        "fit": fit,
    }
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
