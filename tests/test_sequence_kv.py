"""A sequence's page tables during decode (server/engine/sequence_kv.py): heads holding different numbers of
tokens (what Ada-SnapKV leaves) take their pages together when the pool has pages to spare, never more than
the request can still use, and every page a step takes is in the tables and in the log the step buffers apply."""

from __future__ import annotations

import torch

from server.engine.page_pool import PagePool
from server.engine.sequence_kv import SequenceKV

PAGE = 4


def ada_like_sequence(pool: PagePool, kept: list[list[int]]) -> SequenceKV:
    """A sequence whose heads keep ``kept[layer][head]`` prompt tokens (a 40-token prompt, then eviction)."""
    layers, heads = len(kept), len(kept[0])
    seq = SequenceKV(pool, layers, heads)
    g = torch.Generator().manual_seed(0)
    for layer in range(layers):
        k = torch.randn(heads, 40, 8, generator=g)
        seq.append_prompt(layer, k, -k)
        seq.keep_only(layer, [torch.arange(n) for n in kept[layer]])
    return seq


KEPT = [[5, 9, 14], [3, 4, 11]]  # every residue class mod the page size differs somewhere


def run(seq: SequenceKV, steps: int, horizon: int, spare: int) -> tuple[int, int]:
    """Decode ``steps`` tokens -> (allocations, pages taken ahead of need)."""
    pool, calls, ahead = seq.pool, [], 0
    allocate = pool.allocate

    def counted(n):
        calls.append(n)
        return allocate(n)

    pool.allocate = counted
    for step in range(steps):
        held_before = seq.pages_held.clone()
        ahead += seq.prepare_append(horizon - step, spare)
        assert bool((seq.lengths < seq.pages_held * PAGE).all())  # room for this step's token in every head
        assert int((seq.pages_held - held_before).max()) <= 1
        seq.commit_append()
    pool.allocate = allocate
    return len(calls), ahead


def test_heads_take_their_pages_together_when_pages_are_spare():
    pool = PagePool(200, PAGE, 8, torch.float32, "cpu")
    seq = ada_like_sequence(pool, KEPT)
    events, ahead = run(seq, steps=4 * PAGE, horizon=1000, spare=pool.num_pages)
    assert events <= 4 + 1 and ahead > 0  # about once per page_size steps, not at every head's boundary
    room = seq.pages_held * PAGE - seq.lengths
    assert int(room.max()) < 2 * PAGE  # at most one page held ahead

    alone = ada_like_sequence(PagePool(200, PAGE, 8, torch.float32, "cpu"), KEPT)
    events_alone, ahead_alone = run(alone, steps=4 * PAGE, horizon=1000, spare=0)  # no pages to spare
    assert ahead_alone == 0 and events_alone > events
    assert int((alone.pages_held * PAGE - alone.lengths).max()) <= PAGE


def test_no_page_is_taken_that_the_request_cannot_use():
    """Near its last token a request takes only the pages its remaining tokens fill: at most its need."""
    pool = PagePool(200, PAGE, 8, torch.float32, "cpu")
    seq = ada_like_sequence(pool, KEPT)
    appends = 6
    run(seq, steps=appends, horizon=appends, spare=pool.num_pages)
    need = -(-seq.lengths // PAGE)  # pages the tokens it ends with fill
    assert torch.equal(seq.pages_held, need)


def test_every_page_taken_is_in_the_tables_and_in_the_log():
    pool = PagePool(200, PAGE, 8, torch.float32, "cpu")
    seq = ada_like_sequence(pool, KEPT)
    version = seq.version
    run(seq, steps=3 * PAGE, horizon=1000, spare=pool.num_pages)
    assert seq.version == version  # decode growth is logged, not a new version (the buffers apply the log)
    log = torch.cat(seq.grown)
    assert torch.equal(seq.tables[log[:, 0].long(), log[:, 1].long(), log[:, 2].long()], log[:, 3])
    held = int(seq.pages_held.sum())
    assert held == int((seq.tables >= 0).sum()) == pool.num_pages - pool.free_pages
    assert len(set(seq.tables[seq.tables >= 0].tolist())) == held  # no page twice
    seq.release()
    assert pool.free_pages == pool.num_pages
