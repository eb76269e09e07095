"""One layer of sparse prefill at 128K on the engines' layouts (H200 probe, 2026-12-03 fourth session).

    python3 benchmarks/results/e2e-NVIDIA-H200-2026-12-03-parts/session4/bs_probe.py   # from the project root
"""

import sys
import time

import torch

from attention_backends import parse_pattern, sparse_prefill

n, h, hkv, d = int(sys.argv[1]) if len(sys.argv) > 1 else 131072, 28, 4, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(n, x, d, device="cuda", dtype=torch.bfloat16, generator=g) for x in (h, hkv, hkv))
views = (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))  # vLLM's [n, h, d] as [h, n, d] views
cont = tuple(x.contiguous() for x in views)  # the native engine's


def t(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.time() - t0) / reps * 1e3


def spec(m):
    if m == "dense":
        return parse_pattern("dense")
    return parse_pattern({"prefill": {"method": m, "compression_ratio": 10, "fallback": "never"}})


def peak():
    return f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


for m in ("dense", "block_sparse", "vertical_slash"):
    for name, qkv in (("views", views), ("contiguous", cont)):
        ms = t(lambda: sparse_prefill(*qkv, spec(m), impl="triton", defer=True))  # noqa: B023
        print(f"{m:15s} {name:10s} {ms:9.1f} ms/layer  {peak()}", flush=True)
free, total = torch.cuda.mem_get_info()
fill = torch.empty(int(free - 12 * 2**30), dtype=torch.uint8, device="cuda")  # leave ~12 GiB, as vLLM does
torch.cuda.reset_peak_memory_stats()
for m in ("block_sparse", "vertical_slash"):
    ms = t(lambda: sparse_prefill(*views, spec(m), impl="triton", defer=True))  # noqa: B023
    print(f"{m:15s} views, 12 GiB free {ms:9.1f} ms/layer  {peak()}", flush=True)
