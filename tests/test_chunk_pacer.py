"""The chunk pacer (server/engine/chunk_pacer.py): dense prefill chunks sized by a time budget while requests decode,
from times measured as the engine runs."""

from __future__ import annotations

import pytest

from attention_backends.cost import ModelShape, dense_chunk_flops, logits_flops, prefill_flops
from server.engine.chunk_pacer import ChunkPacer

# Qwen2.5-7B's shape (the e2e benchmark's model)
QWEN7B = ModelShape(num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, hidden_size=3584,
                    intermediate_size=18944, vocab_size=152064)


def device_seconds(start: int, end: int) -> float:
    """A stand-in for an H200 running a dense chunk: reading the weights (3 ms) plus the chunk's FLOPs at 400
    TFLOP/s; the pacer only sees the times."""
    return 3e-3 + dense_chunk_flops(QWEN7B, start, end) / 400e12


def prefill(pacer: ChunkPacer, n: int) -> list[tuple[int, int, float]]:
    """Pace an ``n``-token prompt through the stand-in device: (start, end, seconds) of every chunk."""
    chunks, start = [], 0
    while start < n:
        end = min(n, start + pacer.chunk_tokens(start))
        seconds = device_seconds(start, end)
        pacer.observe_chunk(start, end, seconds)
        chunks.append((start, end, seconds))
        start = end
    return chunks


def test_chunk_flops_add_up_to_the_whole_prompts():
    """The chunks' FLOPs of a prompt split anywhere sum to the whole prompt's dense prefill FLOPs (logits apart)."""
    whole = prefill_flops(QWEN7B, 10_000).total_dense - logits_flops(QWEN7B, 1)
    cuts = [0, 128, 4096, 4100, 9000, 10_000]
    parts = sum(dense_chunk_flops(QWEN7B, a, b) for a, b in zip(cuts, cuts[1:], strict=False))
    assert parts == pytest.approx(whole, rel=1e-12)
    assert dense_chunk_flops(QWEN7B, 100_000, 100_128) > 2 * dense_chunk_flops(QWEN7B, 0, 128)  # later keys cost


def test_until_times_are_known_chunks_are_the_longest_then_the_shortest():
    pacer = ChunkPacer(QWEN7B, stall=0.75, max_chunk=4096, align=128)
    assert pacer.budget_s() is None and pacer.chunk_tokens(0) == 4096  # no decode timed: the fixed size
    pacer.observe_decode_step(9e-3)
    assert pacer.budget_s() == pytest.approx(0.75 * 9e-3) and pacer.budget_s(4) == pytest.approx(3 * 9e-3)
    assert pacer.chunk_tokens(0) == 128  # no chunk timed: one align, to measure the rate


def test_a_long_prompts_chunks_converge_to_the_budget_and_shrink_as_the_context_grows():
    """A 32K prompt on the stand-in device while decode steps take 20 ms: after the first few chunks every chunk
    takes its budget (20 ms) within 15% (and one align of tokens), so a decoding request's inter-token latency
    stays near 2x; the chunks get shorter as their queries attend to more keys; all are multiples of 128 within
    the bounds."""
    pacer = ChunkPacer(QWEN7B, stall=1.0, max_chunk=4096, align=128)
    for _ in range(5):
        pacer.observe_decode_step(20e-3)
    chunks = prefill(pacer, 32_768)
    budget = 20e-3
    assert chunks[-1][1] == 32_768 and all(a == b for (_, a, _), (b, _, _) in zip(chunks, chunks[1:], strict=False))
    sizes = [b - a for a, b, _ in chunks]
    assert all(s % 128 == 0 and 128 <= s <= 4096 for s in sizes[:-1])
    settled = chunks[6:-1]
    # within 15% of the budget, up to the last align the budget could not hold
    assert all(t < 1.15 * budget and t * (b - a + 128) / (b - a) > 0.85 * budget for a, b, t in settled), \
        [(b - a, round(t / budget, 2)) for a, b, t in settled]
    assert sizes[6] > sizes[-2]  # late chunks attend to more keys: fewer tokens fit
    assert max(t for _, _, t in chunks) < 1.5 * budget


def test_a_chunk_of_the_smallest_size_may_exceed_the_budget():
    """Where one align of tokens already takes longer than the budget (here the end of a 128K prompt: 128 queries
    against 128K keys), chunks stay at that floor rather than stall the prefill."""
    pacer = ChunkPacer(QWEN7B, stall=0.75, max_chunk=4096, align=128)
    pacer.observe_decode_step(9e-3)
    pacer.observe_chunk(0, 128, device_seconds(0, 128))
    assert device_seconds(130_944, 131_072) > pacer.budget_s()
    assert pacer.chunk_tokens(130_944) == 128


def test_a_chunk_slower_than_predicted_makes_the_next_one_shorter():
    pacer = ChunkPacer(QWEN7B, stall=1.0, max_chunk=8192, align=128)
    pacer.observe_decode_step(10e-3)
    pacer.observe_chunk(0, 1024, 10e-3)  # took exactly the budget
    before = pacer.chunk_tokens(1024)
    pacer.observe_chunk(1024, 1024 + before, 30e-3)  # three times it
    assert pacer.chunk_tokens(1024 + before) < before


def test_a_larger_share_buys_a_longer_chunk():
    """A burst of prompts (more requests waiting for a first token than decoding) gets a budget that many times
    larger: longer, more efficient chunks."""
    pacer = ChunkPacer(QWEN7B, stall=0.75, max_chunk=8192, align=128)
    pacer.observe_decode_step(20e-3)
    pacer.observe_chunk(0, 1024, device_seconds(0, 1024))
    one, four = pacer.chunk_tokens(1024), pacer.chunk_tokens(1024, share=4)
    assert one < four <= 8192 and device_seconds(1024, 1024 + four) > 3 * device_seconds(1024, 1024 + one)


def test_the_decode_step_is_the_median_of_the_latest_steps():
    """One step that compiled a kernel or captured a graph (2 s) does not make the next chunk long."""
    pacer = ChunkPacer(QWEN7B, stall=1.0, max_chunk=4096, align=128)
    for seconds in (9e-3, 9e-3, 2.0, 9e-3, 9e-3):
        pacer.observe_decode_step(seconds)
    assert pacer.decode_step_s == pytest.approx(9e-3)


def test_a_pacer_needs_a_stall_and_a_chunk():
    with pytest.raises(ValueError):
        ChunkPacer(QWEN7B, stall=0.0, max_chunk=4096, align=128)
    with pytest.raises(ValueError):
        ChunkPacer(QWEN7B, stall=1.0, max_chunk=0, align=128)
