"""One layer of block_sparse at 128K in its three parts, block 64, top-k 205 (H200 probe, 2026-12-03 fourth session).

    python3 benchmarks/results/e2e-NVIDIA-H200-2026-12-03-parts/session4/bs_parts.py   # from the project root
"""

import time

import torch

from attention_backends.kernels.index_vertical_slash import block_scores
from attention_backends.kernels.methods import block_sparse_attention
from attention_backends.kernels.topk import causal_block_topk

n, h, hkv, d, B, K = 131072, 28, 4, 128, 64, 205
q = torch.randn(h, n, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(hkv, n, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)


def t(fn):
    fn()
    torch.cuda.synchronize()
    t0 = time.time()
    fn()
    fn()
    torch.cuda.synchronize()
    return (time.time() - t0) / 2 * 1e3


s = block_scores(q, k, B)
print("scores", t(lambda: block_scores(q, k, B)), flush=True)
ids, cnt = causal_block_topk(s, K)
print("topk", t(lambda: causal_block_topk(s, K)), flush=True)
print("attention", t(lambda: block_sparse_attention(q, k, v, ids, cnt, B)), flush=True)
