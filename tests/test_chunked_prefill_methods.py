"""Prefill methods on a chunk (``sparse_prefill(..., q_offset=c0)``): queries ``[c0, n)`` against keys ``[0, n)``.

References against the definitions (``docs/methods.md``, "Chunked prefill"), the Triton path against the
references (interpreter on the CPU, float32 and float16, outputs pre-filled with NaN where the kernel takes
``out``), and one chunk (``c0 = 0``) against the whole prompt.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_kernels import DEV, assert_close, nan_like, qkv  # noqa: E402
from test_prefill_methods import naive_attention, structured_qkv, vertical_slash_mask  # noqa: E402

from attention_backends import parse_pattern, sparse_prefill  # noqa: E402
from attention_backends.cost import causal_cells  # noqa: E402
from attention_backends.kernels.index_vertical_slash import block_scores, computed_cells  # noqa: E402
from attention_backends.kernels.methods import block_sparse_index  # noqa: E402
from attention_backends.kernels.sparse_prefill import (  # noqa: E402
    count_cells,
    slash_chunks,
    sparse_prefill_attention,
    vertical_columns,
)
from attention_backends.kernels.topk import causal_block_topk  # noqa: E402
from attention_backends.prefill import block_sparse, flexprefill, vertical_slash  # noqa: E402
from attention_backends.prefill.common import masked_causal_attention  # noqa: E402

CASES = [
    ("dense", {}),
    ("vertical_slash", {"num_vertical": 6, "num_slash": 14, "window": 32, "local_window": 8}),
    ("flexprefill", {"alpha": 0.5, "min_budget": 6, "window": 32, "local_window": 8}),
    ("block_sparse", {"block_size": 64}),
    ("block_sparse", {"block_size": 16}),
]


def spec(method: str, ratio: float = 3.0, **params):
    return parse_pattern({"prefill": {"method": method, "compression_ratio": ratio, "params": params}})


def chunks(n: int, size: int):
    return [(c0, min(n, c0 + size)) for c0 in range(0, n, size)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("method", "params"), CASES)
def test_triton_chunk_matches_reference_chunk(method, params, dtype):
    q, k, v = qkv(4, 2, 250, 16, dtype, seed=40)
    s = spec(method, **params)
    for c0 in (128, 192 if method != "block_sparse" or params["block_size"] == 16 else 128):
        out_ref, rep_ref = sparse_prefill(q[:, c0:], k, v, s, q_offset=c0)
        out, rep = sparse_prefill(q[:, c0:], k, v, s, q_offset=c0, impl="triton")
        assert out.shape == (4, 250 - c0, 16)
        assert_close(out, out_ref, dtype)
        assert rep.details.get("attended_cells", rep.computed_cells) == rep_ref.computed_cells
        assert rep.dense_cells == rep_ref.dense_cells == 4 * causal_cells(250, c0)


def test_reference_chunk_attends_its_index_over_all_keys():
    """vertical_slash / flexprefill: the index comes from the chunk's last queries against keys [0, n), and the
    chunk's rows attend exactly its union (the naive full mask, rows [c0, n))."""
    q, k, v = structured_qkv(4, 2, 300, 16, seed=41)
    c0 = 180
    for module, phase in ((vertical_slash, spec("vertical_slash", 4, window=24).prefill),
                          (flexprefill, spec("flexprefill", 4, window=24).prefill)):
        built = module.build_index(q[:, c0:], k, phase, c0)
        index = getattr(built, "index", built)
        mask = vertical_slash_mask(index, 300)
        expect = naive_attention(q, k, v, mask | torch.eye(300, dtype=torch.bool))[:, c0:]
        out = module.prefill(q[:, c0:], k, v, phase, q_offset=c0)
        torch.testing.assert_close(out.out, expect, rtol=1e-4, atol=1e-5)
        causal_rows = torch.ones(300, 300, dtype=torch.bool).tril()[c0:]
        assert out.computed_cells == int(((mask[:, c0:] & causal_rows) | torch.eye(300, dtype=torch.bool)[c0:]).sum())
        assert out.computed_cells == int(index.covered_cells().sum())


def test_block_sparse_with_a_fixed_top_k_is_the_same_in_chunks():
    """A query block's kept blocks depend only on its own pooled queries and the keys before it, so with top_k
    given, chunks aligned to blocks give the whole prompt's attention; the ratio mapping is per chunk."""
    q, k, v = structured_qkv(4, 2, 400, 16, seed=42)
    s = spec("block_sparse", 3, block_size=32, top_k=4)
    whole, rep = sparse_prefill(q, k, v, s)
    parts = [sparse_prefill(q[:, c0:c1], k[:, :c1], v[:, :c1], s, q_offset=c0) for c0, c1 in chunks(400, 128)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), whole, rtol=1e-5, atol=1e-6)
    assert sum(p[1].computed_cells for p in parts) == rep.computed_cells
    assert sum(p[1].dense_cells for p in parts) == rep.dense_cells
    with pytest.raises(ValueError, match="multiples of the block size"):
        sparse_prefill(q[:, 100:], k, v, s, q_offset=100)


