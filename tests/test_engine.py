"""The native engine on the embedded SmolLM2 (CPU, float32): per-request sparsity, batching, paging.

Every test talks to the engine through its public async interface (``generate``/``abort``/``stats``), the
same one the HTTP server uses.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import collect, make_request, tiny_engine, tiny_model, with_engine

from attention_backends import parse_pattern
from server.contract.cost import RequestCost
from server.contract.engine import EngineOverloaded, GenerationRequest, RequestRejected, SamplingParams
from server.engine.engine import EngineOptions, NativeEngine
from server.engine.llama import LlamaModel
from server.engine.model_config import ModelConfig
from server.engine.page_pool import page_bytes

PATTERNS = ["dense", "vertical_slash:4", "block_sparse:4", "flexprefill", "snapkv:4", "ada_snapkv:4", "quest:4",
            "vertical_slash:4+quest:4"]


@pytest.fixture(scope="module")
def loaded():
    """Model and tokenizer, loaded once; each test builds its own engine around them (own pool)."""
    from server.engine.model_loader import load_model

    return load_model(None, "cpu", torch.float32)


def new_engine(loaded, **options) -> NativeEngine:
    model, tokenizer = loaded
    return NativeEngine(model, tokenizer, EngineOptions(device="cpu", dtype="float32", **options), "smollm2")


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                            add_special_tokens=False)


def long_prompt_ids(tokenizer, tokens: int) -> list[int]:
    facts = " ".join(f"Item {i} is stored in box {(i * 7919) % 1000}." for i in range(tokens // 8))
    ids = chat_ids(tokenizer, f"{facts}\nWhere is item 42 stored?")
    return ids[-tokens:] if len(ids) > tokens else ids


def test_every_method_at_ratio_one_matches_dense(loaded):
    _, tok = loaded
    ids = long_prompt_ids(tok, 400)
    patterns = ["dense", "vertical_slash:1", "flexprefill:1", "block_sparse:1", "snapkv:1", "ada_snapkv:1",
                "quest:1", "block_sparse:1+ada_snapkv:1"]

    async def body(engine):
        return [await collect(engine, make_request(f"r{i}", ids, p, max_tokens=24)) for i, p in enumerate(patterns)]

    results = asyncio.run(with_engine(new_engine(loaded), body))
    for pattern, res in zip(patterns, results, strict=True):
        assert res.token_ids == results[0].token_ids, pattern
        assert res.final.cost.decode.achieved_compression_ratio == pytest.approx(1.0)
        assert res.final.cost.prefill.achieved_compression_ratio == pytest.approx(1.0)


def test_concurrent_mixed_patterns_equal_their_solo_runs(loaded):
    """8 concurrent requests with different patterns give each the tokens it gives alone."""
    _, tok = loaded
    prompts = [long_prompt_ids(tok, 300 + 40 * i) for i in range(len(PATTERNS))]

    def requests(tag):
        return [make_request(f"{tag}{i}", prompts[i], p, max_tokens=16, logprobs=2)
                for i, p in enumerate(PATTERNS)]

    async def body(engine):
        solo = [await collect(engine, r) for r in requests("solo")]
        together = await asyncio.gather(*(collect(engine, r) for r in requests("batch")))
        return solo, together

    engine = new_engine(loaded)
    solo, together = asyncio.run(with_engine(engine, body))
    assert engine.decode_retries == 0  # the mixed batch really ran as one batch
    assert engine.pool.counters().free_pages == engine.pool.num_pages
    for i, pattern in enumerate(PATTERNS):
        a, b = solo[i], together[i]
        assert len(a.token_ids) == len(b.token_ids), pattern
        for step, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            la, lb = a.logprobs[step], b.logprobs[step]
            if ta != tb:  # only a floating-point near-tie may flip a token, and then the logits agree
                top = dict(la.top)
                assert abs(top.get(ta, -99) - top.get(tb, -99)) < 1e-3, f"{pattern}: step {step} flipped"
                assert abs(la.logprob - dict(lb.top).get(ta, -99)) < 1e-3, f"{pattern}: step {step}"
                break  # after a flip the continuations legitimately differ
            assert la.logprob == pytest.approx(lb.logprob, abs=1e-3), f"{pattern}: step {step} logits differ"
        cost = a.final.cost
        if pattern not in ("dense", "flexprefill"):
            decode_sparse = pattern.split("+")[-1].startswith(("snapkv", "ada", "quest"))
            sparse_phase = cost.decode if decode_sparse else cost.prefill
            assert sparse_phase.achieved_compression_ratio > 1.5, (pattern, sparse_phase)


def test_snapkv_frees_evicted_pages_and_everything_returns(loaded):
    _, tok = loaded
    ids = long_prompt_ids(tok, 2048)
    assert len(ids) >= 2000
    engine = new_engine(loaded)
    start_free = engine.pool.counters().free_pages
    seen = {}

    async def body(engine):
        for pattern in ("dense", "snapkv:4"):
            gen = engine.generate(make_request(pattern, ids, pattern, max_tokens=8))
            first = await gen.__anext__()  # after prefill (and eviction) of this request
            seen[pattern] = start_free - engine.pool.counters().free_pages
            assert not first.finished
            async for _out in gen:
                pass
            assert engine.pool.counters().free_pages == start_free, pattern
        # an aborted request returns its pages too
        gen = engine.generate(make_request("to-abort", ids, "quest:4", max_tokens=64))
        await gen.__anext__()
        await gen.aclose()  # the consumer goes away, as a disconnecting client does
        for _ in range(100):
            if engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(with_engine(engine, body))
    freed = 1 - seen["snapkv:4"] / seen["dense"]
    assert freed >= 0.70, f"SnapKV at r=4 freed only {freed:.0%} of the prompt's pages"
    assert engine.pool.counters().free_pages == start_free
    assert engine.stats().num_running == 0


def test_small_pool_queues_instead_of_failing(loaded):
    _, tok = loaded
    ids = chat_ids(tok, "Count from one to ten.")
    probe = new_engine(loaded, kv_cache_memory=1 << 20)
    per_request = probe.scheduler.pages_for_tokens(len(ids) + 12)
    memory = 3 * per_request * page_bytes(probe.pool.page_size, probe.shape.head_dim, torch.float32)
    engine = new_engine(loaded, kv_cache_memory=memory)  # room for 3 at a time
    assert 3 * per_request <= engine.pool.num_pages < 4 * per_request

    async def body(engine):
        return await asyncio.gather(*(collect(engine, make_request(f"q{i}", ids, "quest:2", max_tokens=12))
                                      for i in range(16)))

    results = asyncio.run(with_engine(engine, body))
    assert all(r.final.finish_reason in ("stop", "length") for r in results)
    assert len({tuple(r.token_ids) for r in results}) == 1
    assert engine.pool.counters().free_pages == engine.pool.num_pages


def test_seeded_sampling_and_stop_strings(loaded):
    _, tok = loaded
    ids = chat_ids(tok, "Write a short poem about the sea.")

    async def body(engine):
        a = await collect(engine, make_request("a", ids, max_tokens=24, temperature=1.0, seed=7))
        b = await collect(engine, make_request("b", ids, max_tokens=24, temperature=1.0, seed=7, top_p=0.9))
        c = await collect(engine, make_request("c", ids, max_tokens=24, temperature=1.0, seed=7, top_p=0.9))
        greedy = await collect(engine, make_request("g", ids, max_tokens=24))
        stop_word = greedy.text.split()[3]
        stopped = await collect(engine, make_request("s", ids, max_tokens=24, stop=[stop_word]))
        return a, b, c, greedy, stop_word, stopped

    a, b, c, greedy, stop_word, stopped = asyncio.run(with_engine(new_engine(loaded), body))
    assert b.token_ids == c.token_ids and b.text == c.text
    assert a.final.finish_reason in ("stop", "length")
    assert stopped.final.finish_reason == "stop"
    assert stop_word not in stopped.text
    assert greedy.text.startswith(stopped.text) and len(stopped.text) < len(greedy.text)


def inject_faults(engine, monkeypatch, *, prefill=(), decode=(), release=()) -> None:
    """Make the runner raise for the named requests: in their prefill, in every decode step that holds one, or when
    their pages are released (as every device call does once a CUDA error is sticky)."""
    real_prefill, real_decode = engine.runner.prefill, engine.runner.launch_decode

    def faulty_prefill(req, end=None):
        if req.request_id in prefill:
            raise RuntimeError("injected prefill fault")
        if req.request_id in release:
            def fail():
                raise RuntimeError("injected release fault")

            req.kv.release = fail
        return real_prefill(req, end)

    def faulty_decode(batch, *args, **kwargs):
        if any(r.request_id in decode for r in batch):
            raise RuntimeError("injected decode fault")
        return real_decode(batch, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "prefill", faulty_prefill)
    monkeypatch.setattr(engine.runner, "launch_decode", faulty_decode)


def test_fault_in_one_request_fails_only_that_request(loaded, monkeypatch):
    _, tok = loaded
    ids = chat_ids(tok, "Name three colours.")
    engine = new_engine(loaded)
    inject_faults(engine, monkeypatch, prefill={"bad-prefill"}, decode={"bad-decode"})

    async def body(engine):
        names = ["ok-1", "bad-prefill", "ok-2", "bad-decode", "ok-3"]
        return names, await asyncio.gather(*(collect(engine, make_request(n, ids, max_tokens=10)) for n in names))

    names, results = asyncio.run(with_engine(engine, body))
    by_name = dict(zip(names, results, strict=True))
    assert by_name["bad-prefill"].final.finish_reason == "error"
    assert by_name["bad-decode"].final.finish_reason == "error"
    good = [by_name[n] for n in ("ok-1", "ok-2", "ok-3")]
    assert all(r.final.finish_reason in ("stop", "length") for r in good)
    assert len({tuple(r.token_ids) for r in good}) == 1
    assert engine.pool.counters().free_pages == engine.pool.num_pages


def test_a_request_whose_release_fails_still_ends_and_the_engine_serves_on(loaded, monkeypatch):
    """On a GPU, a sticky CUDA error makes every later device call raise, freeing the request's pages included:
    the request still gets its final output (an error), and the loop thread lives to serve the next request."""
    _, tok = loaded
    ids = chat_ids(tok, "Name three colours.")
    engine = new_engine(loaded)
    inject_faults(engine, monkeypatch, decode={"dead"}, release={"dead"})

    async def body(engine):
        dead = await asyncio.wait_for(collect(engine, make_request("dead", ids, max_tokens=10)), 60)
        after = await asyncio.wait_for(collect(engine, make_request("after", ids, max_tokens=10)), 60)
        return dead, after

    dead, after = asyncio.run(with_engine(engine, body))
    assert dead.final.finish_reason == "error" and dead.final.error
    assert after.final.finish_reason in ("stop", "length") and after.token_ids


def test_rejections_and_overload(loaded):
    _, tok = loaded
    ids = chat_ids(tok, "Hello")
    engine = new_engine(loaded, max_model_len=128, max_queue=2, max_num_seqs=1)

    async def body(engine):
        with pytest.raises(RequestRejected) as err:
            await collect(engine, make_request("long", ids * 4, max_tokens=8))
        assert err.value.code == "context_length_exceeded"
        with pytest.raises(RequestRejected) as err:  # Quest's page must be the engine's KV page
            await collect(engine, quest_request_with_page_size(ids, 32))
        assert err.value.param == "sparse_pattern.decode.params.page_size"
        # one running (max_num_seqs=1) and two waiting (max_queue=2): the next one is refused
        running = engine.generate(make_request("run", ids, max_tokens=40, ignore_eos=True))
        await running.__anext__()
        waiting = [engine.generate(make_request(f"wait{i}", ids, max_tokens=4)) for i in range(2)]
        pending = [asyncio.ensure_future(g.__anext__()) for g in waiting]
        await asyncio.sleep(0.05)
        assert engine.stats().num_waiting == 2
        with pytest.raises(EngineOverloaded) as err:
            await collect(engine, make_request("refused", ids, max_tokens=4))
        assert err.value.retry_after > 0
        await asyncio.gather(*pending)
        for g in [running, *waiting]:
            async for _ in g:
                pass
        assert (await collect(engine, make_request("after", ids, max_tokens=4))).final.finish_reason == "length"

    asyncio.run(with_engine(engine, body))


def test_page_size_option_sets_the_kv_pages_quest_runs_on():
    """--page-size 32: the pool's pages hold 32 tokens; Quest requests naming page_size 32 run (reading whole
    32-token pages), those left at Quest's default 16 are refused, and other methods do not care."""
    model = tiny_model()
    engine = tiny_engine(model, page_size=32)
    assert engine.pool.page_size == 32 and engine.pool.keys.shape[1] == 32
    ids = [(5 * i + 1) % 96 for i in range(200)]
    with pytest.raises(RequestRejected):
        engine.validate(make_request("quest-16", ids, "quest:2"))

    async def body(engine):
        quest = await collect(engine, quest_request_with_page_size(ids, 32))
        dense = await collect(engine, make_request("dense", ids, max_tokens=4))
        return quest, dense

    quest, dense = asyncio.run(with_engine(engine, body))
    assert quest.final.finish_reason == dense.final.finish_reason == "length"
    assert quest.final.cost.decode.achieved_compression_ratio > 1  # Quest read a subset of the 32-token pages
    same = asyncio.run(with_engine(tiny_engine(model), lambda e: collect(e, make_request("dense", ids, max_tokens=4))))
    assert dense.token_ids == same.token_ids  # the page size changes where tokens live, not what is computed


