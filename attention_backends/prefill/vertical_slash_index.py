"""The vertical–slash index shared by ``vertical_slash`` and ``flexprefill``.

A head's index is a set of *verticals* (key columns ``j``: every query ``i >= j`` attends to ``j``) and a set
of *slashes* (offsets ``o``: every query ``i`` attends to key ``i - o``). This module holds:

* :func:`estimate_scores` — step 1–2 of ``docs/methods.md``: the last ``W`` queries'
  ``softmax(q k^T / sqrt(d))`` (causal inside the last ``W x W`` corner, float32, per query head), summed
  per column (vertical score) and per diagonal offset ``o = i - j`` (slash score);
* :class:`Candidates` — per head, columns and offsets in *keep order* (the forced ones first — sinks for
  verticals, the local window for slashes — then by descending score); :meth:`Candidates.select` keeps the
  first ``num_vertical[h]`` columns and ``num_slash[h]`` offsets of head ``h``, so budgets may differ per
  head (FlexPrefill) or not (Vertical-Slash);
* :class:`VerticalSlashIndex` — the selection itself, ``[h, n]`` bool per kind (column ``j`` / offset ``o``);
* the exact causal cell count an index covers (:func:`covered_cells`) — used by the ratio searches — and
  the row mask that makes :func:`~.common.masked_causal_attention` compute exactly the union.

Nothing here builds an ``[h, n, n]`` tensor: the estimate is ``[h, W, n]``, the index ``O(h n)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cost import causal_cells


@dataclass
class SlashScores:
    """Per query head: vertical score of each key column and slash score of each offset, both ``[h, n]``."""

    vertical: Tensor  # [h, n] float32, sum over the window rows of P[:, j]
    slash: Tensor  # [h, n] float32, sum over the window rows of the entries with i - j = o
    window: int  # W actually used (min(window, n))


def estimate_scores(q: Tensor, k: Tensor, window: int) -> SlashScores:
    """Vertical and slash scores from the last ``W = min(window, m)`` of the ``m`` queries in ``q`` (float32, per
    query head) against all ``n`` keys. ``q`` holds the queries of positions ``[n - m, n)`` (a chunk; ``m = n``
    for a whole prompt), so its last rows are the last queries before key ``n``."""
    h, m, d = q.shape
    h_kv, n = k.shape[0], k.shape[1]
    g = h // h_kv
    w = min(window, m)
    # Group the query heads of a KV head together so the product needs no expanded copy of k:
    # query head i = kv * g + j, so [h_kv, g * W, d] reshapes back to [h, W, n].
    q_last = q[:, m - w:].float().reshape(h_kv, g * w, d)
    scores = torch.matmul(q_last, k.float().transpose(1, 2)).reshape(h, w, n) / math.sqrt(d)
    rows = torch.arange(n - w, n, device=q.device)  # absolute positions of the window queries
    cols = torch.arange(n, device=q.device)
    offsets = rows[:, None] - cols[None, :]  # [W, n], o = i - j (negative above the diagonal)
    scores = scores.masked_fill((offsets < 0).unsqueeze(0), float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [h, W, n]
    vertical = probs.sum(dim=1)
    # Masked cells hold exactly 0, so sending them to offset 0 adds nothing.
    slash = torch.zeros(h, n, dtype=torch.float32, device=q.device)
    slash.index_add_(1, offsets.clamp(min=0).reshape(-1), probs.reshape(h, w * n))
    return SlashScores(vertical, slash, w)


def estimation_flops(h: int, n: int, d: int, window: int) -> float:
    """Indexing FLOPs of the estimate, ``h [2 d n W + 5 n W + 2 n log2 n]`` (docs/methods.md, "Cost accounting"):
    the ``W x n`` score product, softmax and the two reductions, and sorting the scores."""
    return float(h * (2 * d * n * window + 5 * n * window + 2 * n * math.log2(max(n, 2))))


def keep_order(scores: Tensor, forced: int) -> Tensor:
    """Per head, positions ``0..n-1`` in keep order: the first ``forced`` positions (sinks / local window),
    then the others by descending score (stable, so ties keep position order). ``[h, n]`` int64."""
    ranked = scores.clone()
    ranked[:, :forced] = float("inf")
    return torch.sort(ranked, dim=-1, descending=True, stable=True).indices


def ranks(order: Tensor) -> Tensor:
    """Inverse permutation of each row of ``order``: ``rank[h, p]`` = place of position ``p`` in keep order."""
    rank = torch.empty_like(order)
    place = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return rank.scatter_(-1, order, place)


def covered_cells(vertical: Tensor, slash: Tensor, q_offset: int = 0) -> Tensor:
    """Causal cells of query rows ``[q_offset, n)`` covered by each head's union of verticals and slashes,
    counted once. ``[h]`` int64.

    ``vertical``/``slash`` are ``[h, n]`` bool selections (column ``j`` / offset ``o``). Column ``j`` holds
    ``n - j`` causal cells and diagonal ``o`` holds ``n - o``; a cell ``(i, j)`` lies on both a selected
    column and a selected diagonal iff ``j + o = i <= n - 1``, so the overlap is, summed over selected
    columns ``j``, the number of selected offsets ``o <= n - 1 - j``. A selection does not depend on the
    rows, so the rows ``[q_offset, n)`` of a chunk cover the cells of rows ``[0, n)`` minus those of rows
    ``[0, q_offset)`` (which only reach columns and offsets below ``q_offset``).
    """
    n = vertical.shape[-1]
    length = torch.arange(n, 0, -1, device=vertical.device)  # n - p: cells on column p or diagonal p
    v, s = vertical.long(), slash.long()
    offsets_up_to = s.cumsum(-1).flip(-1)  # [h, j] -> number of selected offsets <= n - 1 - j
    cells = (v * length).sum(-1) + (s * length).sum(-1) - (v * offsets_up_to).sum(-1)
    if q_offset:
        cells = cells - covered_cells(vertical[:, :q_offset], slash[:, :q_offset])
    return cells


@dataclass
class VerticalSlashIndex:
    """Which key columns and which offsets each query head keeps: ``[h, n]`` bool selections."""

    vertical: Tensor  # [h, n] bool, True on kept key columns j
    slash: Tensor  # [h, n] bool, True on kept offsets o = i - j
    q_offset: int = 0  # the first query row it serves (a chunk's start)

    @property
    def num_vertical(self) -> Tensor:
        return self.vertical.sum(-1)

    @property
    def num_slash(self) -> Tensor:
        return self.slash.sum(-1)

    def verticals(self, head: int) -> Tensor:
        """The key columns head ``head`` keeps, sorted."""
        return self.vertical[head].nonzero().flatten()

    def slashes(self, head: int) -> Tensor:
        """The offsets head ``head`` keeps, sorted."""
        return self.slash[head].nonzero().flatten()

    def covered_cells(self) -> Tensor:
        """Causal cells each head's index covers (``[h]``): exactly what the masked attention computes."""
        return covered_cells(self.vertical, self.slash, self.q_offset)

    def row_mask(self):
        """``row_mask(start, stop) -> [h, stop - start, n]`` for :func:`~.common.masked_causal_attention`
        (absolute rows)."""
        h, n = self.slash.shape
        # Row i needs slash[i - j] for every key j. With padded[m] = slash[n - 1 - m] (and False for m >= n,
        # i.e. above the diagonal), that is padded[n - 1 - i + j]: window n - 1 - i of length n.
        padded = torch.cat([self.slash.flip(-1), self.slash.new_zeros(h, n)], dim=-1)
        windows = padded.unfold(-1, n, 1)  # [h, n + 1, n] view: windows[:, s, j] = padded[s + j]

        def mask(start: int, stop: int) -> Tensor:
            slash_rows = windows[:, n - stop : n - start].flip(1)  # rows start..stop-1
            return slash_rows | self.vertical[:, None, :]

        return mask


