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
    counts = {k: torch.full((2, 4), 5, dtype=torch.int64) for k in ("ref", "fast")}  # added to, not overwritten
    ref = DecodeKernels(pool).select(q, tables, lengths, budgets, prompt_kept, 8, counts["ref"])
    fast = TritonDecodeKernels(pool).select(q, tables, lengths, budgets, prompt_kept, 8, counts["fast"])
    for row in range(4):
        for head in range(2):
            count = min(int(budgets[row]), -(-int(lengths[row, head]) // page))
            assert torch.equal(fast[0][row, head, :count], ref[0][row, head, :count].int()), (row, head)
    assert torch.equal(fast[1].long(), ref[1].long())  # tokens read
    assert torch.equal(fast[2].long(), ref[2].long())  # prompt tokens among them
    assert int(fast[1][1].sum()) == 0 and int(fast[1][0, 0]) == 2 * page + 37 - 9 * page  # 2 full pages + the last
    for name, (_, sel_len, prompt_read) in (("ref", ref), ("fast", fast)):  # each row's running counts
        assert torch.equal(counts[name], 5 + torch.stack([prompt_read.sum(-1), sel_len.sum(-1)]).long()), name


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


def test_greedy_steps_launched_ahead_give_the_same_tokens_and_costs():
    """A greedy batch's next step is launched from the device's argmax before the host reads the tokens
    (engine._complete): requests ending at different steps (max_tokens 5..13) leave rows of a step launched ahead
    that nobody reads; tokens, costs and the pool end as when every step waits for the previous one's tokens."""
    model = tiny_model()
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 96, (int(n),), generator=g).tolist() for n in (70, 41, 90, 55, 64)]

    def run_all(ahead: bool):
        engine = tiny_engine(model, max_num_seqs=5)
        launches = []
        launch = engine.runner.launch_decode

        def recorded(batch, *args, after=None, **kwargs):
            launches.append(after is not None)
            return launch(batch, *args, after=after, **kwargs)

        engine.runner.launch_decode = recorded
        if not ahead:
            engine._greedy = lambda batch: False

        async def body(e):
            reqs = [make_request(f"r{i}", p, PATTERNS[i % len(PATTERNS)], max_tokens=5 + 2 * i, ignore_eos=True)
                    for i, p in enumerate(prompts)]
            return await asyncio.gather(*(collect(e, r) for r in reqs))

        results = asyncio.run(with_engine(engine, body))
        assert engine.pool.free_pages == engine.pool.num_pages
        return results, launches

    waiting, plain = run_all(ahead=False)
    ahead, launches = run_all(ahead=True)
    assert not any(plain) and sum(launches) > len(launches) // 2  # most steps went ahead
    for a, b in zip(waiting, ahead, strict=True):
        assert a.token_ids == b.token_ids and a.final.finish_reason == b.final.finish_reason == "length"
        assert a.final.cost.decode.actual_units == b.final.cost.decode.actual_units
        assert a.final.cost.decode.kv_bytes_read == b.final.cost.decode.kv_bytes_read
        for field in ("model_flops", "dense_model_flops", "dense_kv_bytes_read", "dense_units", "kv_cache_tokens"):
            assert getattr(a.final.cost.decode, field) == getattr(b.final.cost.decode, field), field


def test_outputs_stream_every_token_once_in_order_while_steps_overlap():
    """Decode tokens are streamed while the next step runs (engine._publish): each output still carries the
    tokens accepted so far, nothing is lost or repeated, and a request that ends (length, stop string, abort)
    first streams what it generated."""
    model = tiny_model()
    engine = tiny_engine(model, max_num_seqs=4)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 96, (40,), generator=g).tolist() for _ in range(3)]

    async def body(e):
        async def stream(req, abort_after=None):
            outs = []
            async for out in e.generate(req):
                outs.append(out)
                if abort_after is not None and sum(len(o.token_ids) for o in outs) >= abort_after:
                    await e.abort(req.request_id)
                    abort_after = None
            return outs

        plain = make_request("plain", prompts[0], max_tokens=25, ignore_eos=True)
        free = await collect(e, make_request("probe", prompts[1], max_tokens=25, ignore_eos=True))
        stop = make_request("stop", prompts[1], max_tokens=25, ignore_eos=True, stop=[free.text[8:10]])
        aborted = make_request("aborted", prompts[2], max_tokens=200, ignore_eos=True)
        return free, await asyncio.gather(stream(plain), stream(stop), stream(aborted, abort_after=6))

    free, (plain, stop, aborted) = asyncio.run(with_engine(engine, body))
    for outs in (plain, stop, aborted):
        counted = 0
        for out in outs:
            counted += len(out.token_ids)
            assert out.completion_tokens == counted
        assert outs[-1].finished and sum(1 for o in outs if o.finished) == 1
    assert sum(len(o.token_ids) for o in plain) == 25 and plain[-1].finish_reason == "length"
    stop_text = free.text[8:10]
    assert stop[-1].finish_reason == "stop" and "".join(o.text for o in stop) == free.text[: free.text.find(stop_text)]
    assert aborted[-1].finish_reason == "abort" and 6 <= aborted[-1].completion_tokens < 200


def test_a_request_that_ends_streams_its_accepted_tokens_first():
    """The deterministic half of the above: a token accepted but not streamed yet (the next step is running)
    goes out before the request's final output, whatever ends it."""
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.request_state import EngineRequest
    from server.engine.sampler import SamplerState

    engine = tiny_engine(tiny_model())
    for reason in ("abort", "error"):
        outs = []
        req = EngineRequest(make_request(reason, [1, 2, 3], max_tokens=10, ignore_eos=True), outs.append,
                            SamplerState(), IncrementalDetokenizer(engine.tokenizer))
        engine._requests[req.request_id] = req
        with engine._lock:
            engine._on_token(req, 40, None)  # the first token streams at once
            engine._on_token(req, 41, None, defer=True)
            assert len(outs) == 1
            engine._finish(req, reason)
        assert [o.token_ids for o in outs] == [[40], [41], []]
        assert [o.completion_tokens for o in outs] == [1, 2, 2] and outs[-1].finish_reason == reason
