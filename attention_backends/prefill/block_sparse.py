"""Block-sparse (MInference), the plain PyTorch reference; ``docs/methods.md`` defines it.

With ``B = block_size`` and ``nb = ceil(n / B)`` blocks (the last one may be partial):

1. Mean-pool q and k over each block (a partial block is averaged over its real tokens);
   ``score = pooled_q @ pooled_k^T`` (raw dot product, each query head against its KV head), causal at
   block level (key block ``<=`` query block).
2. Always keep the sink block (0), the diagonal block and the block before it.
3. Each query block keeps its top ``k`` key blocks; ``k`` counts the forced blocks (so it is at least 3)
   and is clamped to the causal blocks the query block has.
4. Causal attention over the kept blocks (cells above the diagonal inside diagonal blocks are not computed).

Ratio mapping: with ``top_k`` not given, ``k`` is the value in ``[1, nb]`` whose density is closest to
``1 / r``. The spec's analytic density ``[k(k+1)/2 + (nb-k)k] / [nb(nb+1)/2]`` counts whole blocks; this
reference uses the same count in *cells* — :func:`kept_cells` — which also counts the half-empty diagonal
blocks, the partial last block and the forced minimum of 3 blocks per row. It depends only on ``k``, not on
the scores, and is exactly the number of cells computed, so the achieved ratio tracks the target (the
block count overestimates the density by about ``1 / (2k)`` relative, 8% at ``k = 6``). ``r = 1`` gives
``k = nb``: every causal block, i.e. dense.

Chunked prefill (``q_offset = c0``, a multiple of ``B``): the chunk's query blocks are the absolute blocks
``c0 / B ..``; their pooled queries are scored against every key block ``[0, n)``, causal and forced blocks
taken at the absolute block index, and ``k`` is resolved over the chunk's own causal cells (rows ``[c0, n)``).

Indexing FLOPs reported: pooling ``(h + h_kv) n d`` adds, the block score matrix ``2 d h nb^2`` and the
per-row top-k ``h nb^2 log2(k)`` comparisons (the causal half is not exploited in the estimate).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..cost import causal_cells
from ..spec import PhaseSpec
from .common import PrefillOutcome, check_chunk_start, closest_budget_search, expand_kv, masked_causal_attention

FORCED_BLOCKS = 3  # sink, previous, diagonal


def mean_pool(x: Tensor, block: int) -> Tensor:
    """``[heads, n, d] -> [heads, ceil(n / block), d]``: the mean over each block's real tokens."""
    heads, n, d = x.shape
    nb = math.ceil(n / block)
    padded = torch.zeros(heads, nb * block, d, dtype=torch.float32, device=x.device)
    padded[:, :n] = x.float()
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = n - (nb - 1) * block
    return padded.reshape(heads, nb, block, d).sum(dim=2) / counts[None, :, None]


