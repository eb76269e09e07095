"""Quest rows of vLLM's uniform decode steps over persistent buffers: what vLLM's full decode CUDA graph captures.

vLLM replays a full decode graph per batch size, captured at start-up on dummy metadata: the attention op's Python
runs only at capture, so a sparse decode step must be data the captured kernels read, not code. Per batch row
(``[max_num_seqs]``, allocated once with the builder) this module keeps:

* ``seq_cut``: the sequence lengths vLLM's own kernel gets, a Quest row's cut to one key (it skips the row's
  attention; :func:`.step_plan.parent_metadata` does the same for the eager path);
* ``lengths`` / ``prompt_lens`` / ``budgets``: a Quest row's tokens, prompt tokens and page budget (0 for every other
  row: the kernels skip it);
* ``touched`` / ``touched_fill``: each Quest row's current block and its tokens, whose key bounds the step writes
  (the prompt's blocks got theirs when its prefill ended);
* ``counts [2, rows]``: prompt and total tokens read, added on the device over the layers and read after the step
  (:mod:`.count_reader`).

The metadata builder writes them every uniform decode step (:meth:`QuestSlots.fill`, eager, before vLLM replays the
graph); each layer runs :meth:`QuestSlots.forward` after vLLM's kernel, for every batch row: bounds, Quest's
selection and the paged attention over the selected blocks, which writes only the Quest rows' output. The same code
runs eagerly when vLLM does not replay a full graph. A step whose sparse rows are not all such Quest rows (a prefill
chunk, SnapKV, a budget wider than the graph's) takes the per-step path of :mod:`.cache_decode`, and
:mod:`.graphs` keeps it out of the full graphs. No vLLM import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .cache_decode import quest_layer, to_device
from .graph_sizes import KEEP, QUEST, Kernels

# The widest page budget a captured graph selects (pages of vLLM's block size): 1024 16-token pages is quest:10 up to
# 160K tokens. A wider budget runs on the per-step path, outside the full graphs.
GRAPH_PAGES = 1024


@dataclass
class SlotStep:
    """One uniform decode step's Quest rows (host side): what the step's reports need once its counts are read."""

    slots: QuestSlots
    n: int  # batch rows of the step (padding included)
    block_table: Tensor  # [n, max_blocks] vLLM's (persistent)
    states: list[Any] = field(default_factory=list)  # each Quest row's request, in ``index`` order
    index: list[int] = field(default_factory=list)  # their batch rows
    host: list[tuple[int, int, int]] = field(default_factory=list)  # (seq_len, prompt_len, budget) per Quest row
    keep: list[int] = field(default_factory=list)  # the batch rows of SnapKV / Ada-SnapKV (:mod:`.keep_slots`)
    kernels: Kernels = frozenset({QUEST, KEEP})  # the sparse kernels its graph holds (:mod:`.graph_sizes`)
    layers: int = 0
    head_dim: int = 0
    element_bytes: int = 2
    block_size: int = 16

    @property
    def cut(self) -> list[int]:
        """Every batch row vLLM's kernel skips: the Quest rows and the keep rows."""
        return self.index + self.keep

    @property
    def counts(self) -> Tensor:
        return self.slots.counts

    @property
    def kv_heads(self) -> int:
        return self.slots.kv_heads


class QuestSlots:
    def __init__(self, max_rows: int, kv_heads: int, block_size: int, device: torch.device,
                 width: int = GRAPH_PAGES):
        i32 = dict(dtype=torch.int32, device=device)
        self.max_rows, self.kv_heads, self.block_size, self.width = max_rows, kv_heads, block_size, width
        self.seq_cut = torch.zeros(max_rows, **i32)
        self.lengths = torch.zeros(max_rows, kv_heads, **i32)
        self.prompt_lens = torch.zeros(max_rows, kv_heads, **i32)
        self.budgets = torch.zeros(max_rows, **i32)
        self.touched = torch.zeros(max_rows, **i32)
        self.touched_fill = torch.zeros(max_rows, **i32)
        self.counts = torch.zeros(2, max_rows, dtype=torch.int64, device=device)
        self._quest_rows = False  # whether the last fill wrote Quest rows (the buffers then need clearing)

    def takes(self, budget: int) -> bool:
        """Whether a Quest row of this budget (pages) runs here."""
        return budget <= self.width

    def fill(self, seq_lens: Tensor, block_table: Tensor, rows: list[tuple[int, int, int]],
             cut: list[int] | tuple[int, ...] = ()) -> None:
        """A step of ``n`` batch rows (``seq_lens [n]``, ``block_table [n, max_blocks]``: vLLM's, on the device);
        ``rows``: per Quest row ``(batch row, prompt_len, budget)``; ``cut``: other batch rows vLLM's kernel skips
        (another graph kernel writes them: :mod:`.keep_slots`). One host-to-device copy, no wait. A step without
        Quest rows after one without writes only the lengths vLLM's kernel reads (the rest is already zero)."""
        n = seq_lens.shape[0]
        if n > self.max_rows:
            raise RuntimeError(f"a decode step of {n} rows; Quest's graph buffers hold {self.max_rows}")
        seq = seq_lens.to(torch.int32)
        if not rows and not cut:
            self.seq_cut[:n].copy_(seq)
        else:
            host = torch.zeros(n, 3, dtype=torch.int32)  # 1: a Quest row, 2: another cut row; prompt_len, budget
            host[list(cut), 0] = 2
            if rows:
                host[[r for r, _, _ in rows]] = torch.tensor([[1, plen, budget] for _, plen, budget in rows],
                                                             dtype=torch.int32)
            per_row = to_device(host, seq_lens.device)
            self.seq_cut[:n].copy_(torch.where(per_row[:, 0] > 0, 1, seq))
        if not rows:
            if self._quest_rows:  # every row of every buffer, not only this step's: no stale budget stays
                for buf in (self.lengths, self.prompt_lens, self.budgets, self.touched_fill, self.counts):
                    buf.zero_()
                self._quest_rows = False
            return
        self._quest_rows = True
        quest = per_row[:, 0] == 1
        self.lengths[:n].copy_(torch.where(quest, seq, 0)[:, None].expand(n, self.kv_heads))
        self.prompt_lens[:n].copy_(per_row[:, 1:2].expand(n, self.kv_heads))
        self.budgets[:n].copy_(per_row[:, 2])
        last = (seq - 1).clamp(min=0) // self.block_size
        self.touched[:n].copy_(block_table.gather(1, last[:, None].long())[:, 0])
        self.touched_fill[:n].copy_(torch.where(quest, seq - last * self.block_size, 0))
        self.counts.zero_()

    def forward(self, step: SlotStep, query: Tensor, kv_cache: Tensor, bounds: tuple[Tensor, Tensor],
                out: Tensor) -> None:
        """One layer over the step's ``n`` batch rows (one query token each: ``query``/``out [n, h, d]``): the Quest
        rows' outputs written into ``out``, every other row's left as vLLM's kernel wrote it. Fixed shapes, no host
        sync: what the full graph captures."""
        n = step.n
        k_cache, v_cache = kv_cache.unbind(1)
        quest_layer(query, k_cache, v_cache, bounds, step.block_table[:n], self.lengths[:n], self.budgets[:n],
                    self.prompt_lens[:n], self.touched[:n], self.touched_fill[:n], self.counts[:, :n],
                    self.block_size, self.width, out, skip_empty=True)
