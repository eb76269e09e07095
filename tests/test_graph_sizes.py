"""Dense decode steps' own CUDA-graph sizes (``server/vllm_engine/graph_sizes.py``): vLLM's default sizes for dense
steps, a twin of each for steps with sparse rows, and the graph each batch replays. No vLLM needed."""

from __future__ import annotations

from server.vllm_engine.graph_sizes import GraphSizes


def test_dense_steps_keep_vllms_default_sizes_and_sparse_steps_get_a_twin_of_each_reachable_one():
    sizes = GraphSizes.for_batch(max_num_seqs=64, max_num_batched_tokens=133120)
    # vLLM 0.25's default for 64 sequences (the H200 runs' log: 1, 2, 4, 8, 16, ..., 128)
    assert sizes.base == (1, 2, 4, *range(8, 129, 8))
    assert sizes.twins == (3, 5, 9, 17, 25, 33, 41, 49, 57)  # (2 is a base size; no twin above 64 sequences)
    assert sizes.all == sorted(set(sizes.base) | set(sizes.twins)) and len(sizes.all) == 28
    assert GraphSizes.for_batch(4, 8192).base == (1, 2, 4, 8) and GraphSizes.for_batch(4, 8192).twins == (3,)
    assert max(GraphSizes.for_batch(512, 100000).base) == 512 and max(GraphSizes.for_batch(64, 24).base) == 24


def test_each_batch_replays_the_smallest_graph_of_its_family_that_holds_it():
    sizes = GraphSizes.for_batch(max_num_seqs=64, max_num_batched_tokens=133120)
    assert [sizes.size_for(n, sparse=False) for n in (1, 3, 5, 9, 64, 100, 128)] == [1, 4, 8, 16, 64, 104, 128]
    assert sizes.size_for(129, sparse=False) is None  # (vLLM runs it without a full graph)
    assert [sizes.size_for(n, sparse=True) for n in (1, 3, 4, 8, 57)] == [3, 3, 5, 9, 57]
    assert sizes.size_for(58, sparse=True) is None  # wider than every twin: the dispatcher keeps it out of FULL
    assert not any(sizes.takes_sparse(s) for s in sizes.base)
    assert all(sizes.takes_sparse(s) for s in (*sizes.twins, 129, 300))
