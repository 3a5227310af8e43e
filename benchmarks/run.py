"""Side-by-side benchmark: dense GEMM, scipy on the dense matrix, and the certified sparse solver.

Run ``python -m benchmarks.run`` from the repository root (``make bench``). For every planted instance
(see :mod:`benchmarks.planted`) three measurements run, one after the other, each in a fresh
subprocess so that its peak resident memory (``ru_maxrss``) is its own:

* ``gemm``   — the dense float32 score matrix ``A Bᵀ`` (F × F × d), the unit the targets are stated in;
* ``scipy``  — ``linear_sum_assignment(maximize=True)`` on that dense float32 matrix (scipy copies it
  to float64); the reported time is the solver only, the matrix is built before the clock starts;
* ``sparse`` — :func:`saematch_core.lap_sparse.solve_inner_product` end to end, from the two feature
  matrices to the certified assignment (candidates, sparse solves, certificate).

The optimal objectives are compared (float64 re-scoring of both assignments). Results go to
``benchmarks/results/results.json`` and ``results.csv`` (written atomically). Reported memory is
the child's peak RSS, which includes the Python/torch runtime and the instance itself (``base_rss``
is the peak right after the instance was built).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # `python benchmarks/run.py` as well as `python -m benchmarks.run`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.planted import NOISE_LEVELS, make_planted, noise_for, perturb

RESULTS = Path(__file__).resolve().parent / "results"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _exact_total(A: torch.Tensor, B: torch.Tensor, cols: np.ndarray) -> float:
    c = torch.from_numpy(cols)
    return float((A.double() * B[c].double()).sum())


def _substrate_chain(spec: dict[str, Any]) -> dict[str, Any]:
    """Every consecutive layer pair of a prepared profile's main SAEs, matched with one solver."""
    from saematch_core.formats import load_sae
    from saematch_core.match import MatchConfig, match
    from saematch_core.prepare import prepare

    out: dict[str, Any] = {"base_rss_mb": _rss_mb()}
    paths = prepare(spec["profile"], cached_only=True, progress=False).saes()
    saes = [load_sae(paths[layer]) for layer in sorted(paths)]
    cfg = MatchConfig(solver=spec["solver"], sparse_candidates=spec["candidates"])
    match(saes[0], saes[1], cfg)  # warm-up: numba kernels, allocator
    t = time.perf_counter()
    results = [match(a, b, cfg) for a, b in itertools.pairwise(saes)]
    out["time_s"] = time.perf_counter() - t
    out["total"] = float(sum(r.total_cost for r in results))
    out["max_violation"] = max(r.info.get("max_violation", 0.0) for r in results)
    out["n_pairs"] = len(results)
    out["F"], out["d"] = saes[0].d_sae, saes[0].d_in
    out["peak_rss_mb"] = _rss_mb()
    return out


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process; returns a flat record."""
    if spec["task"] == "substrate":
        return _substrate_chain(spec)
    torch.manual_seed(0)
    inst = make_planted(spec["F"], spec["d"], noise_for(spec["noise"], spec["d"]), seed=spec["seed"])
    A, B = inst.A, inst.B
    out: dict[str, Any] = {"base_rss_mb": _rss_mb()}
    task = spec["task"]
    if task == "gemm":
        F = A.shape[0]
        if F * F * 4 <= 2**32:
            t = time.perf_counter()
            S = A @ B.T
            out["time_s"] = time.perf_counter() - t
            best = S.argmax(dim=1).numpy()
        else:
            # too big to hold: the same GEMM streamed in row blocks that are discarded (timed alone)
            Bt = B.T.contiguous()
            best = np.empty(F, np.int64)
            out["time_s"] = 0.0
            for s in range(0, F, 4096):
                t = time.perf_counter()
                S = A[s : s + 4096] @ Bt
                out["time_s"] += time.perf_counter() - t
                best[s : s + 4096] = S.argmax(dim=1).numpy()
            out["streamed"] = True
        out["nn_recovery"] = float((best == inst.perm).mean())
    elif task == "scipy":
        from scipy.optimize import linear_sum_assignment

        S = (A @ B.T).numpy()
        t = time.perf_counter()
        rows, cols = linear_sum_assignment(S, maximize=True)
        out["time_s"] = time.perf_counter() - t
        out["total"] = _exact_total(A, B, cols[np.argsort(rows)])
        out["planted_recovery"] = float((cols[np.argsort(rows)] == inst.perm).mean())
    elif task == "sparse":
        from saematch_core.lap_sparse import solve_inner_product

        t = time.perf_counter()
        solve_inner_product(A[:64], B[:64])  # loads (or compiles, first time ever) the numba kernels
        out["jit_s"] = time.perf_counter() - t
        phases: dict[str, float] = {}
        t = time.perf_counter()
        res = solve_inner_product(A, B, k=spec["k"], timings=phases, candidates=spec["candidates"])
        out["time_s"] = time.perf_counter() - t
        out.update({f"phase_{name}": value for name, value in phases.items()})
        out.update(
            total=res.total,
            max_violation=res.max_violation,
            rounds=res.rounds,
            n_candidates=res.n_candidates,
            planted_recovery=float((res.cols == inst.perm).mean()),
        )
    elif task == "chain":
        from saematch_core.lap_sparse import solve_inner_product

        solve_inner_product(A[:64], B[:64])
        # each layer is a noisy, permuted copy of the previous one whose rows get fresh log-uniform norms
        # in [0.5, 2] (like folded decoders of another layer), so scales do not compound along the chain
        layers = [A]
        for layer in range(1, spec["layers"]):
            nxt = perturb(layers[-1], NOISE_LEVELS[spec["noise"]], seed=spec["seed"] + layer)[0]
            norms = torch.exp(torch.empty(spec["F"], 1).uniform_(-0.6931, 0.6931))
            layers.append(torch.nn.functional.normalize(nxt, dim=1) * norms)
        t = time.perf_counter()
        worst = 0.0
        for a, b in itertools.pairwise(layers):
            res = solve_inner_product(a, b, k=spec["k"], candidates=spec["candidates"])
            worst = max(worst, res.max_violation)
        out["time_s"] = time.perf_counter() - t
        out["max_violation"] = worst
    else:
        raise ValueError(f"task: unknown {task!r}")
    out["peak_rss_mb"] = _rss_mb()
    return out


def _run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", json.dumps(spec)]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--F", type=int, nargs="+", default=[4096, 16384], help="widths (features per SAE)")
    p.add_argument("--d", type=int, nargs="+", default=[576], help="row dimensions")
    p.add_argument("--noise", nargs="+", default=list(NOISE_LEVELS), choices=list(NOISE_LEVELS))
    p.add_argument(
        "--big",
        action="store_true",
        help="also F=65536 (no scipy: dense does not fit; GEMM timed streamed)",
    )
    p.add_argument("--chain", action="store_true", help="also a 30-layer synthetic chain (F=2048, D=1153)")
    p.add_argument(
        "--substrate",
        metavar="PROFILE",
        help="also match every consecutive layer pair of a prepared profile's SAEs (e.g. default) with "
        "scipy and the sparse solver; nothing is trained here",
    )
    p.add_argument("--k", type=int, default=8, help="initial candidates per row")
    p.add_argument(
        "--candidates",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="precisions of the sparse solver's candidate search (each measured against the same GEMM)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scipy-max-F", type=int, default=16384, help="skip scipy above this width")
    p.add_argument("--timeout", type=float, default=1800.0, help="per-measurement timeout (s)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    shapes = [(F, d) for F in args.F for d in args.d]
    if args.big:
        shapes += [(65536, d) for d in args.d if (65536, d) not in shapes]
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    warnings: list[str] = []
    print(
        f"{'F':>6} {'d':>5} {'noise':>6} {'cand':>8} | {'gemm s':>7} {'scipy s':>8} {'ours s':>7} | "
        f"{'LAP x':>6} {'e2e/gemm':>8} | {'rss gemm':>8} {'scipy':>6} {'ours MB':>7} | "
        f"{'nn':>5} {'rounds':>6} {'viol':>8} same"
    )
    for F, d in shapes:
        for noise in args.noise:
            base = {"F": F, "d": d, "noise": noise, "seed": args.seed, "k": args.k}
            dense_ok = F <= args.scipy_max_F
            gemm = _run_child({**base, "task": "gemm"}, args.timeout)
            scipy = _run_child({**base, "task": "scipy"}, args.timeout) if dense_ok else {}
            for cand in args.candidates:
                ours = _run_child({**base, "task": "sparse", "candidates": cand}, args.timeout)
                rec: dict[str, Any] = {
                    **{k: base[k] for k in ("F", "d", "noise", "seed", "k")},
                    "noise_level": noise_for(noise, d),
                    "candidates": cand,
                    "gemm_s": gemm.get("time_s"),
                    "gemm_peak_rss_mb": gemm.get("peak_rss_mb"),
                    "gemm_streamed": gemm.get("streamed", False),
                    "nn_recovery": gemm.get("nn_recovery"),
                    "scipy_s": scipy.get("time_s"),
                    "scipy_peak_rss_mb": scipy.get("peak_rss_mb"),
                    "scipy_total": scipy.get("total"),
                    "ours_s": ours.get("time_s"),
                    "ours_peak_rss_mb": ours.get("peak_rss_mb"),
                    "ours_base_rss_mb": ours.get("base_rss_mb"),
                    "ours_total": ours.get("total"),
                    "max_violation": ours.get("max_violation"),
                    "rounds": ours.get("rounds"),
                    "n_candidates": ours.get("n_candidates"),
                    "planted_recovery": ours.get("planted_recovery"),
                    "errors": "; ".join(
                        f"{n}: {r['error']}"
                        for n, r in (("gemm", gemm), ("scipy", scipy), ("ours", ours))
                        if "error" in r
                    ),
                }
                for name in ("candidates_s", "solve_s", "certify_s"):
                    rec[f"ours_{name}"] = ours.get(f"phase_{name}")
                if rec["ours_solve_s"] is not None:
                    # our LAP part: sparse solves + certificate (which includes recomputing score rows);
                    # the streamed score blocks and top-k of the first pass are the "cost matrix" part
                    rec["ours_lap_s"] = rec["ours_solve_s"] + rec["ours_certify_s"]
                if rec["scipy_s"] and rec.get("ours_lap_s"):
                    rec["lap_speedup_vs_scipy"] = rec["scipy_s"] / max(rec["ours_lap_s"], 1e-9)
                if rec["scipy_s"] and rec["gemm_s"] and rec["ours_s"]:
                    rec["e2e_speedup_vs_gemm_plus_scipy"] = (rec["scipy_s"] + rec["gemm_s"]) / rec["ours_s"]
                if rec["gemm_s"] and rec["ours_s"]:
                    rec["e2e_over_gemm"] = rec["ours_s"] / rec["gemm_s"]
                if rec["scipy_total"] is not None and rec["ours_total"] is not None:
                    # scipy optimises the float32 matrix; its float64 total can only be <= the exact optimum,
                    # and not by more than the float32 rounding of the matrix (bounded generously below)
                    diff = rec["ours_total"] - rec["scipy_total"]
                    slack = F * 1e-4 * max(abs(rec["ours_total"]) / F, 1.0)
                    rec["total_diff"] = diff
                    rec["same_optimum"] = bool(-1e-9 * abs(rec["ours_total"]) <= diff <= slack)
                    if not rec["same_optimum"]:
                        failures.append(
                            f"F={F} d={d} {noise}: ours {rec['ours_total']!r} vs scipy {rec['scipy_total']!r}"
                        )
                if rec["max_violation"] is not None and rec["max_violation"] > 1e-9:
                    failures.append(f"F={F} d={d} {noise}: certificate {rec['max_violation']:.3g} > tol")
                if rec["errors"]:
                    failures.append(f"F={F} d={d} {noise}: {rec['errors']}")
                nn = rec["nn_recovery"]
                if noise == "hard" and nn is not None and nn >= 0.7 and cand == args.candidates[0]:
                    # small F: fewer competitors per row, so even the scaled noise can leave it easy
                    warnings.append(f"F={F} d={d} hard: nearest neighbour recovers {nn:.0%} (>= 70%)")
                records.append(rec)
                print(
                    f"{F:>6} {d:>5} {noise:>6} {cand:>8} | "
                    f"{_fmt(rec['gemm_s']):>7} {_fmt(rec['scipy_s']):>8} "
                    f"{_fmt(rec['ours_s']):>7} | {_fmt(rec.get('lap_speedup_vs_scipy'), '.1f'):>6} "
                    f"{_fmt(rec.get('e2e_over_gemm')):>8} | {_fmt(rec['gemm_peak_rss_mb'], '.0f'):>8} "
                    f"{_fmt(rec['scipy_peak_rss_mb'], '.0f'):>6} {_fmt(rec['ours_peak_rss_mb'], '.0f'):>7} | "
                    f"{_fmt(rec['nn_recovery']):>5} {_fmt(rec['rounds'], 'd'):>6} "
                    f"{_fmt(rec['max_violation'], '.1e'):>8} "
                    f"{rec.get('same_optimum', '-')}",
                    flush=True,
                )
    for cand in args.candidates if args.chain else ():
        spec = {
            "F": 2048,
            "d": 1153,
            "noise": "medium",
            "seed": args.seed,
            "k": args.k,
            "task": "chain",
            "layers": 30,
            "candidates": cand,
        }
        ch = _run_child(spec, args.timeout)
        records.append(
            {
                **{k: spec[k] for k in ("F", "d", "noise", "seed", "k", "candidates")},
                "chain_layers": 30,
                "ours_s": ch.get("time_s"),
                "ours_peak_rss_mb": ch.get("peak_rss_mb"),
                "max_violation": ch.get("max_violation"),
                "errors": ch.get("error", ""),
            }
        )
        print(
            f"chain ({cand} candidates): 30 layers (29 matches) F=2048 D=1153: {_fmt(ch.get('time_s'))} s, "
            f"worst certificate {_fmt(ch.get('max_violation'), '.1e')} {ch.get('error', '')}"
        )
    if args.substrate:
        chain: dict[str, dict[str, Any]] = {}
        variants = [("scipy", "float32")] + [("sparse", c) for c in args.candidates]
        for solver, cand in variants:
            spec = {"task": "substrate", "profile": args.substrate, "solver": solver, "candidates": cand}
            res = _run_child(spec, args.timeout)
            chain[f"{solver}/{cand}"] = res
            ref = chain["scipy/float32"]
            same = (
                None
                if "total" not in res or "total" not in ref
                else abs(res["total"] - ref["total"]) <= 1e-9 * max(1.0, abs(ref["total"]))
            )
            records.append(
                {
                    "F": res.get("F"),
                    "d": res.get("d"),
                    "noise": f"substrate:{args.substrate}",
                    "candidates": cand if solver == "sparse" else None,
                    "solver": solver,
                    "chain_layers": None if res.get("n_pairs") is None else res["n_pairs"] + 1,
                    "ours_s": res.get("time_s"),
                    "ours_peak_rss_mb": res.get("peak_rss_mb"),
                    "max_violation": res.get("max_violation"),
                    "same_optimum": same,
                    "errors": res.get("error", ""),
                }
            )
            print(
                f"substrate {args.substrate}: {res.get('n_pairs', '?')} consecutive pairs, {solver} "
                f"({cand} candidates): {_fmt(res.get('time_s'))} s, same optimum as scipy: {same} "
                f"{res.get('error', '')}",
                flush=True,
            )
            if res.get("error") or same is False:
                failures.append(
                    f"substrate {solver}/{cand}: {res.get('error') or 'objective differs from scipy'}"
                )
    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "created_ms": int(time.time() * 1000),
    }
    _atomic_write(args.out / "results.json", json.dumps({"meta": meta, "records": records}, indent=2))
    keys = sorted({k for r in records for k in r})
    lines: list[str] = []

    class _W:
        def write(self, s: str) -> None:
            lines.append(s)

    w = csv.DictWriter(_W(), fieldnames=keys)
    w.writeheader()
    w.writerows(records)
    _atomic_write(args.out / "results.csv", "".join(lines))
    print(f"wrote {args.out / 'results.json'} and results.csv")
    for w_ in warnings:
        print("WARNING:", w_)
    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
