"""Shared pieces of the prefill references: the outcome type and causal attention restricted to a mask.

Shapes: ``q [h, n, d]``, ``k``/``v`` ``[h_kv, n, d]``, GQA group ``g = h // h_kv`` (query head ``i`` uses KV
head ``i // g``). Masks are built one query chunk at a time so memory stays ``O(h * chunk * n)``.

Chunked prefill: with ``q_offset = c0``, ``q [h, m, d]`` holds the queries of absolute positions ``[c0, n)``
(``n = c0 + m``) and ``k``/``v`` every key ``[0, n)``; query ``c0 + i`` attends causally to keys ``<= c0 + i``.
Row masks and index rows use absolute positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Rows of queries processed at once by the masked references (bounds the [h, chunk, n] score tensor).
QUERY_CHUNK = 512


@dataclass
class PrefillOutcome:
    out: Tensor  # [h, n, d], dtype of q
    computed_cells: int  # causal query-key cells computed, summed over query heads
    indexing_flops: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def closest_budget_search(fraction: Callable[[int], float], target: float, hi: int) -> int:
    """The integer ``k`` in ``[1, hi]`` whose non-decreasing ``fraction(k)`` is closest to ``target`` (binary
    search for the smallest ``k`` reaching it, then the better of it and its predecessor)."""
    if fraction(hi) < target:
        return hi
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fraction(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and abs(fraction(lo - 1) - target) < abs(fraction(lo) - target):
        return lo - 1
    return lo


def expand_kv(x: Tensor, num_heads: int) -> Tensor:
    """Repeat KV heads to match query heads (reference only: fast paths never materialise this)."""
    group = num_heads // x.shape[0]
    return x if group == 1 else x.repeat_interleave(group, dim=0)


def check_shapes(q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> None:
    """``q [h, m, d]`` (positions ``[q_offset, q_offset + m)``), ``k``/``v`` ``[h_kv, q_offset + m, d]``."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q [h, n, d], k/v [h_kv, n, d]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q_offset < 0:
        raise ValueError(f"q_offset must be >= 0, got {q_offset}")
    if k.shape != v.shape or (q_offset + q.shape[1], q.shape[2]) != tuple(k.shape[1:]):
        raise ValueError(f"q/k/v shapes disagree (q_offset {q_offset}): {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[0] % k.shape[0] != 0:
        raise ValueError(f"query heads ({q.shape[0]}) must be a multiple of KV heads ({k.shape[0]})")


class ChunkNotAligned(ValueError):
    """A prefill chunk starts inside one of its method's blocks (an engine whose chunks it does not choose, such
    as vLLM's, then runs that chunk dense)."""


def check_chunk_start(q_offset: int, block: int) -> None:
    """A chunk of a blocked method starts on a block boundary, so its blocks are the whole prompt's."""
    if q_offset % block:
        raise ChunkNotAligned(f"prefill chunks start at multiples of the block size ({block}); got q_offset "
                              f"{q_offset}")


def masked_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, row_mask: Callable[[int, int], Tensor] | None = None, q_offset: int = 0
) -> tuple[Tensor, int]:
    """Causal attention computing only the cells allowed by ``row_mask``, in float32.

    ``row_mask(start, stop)`` returns a bool tensor ``[h, stop - start, n]`` for the query rows of absolute
    positions ``start:stop`` (True = compute); it is intersected with the causal mask. ``None`` means dense.
    Every query row always attends to itself (the diagonal), so no row is empty. Returns the output and the
    computed cell count. ``q_offset``: the absolute position of ``q``'s first row (chunked prefill).
    """
    check_shapes(q, k, v, q_offset)
    h, m, d = q.shape
    n = k.shape[1]
    kf, vf = expand_kv(k.float(), h), expand_kv(v.float(), h)
    out = torch.empty(h, m, d, dtype=q.dtype, device=q.device)
    cols = torch.arange(n, device=q.device)
    cells = 0
    scale = 1.0 / math.sqrt(d)
    for start in range(q_offset, n, QUERY_CHUNK):
        stop = min(n, start + QUERY_CHUNK)
        rows = torch.arange(start, stop, device=q.device)
        # Keys after the chunk's last row are never causal: only the prefix [0, stop) is scored.
        allowed = (cols[None, :stop] <= rows[:, None]).unsqueeze(0).expand(h, -1, -1)
        if row_mask is not None:
            diag = cols[None, :stop] == rows[:, None]
            allowed = allowed & (row_mask(start, stop)[..., :stop] | diag)
        cells += int(allowed.sum())
        local = slice(start - q_offset, stop - q_offset)
        scores = torch.einsum("hqd,hkd->hqk", q[:, local].float(), kf[:, :stop]) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, local] = torch.einsum("hqk,hkd->hqd", torch.softmax(scores, dim=-1), vf[:, :stop]).to(q.dtype)
    return out, cells
