"""The native engine's admission, growth and preemption (:mod:`server.engine.scheduler`) on a tiny random model,
where a pool of an exact number of pages is easy to build and long generations are cheap.

The model has 2 layers x 2 KV heads, so a request holds ``4 * ceil(tokens / 16)`` pages."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import collect, make_request, tiny_engine, tiny_model, with_engine

from server.contract.engine import EngineOverloaded, RequestRejected

PROMPT = [(7 * i + 3) % 96 for i in range(150)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_preempted_requests_resume_with_their_uninterrupted_output(model, monkeypatch):
    """Four requests whose contexts cannot all fit: the youngest are preempted (pages freed) and resumed by
    recomputation; each streams exactly the tokens, text, prompt logprobs (once) and cost it gives alone."""
    from server.engine import runner

    scored = []  # prompt logprobs are computed by a request's first prefill only, not again when it resumes
    real_prompt_logprobs = runner.prompt_logprobs
    monkeypatch.setattr(runner, "prompt_logprobs", lambda *a: (scored.append(1), real_prompt_logprobs(*a))[1])
    patterns = ["dense", "snapkv:2", "quest:2", "ada_snapkv:2"]  # oldest first; the evicting ones evict again
    prompts = [PROMPT, PROMPT[::-1], PROMPT[10:] + PROMPT[:10], PROMPT[75:] + PROMPT[:75]]

    def requests(tag):
        return [make_request(f"{tag}{i}", prompts[i], p, max_tokens=200, ignore_eos=True, prompt_logprobs=1)
                for i, p in enumerate(patterns)]

    async def body(engine):
        solo = [await collect(engine, r) for r in requests("solo")]
        together = await asyncio.gather(*(collect(engine, r) for r in requests("batch")))
        return solo, together

    # 220 pages: the prompts fit side by side (44 pages each, the evicting ones at their eviction peaks), each whole
    # request (350 tokens: 92 pages) fits alone, all four grown (92 + 72 + 92 + 72) do not.
    # (prompts in one piece each: a paced chunk would score its own part of the prompt)
    engine = tiny_engine(model, pages=220, max_decode_stall=0)
    solo, together = asyncio.run(with_engine(engine, body))
    assert engine.preemptions >= 1
    for pattern, a, b in zip(patterns, solo, together, strict=True):
        assert len(b.token_ids) == 200, pattern  # nothing lost or streamed twice
        assert b.token_ids == a.token_ids and b.text == a.text, pattern
        assert b.prompt_logprobs == a.prompt_logprobs and len(a.prompt_logprobs) == len(PROMPT), pattern
        assert b.final.cost.decode == a.final.cost.decode, pattern  # the recomputation is not the request's cost
        assert b.final.cost.model_flops == pytest.approx(a.final.cost.model_flops), pattern
    assert engine.pool.counters().free_pages == engine.pool.num_pages
    assert engine.stats().num_running == engine.stats().num_waiting == 0
    assert len(scored) == 2 * len(patterns)


def test_admission_on_present_need_not_the_whole_context(model):
    """Requests that may grow to the whole context (what the API sends when a client omits max_tokens) run side
    by side when what they hold now fits, although two whole contexts would not."""
    engine = tiny_engine(model, pages=300)  # a whole 512-token context is 132 pages: two would fit, not six
    n = len(PROMPT)

    async def body(engine):
        gens = [engine.generate(make_request(f"r{i}", PROMPT, max_tokens=engine.max_model_len - n, ignore_eos=True))
                for i in range(6)]
        try:
            firsts = await asyncio.wait_for(asyncio.gather(*(g.__anext__() for g in gens)), timeout=30)
            assert not any(f.finished for f in firsts)
            return engine.stats().num_running
        finally:
            for g in gens:
                await g.aclose()

    assert asyncio.run(with_engine(engine, body)) == 6


def test_request_that_cannot_fit_alone_is_rejected_up_front(model):
    engine = tiny_engine(model, pages=60, max_model_len=512)  # 224 tokens fit one request
    with pytest.raises(RequestRejected) as err:
        engine.validate(make_request("big", PROMPT, max_tokens=200))
    assert err.value.code == "kv_cache_too_small"
    engine.validate(make_request("ok", PROMPT, max_tokens=60))


def test_default_context_is_what_the_pool_holds_for_one_request(model):
    """Without --max-model-len the served context is capped to what one request can hold, so a request without
    max_tokens (the API fills in the rest of the context) is served; an explicit --max-model-len is kept."""
    assert tiny_engine(model, pages=60).max_model_len == 224  # 60 pages = 15 per head, one kept for the next token
    assert tiny_engine(model).max_model_len == 512
    assert tiny_engine(model, pages=60, max_model_len=512).max_model_len == 512


def test_a_burst_is_admitted_at_once_not_queued(model):
    """--max-queue bounds the backlog, not a burst: an idle engine admits every request that fits, at once."""
    engine = tiny_engine(model, max_num_seqs=64, max_queue=2)

    async def body(engine):
        return await asyncio.gather(*(collect(engine, make_request(f"b{i}", PROMPT[:20], max_tokens=3))
                                      for i in range(50)))

    results = asyncio.run(with_engine(engine, body))
    assert [r.final.finish_reason for r in results] == ["length"] * 50


def test_retry_after_follows_the_queue_and_throughput(model):
    """A full queue's Retry-After is the time the queue takes to drain at the recent completion rate."""
    sched = tiny_engine(model).scheduler
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):  # 4 completions in the 4 s since the first: 1 per second
        sched.record_finish(now=t)
    assert sched.retry_after(queued=8, now=4.0) == pytest.approx(8.0)
    assert sched.retry_after(queued=2, now=4.0) == pytest.approx(2.0)
    assert sched.retry_after(queued=8, now=12.0) == pytest.approx(24.0)  # nothing finished since: slower
    for t in (4.25, 4.5, 4.75, 5.0):
        sched.record_finish(now=t)
    assert sched.retry_after(queued=8, now=5.0) == pytest.approx(5.0)  # 8 completions in 5 s

    engine = tiny_engine(model, max_num_seqs=1, max_queue=8)

    async def body(engine):
        running = asyncio.ensure_future(
            collect(engine, make_request("run", PROMPT[:20], max_tokens=480, ignore_eos=True)))
        waiting = [asyncio.ensure_future(collect(engine, make_request(f"w{i}", PROMPT[:20], max_tokens=2)))
                   for i in range(8)]
        while engine.stats().num_waiting < 8:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineOverloaded) as err:
            await collect(engine, make_request("refused", PROMPT[:20], max_tokens=2))
        await engine.abort("run")
        await asyncio.gather(running, *waiting)
        return err.value.retry_after

    # no completion seen yet: one request per second is assumed, so 8 queued requests mean 8 s
    assert asyncio.run(with_engine(engine, body)) == pytest.approx(8.0)


