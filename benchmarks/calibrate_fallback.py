"""Measure the dense-fallback rule's profile (``attention_backends/prefill_cost.py``) on this GPU.

Times one Qwen2.5-7B-shaped attention layer (28 query heads, 4 KV heads, head dim 128, bf16, random normal
inputs) through the public API: ``sparse_prefill(q, k, v, spec, impl="triton")`` for each method entry of the
profile, with ``"fallback": "never"`` so the method itself runs, and dense SDPA, on the calls the engines make
(the rule is asked per call): whole prompts up to the longest chunk size, and at every length the last chunk of
each chunk size (``--chunks``, default 4096 and 16384: the native engine's dense and sparse chunks), its queries
against all the keys. A time is the wall time of one
call between two ``torch.cuda.synchronize()``, host work included (the vertical-slash budget search syncs with
the host several times per layer, and the engine waits for that too), the median of ``--reps`` calls after one
warm-up call (which compiles the kernels). Per entry, the four terms of ``prefill_cost.Terms`` are fitted to the
times by non-negative least squares on relative error (``fixed + per_token n h + per_cell cells + per_dense_cell
dense_cells``, ``n`` the keys; the cells are those the call reports computing); dense is fitted apart on whole
prompts (``dense``) and on chunks (``dense_chunk``: SDPA does fewer cells per ms with a lower-right causal mask).
The profile JSON keeps the raw times and each fit's worst relative error beside the terms.

    python3 benchmarks/calibrate_fallback.py --out /root/out/prefill-NVIDIA-H200.json     # on the GPU
    TRITON_INTERPRET=1 python3 benchmarks/calibrate_fallback.py --tiny --out /tmp/p.json   # CPU smoke run

Default output: ``attention_backends/profiles/prefill-<card>.json``, the file the rule loads on that card
(commit it). Fits one 10-minute device call: 11 calls (lengths 4K..128K; whole prompts up to 16K, chunks of 4K
and 16K) x 2 ratios (4, 10) x 6 entries (vertical_slash, flexprefill, block_sparse with blocks 16/32/64/128), plus
11 dense ones, each 1 + 3 calls of at most ~0.1 s on an H200: the timing itself is about a minute, Triton's
compilation (once per kernel variant) a minute or two more. ``--budget-s`` (default 420) stops starting longer
lengths once spent, and the fit uses what was measured. ``--tiny`` runs a 2-head, head dim 16, float32 layer on
the CPU under ``TRITON_INTERPRET=1`` at short lengths (it checks the plumbing; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attention_backends import parse_pattern, sparse_prefill  # noqa: E402
from attention_backends.cost import causal_cells  # noqa: E402
from attention_backends.prefill.dense import sdpa  # noqa: E402
from attention_backends.prefill_cost import PROFILE_DIR, PrefillProfile, Terms, card_slug, profile_key  # noqa: E402

TERMS = ("fixed_s", "per_token_s", "per_cell_s", "per_dense_cell_s")
FULL = dict(heads=28, kv_heads=4, head_dim=128, dtype=torch.bfloat16,
            lengths=(4096, 8192, 16384, 32768, 65536, 131072), chunks=(4096, 16384), ratios=(4.0, 10.0),
            blocks=(16, 32, 64, 128), reps=3)
TINY = dict(heads=2, kv_heads=1, head_dim=16, dtype=torch.float32, lengths=(128, 256), chunks=(128,),
            ratios=(2.0, 4.0), blocks=(16,), reps=1)


def calls(n: int, chunks: tuple[int, ...]) -> list[int]:
    """The ``q_offset`` of each call timed at length ``n``: the whole prompt (0) when no chunk size is shorter
    (the engines prefill it whole, or as its one chunk), and the last chunk of each shorter chunk size."""
    offsets = [0] if n <= max(chunks) else []
    return offsets + [n - c for c in sorted(chunks) if c < n]


def phases(ratio: float, blocks: tuple[int, ...]):
    """Every method entry at ``ratio``, with the rule off so that the method runs."""
    yield parse_pattern({"prefill": {"method": "vertical_slash", "compression_ratio": ratio, "fallback": "never"}})
    yield parse_pattern({"prefill": {"method": "flexprefill", "compression_ratio": ratio, "fallback": "never"}})
    for b in blocks:
        yield parse_pattern({"prefill": {"method": "block_sparse", "compression_ratio": ratio, "fallback": "never",
                                         "params": {"block_size": b}}})


def wall(fn, reps: int, sync):
    """(median wall seconds of ``fn()`` between synchronisations, the result of the warm-up call before them)."""
    result = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def features(row: dict) -> dict[str, float]:
    """What each term of ``Terms`` multiplies in a measured row."""
    return {"fixed_s": 1.0, "per_token_s": row["n"] * row["heads"], "per_cell_s": row["cells"],
            "per_dense_cell_s": row["dense_cells"]}


def fit(rows: list[dict], names: tuple[str, ...]) -> tuple[dict[str, float], float]:
    """Non-negative least squares of ``seconds`` on the terms ``names`` (weighted by 1/seconds, so every
    length counts alike), by trying every subset of terms: returns the terms and the worst relative error."""
    a = np.array([[features(r)[n] for n in names] for r in rows], dtype=float)
    t = np.array([r["seconds"] for r in rows], dtype=float)
    w = 1.0 / t
    best: tuple[float, np.ndarray] | None = None
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), size):
            cols = list(subset)
            coef, *_ = np.linalg.lstsq(a[:, cols] * w[:, None], t * w, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(len(names))
            full[cols] = coef
            err = float(np.max(np.abs(a @ full - t) / t))
            if best is None or err < best[0]:
                best = (err, full)
    assert best is not None  # the single fixed term always fits with a positive coefficient
    return dict(zip(names, (float(c) for c in best[1]), strict=True)), best[0]


def terms_of(coef: dict[str, float]) -> Terms:
    return Terms(**{name: coef.get(name, 0.0) for name in TERMS})


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="profile JSON to write (default: the card's file under attention_backends/profiles)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (TRITON_INTERPRET=1), tiny shapes")
    p.add_argument("--lengths", help="comma-separated prompt lengths (default 4096..131072)")
    p.add_argument("--chunks", help="comma-separated prefill chunk sizes (default 4096,16384)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new length after this many seconds")
    args = p.parse_args(argv)
    cfg = dict(TINY if args.tiny else FULL)
    if args.lengths:
        cfg["lengths"] = tuple(int(x) for x in args.lengths.split(","))
    if args.chunks:
        cfg["chunks"] = tuple(int(x) for x in args.chunks.split(","))
    if args.tiny:
        device, card = torch.device("cpu"), "cpu (TRITON_INTERPRET)"
        sync = lambda: None  # noqa: E731
    else:
        if not torch.cuda.is_available():
            sys.exit("calibrate_fallback.py measures a GPU; use --tiny for the CPU smoke run")
        device, card = torch.device("cuda"), torch.cuda.get_device_name()
        sync = torch.cuda.synchronize
    h, h_kv, d, dt = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"]
    start = time.time()
    dense_rows: dict[str, list[dict]] = {"dense": [], "dense_chunk": []}
    method_rows: dict[str, list[dict]] = {}
    for n in cfg["lengths"]:
        if time.time() - start > args.budget_s:
            print(f"budget spent: lengths from {n} on not measured", flush=True)
            break
        g = torch.Generator(device=device).manual_seed(n)
        k = torch.randn(h_kv, n, d, device=device, dtype=dt, generator=g)
        v = torch.randn(h_kv, n, d, device=device, dtype=dt, generator=g)
        q_all = torch.randn(h, n - min(calls(n, cfg["chunks"])), d, device=device, dtype=dt, generator=g)
        for offset in calls(n, cfg["chunks"]):
            q = q_all[:, q_all.shape[1] - (n - offset):]  # the chunk's queries: positions [offset, n)
            dense = causal_cells(n, offset) * h
            call = f"n={n:>6} {'whole' if not offset else f'chunk {n - offset}':>11}"
            seconds, _ = wall(partial(sdpa, q, k, v, offset), cfg["reps"], sync)
            row = {"n": n, "q_offset": offset, "heads": h, "cells": dense, "dense_cells": dense, "seconds": seconds}
            dense_rows["dense_chunk" if offset else "dense"].append(row)
            print(f"[{time.time() - start:6.1f}s] {call} dense {seconds * 1e3:9.3f} ms", flush=True)
            for ratio in cfg["ratios"]:
                for spec in phases(ratio, cfg["blocks"]):
                    seconds, (_, report) = wall(partial(sparse_prefill, q, k, v, spec, impl="triton", q_offset=offset),
                                                cfg["reps"], sync)
                    key = profile_key(spec.prefill)
                    method_rows.setdefault(key, []).append({**row, "ratio": ratio, "seconds": seconds,
                                                            "cells": report.computed_cells})
                    print(f"[{time.time() - start:6.1f}s] {call} r={ratio:g} {key:<18} {seconds * 1e3:9.3f} ms "
                          f"(achieved r {report.achieved_compression_ratio:.2f})", flush=True)
    dense_terms, errors = {}, {}
    for key, rows in dense_rows.items():
        if rows:
            coef, errors[key] = fit(rows, ("fixed_s", "per_cell_s"))
            dense_terms[key] = terms_of(coef)
    methods = {}
    for key, rows in method_rows.items():
        coef, errors[key] = fit(rows, TERMS)
        methods[key] = terms_of(coef)
    profile = PrefillProfile(
        card=card, impl="triton", head_dim=d, dense=dense_terms.get("dense", dense_terms.get("dense_chunk")),
        dense_chunk=dense_terms.get("dense_chunk"),
        methods=methods,
        source=f"benchmarks/calibrate_fallback.py{' --tiny' if args.tiny else ''}, "
               f"{_dt.datetime.now().isoformat(timespec='seconds')}",
        extra={"shape": {"num_heads": h, "num_kv_heads": h_kv, "head_dim": d, "dtype": str(dt).removeprefix("torch.")},
               "versions": {"torch": torch.__version__, "triton": _triton_version()},
               "max_relative_fit_error": errors, "timings": {**dense_rows, **method_rows}})
    out = Path(args.out) if args.out else PROFILE_DIR / f"prefill-{card_slug(card)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    print(f"worst relative fit error per entry: { {k: round(v, 3) for k, v in errors.items()} }")
    print(f"wrote {out}", flush=True)
    return out


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