@functools.lru_cache(maxsize=1024)  # pure in its arguments; at 32K the host-side search cost ~10% of the GPU time
def kept_cells(n: int, block: int, top_k: int, q_offset: int = 0) -> int:
    """Causal cells one head computes when each query block ``i`` keeps ``min(max(top_k, 3), i + 1)`` key
    blocks, the diagonal among them. Only *which* blocks depend on the scores, not how many, so this is
    exact: the full ``B``-wide blocks left of the diagonal plus the causal triangle of the diagonal block.
    ``q_offset``: only the query blocks from ``q_offset / B`` on (a chunk)."""
    nb = math.ceil(n / block)
    i = torch.arange(q_offset // block, nb, dtype=torch.int64)
    rows = (n - i * block).clamp(max=block)  # real query tokens of block i
    off_diagonal = (i + 1).clamp(max=max(top_k, FORCED_BLOCKS)) - 1
    return int((rows * block * off_diagonal + rows * (rows + 1) // 2).sum())


@functools.lru_cache(maxsize=1024)
def top_k_for_ratio(n: int, block: int, ratio: float, q_offset: int = 0) -> int:
    """The ``k`` in ``[1, nb]`` whose :func:`kept_cells` density (over the causal cells of rows
    ``[q_offset, n)``) is closest to ``1 / ratio`` (binary search: the density grows with ``k``)."""
    nb = math.ceil(n / block)
    dense = causal_cells(n, q_offset)
    target = 1.0 / ratio

    def density(k: int) -> float:
        return kept_cells(n, block, k, q_offset) / dense

    return closest_budget_search(density, target, nb)


def select_blocks(q: Tensor, k: Tensor, block: int, top_k: int, q_offset: int = 0) -> Tensor:
    """``[h, nqb, nb]`` bool: the key blocks each query block of each query head keeps (query block ``r`` of
    ``q`` is the absolute block ``q_offset / B + r``)."""
    h = q.shape[0]
    pooled_q = mean_pool(q, block)  # [h, nqb, d]
    pooled_k = expand_kv(mean_pool(k, block), h)  # [h, nb, d], query head i uses KV head i // g
    scores = pooled_q @ pooled_k.transpose(1, 2)  # [h, nqb, nb]
    nqb, nb = scores.shape[-2:]
    rows = torch.arange(nqb, device=q.device)[:, None] + q_offset // block  # absolute query blocks
    blocks = torch.arange(nb, device=q.device)[None, :]
    causal = blocks <= rows
    forced = (blocks == 0) | (blocks == rows) | (blocks == rows - 1)
    scores = scores.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    per_row = min(max(top_k, FORCED_BLOCKS), nb)
    chosen = scores.topk(per_row, dim=-1).indices
    keep = torch.zeros(h, nqb, nb, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
    return keep & causal  # rows with fewer than per_row causal blocks picked some non-causal ones


def block_row_mask(keep: Tensor, n: int, block: int, q_offset: int = 0) -> Callable[[int, int], Tensor]:
    """``row_mask(start, stop) -> [h, stop - start, n]`` (absolute rows) for
    :func:`~.common.masked_causal_attention`; ``keep``'s first row is the query block at ``q_offset``."""

    def mask(start: int, stop: int) -> Tensor:
        query_blocks = (torch.arange(start, stop, device=keep.device) - q_offset) // block
        # each key block's flag repeated over its B tokens; the padding of a partial last block cut off
        return keep[:, query_blocks].repeat_interleave(block, dim=-1)[..., :n]

    return mask


def resolve_top_k(n: int, phase: PhaseSpec, q_offset: int = 0) -> tuple[int, int]:
    """``(block_size, top_k)`` for this call: the given ``top_k``, else the one for the target ratio."""
    params = phase.params
    block = params["block_size"]
    check_chunk_start(q_offset, block)
    top_k = params["top_k"]
    if top_k is None:
        top_k = top_k_for_ratio(n, block, phase.compression_ratio, q_offset)
    return block, min(max(top_k, FORCED_BLOCKS), math.ceil(n / block))


def indexing_flops(h: int, h_kv: int, n: int, d: int, block: int, top_k: int, q_offset: int = 0) -> float:
    m = n - q_offset  # queries of the call
    nb, nqb = math.ceil(n / block), math.ceil(m / block)
    return float((h * m + h_kv * n) * d + 2 * d * h * nqb * nb + h * nqb * nb * math.log2(max(top_k, 2)))


def prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, q_offset: int = 0) -> PrefillOutcome:
    h, _, d = q.shape
    n = k.shape[1]
    block, top_k = resolve_top_k(n, phase, q_offset)
    details = {"block_size": block, "top_k": top_k}
    if top_k >= math.ceil(n / block):  # every causal block: dense, no estimate needed
        out, cells = masked_causal_attention(q, k, v, q_offset=q_offset)
        return PrefillOutcome(out, cells, 0.0, details)
    keep = select_blocks(q, k, block, top_k, q_offset)
    out, cells = masked_causal_attention(q, k, v, block_row_mask(keep, n, block, q_offset), q_offset)
    return PrefillOutcome(out, cells, indexing_flops(h, k.shape[0], n, d, block, top_k, q_offset), details)
