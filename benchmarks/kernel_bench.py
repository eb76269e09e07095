# ruff: noqa: B023  (closures timed inside the loop iteration that defines them)
"""Kernel benchmark (GPU, one call): check every Triton kernel against its reference, then time the kernel
table of ``docs/performance.md`` next to its baselines measured in the same run.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench.py --out DIR            # full run
    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench.py --out DIR --smoke    # small shapes: compile + check

Reference shape: Qwen2.5-7B attention layer, 28 query heads, 4 KV heads, head dim 128, bfloat16. Inputs are
random normal (never zero). Times are medians of ``triton.testing.do_bench`` after warm-up; a method's time
includes building its index (estimate, budget search, top-k, conversion). Decode is timed both with plain
launches and replayed as a CUDA graph (how the engine runs it); baselines get the same treatment.
Writes ``kernels-<card>-<date>.json`` (and a copy of the printed table) under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention_backends.kernels import methods as M  # noqa: E402
from attention_backends.kernels.index_vertical_slash import (  # noqa: E402
    VSCandidates,
    block_scores,
    triton_mean_pool,
    window_scores,
)
from attention_backends.kernels.paged_decode import paged_decode, pages_from_contiguous  # noqa: E402
from attention_backends.kernels.quest_select import quest_decode, quest_select  # noqa: E402
from attention_backends.kernels.snapkv_select import triton_token_importance  # noqa: E402
from attention_backends.kernels.sparse_prefill import sparse_prefill_attention  # noqa: E402
from attention_backends.kernels.topk import causal_block_topk  # noqa: E402
from attention_backends.prefill.block_sparse import top_k_for_ratio  # noqa: E402
from attention_backends.spec import parse_pattern  # noqa: E402

H, HKV, D = 28, 4, 128
DT = torch.bfloat16
RESULTS: dict = {"checks": [], "timings": [], "notes": []}
VS_ONLY = False
BS64_ONLY = False
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def rel(a, b):
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(name, err, tol, **extra):
    ok = math.isfinite(err) and err < tol
    RESULTS["checks"].append({"name": name, "rel_err": err, "tol": tol, "ok": ok, **extra})
    log(f"CHECK {'ok  ' if ok else 'FAIL'} {name}: rel_err={err:.2e} (tol {tol:g}) {extra if extra else ''}")
    return ok


def bench(fn, ms_hint=None, graph=False):
    fn()
    torch.cuda.synchronize()
    if ms_hint is None:
        t = time.time()
        fn()
        torch.cuda.synchronize()
        ms_hint = (time.time() - t) * 1e3
    rep = max(50.0, min(2000.0, 8 * ms_hint))
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, warmup=max(25.0, 2 * ms_hint), rep=rep, return_mode="median")


def record(case, ms, baseline_ms=None, **extra):
    row = {"case": case, "ms": ms, **extra}
    if baseline_ms is not None:
        row["baseline_ms"] = baseline_ms
        row["speedup"] = baseline_ms / ms
    RESULTS["timings"].append(row)
    sp = f"  speedup {baseline_ms / ms:6.2f}x" if baseline_ms is not None else ""
    log(f"TIME {case:58s} {ms * 1e3 if ms < 1 else ms:10.3f} {'us' if ms < 1 else 'ms'}{sp} "
        + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(DT)


def qkv(n):
    # a mild per-head bias makes the attention non-uniform (random data otherwise spreads it evenly)
    q = rand(H, n, D)
    k = rand(HKV, n, D)
    v = rand(HKV, n, D)
    return q, k, v


def sdpa_prefill(q, k, v):
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]


# ------------------------------------------------------------------------------------------ reference rows
def ref_rows(q, k, v, heads, rows, allowed):
    """fp32 reference for query ``rows`` of ``heads``; ``allowed(head, rows) -> [len(rows), n]`` bool."""
    g = H // HKV
    outs = []
    for hh in heads:
        qq = q[hh, rows].float()
        kk, vv = k[hh // g].float(), v[hh // g].float()
        s = qq @ kk.T / math.sqrt(D)
        m = allowed(hh, rows) & (torch.arange(q.shape[1], device="cuda")[None, :] <= rows[:, None])
        m |= torch.arange(q.shape[1], device="cuda")[None, :] == rows[:, None]
        s = s.masked_fill(~m, float("-inf"))
        outs.append(torch.softmax(s, -1) @ vv)
    return torch.stack(outs)


def sample_rows(n, count=6, block=64):
    nqb = -(-n // block)
    qbs = sorted({0, 1, nqb // 3, nqb // 2, nqb - 2, nqb - 1} | set(torch.randint(0, nqb, (count,)).tolist()))
    rows = torch.cat([torch.arange(b * block, min(n, b * block + block)) for b in qbs])
    return rows.cuda()


# ---------------------------------------------------------------------------------------------- prefill
def settled(outcome):
    """A fast path's outcome with its device scalars (counts left on the device, no sync) read."""
    read = lambda x: x.item() if isinstance(x, torch.Tensor) else x  # noqa: E731
    return dataclasses.replace(outcome, computed_cells=int(read(outcome.computed_cells)),
                               details={key: read(value) for key, value in outcome.details.items()})