@pytest.mark.parametrize("pattern", ["snapkv:4", "ada_snapkv:4"])
def test_evicting_requests_are_admitted_on_their_footprint_after_eviction(model, pattern):
    """SnapKV/Ada-SnapKV free most of a prompt's pages during its prefill (layer by layer): admission counts that
    footprint, never less than the pages the prefill really holds at its peak, so the freed memory becomes
    concurrency: on a pool where two dense requests run side by side, at least twice as many evicting ones do."""
    probe = tiny_engine(model, pages=100)
    request = make_request("one", PROMPT, pattern, max_tokens=40, ignore_eos=True)
    pool, used = probe.pool, []
    allocate = pool.allocate

    def tracked(count):
        ids = allocate(count)
        used.append(pool.num_pages - pool.free_pages)
        return ids

    pool.allocate = tracked
    asyncio.run(with_engine(probe, lambda engine: collect(engine, request)))
    assert max(used) <= probe.scheduler.need_pages(request)  # the bound holds at the real peak
    assert probe.scheduler.need_pages(request) < probe.scheduler.need_pages(make_request("d", PROMPT))

    def most_running(pattern: str) -> int:
        engine = tiny_engine(model, pages=100, max_num_seqs=16)
        seen = []

        async def body(engine):
            async def watch():
                while True:
                    seen.append(engine.stats().num_running)
                    await asyncio.sleep(0.002)

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(collect(engine, make_request(f"{pattern}{i}", PROMPT, pattern,
                                                                          max_tokens=40, ignore_eos=True))
                                             for i in range(8)))
            watcher.cancel()
            return results

        results = asyncio.run(with_engine(engine, body))
        assert [len(r.token_ids) for r in results] == [40] * 8
        return max(seen)

    dense = most_running("dense")
    assert dense == 2
    assert most_running(pattern) >= 2 * dense
