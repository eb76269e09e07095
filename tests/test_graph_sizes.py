"""Decode graphs per set of sparse kernels (``server/vllm_engine/graph_sizes.py``): vLLM's default sizes for dense
steps, sizes of their own for each family (the keep launch, Quest, both), and the graph each batch replays. No vLLM
needed."""

from __future__ import annotations

import pytest

from server.vllm_engine import graph_sizes
from server.vllm_engine.graph_sizes import KEEP, QUEST, GraphSizes

NONE, K, Q, BOTH = frozenset(), frozenset({KEEP}), frozenset({QUEST}), frozenset({QUEST, KEEP})


def test_dense_steps_keep_vllms_default_sizes_and_each_family_gets_sizes_of_its_own():
    sizes = GraphSizes.for_batch(max_num_seqs=64, max_num_batched_tokens=133120)
    # vLLM 0.25's default for 64 sequences (the H200 runs' log: 1, 2, 4, 8, 16, ..., 128)
    assert sizes.base == (1, 2, 4, *range(8, 129, 8))
    families = dict(sizes.families)
    # beside each base size s: s + 1 for the keep launch, s + 2 for Quest, s + 3 for both, where free and a decode
    # batch (at most 64 rows) can reach it
    assert families[K] == (3, 5, 9, 17, 25, 33, 41, 49, 57)
    assert families[Q] == (6, 10, 18, 26, 34, 42, 50, 58)  # (1 + 2 = 3 is the keep launch's; 2 + 2 a base size)
    assert families[BOTH] == (7, 11, 19, 27, 35, 43, 51, 59)
    assert len(sizes.all) == len(set(sizes.all)) == 19 + 9 + 8 + 8  # no size captured twice
    assert sizes.every == BOTH
    small = GraphSizes.for_batch(4, 8192)
    assert small.base == (1, 2, 4, 8) and dict(small.families) == {K: (3,), Q: (), BOTH: ()}
    assert max(GraphSizes.for_batch(512, 100000).base) == 512 and max(GraphSizes.for_batch(64, 24).base) == 24
    # Quest alone in the graphs (SPARSE_SERVE_VLLM_KEEP_GRAPH=0): one family, Quest's, at s + 1
    assert GraphSizes.for_batch(64, 133120, Q).families == ((Q, (3, 5, 9, 17, 25, 33, 41, 49, 57)),)


def test_each_batch_replays_the_smallest_graph_that_holds_its_rows_and_only_its_kernels():
    sizes = GraphSizes.for_batch(max_num_seqs=64, max_num_batched_tokens=133120)
    assert [sizes.size_for(n, NONE) for n in (1, 3, 5, 9, 64, 100, 128)] == [1, 4, 8, 16, 64, 104, 128]
    assert sizes.size_for(129, NONE) is None  # (vLLM runs it without a full graph)
    assert [sizes.size_for(n, K) for n in (1, 3, 4, 8, 32, 57)] == [3, 3, 5, 9, 33, 57]
    assert [sizes.size_for(n, Q) for n in (1, 6, 7, 32, 58)] == [6, 6, 10, 34, 58]
    assert [sizes.size_for(n, BOTH) for n in (1, 8, 32, 59)] == [7, 11, 35, 59]
    # past its own family's widest size a batch takes a family with more kernels; past every one, none holds it
    assert sizes.size_for(58, K) == 59 and sizes.size_for(59, Q) == 59
    assert sizes.size_for(60, K) is None and sizes.size_for(60, BOTH) is None
    # what the builder captures at each size: nothing at a base size, the family's kernels at its sizes, and every
    # kernel at a size no graph has (the step runs eagerly)
    assert all(sizes.kernels(s) == NONE for s in sizes.base)
    assert [sizes.kernels(s) for s in (3, 6, 7, 57, 58, 59)] == [K, Q, BOTH, K, Q, BOTH]
    assert sizes.kernels(129) == sizes.kernels(60) == BOTH


@pytest.mark.parametrize("quest, keep, kernels", [(None, None, BOTH), ("1", "0", Q), ("0", "1", NONE)])
def test_the_switches_choose_which_kernels_the_graphs_take(monkeypatch, quest, keep, kernels):
    for env, value in ((graph_sizes.QUEST_GRAPH_ENV, quest), (graph_sizes.KEEP_GRAPH_ENV, keep)):
        if value is None:
            monkeypatch.delenv(env, raising=False)
        else:
            monkeypatch.setenv(env, value)
    assert graph_sizes.graph_kernels() == kernels
