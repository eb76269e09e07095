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

Indexing FLOPs reported: pooling ``(h + h_kv) n d`` adds, the block score matrix ``2 d h nb^2`` and the
per-row top-k ``h nb^2 log2(k)`` comparisons (the causal half is not exploited in the estimate).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..spec import PhaseSpec
from .common import PrefillOutcome, closest_budget_search, expand_kv, masked_causal_attention

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
def kept_cells(n: int, block: int, top_k: int) -> int:
    """Causal cells one head computes when each query block ``i`` keeps ``min(max(top_k, 3), i + 1)`` key
    blocks, the diagonal among them. Only *which* blocks depend on the scores, not how many, so this is
    exact: the full ``B``-wide blocks left of the diagonal plus the causal triangle of the diagonal block."""
    nb = math.ceil(n / block)
    i = torch.arange(nb, dtype=torch.int64)
    rows = (n - i * block).clamp(max=block)  # real query tokens of block i
    off_diagonal = (i + 1).clamp(max=max(top_k, FORCED_BLOCKS)) - 1
    return int((rows * block * off_diagonal + rows * (rows + 1) // 2).sum())


@functools.lru_cache(maxsize=1024)
def top_k_for_ratio(n: int, block: int, ratio: float) -> int:
    """The ``k`` in ``[1, nb]`` whose :func:`kept_cells` density is closest to ``1 / ratio`` (binary search:
    the density grows with ``k``)."""
    nb = math.ceil(n / block)
    dense = n * (n + 1) / 2
    target = 1.0 / ratio

    def density(k: int) -> float:
        return kept_cells(n, block, k) / dense

    return closest_budget_search(density, target, nb)


def select_blocks(q: Tensor, k: Tensor, block: int, top_k: int) -> Tensor:
    """``[h, nb, nb]`` bool: the key blocks each query block of each query head keeps."""
    h = q.shape[0]
    pooled_q = mean_pool(q, block)  # [h, nb, d]
    pooled_k = expand_kv(mean_pool(k, block), h)  # [h, nb, d], query head i uses KV head i // g
    scores = pooled_q @ pooled_k.transpose(1, 2)  # [h, nb, nb]
    nb = scores.shape[-1]
    blocks = torch.arange(nb, device=q.device)
    causal = blocks[None, :] <= blocks[:, None]
    forced = (blocks[None, :] == 0) | (blocks[None, :] == blocks[:, None]) | (blocks[None, :] == blocks[:, None] - 1)
    scores = scores.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    per_row = min(max(top_k, FORCED_BLOCKS), nb)
    chosen = scores.topk(per_row, dim=-1).indices
    keep = torch.zeros(h, nb, nb, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
    return keep & causal  # rows with fewer than per_row causal blocks picked some non-causal ones


def block_row_mask(keep: Tensor, n: int, block: int) -> Callable[[int, int], Tensor]:
    """``row_mask(start, stop) -> [h, stop - start, n]`` for :func:`~.common.masked_causal_attention`."""

    def mask(start: int, stop: int) -> Tensor:
        query_blocks = torch.arange(start, stop, device=keep.device) // block
        # each key block's flag repeated over its B tokens; the padding of a partial last block cut off
        return keep[:, query_blocks].repeat_interleave(block, dim=-1)[..., :n]

    return mask


def resolve_top_k(n: int, phase: PhaseSpec) -> tuple[int, int]:
    """``(block_size, top_k)`` for this call: the given ``top_k``, else the one for the target ratio."""
    params = phase.params
    block = params["block_size"]
    top_k = params["top_k"]
    if top_k is None:
        top_k = top_k_for_ratio(n, block, phase.compression_ratio)
    return block, min(max(top_k, FORCED_BLOCKS), math.ceil(n / block))


def indexing_flops(h: int, h_kv: int, n: int, d: int, block: int, top_k: int) -> float:
    nb = math.ceil(n / block)
    return float((h + h_kv) * n * d + 2 * d * h * nb * nb + h * nb * nb * math.log2(max(top_k, 2)))


def prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec) -> PrefillOutcome:
    h, n, d = q.shape
    block, top_k = resolve_top_k(n, phase)
    details = {"block_size": block, "top_k": top_k}
    if top_k >= math.ceil(n / block):  # every causal block: dense, no estimate needed
        out, cells = masked_causal_attention(q, k, v)
        return PrefillOutcome(out, cells, 0.0, details)
    keep = select_blocks(q, k, block, top_k)
    out, cells = masked_causal_attention(q, k, v, block_row_mask(keep, n, block))
    return PrefillOutcome(out, cells, indexing_flops(h, k.shape[0], n, d, block, top_k), details)
