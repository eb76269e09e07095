"""Triton kernels shared by the sparse methods (CUDA for real; the CPU under ``TRITON_INTERPRET=1`` in tests).

Entry points (layouts in each module's docstring):

* :func:`.sparse_prefill.sparse_prefill_attention` -- causal attention of ``q [h, n, d]`` over
  ``k``/``v [h_kv, n, d]`` (GQA by indexing, K/V never repeated) restricted to per-query-block key sets:
  relative chunks (slash bands, optional exact per-cell mask), key-block lists (block_sparse, block 16..128)
  and gathered columns (verticals); online softmax in float32. :func:`.sparse_prefill.count_cells` counts the
  cells a given index makes it compute.
* :func:`.paged_decode.paged_decode` -- decode attention ``q [B, h, d]`` over a page pool
  ``k_pages/v_pages [num_pages, page_size, d]`` (a page belongs to one KV head) with per-(sequence, KV head)
  page tables ``[B, h_kv, max_pages]`` and lengths ``[B, h_kv]``; split-K plus a merge kernel, no host sync.
* :func:`.quest_select.quest_select` / :func:`.quest_select.quest_decode` -- Quest page scores from per-page
  key min/max, exact top-k with the current page forced, then paged decode over the selected pages.
* :func:`.index_vertical_slash.window_scores` -- last-window estimate (vertical and slash sums, or column
  max) without materialising ``[h, W, n]``; :class:`.index_vertical_slash.VSCandidates` (keep orders, computed
  cells, budget search); :func:`.index_vertical_slash.block_scores` + :func:`.topk.causal_block_topk`
  (block_sparse index).
* :func:`.snapkv_select.snapkv_keep` / :func:`.snapkv_select.ada_snapkv_keep` -- keep sets after prefill.
* :mod:`.methods` -- every method behind the references' contract (registries ``PREFILL`` / ``DECODE``), used
  by ``attention_backends.sparse_prefill(..., impl="triton")`` and ``prepare_decode(..., impl="triton")``.
"""


def steps_by_one(*tensors) -> bool:
    """Whether a kernel may step along each tensor's last dimension by one element. A dimension of size one
    passes whatever its stride: torch keeps a view's stride there (a batch of one decode row sliced from a
    ``[1, 4]`` matrix has stride 4), and no kernel ever steps along it."""
    return all(t.shape[-1] <= 1 or t.stride(-1) == 1 for t in tensors)
