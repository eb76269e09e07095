"""The sparse prefill references: vertical_slash, flexprefill, block_sparse (``docs/methods.md``)."""

from __future__ import annotations

import math

import pytest
import torch

from attention_backends.api import sparse_prefill
from attention_backends.prefill import block_sparse, flexprefill, vertical_slash
from attention_backends.prefill.vertical_slash_index import covered_cells, estimate_scores
from attention_backends.spec import InvalidSparsePattern, SparseSpec, parse_pattern

SPARSE_PREFILL = ("vertical_slash", "flexprefill", "block_sparse")


def structured_qkv(h: int, h_kv: int, n: int, d: int, seed: int = 0):
    """Random q/k/v with some structure: a few keys every query leans towards, and a local bias."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(h, n, d, generator=gen)
    k = torch.randn(h_kv, n, d, generator=gen)
    v = torch.randn(h_kv, n, d, generator=gen)
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    q += 1.5 * u
    k[:, ::97] += 3.0 * u  # heavy columns
    k += 0.5 * torch.roll(q[:: h // h_kv], shifts=1, dims=1)  # key j resembles query j + 1: local attention
    return q, k, v


def spec(method: str, ratio: float, **params) -> SparseSpec:
    return parse_pattern({"prefill": {"method": method, "compression_ratio": ratio, "params": params}})


def naive_attention(q, k, v, allowed):
    """Per-head loop with an explicit [h, n, n] mask (small n only); query head i uses KV head i // g."""
    h, n, d = q.shape
    g = h // k.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    out = torch.empty_like(q)
    for i in range(h):
        s = (q[i] @ k[i // g].T) / math.sqrt(d)
        s = s.masked_fill(~(allowed[i] & causal), float("-inf"))
        out[i] = torch.softmax(s, -1) @ v[i // g]
    return out


def vertical_slash_mask(index, n):
    """The index as an explicit [h, n, n] mask, built from its column and offset sets."""
    rows = torch.arange(n)[:, None]
    cols = torch.arange(n)[None, :]
    return torch.stack([
        torch.isin(cols.expand(n, n), index.verticals(i)) | torch.isin(rows - cols, index.slashes(i))
        for i in range(index.vertical.shape[0])
    ])


# ---------------------------------------------------------------------------------------------- ratio 1


@pytest.mark.parametrize("method", SPARSE_PREFILL)
@pytest.mark.parametrize("h,h_kv", [(4, 2), (7, 1)])
def test_ratio_one_is_dense(method, h, h_kv):
    q, k, v = structured_qkv(h, h_kv, 300, 32)
    dense_out, dense_report = sparse_prefill(q, k, v, parse_pattern("dense"))
    out, report = sparse_prefill(q, k, v, spec(method, 1.0))
    assert (out - dense_out).abs().max().item() < 1e-5
    assert report.computed_cells == dense_report.computed_cells
    assert report.achieved_compression_ratio == 1.0


def test_plain_flexprefill_runs_its_default_alpha_and_ratio_one_runs_dense():
    q, k, v = structured_qkv(4, 2, 1024, 32)
    _, native = sparse_prefill(q, k, v, parse_pattern("flexprefill"))  # named alone: alpha 0.9, floor 512
    assert native.details["alpha"] == 0.9 and native.details["min_budget"] == 512
    assert native.achieved_compression_ratio > 1.0
    _, dense = sparse_prefill(q, k, v, parse_pattern("flexprefill:1"))  # an explicit ratio 1 is dense
    assert dense.achieved_compression_ratio == 1.0 and dense.details["alpha"] is None


def test_flexprefill_explicit_alpha_runs_natively_at_ratio_one():
    q, k, v = structured_qkv(4, 2, 1024, 32)
    _, report = sparse_prefill(q, k, v, spec("flexprefill", 1.0, alpha=0.5, min_budget=16))
    assert report.details["alpha"] == 0.5 and report.details["min_budget"] == 16
    assert report.achieved_compression_ratio > 1.0


# ------------------------------------------------------------------------------------ achieved ratios


@pytest.fixture(scope="module")
def long_inputs():
    return structured_qkv(8, 2, 4096, 64, seed=1)


@pytest.mark.parametrize("method", ["vertical_slash", "block_sparse"])
@pytest.mark.parametrize("ratio", [2, 5, 10, 20])
def test_achieved_ratio_tracks_target(long_inputs, method, ratio):
    q, k, v = long_inputs
    _, report = sparse_prefill(q, k, v, spec(method, ratio))
    achieved = report.achieved_compression_ratio
    assert abs(achieved - ratio) / ratio < 0.15, (method, ratio, achieved, report.details)


def test_flexprefill_ratio_moves_with_target(long_inputs):
    q, k, v = long_inputs
    n = q.shape[1]
    dense = q.shape[0] * n * (n + 1) // 2
    achieved = {}
    for ratio in (2, 5, 20):  # from the index alone (its covered cells are what the attention computes)
        budget = flexprefill.build_index(q, k, spec("flexprefill", ratio).prefill)
        achieved[ratio] = dense / int(budget.index.covered_cells().sum())
    _, report = sparse_prefill(q, k, v, spec("flexprefill", 10))
    achieved[10] = report.achieved_compression_ratio
    ordered = [achieved[r] for r in (2, 5, 10, 20)]
    assert ordered == sorted(ordered) and achieved[10] > 1.0
    for ratio, value in achieved.items():
        assert abs(value - ratio) / ratio < 0.3, achieved


# --------------------------------------------------------------------------------------------- needle


@pytest.fixture(scope="module")
def needle():
    """A run of 32 keys (at 1600..1631) that the last 64 queries attend to almost exclusively."""
    h, h_kv, n, d = 2, 1, 4096, 64
    q, k, v = structured_qkv(h, h_kv, n, d, seed=2)
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(d, generator=gen)
    u = 10.0 * u / u.norm()
    start, length, seekers = 1600, 32, 64
    k[:, start:start + length] = u + 0.3 * torch.randn(h_kv, length, d, generator=gen)
    v[:, start:start + length] += 2.0
    q[:, n - seekers:] = u + 0.3 * torch.randn(h, seekers, d, generator=gen)
    dense_out, _ = sparse_prefill(q, k, v, parse_pattern("dense"))
    return q, k, v, range(start, start + length), dense_out


def test_needle_holds_the_attention_mass(needle):
    q, k, v, keys, dense_out = needle
    h, n, d = q.shape
    g = h // k.shape[0]
    for i in range(h):
        p = torch.softmax(q[i, -64:] @ k[i // g].T / math.sqrt(d), -1)  # last queries see every key
        assert p[:, keys.start:keys.stop].sum(-1).min() > 0.95


@pytest.mark.parametrize("method", SPARSE_PREFILL)
def test_needle_is_kept_at_ratio_20(needle, method):
    q, k, v, keys, dense_out = needle
    h, n, _ = q.shape
    phase = spec(method, 20).prefill
    if method == "block_sparse":
        block, top_k = block_sparse.resolve_top_k(n, phase)
        kept = block_sparse.select_blocks(q, k, block, top_k)[:, -1]  # last query block
        assert kept[:, keys.start // block:(keys.stop - 1) // block + 1].all()
    else:
        index = vertical_slash.build_index(q, k, phase) if method == "vertical_slash" else \
            flexprefill.build_index(q, k, phase).index
        assert index.vertical[:, keys.start:keys.stop].all()
    out, report = sparse_prefill(q, k, v, spec(method, 20))
    err = (out[:, -1] - dense_out[:, -1]).norm(dim=-1) / dense_out[:, -1].norm(dim=-1)
    assert err.max().item() < 0.05
    assert report.achieved_compression_ratio > 15


# ------------------------------------------------------------------------------------- forced entries


@pytest.mark.parametrize("method", ["vertical_slash", "flexprefill"])
def test_sinks_and_local_window_always_kept(needle, method):
    q, k, _, _, _ = needle
    for ratio, params in ((20, {}), (200, {"sink_tokens": 9, "local_window": 100})):
        phase = spec(method, ratio, **params).prefill
        index = vertical_slash.build_index(q, k, phase) if method == "vertical_slash" else \
            flexprefill.build_index(q, k, phase).index
        sinks = params.get("sink_tokens", 4)
        local = params.get("local_window", 64)
        assert index.vertical[:, :sinks].all() and index.slash[:, :local].all()
        # forced entries count towards the budget: at r = 200 nothing but them is kept
        if ratio == 200:
            assert (index.num_vertical == sinks).all() and (index.num_slash == local).all()


@pytest.mark.parametrize("block", [16, 32])
def test_block_sparse_keeps_sink_diagonal_and_previous_blocks(block):
    q, k, _ = structured_qkv(4, 2, 1000, 16)
    keep = block_sparse.select_blocks(q, k, block, top_k=3)
    nb = keep.shape[-1]
    rows = torch.arange(nb)
    assert keep[:, :, 0].all() and keep[:, rows, rows].all() and keep[:, rows[1:], rows[1:] - 1].all()
    assert (keep.sum(-1) == rows.clamp(max=2) + 1).all()  # exactly those three when k = 3
    assert not keep.triu(1).any()  # causal at block level


# ----------------------------------------------------------------------------------------- parameters


def test_invalid_block_size_names_the_field():
    with pytest.raises(InvalidSparsePattern) as err:
        parse_pattern({"prefill": {"method": "block_sparse", "params": {"block_size": 17}}})
    assert "block_size" in err.value.param


def test_explicit_budgets_are_used():
    q, k, v = structured_qkv(4, 2, 512, 32)
    _, report = sparse_prefill(q, k, v, spec("vertical_slash", 1.0, num_vertical=40, num_slash=70))
    assert report.details == {"num_vertical": 40, "num_slash": 70}
    _, report = sparse_prefill(q, k, v, spec("block_sparse", 1.0, block_size=32, top_k=5))
    assert report.details == {"block_size": 32, "top_k": 5}
    assert report.computed_cells == 4 * block_sparse.kept_cells(512, 32, 5)


def test_flexprefill_cover():
    cover = flexprefill.Coverage(torch.tensor([[0.2, 0.5, 0.3, 0.0]]), window=1, forced=0)
    assert [int(cover.cover(a)) for a in (0.0, 0.5, 0.8, 0.81, 1.0)] == [0, 1, 2, 3, 3]
    forced = flexprefill.Coverage(torch.tensor([[0.2, 0.5, 0.3, 0.0]]), window=1, forced=1)
    assert [int(forced.count(a)) for a in (0.0, 0.5, 0.8, 1.0)] == [1, 2, 3, 3]  # position 0 always kept


# --------------------------------------------------------------------------- exactness of the indexes


@pytest.mark.parametrize("h,h_kv", [(2, 2), (8, 2), (7, 1)])
def test_vertical_slash_matches_explicit_mask(h, h_kv):
    n, d = 193, 16
    q, k, v = structured_qkv(h, h_kv, n, d, seed=4)
    for method in ("vertical_slash", "flexprefill"):
        phase = spec(method, 3.0, window=64, local_window=8).prefill
        index = vertical_slash.build_index(q, k, phase) if method == "vertical_slash" else \
            flexprefill.build_index(q, k, phase).index
        allowed = vertical_slash_mask(index, n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        assert int((allowed & causal).sum()) == int(index.covered_cells().sum())
        out, report = sparse_prefill(q, k, v, SparseSpec(prefill=phase))
        assert report.computed_cells == int((allowed & causal).sum())
        assert (out - naive_attention(q, k, v, allowed)).abs().max().item() < 1e-5


@pytest.mark.parametrize("h,h_kv", [(2, 2), (8, 2), (7, 1)])
def test_block_sparse_matches_explicit_mask(h, h_kv):
    n, d, block = 203, 16, 16  # partial last block
    q, k, v = structured_qkv(h, h_kv, n, d, seed=5)
    phase = spec("block_sparse", 1.6).prefill
    _, top_k = block_sparse.resolve_top_k(n, phase)
    keep = block_sparse.select_blocks(q, k, block, top_k)
    blocks = torch.arange(n) // block
    allowed = keep[:, blocks][:, :, blocks]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    out, report = sparse_prefill(q, k, v, SparseSpec(prefill=phase))
    assert report.computed_cells == int((allowed & causal).sum()) == h * block_sparse.kept_cells(n, block, top_k)
    assert (out - naive_attention(q, k, v, allowed)).abs().max().item() < 1e-5
    # the block scores use each query head's own KV head: the last query block of the last head keeps the
    # unforced blocks with the highest pooled scores
    g = h // h_kv
    pooled_q, pooled_k = block_sparse.mean_pool(q, block), block_sparse.mean_pool(k, block)
    assert torch.allclose(pooled_q[-1, -1], q[-1, 12 * block:].mean(0))  # partial block: mean of real tokens
    scores = pooled_q[h - 1, -1] @ pooled_k[(h - 1) // g].T
    nb = scores.shape[0]
    unforced = torch.ones(nb, dtype=torch.bool)
    unforced[[0, nb - 2, nb - 1]] = False
    kept = keep[h - 1, -1]
    assert int(kept.sum()) == top_k
    assert scores[kept & unforced].min() >= scores[~kept & unforced].max()


@pytest.mark.parametrize("h,h_kv", [(4, 4), (8, 2), (7, 1)])
def test_estimate_scores_per_query_head(h, h_kv):
    n, d, w = 150, 16, 40
    q, k, _ = structured_qkv(h, h_kv, n, d, seed=6)
    scores = estimate_scores(q, k, w)
    g = h // h_kv
    rows, cols = torch.arange(n - w, n)[:, None], torch.arange(n)[None, :]
    for i in range(h):
        p = torch.softmax((q[i, -w:] @ k[i // g].T / math.sqrt(d)).masked_fill(cols > rows, float("-inf")), -1)
        assert torch.allclose(scores.vertical[i], p.sum(0), atol=1e-5)
        slash = torch.zeros(n).index_add_(0, (rows - cols).clamp(min=0).flatten(), p.flatten())
        assert torch.allclose(scores.slash[i], slash, atol=1e-5)
    assert torch.allclose(scores.vertical.sum(-1), torch.full((h,), float(w)), atol=1e-3)


def test_covered_cells_counts_union_once():
    n = 50
    gen = torch.Generator().manual_seed(7)
    vertical = torch.rand(3, n, generator=gen) < 0.2
    slash = torch.rand(3, n, generator=gen) < 0.2
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal = cols <= rows
    for i in range(3):
        explicit = (vertical[i][None, :].expand(n, n) | slash[i][(rows - cols).clamp(min=0)]) & causal
        assert int(covered_cells(vertical, slash)[i]) == int(explicit.sum())


def test_output_dtype_follows_q():
    q, k, v = structured_qkv(4, 2, 128, 16)
    for method in SPARSE_PREFILL:
        out, _ = sparse_prefill(q.half(), k.half(), v.half(), spec(method, 4.0))
        assert out.dtype == torch.float16 and out.shape == q.shape


def test_flexprefill_alpha_searches_hit_the_target():
    """The reference's bisection and the fast path's grid rounds find the same alpha, the grid in few host syncs
    and stopping at once when the floor budget alone is within 1% of the target."""
    from attention_backends.kernels.methods import grid_search_alpha

    calls: list[int] = []

    def fraction(a: float) -> float:  # covered fraction grows with alpha, from 0.05 to 0.6
        return 0.05 + 0.55 * a

    def fractions(alphas: list[float]) -> list[float]:
        calls.append(len(alphas))
        return [fraction(a) for a in alphas]

    alpha = flexprefill.search_alpha(fraction, 5.0, steps=30)  # target 0.2 -> alpha 0.2727...
    assert abs(fraction(alpha) - 0.2) < 1e-6
    grid_alpha = grid_search_alpha(fractions, 5.0)
    assert abs(fraction(grid_alpha) - 0.2) <= 0.01 * 0.2 and len(calls) <= 2
    calls.clear()
    assert grid_search_alpha(fractions, 1 / 0.0504) == 0.0  # within 1% at alpha 0: one round
    assert len(calls) == 1
    assert flexprefill.search_alpha(fraction, 1 / 0.0504, steps=30) > 0.0  # the reference searches on


def test_flexprefill_coverage_counts_many_alphas_at_once():
    g = torch.Generator().manual_seed(3)
    cov = flexprefill.Coverage(torch.rand(3, 50, generator=g), window=4, forced=2)
    alphas = [0.0, 0.1, 0.5, 0.93, 1.0]
    many = cov.count(torch.tensor(alphas))
    assert torch.equal(many, torch.stack([cov.count(a) for a in alphas]))
    assert torch.equal(cov.cover(torch.tensor(alphas)).T, torch.stack([cov.cover(a) for a in alphas]))
