"""block_sparse with 16-token blocks on the GPU: packed 64-row tiles against exact 16x16 tiles, beside dense.

The packed kernel multiplies every kept 16-column block against all 64 rows of its query tile (the union of four
query blocks' choices), so it computes many more cells than it keeps; exact tiles compute only the kept cells,
on small tensor-core tiles. Prints kernel times (triton.testing.do_bench, ms) and the computed/kept cells of each,
for a Qwen2.5-7B-shaped layer (28 query heads, 4 KV heads, head dim 128, bf16).

    python3 benchmarks/block_sparse_tiles.py [--lengths 8192,32768] [--ratios 4,10]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from triton.testing import do_bench

    from attention_backends import parse_pattern
    from attention_backends.kernels.methods import block_sparse_index, dense_prefill
    from attention_backends.kernels.sparse_prefill import count_cells, sparse_prefill_attention
    from attention_backends.prefill.block_sparse import kept_cells, resolve_top_k

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--ratios", default="4,10")
    args = p.parse_args()
    h, h_kv, d, dev, dt = 28, 4, 128, "cuda", torch.bfloat16
    print(f"{'n':>6} {'r':>3} {'dense ms':>9} {'packed ms':>9} {'exact ms':>9} {'packed r':>8} {'exact r':>8}")
    for n in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(h, n, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(h_kv, n, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(h_kv, n, d, device=dev, dtype=dt, generator=g)
        dense_ms = do_bench(partial(dense_prefill, q, k, v))
        dense_cells = h * n * (n + 1) // 2
        for r in (float(x) for x in args.ratios.split(",")):
            block, top_k = resolve_top_k(n, parse_pattern(f"block_sparse:{r}").prefill)
            ids, cnt = block_sparse_index(q, k, block, top_k)
            packed_run = partial(sparse_prefill_attention, q, k, v, blocks=(ids, cnt, block), block_m=64)
            exact_run = partial(sparse_prefill_attention, q, k, v, blocks=(ids, cnt, block), block_m=block)
            packed, exact = do_bench(packed_run), do_bench(exact_run)
            a, b = packed_run(), exact_run()
            err = float((a.float() - b.float()).norm() / b.float().norm())
            packed_cells = int(count_cells(n, h, blocks=(ids, cnt, block), block_m=64, device=q.device,
                                           whole_tile=True).sum())
            exact_cells = kept_cells(n, block, top_k) * h
            print(f"{n:>6} {r:>3.0f} {dense_ms:>9.3f} {packed:>9.3f} {exact:>9.3f} {dense_cells / packed_cells:>8.2f} "
                  f"{dense_cells / exact_cells:>8.2f}  (outputs differ by {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