def quest_request_with_page_size(ids, page_size):
    spec = parse_pattern({"decode": {"method": "quest", "compression_ratio": 2, "params": {"page_size": page_size}}})
    return GenerationRequest("quest-page", ids, SamplingParams(max_tokens=4, temperature=0), spec)


def test_small_pool_serves_chat_without_max_tokens(loaded):
    """--kv-cache-memory 64MB: a chat request without max_tokens (the API asks for the rest of the context) is
    served; with an explicit --max-model-len beyond the pool, a request that could not fit even alone is refused."""
    _, tok = loaded
    ids = chat_ids(tok, "What is 2+2? Answer with one number.")
    engine = new_engine(loaded, kv_cache_memory=64 * 10**6)

    async def body(engine):
        return await collect(engine, make_request("chat", ids, max_tokens=engine.max_model_len - len(ids)))

    res = asyncio.run(with_engine(engine, body))
    assert res.final.finish_reason == "stop" and "4" in res.text
    explicit = new_engine(loaded, kv_cache_memory=64 * 10**6, max_model_len=8192)
    with pytest.raises(RequestRejected) as err:
        explicit.validate(make_request("long", ids, max_tokens=8000))
    assert err.value.code == "kv_cache_too_small"


def test_decode_ratio_of_several_choices_is_each_choices_ratio():
    """n = 2 identical snapkv:4 choices with generated tokens: the combined decode ratio is each choice's."""
    engine = tiny_engine(tiny_model())
    prompt = [(7 * i + 3) % 96 for i in range(300)]

    async def body(engine):
        return await asyncio.gather(*(collect(engine, make_request(f"c{i}", prompt, "snapkv:4", max_tokens=64,
                                                                   ignore_eos=True)) for i in range(2)))

    a, b = asyncio.run(with_engine(engine, body))
    ratio = a.final.cost.decode.achieved_compression_ratio
    assert ratio > 3 and b.final.cost.decode.achieved_compression_ratio == ratio
    assert RequestCost.combine([a.final.cost, b.final.cost]).decode.achieved_compression_ratio == pytest.approx(ratio)


