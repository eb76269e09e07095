"""Observation-window token importance for the SnapKV family (SnapKV, Ada-SnapKV).

The last ``W`` prompt queries (the observation window) vote for the prompt tokens worth keeping: per query
head, ``A = softmax(q[-W:] K^T / sqrt(d))`` in float32 with the causal mask inside the last ``W x W``
corner (window query ``i`` sits at prompt position ``n - W + i`` and sees keys ``0 .. n - W + i``). The
votes are then reduced to one score per (KV head, token), over the window queries and over the KV head's
GQA group of ``g`` query heads, and smoothed along the sequence by a 1-D pool (stride 1, "same" output
length).

Shapes: ``q [h, m, d]`` the queries of the last ``m <= n`` prompt positions (the observation window, a last
chunk, or the whole prompt; only the last ``W = min(window, m)`` rows are read), ``k [h_kv, n, d]``; query
head ``i`` uses KV head ``i // g``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["sum_of_group_mean", "max"]


def window_attention(q_group: Tensor, k_head: Tensor, window: int) -> Tensor:
    """Causal attention probabilities of the last ``window`` queries of one GQA group over all keys.

    ``q_group [g, m, d]`` (positions ``[n - m, n)``), ``k_head [n, d]`` -> ``[g, W, n]`` float32 with
    ``W = min(window, m)``."""
    g, m, d = q_group.shape
    n = k_head.shape[0]
    w = min(window, m)
    logits = q_group[:, m - w :].float() @ k_head.float().T / math.sqrt(d)  # [g, W, n]
    query_pos = torch.arange(n - w, n, device=q_group.device)[:, None]
    key_pos = torch.arange(n, device=q_group.device)[None, :]
    logits = logits.masked_fill(key_pos > query_pos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def token_importance(q: Tensor, k: Tensor, window: int, reduction: Reduction) -> Tensor:
    """One importance score per (KV head, prompt token): ``[h_kv, n]`` float32.

    * ``"sum_of_group_mean"`` (SnapKV): sum over window queries of the mean over the group's query heads.
    * ``"max"`` (Ada-SnapKV): max over window queries and over the group's query heads.

    Computed one KV head at a time so memory stays ``O(g * W * n)``."""
    h = q.shape[0]
    h_kv, n = k.shape[0], k.shape[1]
    group = h // h_kv
    scores = torch.empty(h_kv, n, dtype=torch.float32, device=k.device)
    for j in range(h_kv):
        probs = window_attention(q[j * group : (j + 1) * group], k[j], window)  # [g, W, n]
        if reduction == "sum_of_group_mean":
            scores[j] = probs.mean(dim=0).sum(dim=0)
        elif reduction == "max":
            scores[j] = probs.amax(dim=(0, 1))
        else:
            raise ValueError(f"unknown reduction {reduction!r}")
    return scores


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """(left, right) padding that keeps the length for a stride-1 window of ``kernel_size`` (centred; an
    even kernel leans one token to the left)."""
    left = kernel_size // 2
    return left, kernel_size - 1 - left


def avg_pool_same(scores: Tensor, kernel_size: int) -> Tensor:
    """1-D average pool along the last dim, stride 1, same length. The sequence is padded with zeros and
    every window is divided by ``kernel_size`` (the padding counts, as in SnapKV's released code, i.e.
    ``avg_pool1d(..., padding=kernel_size // 2)`` with ``count_include_pad=True``): tokens within
    ``kernel_size // 2`` of either end are scaled down. Those ends are the sinks and the local window,
    which are force-kept anyway."""
    if kernel_size <= 1:
        return scores
    padded = F.pad(scores.unsqueeze(1), _same_padding(kernel_size), value=0.0)
    return F.avg_pool1d(padded, kernel_size, stride=1).squeeze(1)


def max_pool_same(scores: Tensor, kernel_size: int) -> Tensor:
    """1-D max pool along the last dim, stride 1, same length (padding never wins: it is ``-inf``)."""
    if kernel_size <= 1:
        return scores
    padded = F.pad(scores.unsqueeze(1), _same_padding(kernel_size), value=float("-inf"))
    return F.max_pool1d(padded, kernel_size, stride=1).squeeze(1)
