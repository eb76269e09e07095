# ruff: noqa: B023  (closures timed inside the loop iteration that defines them)
"""Tuning experiments (GPU, one call) for the kernels whose bars were missed; kept so the next person can rerun
them. Each variant is checked against the library kernel on the same inputs before it is timed.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_variants.py --out DIR [--n 131072] [--smoke]

1. block_sparse B=64 attention: the library kernel vs a dedicated loop (mask-free off-diagonal steps, the
   diagonal block last) taking one 64-key tile, two 64-key tiles (two dots, one softmax update) or one gathered
   128-key tile per step; pointer loads vs TMA descriptors; two program orders. Also the same kernels on an
   index shared by the 7 query heads of a KV group, which separates data movement (K/V tiles from L2/HBM)
   from arithmetic: with a shared index the 7 programs of a group read the same tiles.
2. Quest at 128K context, batch 1 and 8, and at 32K, batch 32 (the decode bar's shape): scoring, selection and
   attention timed apart (CUDA graphs), the selection under several warp counts, and the page scores under several
   launch settings with their bandwidth (2026-12-02's e2e profile: 1.47 ms a step at about half the H200's).
   (Testing 2-8 thresholds per bisection pass was tried here too and was slower:
   ``kernel-variants-NVIDIA-H200-2026-11-28.log`` in ``benchmarks/results``.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_bench as kernels_bench  # noqa: E402  (benchmarks/kernel_bench.py: the same timing rules)

from attention_backends.kernels import methods as M  # noqa: E402
from attention_backends.kernels.paged_decode import (  # noqa: E402
    paged_decode,
    pages_from_contiguous,
    shared_pages_from_contiguous,
)
from attention_backends.kernels.quest_select import cache_page_bounds, quest_page_scores, quest_select  # noqa: E402
from attention_backends.kernels.sparse_prefill import _attend, _kv_major_block, sparse_prefill_attention  # noqa: E402
from attention_backends.prefill.block_sparse import top_k_for_ratio  # noqa: E402

H, HKV, D = 28, 4, 128
T0 = time.time()
ROWS: list[dict] = []


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET=1 smoke run, checks only


def bench(fn, graph=False):
    fn()
    return float("nan") if DEV == "cpu" else kernels_bench.bench(fn, graph=graph)


def row(**kw):
    ROWS.append(kw)
    log("ROW", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()))


# ------------------------------------------------------------------------------------------ block-sparse
@triton.jit
def _bs_kernel(Q, K, V, Out, BLK, CNT, sbh, sbq, sch, n, n_qb, group, h_kv, qk_scale,
               D: tl.constexpr, B: tl.constexpr, MODE: tl.constexpr, ORDER: tl.constexpr, TMA: tl.constexpr,
               WS: tl.constexpr = False):
    pid = tl.program_id(0)
    if ORDER == 0:  # head-major, latest (heaviest) query blocks first
        head = pid // n_qb
        qb = n_qb - 1 - pid % n_qb
    else:  # KV-head-major, the group's query heads side by side at one query block (the library's order)
        head, qb = _kv_major_block(pid, n_qb, group)
    kvh = head // group
    qs = qb * B
    lane = tl.arange(0, B)
    offs_m = qs + lane
    offs_d = tl.arange(0, D)
    row_ok = offs_m < n
    if TMA:
        qd = tl.make_tensor_descriptor(Q, shape=[h_kv * group * n, D], strides=[D, 1], block_shape=[B, D])
        kd = tl.make_tensor_descriptor(K, shape=[h_kv * n, D], strides=[D, 1], block_shape=[B, D])
        vd = tl.make_tensor_descriptor(V, shape=[h_kv * n, D], strides=[D, 1], block_shape=[B, D])
        q = qd.load([head * n + qs, 0])
    else:
        q = tl.load(Q + (head * n + offs_m)[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    K_h = K + kvh * n * D
    V_h = V + kvh * n * D
    m_i = tl.full([B], -1.0e30, tl.float32)
    l_i = tl.zeros([B], tl.float32)
    acc = tl.zeros([B, D], tl.float32)
    cnt = tl.load(CNT + head * sch + qb)
    blk = BLK + head * sbh + qb * sbq
    n_off = cnt - 1  # ids ascending: the diagonal block is the last entry
    if MODE == 0:
        for t in tl.range(0, n_off, warp_specialize=WS):
            key0 = tl.load(blk + t) * B
            if TMA:
                k = kd.load([kvh * n + key0, 0])
                v = vd.load([kvh * n + key0, 0])
            else:
                k = tl.load(K_h + (key0 + lane)[:, None] * D + offs_d[None, :])
                v = tl.load(V_h + (key0 + lane)[:, None] * D + offs_d[None, :])
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, None, qk_scale, False)
        rem = 0
    elif MODE == 1:
        for t in range(0, n_off - 1, 2):
            a0 = tl.load(blk + t) * B
            a1 = tl.load(blk + t + 1) * B
            if TMA:
                k0 = kd.load([kvh * n + a0, 0])
                k1 = kd.load([kvh * n + a1, 0])
                v0 = vd.load([kvh * n + a0, 0])
                v1 = vd.load([kvh * n + a1, 0])
            else:
                k0 = tl.load(K_h + (a0 + lane)[:, None] * D + offs_d[None, :])
                k1 = tl.load(K_h + (a1 + lane)[:, None] * D + offs_d[None, :])
                v0 = tl.load(V_h + (a0 + lane)[:, None] * D + offs_d[None, :])
                v1 = tl.load(V_h + (a1 + lane)[:, None] * D + offs_d[None, :])
            s0 = tl.dot(q, tl.trans(k0)) * qk_scale
            s1 = tl.dot(q, tl.trans(k1)) * qk_scale
            m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)))
            alpha = tl.math.exp2(m_i - m_new)
            p0 = tl.math.exp2(s0 - m_new[:, None])
            p1 = tl.math.exp2(s1 - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
            acc = tl.dot(p1.to(v1.dtype), v1, tl.dot(p0.to(v0.dtype), v0, acc * alpha[:, None]))
            m_i = m_new
        rem = n_off % 2
    else:
        lane2 = tl.arange(0, 2 * B)
        for t in range(0, n_off - 1, 2):
            key = tl.load(blk + t + lane2 // B) * B + lane2 % B
            k = tl.load(K_h + key[:, None] * D + offs_d[None, :])
            v = tl.load(V_h + key[:, None] * D + offs_d[None, :])
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, None, qk_scale, False)
        rem = n_off % 2
    if rem == 1:
        key0 = tl.load(blk + n_off - 1) * B
        k = tl.load(K_h + (key0 + lane)[:, None] * D + offs_d[None, :])
        v = tl.load(V_h + (key0 + lane)[:, None] * D + offs_d[None, :])
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, None, qk_scale, False)
    # the diagonal block, causal inside
    key = qs + lane
    key_ok = key < n
    k = tl.load(K_h + key[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V_h + key[:, None] * D + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    ok = key_ok[None, :] & (key[None, :] <= offs_m[:, None])
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, ok, qk_scale, True)
    out = acc / l_i[:, None]
    tl.store(Out + (head * n + offs_m)[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


def bs_variant(q, k, v, ids, cnt, mode, order, tma, warps, stages, ws=False):
    h, n, d = q.shape
    out = torch.empty_like(q)
    n_qb = triton.cdiv(n, 64)
    _bs_kernel[(h * n_qb,)](q, k, v, out, ids, cnt, ids.stride(0), ids.stride(1), cnt.stride(0), n, n_qb,
                            h // k.shape[0], k.shape[0], (1 / math.sqrt(d)) * 1.4426950408889634,
                            D=d, B=64, MODE=mode, ORDER=order, TMA=tma, WS=ws, num_warps=warps,
                            num_stages=stages)
    return out


BEST: list[tuple] = [(0, 0, False, 4, 3), (1, 0, False, 4, 3), (1, 1, False, 4, 3), (1, 0, True, 4, 3),
                     (2, 0, False, 8, 2)]


def block_sparse_section(n, smoke, a_n_full=131072):
    log(f"=== block_sparse B=64 n={n} ===")
    torch.manual_seed(0)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float16
    q = torch.randn(H, n, D, device=DEV).to(dt)
    k = torch.randn(HKV, n, D, device=DEV).to(dt)
    v = torch.randn(HKV, n, D, device=DEV).to(dt)
    top_k = max(3, top_k_for_ratio(n, 64, 10.0))
    ids, cnt = M.block_sparse_index(q, k, 64, top_k)
    g = H // HKV
    ids_shared = ids.view(HKV, g, *ids.shape[1:])[:, :1].expand(HKV, g, *ids.shape[1:]).reshape(ids.shape)
    ids_shared = ids_shared.contiguous()
    cnt_shared = cnt.view(HKV, g, -1)[:, :1].expand(HKV, g, cnt.shape[1]).reshape(cnt.shape).contiguous()
    cells = M.count_cells(n, H, blocks=(ids, cnt, 64), block_m=64, device=DEV).sum().item()
    flops = 4 * D * cells
    sdpa_ms = bench(lambda: M.dense_prefill(q, k, v))
    row(case="sdpa", n=n, ms=sdpa_ms, tflops=4 * D * H * n * (n + 1) / 2 / sdpa_ms / 1e9)
    lib = lambda ii, cc: sparse_prefill_attention(q, k, v, blocks=(ii, cc, 64), block_m=64)  # noqa: E731
    ref = lib(ids, cnt)
    ref_sh = lib(ids_shared, cnt_shared)
    timed = []
    for tag, ii, cc, rr in (("random", ids, cnt, ref), ("shared", ids_shared, cnt_shared, ref_sh)):
        ms = bench(lambda: lib(ii, cc))
        row(case=f"lib {tag}", n=n, ms=ms, tflops=flops / ms / 1e9, speedup=sdpa_ms / ms)
        if tag == "random" and n == a_n_full:
            variants = [(m, o, t, w, s) for m in (0, 1, 2) for o in (0, 1) for t in (False, True)
                        for w, s in ((4, 2), (4, 3), (8, 2)) if not (t and m == 2)]
        else:  # the best of the full sweep
            variants = BEST[:5]
        if smoke:
            variants = [(0, 0, False, 4, 1), (1, 1, False, 4, 1), (2, 0, False, 4, 1), (1, 0, True, 4, 1)]
        for mode, order, tma, warps, stages in variants:
            name = f"{tag} mode={mode} order={order} tma={int(tma)} w={warps} s={stages}"
            try:
                fn = lambda: bs_variant(q, k, v, ii, cc, mode, order, tma, warps, stages)
                out = fn()
                err = float((out.float() - rr.float()).norm() / rr.float().norm())
                ok = math.isfinite(err) and err < 1e-2
                ms = bench(fn) if ok else float("nan")
                row(case=name, n=n, ms=ms, tflops=flops / ms / 1e9, speedup=sdpa_ms / ms, err=err, ok=ok)
                if ok and tag == "random" and n == a_n_full:
                    timed.append((ms, (mode, order, tma, warps, stages)))
            except Exception as e:  # noqa: BLE001  (a variant that fails to compile is a result too)
                row(case=name, n=n, error=f"{type(e).__name__}: {str(e)[:200]}")
    if timed:
        BEST[:] = [cfg for _, cfg in sorted(timed)]
    idx_ms = bench(lambda: M.block_sparse_index(q, k, 64, top_k))
    row(case="index (scores + top-k)", n=n, ms=idx_ms)


# ------------------------------------------------------------------------------------------------- quest
def quest_section(L, B, smoke):
    log(f"=== quest L={L} B={B} ===")
    torch.manual_seed(3)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float16
    page = 16
    q = torch.randn(B, H, D, device=DEV).to(dt)
    k = torch.randn(B, HKV, L, D, device=DEV).to(dt)
    v = torch.randn(B, HKV, L, D, device=DEV).to(dt)
    kp, vp, pt = pages_from_contiguous(k, v, page)
    lens = torch.full((B, HKV), L, dtype=torch.int32, device=DEV)
    pmin, pmax = kp.amin(1), kp.amax(1)
    budget = math.ceil(math.ceil(L / 20) / page)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa
    base = bench(sdpa, graph=True)
    row(case=f"quest B={B} sdpa dense [graph]", ms=base)
    scores = quest_page_scores(q, pmin, pmax, pt, lens, page)
    sel, sl = quest_select(q, pmin, pmax, pt, lens, budget, page)
    row(case=f"quest B={B} scores [graph]", ms=bench(lambda: quest_page_scores(q, pmin, pmax, pt, lens, page),
                                                   graph=True))
    row(case=f"quest B={B} scores+select lib [graph]",
        ms=bench(lambda: quest_select(q, pmin, pmax, pt, lens, budget, page), graph=True))
    row(case=f"quest B={B} attend selected [graph]",
        ms=bench(lambda: paged_decode(q, kp, vp, sel, sl, max_len=budget * page), graph=True))
    # the same step over vLLM's cache layout (a block holds every KV head: server/vllm_engine/cache_decode.py)
    cache, blocks = shared_pages_from_contiguous(k, v, page)
    kc, vc = cache[:, 0], cache[:, 1]
    vmin = torch.empty(cache.shape[0], HKV, D, dtype=dt, device=DEV)
    vmax = torch.empty_like(vmin)
    npg = blocks.shape[1]
    fill = torch.full((B * npg,), page, dtype=torch.int32, device=DEV)
    fill.view(B, npg)[:, -1] = L - (npg - 1) * page
    cache_page_bounds(kc, blocks.flatten(), fill, vmin, vmax)
    table = blocks[:, None, :].expand(B, HKV, npg)
    vsel, vsl = quest_select(q, vmin, vmax, table, lens, budget, page)
    same = bool(torch.equal(vsl, sl) and torch.allclose(paged_decode(q, kc, vc, vsel, vsl, max_len=budget * page),
                                                        paged_decode(q, kp, vp, sel, sl, max_len=budget * page),
                                                        rtol=1e-2, atol=1e-2))
    row(case=f"quest B={B} vLLM layout: the per-head layout's tokens and output", ms=0.0, same=same)
    row(case=f"quest B={B} vLLM layout: scores+select [graph]",
        ms=bench(lambda: quest_select(q, vmin, vmax, table, lens, budget, page), graph=True))
    row(case=f"quest B={B} vLLM layout: attend selected [graph]",
        ms=bench(lambda: paged_decode(q, kc, vc, vsel, vsl, max_len=budget * page), graph=True))
    row(case=f"quest B={B} vLLM layout: bounds of one block per row [graph]",
        ms=bench(lambda: cache_page_bounds(kc, blocks[:, -1].contiguous(), fill.view(B, npg)[:, -1].contiguous(),
                                           vmin, vmax), graph=True))
    # the page scores read every page's key min and max once: their time against the card's bandwidth
    bound_bytes = 2 * pmin.numel() * pmin.element_size()
    for pages, warps in ((32, 2), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)):
        s2 = quest_page_scores(q, pmin, pmax, pt, lens, page, block_pages=pages, num_warps=warps)
        same = bool(torch.allclose(s2, scores, rtol=1e-5, atol=1e-3))
        ms = bench(lambda: quest_page_scores(q, pmin, pmax, pt, lens, page, block_pages=pages, num_warps=warps),
                   graph=True)
        row(case=f"quest B={B} L={L} scores pages={pages} warps={warps} [graph]", ms=ms, same=same,
            tb_s=bound_bytes / ms / 1e9)
    for warps in (4, 8, 16, 32):
        s2, l2 = quest_select(q, pmin, pmax, pt, lens, budget, page, scores=scores, num_warps=warps)
        same = bool(torch.equal(s2, sel) and torch.equal(l2, sl))
        ms = bench(lambda: quest_select(q, pmin, pmax, pt, lens, budget, page, scores=scores, num_warps=warps),
                   graph=True)
        row(case=f"quest B={B} select only warps={warps} [graph]", ms=ms, same=same)


def warp_specialized_section(n):
    """Triton's automatic warp specialization (``tl.range(..., warp_specialize=True)``, Hopper since 3.5) on the
    one-tile loop with TMA loads, next to the library kernel and the plain variant."""
    log(f"=== warp specialization n={n} ===")
    torch.manual_seed(0)
    q = torch.randn(H, n, D, device=DEV).to(torch.bfloat16)
    k = torch.randn(HKV, n, D, device=DEV).to(torch.bfloat16)
    v = torch.randn(HKV, n, D, device=DEV).to(torch.bfloat16)
    ids, cnt = M.block_sparse_index(q, k, 64, max(3, top_k_for_ratio(n, 64, 10.0)))
    flops = 4 * D * M.count_cells(n, H, blocks=(ids, cnt, 64), block_m=64, device=DEV).sum().item()
    ref = sparse_prefill_attention(q, k, v, blocks=(ids, cnt, 64), block_m=64)
    ms = bench(lambda: sparse_prefill_attention(q, k, v, blocks=(ids, cnt, 64), block_m=64))
    row(case="ws: library kernel", n=n, ms=ms, tflops=flops / ms / 1e9)
    for tma, ws, warps, stages in ((True, False, 4, 2), (True, True, 4, 2), (True, True, 4, 3), (True, True, 8, 2),
                                   (True, True, 8, 3), (False, True, 4, 2)):
        name = f"ws: mode=0 order=1 tma={int(tma)} ws={int(ws)} w={warps} s={stages}"
        try:
            fn = lambda: bs_variant(q, k, v, ids, cnt, 0, 1, tma, warps, stages, ws)
            out = fn()
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            ok = math.isfinite(err) and err < 1e-2
            ms = bench(fn) if ok else float("nan")
            row(case=name, n=n, ms=ms, tflops=flops / ms / 1e9, err=err, ok=ok)
        except Exception as e:  # noqa: BLE001
            row(case=name, n=n, error=f"{type(e).__name__}: {str(e)[:300]}")


def index_section(n):
    """The block-sparse index at n, piece by piece, and the row top-k under several warp counts."""
    from attention_backends.kernels.index_vertical_slash import block_scores, triton_mean_pool
    from attention_backends.kernels.topk import causal_block_topk

    log(f"=== block_sparse index n={n} ===")
    torch.manual_seed(0)
    q = torch.randn(H, n, D, device=DEV).to(torch.bfloat16)
    k = torch.randn(HKV, n, D, device=DEV).to(torch.bfloat16)
    top_k = max(3, top_k_for_ratio(n, 64, 10.0))
    row(case="index: whole", n=n, ms=bench(lambda: M.block_sparse_index(q, k, 64, top_k)))
    row(case="index: mean-pool q, k", n=n, ms=bench(lambda: (triton_mean_pool(q, 64), triton_mean_pool(k, 64))))
    row(case="index: pool + block scores", n=n, ms=bench(lambda: block_scores(q, k, 64)))
    s = block_scores(q, k, 64)
    ref = causal_block_topk(s, top_k)
    for warps in (1, 2, 4, 8):
        got = causal_block_topk(s, top_k, num_warps=warps)
        same = bool(torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]))
        row(case=f"index: top-k warps={warps}", n=n, ms=bench(lambda: causal_block_topk(s, top_k, num_warps=warps)),
            same=same)


def profile_once(n):
    """One launch each of the library kernel and the two-tile variant (for ``ncu -k regex:...``)."""
    torch.manual_seed(0)
    q = torch.randn(H, n, D, device=DEV).to(torch.bfloat16)
    k = torch.randn(HKV, n, D, device=DEV).to(torch.bfloat16)
    v = torch.randn(HKV, n, D, device=DEV).to(torch.bfloat16)
    ids, cnt = M.block_sparse_index(q, k, 64, max(3, top_k_for_ratio(n, 64, 10.0)))
    sparse_prefill_attention(q, k, v, blocks=(ids, cnt, 64), block_m=64)
    bs_variant(q, k, v, ids, cnt, *PROFILE_VARIANT)
    torch.cuda.synchronize()


PROFILE_VARIANT = (1, 0, False, 4, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--skip", default="")
    ap.add_argument("--profile", action="store_true", help="one launch per kernel, for ncu")
    ap.add_argument("--only", default="",
                    help="ws: only the warp-specialization experiment; index: only the block-sparse index")
    a = ap.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=DEV))
    global H, HKV
    if a.smoke and DEV == "cpu":
        H, HKV = 4, 2
    skip = set(a.skip.split(","))
    if a.profile:
        profile_once(a.n)
        return
    if "ws" in a.only:
        warp_specialized_section(a.n)
        skip |= {"quest", "bs"}
    if "index" in a.only:
        for n in (a.n, 32768):
            index_section(n)
        skip |= {"quest", "bs"}
    card = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    log(card, torch.__version__, triton.__version__)
    try:
        if "quest" not in skip:
            for L, B in ((131072, 1), (131072, 8), (32768, 32)):  # the last: the e2e decode bar's shape
                quest_section(min(L, 2048 if DEV == "cpu" else 8192) if a.smoke else L, B, a.smoke)
        if "bs" not in skip:
            for n in ((2048,) if a.smoke else (a.n, 32768)):
                block_sparse_section(n, a.smoke, a.n)
                torch.cuda.empty_cache()
    finally:
        with open(os.path.join(a.out, "kernel-variants.json"), "w") as f:
            json.dump({"card": card, "rows": ROWS}, f, indent=1)
    print("\n| case | n | ms | TFLOP/s | speedup | note |")
    for r in ROWS:
        cols = [r["case"], str(r.get("n", ""))]
        for key, fmt in (("ms", "{:.4f}"), ("tflops", "{:.0f}"), ("speedup", "{:.2f}")):
            cols.append(fmt.format(r[key]) if key in r else "")
        bad = not (r.get("ok", True) and r.get("same", True))
        cols.append(r.get("error", "") or ("MISMATCH" if bad else ""))
        print("| " + " | ".join(cols) + " |")

if __name__ == "__main__":
    main()