def test_sliding_window_model_is_refused_unless_the_window_covers_the_context():
    """The native engine attends over the whole context: a Mistral-style sliding window shorter than the served
    context is refused at load with a clear error; one that covers the context is plain causal attention."""
    hf = {"model_type": "mistral", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "hidden_size": 64, "intermediate_size": 128, "vocab_size": 96, "max_position_embeddings": 512,
          "sliding_window": 128}
    model = LlamaModel(ModelConfig.from_hf_dict(hf), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="sliding window of 128 tokens"):
        tiny_engine(model)
    assert tiny_engine(model, max_model_len=128).max_model_len == 128
    model.config.sliding_window = 512
    assert tiny_engine(model).max_model_len == 512


def test_a_step_that_fails_after_its_launch_is_retried_from_the_last_accepted_token(monkeypatch):
    """Reading a launched decode step fails once (after the engine launched the greedy batch's next step on its
    tokens): both steps are undone and the requests, retried one by one, give the tokens of a run without the
    fault (2026-12-02 on the H200: every retry raised "no token to feed" and the requests ended in errors)."""
    from server.engine.runner import PendingDecode

    model = tiny_model()
    prompts = {f"r{i}": [(5 * i + 3 * j) % 90 for j in range(40 + 7 * i)] for i in range(3)}
    seen = {"n": 0, "ahead": False}

    def generate(fault: bool):
        engine = tiny_engine(model)
        if fault:
            real, calls = PendingDecode.tokens, seen

            def tokens(step):
                calls["n"] += 1
                if calls["n"] == 4:  # a step of the three-request batch, with its successor launched ahead
                    calls["ahead"] = engine._ahead is not None
                    raise RuntimeError("injected fault reading a step")
                return real(step)

            monkeypatch.setattr(PendingDecode, "tokens", tokens)

        async def body(engine):
            return await asyncio.gather(*(collect(engine, make_request(r, ids, max_tokens=12, ignore_eos=True))
                                          for r, ids in prompts.items()))

        try:
            return asyncio.run(with_engine(engine, body)), engine
        finally:
            monkeypatch.undo()

    clean, _ = generate(False)
    faulty, engine = generate(True)
    assert engine.decode_retries == 1 and seen["ahead"]
    for a, b in zip(clean, faulty, strict=True):
        assert b.final.finish_reason == "length" and b.token_ids == a.token_ids
        assert b.final.cost.decode.kv_cache_tokens == a.final.cost.decode.kv_cache_tokens
    assert engine.pool.counters().free_pages == engine.pool.num_pages
