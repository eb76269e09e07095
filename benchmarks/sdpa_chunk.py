"""Dense attention of one prefill chunk (queries [c0, n) against keys [0, n)) on one Qwen2.5-7B-shaped layer
(28 query heads, 4 KV heads, head dim 128, bf16): which SDPA route runs at flash speed. Prints ms per call of the
whole causal prompt and of its last chunk through each route.

    python3 benchmarks/sdpa_chunk.py --lengths 32768,131072 --chunk 4096
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def routes(q, k, v, chunk: int) -> dict:
    n, g = k.shape[2], q.shape[1] // k.shape[1]
    qc = q[:, :, n - chunk :].contiguous()
    return {
        "whole, is_causal, enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               enable_gqa=True),
        "chunk, causal_lower_right, enable_gqa": lambda: F.scaled_dot_product_attention(
            qc, k, v, attn_mask=causal_lower_right(chunk, n), enable_gqa=True),
        "chunk, flash op (lower right), GQA": lambda: torch.ops.aten._scaled_dot_product_flash_attention(
            qc, k, v, 0.0, is_causal=True)[0],
        "chunk, causal_lower_right, K/V repeated": lambda: F.scaled_dot_product_attention(
            qc, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=causal_lower_right(chunk, n)),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--chunk", type=int, default=4096)
    args = p.parse_args()
    h, h_kv, d = 28, 4, 128
    for n in map(int, args.lengths.split(",")):
        q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, h_kv, n, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        ref = None
        for name, fn in routes(q, k, v, args.chunk).items():
            try:
                ms = timed(fn)
                out = fn()
                err = "" if ref is None or "whole" in name else \
                    f"max |diff| vs whole's last rows {float((out - ref).abs().max()):.3g}"
                if "whole" in name:
                    ref = out[:, :, n - args.chunk :]
                print(f"n={n:6d} {name:42s} {ms:8.2f} ms  {err}", flush=True)
            except Exception as e:  # a route this torch does not take
                print(f"n={n:6d} {name:42s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


if __name__ == "__main__":
    main()
