"""What one prefill chunk of one attention layer costs, per method, against dense attention over the same chunk.

The engines prefill long prompts in chunks (``--max-prefill-chunk``, default 4096), and every sparse prefill method
pays its index (estimate, budget search, tables) once per chunk and layer. This times that unit directly, on one
Qwen2.5-7B-shaped layer (28 query heads, 4 KV heads, head dim 128, bf16, random normal q/k/v): for each chunk size
and context length, the chunk's queries are the last ``chunk`` positions of ``context`` keys (``q_offset``), run
through the public ``sparse_prefill`` with ``"fallback": "never"`` (the method itself) and through dense SDPA (what
the fallback runs). A time is the wall time of one call between two ``torch.cuda.synchronize()``, host work
included, the median of ``--reps`` calls after one warm-up call. One extra call per method runs under
``torch.profiler`` and counts its kernel launches and host synchronisations (the fixed cost's source).

    python3 benchmarks/chunk_cost.py --out $OUT/chunk-cost.json                   # on the GPU, about a minute
    TRITON_INTERPRET=1 python3 benchmarks/chunk_cost.py --tiny --out /tmp/c.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from attention_backends import parse_pattern, sparse_prefill  # noqa: E402
from attention_backends.prefill.dense import sdpa  # noqa: E402

FULL = dict(heads=28, kv_heads=4, head_dim=128, dtype=torch.bfloat16, chunks=(4096, 16384),
            contexts=(32768, 131072), reps=3)
TINY = dict(heads=2, kv_heads=1, head_dim=16, dtype=torch.float32, chunks=(128,), contexts=(512,), reps=1)
PATTERNS = ("vertical_slash:10", "flexprefill:10", "block_sparse:10/b64")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int) -> float:
    fn()  # compiles
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


LAUNCHES = {"cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"}
SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}


def launches_and_syncs(fn) -> dict[str, int]:
    """Kernel launches, host synchronisations and copies of one call (the profiler's CUDA runtime events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {"launches": sum(n in LAUNCHES for n in names), "syncs": sum(n in SYNCS for n in names),
            "copies": names.count("cudaMemcpyAsync")}


def pattern_spec(pattern: str):
    method_ratio, _, block = pattern.partition("/b")
    method, ratio = method_ratio.split(":")
    params = {"block_size": int(block)} if block else {}
    return parse_pattern({"prefill": {"method": method, "compression_ratio": float(ratio), "params": params,
                                      "fallback": "never"}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    args = ap.parse_args()
    cfg = TINY if args.tiny else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    impl = "triton"
    g = torch.Generator(device="cpu").manual_seed(0)
    h, hk, d, dt = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["dtype"]
    top = max(cfg["contexts"])
    k_all = torch.randn(hk, top, d, generator=g).to(device, dt)
    v_all = torch.randn(hk, top, d, generator=g).to(device, dt)
    q_all = torch.randn(h, max(cfg["chunks"]), d, generator=g).to(device, dt)
    rows = []
    for ctx in cfg["contexts"]:
        for chunk in cfg["chunks"]:
            if chunk > ctx:
                continue
            q, k, v = q_all[:, :chunk], k_all[:, :ctx], v_all[:, :ctx]
            offset = ctx - chunk
            dense_s = timed(lambda q=q, k=k, v=v, o=offset: sdpa(q, k, v, o), device, cfg["reps"])
            row = {"context": ctx, "chunk": chunk, "dense_s": dense_s, "methods": {}}
            for pattern in args.patterns.split(","):
                spec = pattern_spec(pattern)
                call = lambda q=q, k=k, v=v, s=spec, o=offset: sparse_prefill(q, k, v, s, impl=impl, q_offset=o)  # noqa: E731
                s = timed(call, device, cfg["reps"])
                report = call()[1]
                row["methods"][pattern] = {"s": s, "vs_dense": s / dense_s,
                                           "achieved_ratio": report.dense_cells / max(report.computed_cells, 1),
                                           **launches_and_syncs(call)}
                print(f"[chunk] ctx {ctx:>6} chunk {chunk:>5} {pattern:<22} {s * 1e3:8.2f} ms  dense "
                      f"{dense_s * 1e3:8.2f} ms  x{s / dense_s:5.2f}  {row['methods'][pattern]}", flush=True)
            rows.append(row)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    Path(args.out).write_text(json.dumps({"card": card, "shape": dict(heads=h, kv_heads=hk, head_dim=d,
                                                                      dtype=str(dt)), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
