"""Batched decode attention over per-(sequence, KV head) page tables, in PyTorch.

This is the engine's portable path (CPU, or CUDA without the Triton kernels): one gather of the selected
pages for the whole batch, then GQA attention with the group's query heads sharing each KV head. It
serves every decode method: dense and SnapKV/Ada-SnapKV pass each head's whole table (heads may hold
different numbers of tokens), Quest passes the pages it selected.
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


def page_fill(lengths: Tensor, num_pages: int, page_size: int) -> Tensor:
    """Valid tokens per page ``[..., num_pages]`` for heads holding ``lengths [...]`` tokens."""
    starts = torch.arange(num_pages, device=lengths.device) * page_size
    return (lengths.unsqueeze(-1) - starts).clamp(0, page_size)


def choose_quest_pages(q: Tensor, key_min: Tensor, key_max: Tensor, tables: Tensor, lengths: Tensor,
                       budget_pages: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """Quest's page choice for a batch of decode queries.

    ``q [B, h, d]``; pool ``key_min``/``key_max`` ``[num_pages, d]``; ``tables [B, h_kv, P]``; ``lengths
    [B, h_kv]`` tokens held (the current token included); ``budget_pages [B]`` pages to read per head.
    Upper bound of q.k over a page: sum_d max(q_d min_d, q_d max_d), summed over the group's query heads.
    The last (current) page is always chosen. Returns the chosen logical page indices ``[B, h_kv, S]`` in
    ascending order, real choices first, and the number of real choices ``[B, h_kv]`` (rows with a smaller
    budget, or fewer pages, pad). Because the only partial page is the last one, the chosen pages hold
    their tokens as one contiguous prefix: a paged kernel reads them with a plain length."""
    b, h, d = q.shape
    h_kv, p = tables.shape[1], tables.shape[2]
    ids = tables.clamp(min=0)
    kmin, kmax = key_min[ids].float(), key_max[ids].float()  # [B, h_kv, P, d]
    qg = q.view(b, h_kv, h // h_kv, 1, d).float()
    ub = torch.maximum(qg * kmin.unsqueeze(2), qg * kmax.unsqueeze(2)).sum(-1).sum(2)  # [B, h_kv, P]
    n_pages = -(-lengths // page_size)  # [B, h_kv]
    logical = torch.arange(p, device=q.device).view(1, 1, p)
    ub = ub.masked_fill(logical >= n_pages.unsqueeze(-1), float("-inf"))
    ub = ub.masked_fill(logical == (n_pages - 1).unsqueeze(-1), float("inf"))
    s = int(min(p, int(budget_pages.max())))
    chosen = ub.topk(s, dim=-1).indices  # [B, h_kv, S]
    count = torch.minimum(budget_pages.view(b, 1).clamp(max=s), n_pages)
    rank = torch.arange(s, device=q.device).view(1, 1, s)
    chosen = torch.where(rank < count.unsqueeze(-1), chosen, p).sort(dim=-1).values  # pads sort last
    return chosen.clamp(max=p - 1), count


def selected_pages(tables: Tensor, lengths: Tensor, chosen: Tensor, count: Tensor, page_size: int
                   ) -> tuple[Tensor, Tensor]:
    """Page ids ``[B, h_kv, S]`` and token lengths ``[B, h_kv]`` of Quest's chosen pages."""
    fill = page_fill(lengths, tables.shape[2], page_size).gather(2, chosen)
    real = torch.arange(chosen.shape[2], device=chosen.device).view(1, 1, -1) < count.unsqueeze(-1)
    return tables.gather(2, chosen), (fill * real).sum(-1)