@pytest.mark.parametrize("pattern", ["vertical_slash:4", "flexprefill:4", "block_sparse:4"])
def test_each_chunk_follows_the_target_ratio_over_its_own_cells(pattern):
    q, k, v = structured_qkv(4, 2, 768, 16, seed=43)
    s = parse_pattern(pattern)
    for c0, c1 in chunks(768, 256)[1:]:
        _, rep = sparse_prefill(q[:, c0:c1], k[:, :c1], v[:, :c1], s, q_offset=c0)
        assert rep.dense_cells == 4 * causal_cells(c1, c0)
        assert 2.5 < rep.achieved_compression_ratio < 6, (c0, rep.achieved_compression_ratio)


@pytest.mark.parametrize("pattern", ["dense", "vertical_slash:3", "flexprefill:3", "block_sparse:3"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_one_chunk_is_the_whole_prefill(pattern, impl):
    """c0 = 0, c1 = n: exactly the whole prompt's output and report."""
    q, k, v = qkv(4, 2, 200, 16, torch.float32, seed=44)
    s = parse_pattern(pattern)
    whole, rep = sparse_prefill(q, k, v, s, impl=impl)
    one, rep1 = sparse_prefill(q, k, v, s, impl=impl, q_offset=0)
    assert torch.equal(one, whole) and rep1 == rep


def test_dense_chunks_give_the_whole_attention():
    q, k, v = qkv(4, 2, 300, 16, torch.float32, seed=45)
    whole, _ = masked_causal_attention(q, k, v)
    for impl in ("reference", "triton"):
        parts = [sparse_prefill(q[:, c0:c1], k[:, :c1], v[:, :c1], parse_pattern("dense"), impl=impl, q_offset=c0)[0]
                 for c0, c1 in chunks(300, 64)]
        torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_writes_every_row_of_a_chunk(dtype):
    """Block lists of the chunk's query blocks (absolute ids) into an output pre-filled with NaN."""
    q, k, v = qkv(4, 2, 200, 16, dtype, seed=46)
    c0, block = 64, 32
    ids, cnt = block_sparse_index(q[:, c0:], k, block, 3, c0)
    out = nan_like(q[:, c0:].contiguous())
    sparse_prefill_attention(q[:, c0:].contiguous(), k, v, blocks=(ids, cnt, block), block_m=block, out=out,
                             q_offset=c0)
    keep = block_sparse.select_blocks(q[:, c0:].float(), k.float(), block, 3, c0)
    ref, _ = masked_causal_attention(q[:, c0:].float(), k.float(), v.float(),
                                     block_sparse.block_row_mask(keep, 200, block, c0), c0)
    assert_close(out, ref, dtype)


def test_block_index_of_a_chunk_is_the_whole_prompts_rows():
    q, k, _ = qkv(4, 2, 170, 16, torch.float32, seed=47)
    c0, block = 64, 16
    full, part = block_scores(q, k, block), block_scores(q[:, c0:].contiguous(), k, block, c0)
    causal = torch.ones(full.shape[1:], dtype=torch.bool).tril()[c0 // block:]
    torch.testing.assert_close(part.masked_fill(~causal, 0), full[:, c0 // block:].masked_fill(~causal, 0))
    ids, cnt = causal_block_topk(full.contiguous(), 4)
    ids_c, cnt_c = causal_block_topk(part.contiguous(), 4, row0=c0 // block)
    assert torch.equal(ids_c, ids[:, c0 // block:]) and torch.equal(cnt_c, cnt[:, c0 // block:])


def test_computed_cells_of_a_chunk_equal_the_kernel_count_of_its_blocks():
    g = torch.Generator().manual_seed(48)
    h, n, bm = 3, 300, 64
    sel_s = torch.rand(h, n, generator=g) < 0.06
    sel_s[:, 0] = True
    sel_v = torch.rand(h, n, generator=g) < 0.06
    pos = torch.arange(n).expand(h, n)
    big = torch.full((h, n), 1 << 30)
    rel, width, count, cover = slash_chunks(torch.where(sel_s, pos, big), None, n, bm, bm)
    cols, ccnt = vertical_columns(torch.where(sel_v, pos, big), None, n, bm)
    per_block = count_cells(n, h, rel=(rel, width, count), cols=(cols, ccnt, cover), block_m=bm, device=DEV)
    for c0 in (64, 128, 256):
        assert torch.equal(per_block[:, c0 // bm:].sum(-1), computed_cells(sel_s, sel_v, bm, q_offset=c0))
        live = torch.ones(h, 40, dtype=torch.bool)
        vpos = torch.sort(torch.randperm(n, generator=g)[:40]).values.expand(h, 40)
        sel_pos = torch.zeros(h, n, dtype=torch.bool).scatter_(1, vpos, True)
        by_positions = computed_cells(sel_s, None, bm, vpos, live, c0)
        assert torch.equal(by_positions, computed_cells(sel_s, sel_pos, bm, q_offset=c0))