def vs_and_flex(q, k, v, n, heads, rows, dense_cells, flops_cell, sdpa_ms, do_flex):
    """vertical_slash and flexprefill at n: window estimate, checks, timings and breakdowns."""
    nn_ = torch.arange(n, device="cuda")
    # --- window estimate vs reference
    from attention_backends.prefill.vertical_slash_index import estimate_scores

    cols, slash, W = window_scores(q, k, 256)
    ref = estimate_scores(q, k, 256)
    check(f"window_scores vertical n={n}", rel(cols, ref.vertical), 1e-3)
    check(f"window_scores slash n={n}", rel(slash, ref.slash), 1e-3)
    del ref
    torch.cuda.empty_cache()
    record(f"  window estimate (W=256) n={n}", bench(lambda: window_scores(q, k, 256)))
    record(f"  window estimate, columns only (no slash sums) n={n}",
           bench(lambda: window_scores(q, k, 256, diagonal=False)))

    # --- vertical_slash r=10
    phase = parse_pattern("vertical_slash:10").prefill
    outcome = settled(M.vertical_slash_prefill(q, k, v, phase))
    kk = outcome.details["num_vertical"]
    cand = VSCandidates(cols, slash, W, 4, 64, M.VS_BLOCK)
    sel_s = cand.slash_rank < cand.counts(kk, cand.forced_slash)[:, None]
    sel_v = cand.vertical_rank < cand.counts(kk, cand.forced_vertical)[:, None]

    def vs_allowed(hh, rr):
        off = (rr[:, None] - nn_[None, :]).clamp(min=0)
        return sel_s[hh][off] | sel_v[hh][None, :]

    kv_t = cand.counts(kk, cand.forced_vertical)
    ks_t = cand.counts(kk, cand.forced_slash)
    out_chk = M.vs_attention(q, k, v, cand, kv_t, ks_t, kk, kk)[0]
    exp = ref_rows(q, k, v, heads, rows, vs_allowed)
    check(f"vertical_slash attention n={n} (k={kk})", rel(out_chk[heads][:, rows], exp), 1e-2)
    check(f"vertical_slash method output == kernel on same index n={n}", rel(outcome.out, out_chk), 1e-2)
    vs_ms = bench(lambda: M.vertical_slash_prefill(q, k, v, phase))
    achieved = dense_cells / outcome.computed_cells
    record(f"vertical_slash r=10 n={n} (index+attention)", vs_ms, sdpa_ms, k=kk, achieved_r=achieved,
           attended_r=dense_cells / outcome.details["attended_cells"])
    # breakdown
    est_ms = bench(lambda: VSCandidates(*window_scores(q, k, 256), 4, 64, M.VS_BLOCK))
    search_ms = bench(lambda: M.vs_closest_budget(cand, 10.0))
    attn_ms = bench(lambda: M.vs_attention(q, k, v, cand, kv_t, ks_t, kk, kk))
    record(f"  vs estimate+keep order n={n}", est_ms)
    record(f"  vs budget search n={n}", search_ms)
    record(f"  vs index convert+attention (exact mask) n={n}", attn_ms,
           tflops_computed=outcome.computed_cells * flops_cell / attn_ms / 1e9)
    from attention_backends.kernels.sparse_prefill import slash_chunks, vertical_columns

    r_, w_, c_, cov = slash_chunks(cand.slash_order[:, :kk], ks_t, n)
    pos, cc = vertical_columns(cand.vertical_order[:, :kk], kv_t, n)
    band_ms = bench(lambda: sparse_prefill_attention(q, k, v, rel=(r_, w_, c_), cols=(pos, cc, cov)))
    record(f"  vs attention kernel only, band mode (no exact mask) n={n}", band_ms,
           tflops_computed=outcome.computed_cells * flops_cell / band_ms / 1e9)
    exact_ms = bench(lambda: sparse_prefill_attention(q, k, v, rel=(r_, w_, c_), cols=(pos, cc, cov),
                                                      exact=(sel_s.view(torch.int8), sel_v.view(torch.int8))))
    record(f"  vs attention kernel only, exact mask n={n}", exact_ms,
           tflops_computed=outcome.computed_cells * flops_cell / exact_ms / 1e9)
    if do_flex and n >= 131072:
        try:
            flex_vs(q, k, v, sel_s, sel_v, n, exact_ms)
        except Exception as e:  # noqa: BLE001
            log("flex vertical_slash peer failed:", repr(e)[:300])
    del outcome
    torch.cuda.empty_cache()

    # --- flexprefill r~10
    phase = parse_pattern("flexprefill:10").prefill
    outcome = settled(M.flexprefill_prefill(q, k, v, phase))
    fx_ms = bench(lambda: M.flexprefill_prefill(q, k, v, phase))
    record(f"flexprefill r=10 n={n} (index+attention)", fx_ms, sdpa_ms, alpha=outcome.details["alpha"],
           min_budget=outcome.details["min_budget"], achieved_r=dense_cells / outcome.computed_cells)
    kvl = torch.tensor(outcome.details["num_vertical"], device="cuda")
    ksl = torch.tensor(outcome.details["num_slash"], device="cuda")
    sel_s2 = cand.slash_rank < ksl[:, None]
    sel_v2 = cand.vertical_rank < kvl[:, None]

    def fx_allowed(hh, rr):
        off = (rr[:, None] - nn_[None, :]).clamp(min=0)
        return sel_s2[hh][off] | sel_v2[hh][None, :]

    out_chk = M.vs_attention(q, k, v, cand, kvl, ksl, int(kvl.max()), int(ksl.max()))[0]
    exp = ref_rows(q, k, v, heads, rows, fx_allowed)
    check(f"flexprefill attention n={n}", rel(out_chk[heads][:, rows], exp), 1e-2)
    del outcome
    torch.cuda.empty_cache()



