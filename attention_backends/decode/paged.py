"""Batched decode attention over per-(sequence, KV head) page tables, in PyTorch: the reference of
:func:`..kernels.paged_decode.paged_decode`.

This is the engine's portable path (CPU, or CUDA without the Triton kernels): one gather of the selected
pages for the whole batch, then GQA attention with the group's query heads sharing each KV head. It
serves every decode method: dense and SnapKV/Ada-SnapKV pass each head's whole table (heads may hold
different numbers of tokens), Quest passes the pages it selected (:func:`.quest.select_pages`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_mask(fill: Tensor, page_size: int) -> Tensor:
    """Which token slots of the listed pages are valid: ``fill [..., S]`` -> bool ``[..., S * page_size]``."""
    slots = torch.arange(page_size, device=fill.device)
    return (slots < fill.unsqueeze(-1)).flatten(-2)


def paged_decode_attention(q: Tensor, keys: Tensor, values: Tensor, tables: Tensor, fill: Tensor,
                           valid: Tensor | None = None) -> Tensor:
    """``q [B, h, d]``; pool ``keys``/``values`` ``[num_pages, page_size, d]``; ``tables [B, h_kv, S]`` page
    ids (any value where ``fill`` is 0); ``fill [B, h_kv, S]`` valid tokens in each listed page (or the
    precomputed ``valid = token_mask(fill)``). Returns ``[B, h, d]`` in q's dtype."""
    b, h, d = q.shape
    h_kv, s = tables.shape[1], tables.shape[2]
    ps = keys.shape[1]
    ids = tables.clamp(min=0)
    k = keys[ids].view(b, h_kv, s * ps, d)
    v = values[ids].view(b, h_kv, s * ps, d)
    if valid is None:
        valid = token_mask(fill, ps)
    qg = q.view(b, h_kv, h // h_kv, d).to(k.dtype)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid.view(b, h_kv, 1, s * ps))
    return out.reshape(b, h, d).to(q.dtype)


def pow2_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (at least 1): the size class of a decode shape (page counts, Quest widths,
    lengths), so the Triton kernels compile and CUDA graphs capture once per class, not per value."""
    return 1 << max(0, int(n) - 1).bit_length()


def page_fill(lengths: Tensor, num_pages: int, page_size: int) -> Tensor:
    """Valid tokens per page ``[..., num_pages]`` for heads holding ``lengths [...]`` tokens."""
    starts = torch.arange(num_pages, device=lengths.device) * page_size
    return (lengths.unsqueeze(-1) - starts).clamp(0, page_size)