class Candidates:
    """The ranked candidates of one call: per head, key columns and offsets in keep order (forced first:
    the first ``sink_tokens`` columns and the offsets ``0..local_window-1``; then by descending score).

    :meth:`select` keeps the first ``num_vertical[h]`` columns and ``num_slash[h]`` offsets of head ``h``;
    counts are raised to the forced count (forced entries count towards the budget) and capped at ``n``.
    Budgets only grow the selection, so the covered cells are monotone in each count — what the ratio
    searches rely on.
    """

    def __init__(self, scores: SlashScores, sink_tokens: int, local_window: int, q_offset: int = 0):
        self.scores = scores
        self.n = scores.vertical.shape[-1]
        self.q_offset = q_offset  # the index serves query rows [q_offset, n) (a chunk)
        self.forced_vertical = min(sink_tokens, self.n)
        self.forced_slash = min(local_window, self.n)
        self.vertical_rank = ranks(keep_order(scores.vertical, self.forced_vertical))
        self.slash_rank = ranks(keep_order(scores.slash, self.forced_slash))

    @property
    def num_heads(self) -> int:
        return self.vertical_rank.shape[0]

    def _counts(self, count: Tensor | int, forced: int) -> Tensor:
        count = torch.as_tensor(count, device=self.vertical_rank.device).expand(self.num_heads)
        return count.clamp(min=forced, max=self.n)

    def select(self, num_vertical: Tensor | int, num_slash: Tensor | int) -> VerticalSlashIndex:
        """The index keeping, per head, the first ``num_vertical`` columns and ``num_slash`` offsets."""
        kv = self._counts(num_vertical, self.forced_vertical)
        ks = self._counts(num_slash, self.forced_slash)
        return VerticalSlashIndex(self.vertical_rank < kv[:, None], self.slash_rank < ks[:, None], self.q_offset)

    def covered_fraction(self, num_vertical: Tensor | int, num_slash: Tensor | int) -> float:
        """Covered causal cells over all heads / dense causal cells (of the rows served): the density ``1 / r``."""
        covered = self.select(num_vertical, num_slash).covered_cells().sum()
        return float(covered) / (self.num_heads * causal_cells(self.n, self.q_offset))
