"""The engine's CUDA code path (Triton paged decode, Triton prefill methods), run on the CPU through the
Triton interpreter (``TRITON_INTERPRET=1``, set by ``make test``) on a tiny random model: it must give the
tokens the PyTorch path gives, for every decode method and a sparse prefill method."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from engine_helpers import ByteTokenizer, collect, make_request, tiny_model

from server.engine.engine import EngineOptions, NativeEngine

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (make test sets it)")


def use_triton_kernels(engine: NativeEngine, bucketed: bool = False) -> None:
    """Switch a CPU engine to the CUDA code path: Triton prefill methods and decode kernels, and with ``bucketed``
    the CUDA decode layout (batches padded to their bucket in static buffers; not captured: no CUDA here)."""
    engine.runner.use_triton_kernels()
    if bucketed:
        engine.runner.enable_cuda_graphs(engine.options.max_num_seqs, engine.max_model_len, capture=False)


@pytest.mark.parametrize(("pattern", "chunk", "length"), [
    *((p, 0, 150) for p in ("dense", "quest:3", "snapkv:2", "ada_snapkv:2", "block_sparse:2+quest:2",
                            "vertical_slash:2+snapkv:2")),
    # chunked prefill: the Triton methods on chunks (q_offset) in the engine (a lone dense prompt prefills whole)
    # (vertical_slash with its budgets given: for a target ratio the two paths search them on different cell
    # counts, docs/methods.md)
    ("block_sparse:2+snapkv:2", 128, 400),
    ({"prefill": {"method": "vertical_slash", "params": {"num_vertical": 40, "num_slash": 60}}}, 128, 400)])
def test_triton_path_matches_pytorch_path(pattern, chunk, length):
    model, tok = tiny_model(), ByteTokenizer()
    prompt = [(7 * i + 3) % 96 for i in range(length)]

    async def generate(use_triton: bool):
        engine = NativeEngine(model, tok, EngineOptions(device="cpu", dtype="float32", kv_cache_memory=8 << 20,
                                                        max_prefill_chunk=chunk,
                                                        max_sparse_prefill_chunk=chunk), "tiny")
        if use_triton:
            use_triton_kernels(engine)
        await engine.start()
        try:
            return await collect(engine, make_request(str(pattern), prompt, pattern, max_tokens=6, logprobs=1,
                                                      ignore_eos=True))
        finally:
            await engine.shutdown(timeout=5)

    torch_path, triton_path = asyncio.run(generate(False)), asyncio.run(generate(True))
    assert triton_path.token_ids == torch_path.token_ids
    for a, b in zip(torch_path.logprobs, triton_path.logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    assert (triton_path.final.cost.decode.achieved_compression_ratio
            == pytest.approx(torch_path.final.cost.decode.achieved_compression_ratio))
    # the prefill's cost is in, read from the device when the prefill ended (the Triton reports defer it)
    fast, ref = triton_path.final.cost.prefill, torch_path.final.cost.prefill
    assert fast.dense_units == ref.dense_units and 0 < fast.actual_units <= fast.dense_units
    assert not isinstance(fast.actual_units, torch.Tensor) and not isinstance(fast.attention_flops, torch.Tensor)


def test_cuda_decode_layout_gives_each_request_of_a_mixed_batch_its_tokens_alone():
    """The CUDA decode step (Triton kernels over padded static buffers) on a batch of dense, Quest (two budgets: the
    step's selection width is the larger's) and SnapKV rows: each request gets the tokens the PyTorch path gives it
    alone (2026-12-02: a Quest row after the first row of a mixed batch read another row's input as its budget)."""
    model, tok = tiny_model(), ByteTokenizer()
    prompt = [(7 * i + 3) % 96 for i in range(300)]
    patterns = ["dense", "quest:10", "quest:2", "snapkv:4"]

    async def generate(cuda_layout: bool, batch: list[str]):
        engine = NativeEngine(model, tok, EngineOptions(device="cpu", dtype="float32", kv_cache_memory=8 << 20,
                                                        max_num_seqs=8), "tiny")
        if cuda_layout:
            use_triton_kernels(engine, bucketed=True)
        await engine.start()
        try:
            reqs = [make_request(f"{p}-{i}", prompt, p, max_tokens=8, ignore_eos=True) for i, p in enumerate(batch)]
            return [r.token_ids for r in await asyncio.gather(*(collect(engine, r) for r in reqs))]
        finally:
            await engine.shutdown(timeout=5)

    alone = [asyncio.run(generate(False, [p]))[0] for p in patterns]
    assert len({tuple(t) for t in alone}) == len(patterns)  # the methods differ here: a swapped row would show
    assert asyncio.run(generate(True, patterns)) == alone
