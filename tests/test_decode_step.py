"""The decode step (server/engine/decode_step.py): the Triton Quest selection with a budget per row against the
PyTorch one, and the bucketed step (static buffers, padding rows: what CUDA graphs replay) against the exact one.

The Triton kernels run under TRITON_INTERPRET=1 on the CPU (float32). CUDA-graph replay itself needs a GPU:
tests/gpu/test_native_engine_cuda.py compares it with eager steps.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio  # noqa: E402

import torch  # noqa: E402

from server.engine.decode_step import DecodeKernels, DecodeStepper, TritonDecodeKernels  # noqa: E402
from server.engine.page_pool import PagePool  # noqa: E402
from tests.engine_helpers import collect, make_request, tiny_engine, tiny_model, with_engine  # noqa: E402


def _pool_with_tables(lengths: torch.Tensor, page: int, d: int, seed: int) -> tuple[PagePool, torch.Tensor]:
    """A pool of random keys/values with page min/max, and shuffled page tables ``[B, h_kv, P]`` holding
    ``lengths [B, h_kv]`` tokens."""
    b, h_kv = lengths.shape
    pages = -(-int(lengths.max()) // page)
    g = torch.Generator().manual_seed(seed)
    pool = PagePool(b * h_kv * pages + 3, page, d, torch.float32, "cpu")
    pool.keys.copy_(torch.randn(pool.keys.shape, generator=g))
    pool.values.copy_(torch.randn(pool.values.shape, generator=g))
    pool.key_min.copy_(pool.keys.amin(1))
    pool.key_max.copy_(pool.keys.amax(1))
    tables = torch.randperm(pool.num_pages, generator=g)[: b * h_kv * pages].view(b, h_kv, pages).int()
    return pool, tables


def test_triton_quest_selection_takes_a_budget_per_row():
    page, d, h = 4, 16, 8
    lengths = torch.tensor([[37, 37], [21, 9], [40, 33], [5, 5]], dtype=torch.int32)  # Ada-like: heads differ
    budgets = torch.tensor([3, 0, 6, 1], dtype=torch.int32)  # row 1 is not Quest's: it selects nothing
    prompt_kept = torch.tensor([[30, 30], [20, 8], [17, 29], [5, 5]], dtype=torch.int32)
    pool, tables = _pool_with_tables(lengths, page, d, seed=3)
    q = torch.randn(4, h, d, generator=torch.Generator().manual_seed(4))
    ref = DecodeKernels(pool).select(q, tables, lengths, budgets, prompt_kept, 8)
    fast = TritonDecodeKernels(pool).select(q, tables, lengths, budgets, prompt_kept, 8)
    for row in range(4):
        for head in range(2):
            count = min(int(budgets[row]), -(-int(lengths[row, head]) // page))
            assert torch.equal(fast[0][row, head, :count], ref[0][row, head, :count].int()), (row, head)
    assert torch.equal(fast[1].long(), ref[1].long())  # tokens read
    assert torch.equal(fast[2].long(), ref[2].long())  # prompt tokens among them
    assert int(fast[1][1].sum()) == 0 and int(fast[1][0, 0]) == 2 * page + 37 - 9 * page  # 2 full pages + the last


def test_triton_attention_over_a_whole_table_matches_the_reference():
    page, d, h = 4, 16, 8
    lengths = torch.tensor([[37, 12], [1, 9], [0, 0]], dtype=torch.int32)  # a row of 0 tokens writes zeros
    pool, tables = _pool_with_tables(lengths, page, d, seed=5)
    q = torch.randn(3, h, d, generator=torch.Generator().manual_seed(6))
    ref = DecodeKernels(pool).attend(q, tables, lengths)
    fast = TritonDecodeKernels(pool).attend(q, tables, lengths)
    assert torch.allclose(fast[:2], ref[:2], rtol=1e-4, atol=1e-5)
    assert torch.equal(fast[2], torch.zeros_like(fast[2]))


PATTERNS = ("dense", "quest:2", "snapkv:2", "ada_snapkv:2", "quest:4")


def _generate_all(engine, prompts: list[list[int]]) -> list:
    async def body(e):
        reqs = [make_request(f"r{i}", p, PATTERNS[i % len(PATTERNS)], max_tokens=12) for i, p in enumerate(prompts)]
        return await asyncio.gather(*(collect(e, r) for r in reqs))

    return asyncio.run(with_engine(engine, body))


def test_bucketed_steps_give_the_exact_steps_tokens_and_costs():
    """The static-buffer step CUDA graphs capture (a batch padded to its bucket, tables copied only when they
    change) against the exact step, on a batch mixing every decode method: same tokens, same decode costs, and
    every page comes back (the padding rows' scratch page aside)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 96, (int(n),), generator=g).tolist() for n in (70, 41, 90, 55, 64)]
    exact = _generate_all(tiny_engine(model, max_num_seqs=5), prompts)
    engine = tiny_engine(model, max_num_seqs=5)
    runner = engine.runner
    runner.stepper = DecodeStepper(model, engine.pool, runner.shape.num_layers, runner.shape.num_kv_heads,
                                   use_triton=False, buckets=(2, 8), max_pages=16)
    bucketed = _generate_all(engine, prompts)
    for a, b in zip(exact, bucketed, strict=True):
        assert a.token_ids == b.token_ids and len(a.token_ids) == 12
        assert a.final.cost.decode.actual_units == b.final.cost.decode.actual_units
        assert a.final.cost.decode.kv_bytes_read == b.final.cost.decode.kv_bytes_read
    assert bucketed[1].final.cost.decode.achieved_compression_ratio > 1.5  # Quest really selected
    assert engine.pool.free_pages == engine.pool.num_pages - 1  # the scratch page is the stepper's for good
