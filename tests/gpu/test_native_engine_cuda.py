"""The native engine serving the embedded SmolLM2 on CUDA (Triton kernels, paged decode), checked against itself
on the CPU and against its own dense path: what a user of ``--device cuda`` relies on.

The model is the embedded GGUF (``default_model_path()``), or ``$SPARSE_SERVE_GPU_TEST_MODEL``."""

from __future__ import annotations

import asyncio
import os

import pytest
from engine_helpers import collect, make_request

PATTERNS = ["vertical_slash", "flexprefill", "block_sparse", "snapkv", "ada_snapkv", "quest"]


def model_path() -> str:
    from server.engine.default_model import default_model_path

    return os.environ.get("SPARSE_SERVE_GPU_TEST_MODEL") or str(default_model_path())


class Served:
    """A started native engine and the event loop it serves on (an engine does not restart after shutdown)."""

    def __init__(self, device: str, dtype: str, **options):
        from server.engine.engine import EngineOptions, NativeEngine

        self.engine = NativeEngine.from_options(EngineOptions(model=model_path(), device=device, dtype=dtype,
                                                              kv_cache_memory=2 << 30, max_num_seqs=16, **options))
        self.tokenizer = self.engine.tokenizer
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.shutdown(timeout=5))
        self.loop.close()


def prompt(engine, items: int) -> list[int]:
    """A chat prompt with a fact to retrieve in the middle of ``items`` filler sentences (about 10 tokens each)."""
    filler = " ".join(f"item{i % 97} is stored in box {i % 13}." for i in range(items))
    half = len(filler) // 2
    text = (f"{filler[:half]} The secret code is 4417. {filler[half:]}\n"
            "What is the secret code? Answer with the number only.")
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return engine.tokenizer.encode(chat, add_special_tokens=False)


def generate(served: Served, requests):
    async def body():
        return await asyncio.gather(*(collect(served.engine, r) for r in requests))

    return served.loop.run_until_complete(body())


def greedy(eng, ids, patterns, tokens=16):
    reqs = [make_request(f"{p}-{i}", ids, p, max_tokens=tokens, ignore_eos=True) for i, p in enumerate(patterns)]
    return [r.token_ids for r in generate(eng, reqs)]


@pytest.fixture(scope="module")
def cuda_bf16():
    served = Served("cuda", "bfloat16")
    yield served
    served.close()


@pytest.fixture(scope="module")
def cuda_f32():
    """One float32 engine for the token-exact checks (every Triton kernel compiles once for float32)."""
    served = Served("cuda", "float32")
    yield served
    served.close()


def test_cuda_float32_greedy_tokens_equal_the_cpu_engines(cuda_f32):
    cpu = Served("cpu", "float32")
    try:
        ids = prompt(cpu, 100)
        assert greedy(cuda_f32, ids, ["dense"]) == greedy(cpu, ids, ["dense"])
    finally:
        cpu.close()


def test_every_method_at_ratio_1_gives_the_dense_tokens(cuda_bf16):
    ids = prompt(cuda_bf16, 200)
    dense = greedy(cuda_bf16, ids, ["dense"])[0]
    for pattern in PATTERNS:
        assert greedy(cuda_bf16, ids, [f"{pattern}:1"])[0] == dense, pattern


def test_a_mixed_batch_gives_each_request_the_tokens_it_gets_alone(cuda_f32):
    """float32: in bfloat16 a batch of 7 and a batch of 1 round their matmuls differently (cuBLAS picks kernels per
    shape), which flips near-tied greedy tokens (snapkv:4 agreed for 11 of 16 on the H200, 2026-11-30) without any
    request reading another's cache; float32 keeps that rounding far below the margins, so a difference here is
    one request's state leaking into another's."""
    ids = prompt(cuda_f32, 250)
    patterns = ["dense"] + [f"{p}:4" for p in PATTERNS]
    alone = [greedy(cuda_f32, ids, [p])[0] for p in patterns]
    together = greedy(cuda_f32, ids, patterns)
    for p, a, b in zip(patterns, alone, together, strict=True):
        assert b == a, p


def test_sparse_requests_report_the_ratio_they_achieved(cuda_bf16):
    ids = prompt(cuda_bf16, 400)
    reqs = [make_request(p, ids, f"{p}:4", max_tokens=8, ignore_eos=True) for p in PATTERNS]
    for p, r in zip(PATTERNS, generate(cuda_bf16, reqs), strict=True):
        assert len(r.token_ids) == 8 and r.final.error is None, p
        cost = r.final.cost
        phase = cost.prefill if p in PATTERNS[:3] else cost.decode
        assert phase.method == p
        assert 2.5 <= phase.achieved_compression_ratio <= 6.0, (p, phase.achieved_compression_ratio)


def test_cuda_graph_replay_gives_the_eager_steps_tokens(cuda_f32):
    """Decode steps replayed as CUDA graphs (the default on CUDA; batches padded to their bucket) against eager
    steps: a lone request, then a mixed batch of 3 (padded to 4), each request's tokens equal."""
    graphs, eager = cuda_f32, Served("cuda", "float32", enforce_eager=True)
    try:
        ids = prompt(graphs, 150)
        mixed = ["dense", "quest:4", "snapkv:4"]
        for patterns in (["dense"], ["quest:4"], mixed, mixed):  # the last batch replays what the third captured
            assert greedy(graphs, ids, patterns) == greedy(eager, ids, patterns), patterns
        assert graphs.engine.runner.stepper.graphs and not eager.engine.runner.stepper.graphs
    finally:
        eager.close()


def test_steps_launched_ahead_give_the_tokens_and_costs_of_steps_that_wait(cuda_f32):
    """On CUDA a greedy batch's next step is launched from the device's argmax before the host reads the tokens
    (CUDA-graph replays, pinned copies, an event per step): each request gets the tokens and decode costs it
    gets when every step waits for the previous one's tokens, requests ending at different steps included."""
    ahead, waiting = cuda_f32, Served("cuda", "float32")
    waiting.engine._greedy = lambda batch: False  # no step goes ahead
    try:
        ids = prompt(ahead, 150)
        patterns = ["dense", "quest:4", "snapkv:4", "ada_snapkv:4"]

        def run(served):
            reqs = [make_request(f"{p}-{i}", ids, p, max_tokens=6 + 5 * i, ignore_eos=True)
                    for i, p in enumerate(patterns)]
            return generate(served, reqs)

        for a, w, p in zip(run(ahead), run(waiting), patterns, strict=True):
            assert a.token_ids == w.token_ids, p
            assert a.final.cost.decode.kv_bytes_read == w.final.cost.decode.kv_bytes_read, p
            assert a.final.cost.decode.kv_cache_tokens == w.final.cost.decode.kv_cache_tokens, p
    finally:
        waiting.close()