def prefill_section(n, smoke, do_flex):
    log(f"=== prefill n={n} ===")
    torch.manual_seed(n)
    q, k, v = qkv(n)
    heads = [0, 6, 13, 27]
    rows = sample_rows(n)
    dense_cells = H * n * (n + 1) // 2
    flops_cell = 4 * D

    # --- baseline
    sdpa_ms = bench(lambda: sdpa_prefill(q, k, v))
    record(f"sdpa causal prefill n={n}", sdpa_ms, tflops=dense_cells * flops_cell / sdpa_ms / 1e9)

    nn_ = torch.arange(n, device="cuda")
    if not BS64_ONLY:
        vs_and_flex(q, k, v, n, heads, rows, dense_cells, flops_cell, sdpa_ms, do_flex)

    # --- block_sparse r=10, block 64 and 16
    for block in (() if VS_ONLY else (64,) if BS64_ONLY else (64, 16)):
        top_k = top_k_for_ratio(n, block, 10.0)
        phase = parse_pattern({"prefill": {"method": "block_sparse", "compression_ratio": 10,
                                           "params": {"block_size": block}}}).prefill
        # index pieces vs torch
        s = block_scores(q, k, block)
        pq, pk = triton_mean_pool(q, block), triton_mean_pool(k, block)
        nb = pq.shape[1]
        sub = slice(0, min(nb, 512))
        ref_s = pq[heads][:, sub] @ pk[[hh // (H // HKV) for hh in heads]].transpose(1, 2)
        tri = torch.tril(torch.ones(ref_s.shape[1], nb, dtype=torch.bool, device="cuda"))
        check(f"block_scores B={block} n={n}", rel(s[heads][:, sub][:, :, :].masked_fill(~tri, 0),
                                                  ref_s.masked_fill(~tri, 0)), 1e-4)
        ids, cnt = causal_block_topk(s, top_k)
        # top-k agreement with torch.topk on the same scores (rows of the sampled heads)
        blocks_ = torch.arange(nb, device="cuda")
        causal = blocks_[None, :] <= blocks_[:, None]
        bq, bk = blocks_[:, None], blocks_[None, :]
        forced = (bk == 0) | (bk == bq) | (bk == bq - 1)
        agree = []
        for hh in heads[:2]:
            sc = s[hh].masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
            ch = sc.topk(min(top_k, nb), -1).indices
            keep_ref = torch.zeros(nb, nb, dtype=torch.bool, device="cuda").scatter_(-1, ch, True) & causal
            keep_mine = torch.zeros(nb, nb + 1, dtype=torch.bool, device="cuda")
            live = torch.arange(ids.shape[-1], device="cuda")[None, :] < cnt[hh][:, None]
            idx = torch.where(live, ids[hh].long(), nb)
            keep_mine.scatter_(-1, idx, True)
            agree.append(float((keep_mine[:, :nb] == keep_ref).all(-1).float().mean()))
        check(f"block top-k rows identical to torch.topk B={block} n={n}", 1 - min(agree), 1e-3)
        del s
        outcome = M.block_sparse_prefill(q, k, v, phase)
        keep_blocks = torch.zeros(H, nb, nb + 1, dtype=torch.bool, device="cuda")
        idx = torch.where(torch.arange(ids.shape[-1], device="cuda")[None, None, :] < cnt[..., None], ids.long(), nb)
        keep_blocks.scatter_(-1, idx, True)
        keep_blocks = keep_blocks[..., :nb]

        def bs_allowed(hh, rr):
            return keep_blocks[hh][rr // block][:, nn_ // block]

        exp = ref_rows(q, k, v, heads, rows, bs_allowed)
        check(f"block_sparse B={block} attention n={n}", rel(outcome.out[heads][:, rows], exp), 1e-2)
        bs_ms = bench(lambda: M.block_sparse_prefill(q, k, v, phase))
        attn_ms = bench(lambda: M.block_sparse_attention(q, k, v, ids, cnt, block))
        att = outcome.details.get("attended_cells", outcome.computed_cells)
        record(f"block_sparse r=10 B={block} n={n} (index+attention)", bs_ms, sdpa_ms, top_k=top_k,
               achieved_r=dense_cells / outcome.computed_cells, attended_r=dense_cells / att)
        record(f"  block_sparse B={block} attention only n={n}", attn_ms,
               tflops_computed=outcome.computed_cells * flops_cell / attn_ms / 1e9)
        record(f"  block_sparse B={block} index (pool + scores + top-k) n={n}",
               bench(lambda: M.block_sparse_index(q, k, block, top_k)))
        record(f"  block_sparse B={block} index: mean-pool q and k n={n}",
               bench(lambda: (triton_mean_pool(q, block), triton_mean_pool(k, block))))
        if block == 64 and not smoke and n >= 131072:
            for warps, stages in ((4, 2), (4, 4), (8, 2), (8, 3)):
                ms = bench(lambda: sparse_prefill_attention(q, k, v, blocks=(ids, cnt, 64), block_m=64,
                                                            num_warps=warps, num_stages=stages))
                record(f"    sweep B=64 attention warps={warps} stages={stages}", ms,
                       tflops_computed=outcome.computed_cells * flops_cell / ms / 1e9)
        if block == 64 and do_flex:
            try:
                flex_bs(q, k, v, keep_blocks, n, attn_ms)
            except Exception as e:  # noqa: BLE001
                log("flex block_sparse peer failed:", repr(e)[:300])
        torch.cuda.empty_cache()
    torch.cuda.empty_cache()


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return create_block_mask, torch.compile(flex_attention, dynamic=False)


def flex_bs(q, k, v, keep_blocks, n, own_ms):
    create_block_mask, flex = _flex()
    kb = keep_blocks

    def mask_mod(b, hh, qi, ki):
        return kb[hh, qi // 64, ki // 64] & (ki <= qi)

    t = time.time()
    bm = create_block_mask(mask_mod, 1, H, n, n, device="cuda", BLOCK_SIZE=64, _compile=True)
    log(f"flex block mask built in {time.time() - t:.1f}s")
    opts = {"BLOCK_M": 64, "BLOCK_N": 64}
    fn = lambda: flex(q[None], k[None], v[None], block_mask=bm, enable_gqa=True, kernel_options=opts)  # noqa: E731
    t = time.time()
    out = fn()[0]
    torch.cuda.synchronize()
    log(f"flex compiled+ran in {time.time() - t:.1f}s")
    own = M.block_sparse_attention(q, k, v, *(_ids_from_keep(kb)), 64)
    check(f"flex block_sparse B=64 peer agrees n={n}", rel(own, out), 2e-2)
    ms = bench(fn)
    record(f"  peer flex_attention block_sparse B=64 n={n}", ms, own_ms)


def _ids_from_keep(kb):
    h, nb, _ = kb.shape
    cnt = kb.sum(-1).to(torch.int32)
    kmax = int(cnt.max())
    pos = torch.arange(nb, device=kb.device).expand(h, nb, nb)
    ids = torch.where(kb, pos, nb).sort(-1).values[..., :kmax].to(torch.int32)
    return ids.contiguous(), cnt


def flex_vs(q, k, v, sel_s, sel_v, n, own_ms):
    create_block_mask, flex = _flex()
    s_on, v_on = sel_s, sel_v

    def mask_mod(b, hh, qi, ki):
        return (ki <= qi) & (s_on[hh, (qi - ki).clamp(min=0)] | v_on[hh, ki])

    t = time.time()
    bm = create_block_mask(mask_mod, 1, H, n, n, device="cuda", BLOCK_SIZE=128, _compile=True)
    log(f"flex VS block mask built in {time.time() - t:.1f}s (sparsity {bm.sparsity():.1f}%)")
    fn = lambda: flex(q[None], k[None], v[None], block_mask=bm, enable_gqa=True)  # noqa: E731
    t = time.time()
    fn()
    torch.cuda.synchronize()
    log(f"flex compiled+ran in {time.time() - t:.1f}s")
    ms = bench(fn)
    record(f"  peer flex_attention vertical_slash (exact mask_mod) n={n}", ms, own_ms)


# ----------------------------------------------------------------------------------------------- decode
def decode_section(L, batches, smoke):
    log(f"=== decode context={L} ===")
    torch.manual_seed(L + 1)
    g = H // HKV
    page = 16
    for B in batches:
        q = rand(B, H, D)
        k = rand(B, HKV, L, D)
        v = rand(B, HKV, L, D)
        kp, vp, pt = pages_from_contiguous(k, v, page)
        lens = torch.full((B, HKV), L, dtype=torch.int32, device="cuda")
        out = paged_decode(q, kp, vp, pt, lens, max_len=L)
        sd = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
        ref = sd()[:, :, 0]
        check(f"paged_decode dense B={B} L={L}", rel(out, ref), 1e-2)
        kv_bytes = 2 * B * HKV * L * D * 2
        for graph in (False, True):
            tag = "graph" if graph else "eager"
            base = bench(sd, graph=graph)
            record(f"sdpa decode contiguous B={B} L={L} [{tag}]", base, tb_s=kv_bytes / base / 1e9)
            ms = bench(lambda: paged_decode(q, kp, vp, pt, lens, max_len=L), graph=graph)
            record(f"paged dense decode (own) B={B} L={L} [{tag}]", ms, base, tb_s=kv_bytes / ms / 1e9)
            # quest r=20
            budget_pages = math.ceil(math.ceil(L / 20) / page)
            pmin = kp.amin(1)
            pmax = kp.amax(1)
            qd = lambda: quest_decode(q, kp, vp, pmin, pmax, pt, lens, budget_pages)  # noqa: E731
            ms = bench(qd, graph=graph)
            record(f"quest r=20 decode B={B} L={L} [{tag}] (select+attend)", ms, base,
                   pages=budget_pages)
            # snapkv / ada over the kept cache (C = L / 20 per head; ada: uneven per head, same total)
            C = math.ceil(L / 20)
            lens_s = torch.full((B, HKV), C, dtype=torch.int32, device="cuda")
            ms = bench(lambda: paged_decode(q, kp, vp, pt, lens_s, max_len=C), graph=graph)
            record(f"snapkv r=20 decode over kept cache B={B} L={L} [{tag}]", ms, base, kept=C)
            share = torch.tensor([0.4, 0.3, 0.2, 0.1], device="cuda") * 4 * C
            lens_a = share.round().to(torch.int32)[None].expand(B, HKV).contiguous()
            mx = int(lens_a.max())
            ms = bench(lambda: paged_decode(q, kp, vp, pt, lens_a, max_len=mx), graph=graph)
            record(f"ada_snapkv r=20 decode over kept cache B={B} L={L} [{tag}]", ms, base, kept_max=mx)
        if not smoke:
            for warps, stages, bn in ((4, 3, 32), (4, 4, 32), (8, 4, 64), (8, 3, 32)):
                ms = bench(lambda: paged_decode(q, kp, vp, pt, lens, max_len=L, num_warps=warps, num_stages=stages,
                                                block_n=bn))
                record(f"    sweep paged decode B={B} warps={warps} stages={stages} block_n={bn}", ms,
                       tb_s=kv_bytes / ms / 1e9)
        # quest correctness: selection vs reference upper bounds + topk, and output over selected pages
        from attention_backends.decode.quest import page_upper_bounds

        sel, sel_len = quest_select(q, pmin, pmax, pt, lens, budget_pages, page)
        npg = L // page
        ok_sel = []
        outq = quest_decode(q, kp, vp, pmin, pmax, pt, lens, budget_pages)
        exp = torch.empty(B, H, D, device="cuda")
        for b in range(min(B, 2)):
            pm = pmin[pt[b].long()]  # [h_kv, P, d]
            px = pmax[pt[b].long()]
            ub = page_upper_bounds(q[b], pm, px).view(HKV, g, npg).sum(1)
            ub[:, -1] = float("inf")
            pages_ref = ub.topk(budget_pages, dim=1).indices.sort(1).values
            slot_of = torch.empty(kp.shape[0], dtype=torch.long, device="cuda")
            slot_of[pt[b].long().flatten()] = torch.arange(npg, device="cuda").repeat(HKV)
            mine = slot_of[sel[b].long()].sort(1).values
            ok_sel.append(float((mine == pages_ref).float().mean()))
            for j in range(HKV):
                toks = (pages_ref[j][:, None] * page + torch.arange(page, device="cuda")).flatten()
                kk, vv = k[b, j, toks].float(), v[b, j, toks].float()
                s_ = q[b, j * g:(j + 1) * g].float() @ kk.T / math.sqrt(D)
                exp[b, j * g:(j + 1) * g] = torch.softmax(s_, -1) @ vv
        check(f"quest selected pages == reference B={B} L={L}", 1 - min(ok_sel), 1e-3)
        bb = min(B, 2)
        check(f"quest decode output B={B} L={L}", rel(outq[:bb], exp[:bb]), 1e-2)
        torch.cuda.empty_cache()


def snapkv_section(n):
    log(f"=== snapkv scoring n={n} ===")
    torch.manual_seed(7)
    q, k, v = qkv(n)
    from attention_backends.decode.window_scores import token_importance as ref_imp

    for red in ("sum_of_group_mean", "max"):
        mine = triton_token_importance(q, k, 256, red)
        ref = ref_imp(q, k, 256, red)
        check(f"snapkv token_importance {red} n={n}", rel(mine, ref), 1e-3)
    from attention_backends.kernels.snapkv_select import ada_snapkv_keep, snapkv_keep

    C = math.ceil(n / 20)
    ms = bench(lambda: snapkv_keep(q, k, capacity=C))
    record(f"snapkv prepare (scores+pool+keep) n={n}", ms)
    ms = bench(lambda: ada_snapkv_keep(q, k, capacity=C))
    record(f"ada_snapkv prepare (scores+pool+keep) n={n}", ms)
    torch.cuda.empty_cache()


def smoke_references():
    """End-to-end: the Triton path vs the reference modules through the public API at a small size."""
    from attention_backends import parse_pattern, prepare_decode, sparse_decode, sparse_prefill

    torch.manual_seed(3)
    n = 2048 + 37
    q, k, v = qkv(n)
    for pat, params in (("vertical_slash:8", {"num_vertical": 100, "num_slash": 120}),
                        ("flexprefill:8", {"alpha": 0.5, "min_budget": 64}),
                        ("block_sparse:8", {"block_size": 64}), ("block_sparse:8", {"block_size": 16})):
        spec = parse_pattern({"prefill": {"method": pat.split(":")[0], "compression_ratio": 8, "params": params,
                                          "fallback": "never"}})  # the kernels, not the dense-fallback rule
        o_ref, r_ref = sparse_prefill(q, k, v, spec)
        o_tri, r_tri = sparse_prefill(q, k, v, spec, impl="triton")
        check(f"api {pat} {params} triton vs reference n={n}", rel(o_tri, o_ref), 1e-2,
              cells_ref=r_ref.computed_cells, cells_triton=r_tri.computed_cells,
              attended=r_tri.details.get("attended_cells"))
    for pat in ("snapkv:8", "ada_snapkv:8", "quest:8", "dense"):
        spec = parse_pattern(pat)
        s_ref = prepare_decode(q, k, v, spec)
        s_tri = prepare_decode(q, k, v, spec, impl="triton")
        errs = []
        for _ in range(3):
            qt, kt, vt = rand(H, D), rand(HKV, D), rand(HKV, D)
            o1, rep1 = sparse_decode(qt, kt, vt, s_ref)
            o2, rep2 = sparse_decode(qt, kt, vt, s_tri)
            errs.append(rel(o2, o1))
        check(f"api decode {pat} triton vs reference n={n}", max(errs), 1e-2,
              read_ref=rep1.kv_tokens_read, read_triton=rep2.kv_tokens_read)


def b16_diagnostic():
    """Packed sub-block tiles (block 16 in 64-row tiles) under several launch configs vs the reference."""
    from attention_backends import parse_pattern, sparse_prefill
    from attention_backends.kernels import sparse_prefill as SP

    torch.manual_seed(5)
    n = 2085
    q, k, v = qkv(n)
    spec = parse_pattern({"prefill": {"method": "block_sparse", "compression_ratio": 8, "params": {"block_size": 16}}})
    o_ref, _ = sparse_prefill(q, k, v, spec)
    top_k = top_k_for_ratio(n, 16, 8.0)
    ids, cnt = M.block_sparse_index(q, k, 16, top_k)
    good = None
    for warps, stages in ((8, 3), (4, 3), (8, 1), (4, 1), (4, 2)):
        o = sparse_prefill_attention(q, k, v, blocks=(ids, cnt, 16), block_m=64, num_warps=warps, num_stages=stages)
        ok = check(f"block16 packed tiles warps={warps} stages={stages}", rel(o, o_ref), 1e-2)
        if ok and good is None:
            good = (warps, stages)
    for bm in (32, 16):
        o = sparse_prefill_attention(q, k, v, blocks=(ids, cnt, 16), block_m=bm, num_warps=4, num_stages=2)
        check(f"block16 packed tiles block_m={bm} warps=4 stages=2", rel(o, o_ref), 1e-2)
    if good is not None and good != (8, 3):
        SP.SUB_CONFIG = good
        RESULTS["notes"].append({"b16_config": good})
        log("using packed-tile config", good)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: prefill,decode,snapkv,api")
    ap.add_argument("--vs-only", action="store_true", help="prefill: vertical_slash and flexprefill only")
    ap.add_argument("--bs64-only", action="store_true", help="prefill: block_sparse at block 64 only")
    args = ap.parse_args()
    global VS_ONLY, BS64_ONLY
    VS_ONLY = args.vs_only
    BS64_ONLY = args.bs64_only
    os.makedirs(args.out, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    card = torch.cuda.get_device_name(0)
    RESULTS["env"] = {"card": card, "sms": props.multi_processor_count, "torch": torch.__version__,
                      "triton": triton.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds"),
                      "command": " ".join(sys.argv), "smoke": args.smoke}
    log("env", RESULTS["env"])
    skip = set(filter(None, args.skip.split(",")))
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.smoke:
        lengths = [4096 + 64 * 3 + 5]
    sections = []
    if "b16" not in skip:
        sections.append(("b16", b16_diagnostic))
    if "api" not in skip:
        sections.append(("api", smoke_references))
    if "prefill" not in skip:
        for n in lengths:
            flex = not args.no_flex and not args.smoke
            sections.append((f"prefill-{n}", lambda n=n, flex=flex: prefill_section(n, args.smoke, flex)))
    if "snapkv" not in skip:
        sections.append(("snapkv", lambda: snapkv_section(lengths[-1])))
    if "decode" not in skip:
        L = 4096 if args.smoke else 131072
        sections.append(("decode", lambda: decode_section(L, [1, 8], args.smoke)))
    for name, fn in sections:
        try:
            fn()
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            RESULTS["notes"].append({"section": name, "error": tb})
            log(f"SECTION {name} FAILED:\n{tb}")
        torch.cuda.empty_cache()
        dump(args.out, card)
    print_table()
    dump(args.out, card)


def dump(out, card):
    tag = card.replace(" ", "-").replace("/", "-")
    date = _dt.date.today().isoformat()
    suffix = "-smoke" if RESULTS["env"].get("smoke") else ("-vs" if VS_ONLY else "-bs64" if BS64_ONLY else "")
    with open(os.path.join(out, f"kernels-{tag}-{date}{suffix}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def print_table():
    print("\n==== checks ====")
    for c in RESULTS["checks"]:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']:70s} {c['rel_err']:.2e}")
    print("\n==== timings ====")
    for t in RESULTS["timings"]:
        ms = t["ms"]
        s = f"{t['case']:66s} {ms:10.4f} ms"
        if "speedup" in t:
            s += f"  {t['speedup']:6.2f}x vs {t['baseline_ms']:.4f} ms"
        for key in ("achieved_r", "tflops_computed", "tb_s"):
            if key in t:
                s += f"  {key}={t[key]:.3g}"
        print(s)
    failed = [n for n in RESULTS["notes"] if "error" in n]
    if failed:
        print(f"\n{len(failed)} section(s) failed")


if __name__ == "__main__":
    main()
