"""Chunked prefill in the native engine (``--max-prefill-chunk``): long prompts prefill in chunks between the
decode steps of the running requests, and give what a whole prefill gives."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from engine_helpers import collect, make_request, tiny_engine, tiny_model, with_engine
from test_engine import long_prompt_ids, new_engine

from server.engine.engine import EngineOptions


@pytest.fixture(scope="module")
def loaded():
    from server.engine.model_loader import load_model

    return load_model(None, "cpu", torch.float32)


@pytest.fixture(scope="module")
def model():
    return tiny_model(max_position_embeddings=2048)


def record_calls(engine) -> list[tuple]:
    """Wrap the runner: ``("prefill", request id, chunk start, chunk end)`` and ``("decode", request ids)`` in the
    order the engine runs them."""
    calls: list[tuple] = []
    runner = engine.runner
    prefill, decode = runner.prefill, runner.launch_decode

    def prefill_chunk(req, end=None):
        calls.append(("prefill", req.request_id, req.prefill_pos, end))
        return prefill(req, end)

    def decode_step(batch, *args, **kwargs):
        calls.append(("decode", [r.request_id for r in batch]))
        return decode(batch, *args, **kwargs)

    runner.prefill, runner.launch_decode = prefill_chunk, decode_step
    return calls


def chunk_starts(calls, rid: str) -> list[int]:
    return [c[2] for c in calls if c[0] == "prefill" and c[1] == rid]


async def while_decoding(engine, body):
    """Run ``await body(engine)`` while another request decodes (a dense prefill with nothing decoding runs
    whole), then abort that one."""
    background = engine.generate(make_request("bg", [9, 8, 7], max_tokens=1000, ignore_eos=True))
    await background.__anext__()
    try:
        return await body(engine)
    finally:
        await engine.abort("bg")
        async for _ in background:
            pass


@pytest.mark.parametrize("pattern", ["dense", "snapkv:2"])
def test_chunked_prefill_gives_the_whole_prefills_tokens_on_smollm2(loaded, pattern):
    """Greedy tokens, prompt logprobs and cost equal; with SnapKV the eviction after the last chunk keeps what
    the whole prefill keeps (same keys, same observation window)."""
    _, tok = loaded
    ids = long_prompt_ids(tok, 600)

    def run(chunk: int):
        engine = new_engine(loaded, max_prefill_chunk=chunk)
        calls = record_calls(engine)
        request = make_request("r", ids, pattern, max_tokens=12, prompt_logprobs=1)
        body = lambda e: while_decoding(e, lambda e: collect(e, request))  # noqa: E731
        return asyncio.run(with_engine(engine, body)), calls

    (whole, whole_calls), (chunked, calls) = run(0), run(128)
    assert chunk_starts(whole_calls, "r") == [0]
    # SnapKV's observation window (256 queries) stays in the last chunk: 344 tokens from 256 on
    assert chunk_starts(calls, "r") == ([0, 128, 256] if pattern == "snapkv:2" else [0, 128, 256, 384, 512])
    assert chunked.token_ids == whole.token_ids
    assert len(chunked.prompt_logprobs) == len(whole.prompt_logprobs) == len(ids)
    for a, b in zip(chunked.prompt_logprobs[1:], whole.prompt_logprobs[1:], strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-3)
    c, w = chunked.final.cost, whole.final.cost
    assert (c.prefill.dense_units, c.prefill.actual_units) == (w.prefill.dense_units, w.prefill.actual_units)
    assert c.decode == w.decode
    assert c.prefill.model_flops == pytest.approx(w.prefill.model_flops)


def test_the_last_chunk_holds_the_observation_window(model):
    engine = tiny_engine(model, max_prefill_chunk=128)
    window = 64
    snap = make_request("s", [1] * (256 + window - 1), {"decode": {"method": "snapkv", "compression_ratio": 2,
                                                                   "params": {"window": window}}})
    assert engine.scheduler.chunk_end(snap, 128, dense=True) == 256 + window - 1
    dense = make_request("d", [1] * (256 + window - 1))
    assert engine.scheduler.chunk_end(dense, 128, dense=True) == 256
    assert engine.scheduler.chunk_end(dense, 256, dense=True) == 256 + window - 1


def test_decodes_keep_flowing_while_a_long_prompt_prefills(model):
    """The engine interleaves: a decode step of the running request after every chunk of the long prompt."""
    engine = tiny_engine(model, max_prefill_chunk=128)
    calls = record_calls(engine)
    long_prompt = [(5 * i + 1) % 96 for i in range(1000)]

    async def body(engine):
        first = engine.generate(make_request("short", [3, 4, 5], max_tokens=200, ignore_eos=True))
        await first.__anext__()  # decoding now
        long = asyncio.create_task(collect(engine, make_request("long", long_prompt, max_tokens=2)))
        rest = [out async for out in first]
        return await long, rest

    long, _ = asyncio.run(with_engine(engine, body))
    assert len(long.token_ids) == 2
    starts = chunk_starts(calls, "long")
    assert starts == list(range(0, 1000, 128))
    i_first = calls.index(("prefill", "long", 0, 128))
    i_last = calls.index(("prefill", "long", 896, 1000))
    decodes = [c for c in calls[i_first:i_last] if c[0] == "decode" and "short" in c[1]]
    assert len(decodes) == len(starts) - 1  # one decode step after every chunk but the last
    assert engine.pool.counters().free_pages == engine.pool.num_pages


def test_while_requests_decode_dense_chunks_are_paced_by_the_measured_times(model):
    """With a decode-stall budget (``--max-decode-stall``) the engine times its decode steps and every dense chunk
    it runs between them, and the pacer sizes the next chunk from those times: the first chunk, before any rate
    is known, is one align (128 tokens); each chunk is a multiple of 128 up to --max-prefill-chunk; and the paced
    prompt gets the tokens its whole prefill gets."""
    long_prompt = [(5 * i + 1) % 96 for i in range(1500)]

    def run(decoding: bool):
        engine = tiny_engine(model, max_prefill_chunk=1024, max_decode_stall=1.0)
        calls, timed = record_calls(engine), []
        pacer = engine.scheduler.pacer
        observe = pacer.observe_chunk
        pacer.observe_chunk = lambda a, b, s: (timed.append((a, b, s)), observe(a, b, s))[1]

        async def body(engine):
            if not decoding:
                return await collect(engine, make_request("long", long_prompt, max_tokens=4))
            short = engine.generate(make_request("short", [3, 4, 5], max_tokens=400, ignore_eos=True))
            for _ in range(4):  # a few decode steps timed
                await short.__anext__()
            long = await collect(engine, make_request("long", long_prompt, max_tokens=4))
            await engine.abort("short")
            async for _ in short:
                pass
            return long

        return asyncio.run(with_engine(engine, body)), calls, timed, pacer

    (paced, calls, timed, pacer), (whole, whole_calls, _, _) = run(True), run(False)
    assert chunk_starts(whole_calls, "long") == [0]
    chunks = [(c[2], c[3]) for c in calls if c[0] == "prefill" and c[1] == "long"]
    assert chunks[0] == (0, 128) and chunks[-1][1] == 1500
    assert all((b - a) % 128 == 0 and b - a <= 1024 for a, b in chunks[:-1])
    assert [(a, b) for a, b, _ in timed] == chunks and all(s > 0 for _, _, s in timed)
    assert pacer.decode_step_s is not None and pacer.seconds_per_flop is not None
    assert paced.token_ids == whole.token_ids


def test_a_burst_of_prompts_gets_longer_paced_chunks_than_one_prompt(model):
    """The decode-stall budget protects decodes from a prefill, not a burst of prompts from one decode: with one
    request decoding and four prefilling, a chunk gets four times the budget of a lone prompt's (3 decode steps
    against 0.75: where 128 tokens take a step, a lone prompt's chunk stays at the 128-token floor, the burst's is
    longer)."""
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.request_state import EngineRequest
    from server.engine.sampler import SamplerState

    engine = tiny_engine(model, max_prefill_chunk=4096, max_decode_stall=0.75)
    scheduler, pacer = engine.scheduler, engine.scheduler.pacer
    pacer.observe_decode_step(0.01)
    pacer.observe_chunk(0, 128, 0.01)  # 128 tokens took a decode step: about 96 fit 0.75 of one

    def admitted(rid: str, prefilled: bool) -> EngineRequest:
        r = EngineRequest(make_request(rid, [1] * 3000), lambda out: None, SamplerState(),
                          IncrementalDetokenizer(engine.tokenizer))
        r.prefilled = prefilled
        return r

    long = admitted("long", prefilled=False)
    scheduler.running = [admitted("decoding", True), long]
    alone = scheduler.prefill_end(long, dense=True)
    scheduler.running += [admitted(f"burst{i}", False) for i in range(3)]
    burst = scheduler.prefill_end(long, dense=True)
    assert alone == 128 and burst > alone  # the floor; then a budget of 3 decode steps


def test_abort_between_chunks_frees_every_page(model):
    engine = tiny_engine(model, max_prefill_chunk=128)
    calls = record_calls(engine)
    seen: dict[str, int] = {}
    prefill = engine.runner.prefill

    def abort_after_first_chunk(req, end=None):
        out = prefill(req, end)
        if req.request_id == "long" and req.prefill_pos == 128:
            seen["held"] = req.kv.num_pages
            engine._abort("long")  # what a client disconnect does, from the event loop
        return out

    engine.runner.prefill = abort_after_first_chunk

    async def body(engine):
        return await collect(engine, make_request("long", [7] * 900, max_tokens=5))

    result = asyncio.run(with_engine(engine, lambda e: while_decoding(e, body)))
    assert result.final.finish_reason == "abort" and result.token_ids == []
    assert chunk_starts(calls, "long") == [0]  # no chunk after the abort
    assert seen["held"] == 2 * 2 * (128 // 16)  # layers x KV heads x pages of the first chunk
    c = engine.pool.counters()
    assert c.free_pages == c.total_pages == engine.pool.num_pages


def test_request_preempted_between_chunks_prefills_again_from_its_start(model):
    """A decoding request outgrows the pool while a long prompt is between chunks: the long one (the youngest) is
    preempted, its pages go back, and it prefills again from its first token once there is room (when the other
    has finished: then nothing decodes, and its dense prompt prefills whole); both give the tokens and cost they
    give alone."""
    page_size = 4  # a decode step needs new pages every 4 tokens: the squeeze comes within a few steps
    options = dict(max_prefill_chunk=128, page_size=page_size)
    old = make_request("old", [(3 * i + 2) % 96 for i in range(64)], max_tokens=40, ignore_eos=True)
    young = make_request("young", [(5 * i + 1) % 96 for i in range(700)], max_tokens=5, ignore_eos=True)
    probe = tiny_engine(model, pages=1, **options)
    pages = probe.scheduler.need_pages(old) + probe.scheduler.need_pages(young)  # both admitted at once, exactly

    def run(requests):
        engine = tiny_engine(model, pages=pages, **options)
        calls = record_calls(engine)

        async def body(engine):
            return await asyncio.gather(*(collect(engine, r) for r in requests))

        return asyncio.run(with_engine(engine, body)), calls, engine

    (old_res, young_res), calls, engine = run([old, young])
    starts = chunk_starts(calls, "young")
    restart = starts.index(0, 1)  # the second first chunk
    assert 0 < restart < 6 and starts[restart:] == [0]
    assert engine.pool.counters().free_pages == engine.pool.num_pages
    (old_alone,), _, _ = run([old])
    (young_alone,), _, _ = run([young])
    assert old_res.token_ids == old_alone.token_ids and young_res.token_ids == young_alone.token_ids
    chunked, whole = young_res.final.cost.prefill, young_alone.final.cost.prefill  # alone: one whole prefill
    assert (chunked.dense_units, chunked.actual_units) == (whole.dense_units, whole.actual_units)  # lost chunks
    assert chunked.model_flops == pytest.approx(whole.model_flops)  # are not its cost


def test_max_prefill_chunk_is_validated():
    with pytest.raises(ValueError, match="multiple of 128"):
        EngineOptions(max_prefill_chunk=100)
    assert EngineOptions().max_prefill_chunk == 4096 and EngineOptions(max_prefill_chunk=0).max_prefill_chunk == 0


def test_max_decode_stall_is_validated_and_zero_turns_pacing_off(model):
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            EngineOptions(max_decode_stall=bad)
    assert EngineOptions().max_decode_stall == 0  # off by default (server/settings.py says why)
    assert tiny_engine(model).scheduler.pacer is None
    assert tiny_engine(model, max_decode_stall=0.75).scheduler.pacer.stall == 0.75
    assert tiny_engine(model, max_prefill_chunk=0, max_decode_stall=0.75).scheduler.pacer is None  # nothing to pace
    from server.cli import build_parser, settings_from_args

    settings = settings_from_args(build_parser().parse_args(["--max-decode-stall", "1.5"]))
    assert EngineOptions.from_settings(settings).max_decode_stall == 1.5


FALLBACK_PROMPT = [(7 * i + 3) % 96 for i in range(600)]


def prefill_starts(model, pattern: str, decoding: bool):
    """Where a 600-token prompt's prefill chunks start (dense chunks of 128, sparse ones of 256), alone or while a
    request decodes; and its result."""
    engine = tiny_engine(model, max_prefill_chunk=128, max_sparse_prefill_chunk=256)
    calls = record_calls(engine)

    async def body(e):
        return await collect(e, make_request("p", FALLBACK_PROMPT, pattern, max_tokens=2))

    res = asyncio.run(with_engine(engine, (lambda e: while_decoding(e, body)) if decoding else body))
    return chunk_starts(calls, "p"), res


def test_a_dense_prompt_prefills_whole_when_nothing_decodes_and_in_chunks_when_something_does(model):
    """Chunks are for the decodes: alone, a dense prompt prefills in one step (a chunked dense prefill computes the
    same attention, slower); while a request decodes it prefills in chunks; a sparse prefill method, defined per
    chunk, is chunked either way, in its own chunk size (its answer must not depend on the load)."""
    assert prefill_starts(model, "dense", decoding=False)[0] == [0]
    assert prefill_starts(model, "dense", decoding=True)[0] == [0, 128, 256, 384, 512]
    for decoding in (False, True):
        assert prefill_starts(model, "vertical_slash:2", decoding)[0] == [0, 256, 512]


def test_a_sparse_prompt_the_fallback_runs_dense_prefills_like_a_dense_one(model, tmp_path, monkeypatch):
    """Where the fallback rule runs a sparse method as dense at the prompt's length (here: an index that costs
    a second), the prompt computes dense attention and prefills like a dense one: whole when nothing decodes (so
    it is never slower than dense), in chunks while something does; its report says it fell back."""
    from attention_backends.prefill_cost import PROFILE_ENV

    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"card": "test", "impl": "reference", "head_dim": 16, "dense": {"per_cell_s": 1e-12},
                                "methods": {"vertical_slash": {"fixed_s": 1.0, "per_cell_s": 1e-12}}}))
    monkeypatch.setenv(PROFILE_ENV, str(path))
    alone, res = prefill_starts(model, "vertical_slash:2", decoding=False)
    assert alone == [0] and res.final.cost.prefill.fallback == "dense"
    assert res.token_ids == prefill_starts(model, "dense", decoding=False)[1].token_ids
    assert prefill_starts(model, "vertical_slash:2", decoding=True)[0] == [0, 128, 256, 384, 512]  # dense chunks


def test_a_prompt_whose_chunks_lose_to_one_dense_call_runs_dense(model, tmp_path, monkeypatch):
    """A method that pays on a whole prompt can lose in chunks (its index costs once per chunk; dense chunks are
    slower per cell than one whole call): the rule compares the prompt's sparse chunks with one dense call. An
    index of 2 ms, cells at 10 ns (20 ns in a dense chunk), 4 query heads: the whole 600-token prompt would take
    5.6 ms sparse against 7.2 ms dense, its 256-token chunks 1.3 + 4.0 + 3.0 ms (the first one dense, the others
    sparse). So the prompt computes dense attention and, alone, prefills whole."""
    from attention_backends.prefill_cost import PROFILE_ENV

    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"card": "test", "impl": "reference", "head_dim": 16, "dense": {"per_cell_s": 1e-8},
                                "dense_chunk": {"per_cell_s": 2e-8},
                                "methods": {"vertical_slash": {"fixed_s": 2e-3, "per_cell_s": 1e-8}}}))
    monkeypatch.setenv(PROFILE_ENV, str(path))
    alone, res = prefill_starts(model, "vertical_slash:2", decoding=False)
    assert alone == [0] and res.final.cost.prefill.fallback == "dense"
    dense = prefill_starts(model, "dense", decoding=False)[1]
    assert res.token_ids == dense.token_ids
    got, want = res.final.cost.prefill, dense.final.cost.prefill
    assert (got.dense_units, got.actual_units) == (want.dense_units, want.actual_units)
