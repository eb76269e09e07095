"""SnapKV / Ada-SnapKV rows of vLLM's uniform decode steps over persistent buffers: what its full decode graph replays.

The keep-sets are fixed when a request's prefill ends (:func:`.cache_decode.fix_keep_set`) and stacked once per request
(:func:`.cache_decode.stacked_keep`: ``positions [layers, h_kv, K]`` on the device). A replayed graph cannot take a
new tensor per step, so per batch row (``[max_num_seqs]``, allocated once with the builder) this module keeps:

* ``pointers`` / ``widths``: the address and ``K`` of the row's request's own stack (0: not a keep row), read by
  :func:`attention_backends.kernels.paged_decode.paged_decode` through :class:`StackedPositions`: no copy of a
  keep-set, whichever batch row the request sits in this step;
* ``kept [rows, layers, h_kv]``: the prompt tokens each (layer, KV head) keeps, and ``lengths`` (kept plus the
  generated tokens, this step's included; 0 for every other row: the kernel skips it);
* ``prompt_lens``: where the generated tokens start.

The metadata builder writes them on every uniform decode step that holds keep rows, and clears them on the first step
after that holds none (:meth:`KeepSlots.fill`: one pinned host-to-device copy, no wait); each layer runs
:meth:`KeepSlots.forward` after vLLM's kernel, which writes only the keep rows' outputs (vLLM's kernel got their
lengths cut to one key: :mod:`.quest_slots`' ``seq_cut``). A request's stack lives as long as its request, longer than
any step that reads it (the steps run in stream order). The reads are known on the host, so the reports are written
when the step is planned, as on the per-step path. No vLLM import here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cache_decode import KeepStack, to_device

# The longest row the graph's attention launch is sized for (tokens): it only sets the split count, each row divides
# its own length among the splits (any length runs).
GRAPH_TOKENS = 16384


class KeepSlots:
    def __init__(self, max_rows: int, layers: int, kv_heads: int, device: torch.device):
        i32 = dict(dtype=torch.int32, device=device)
        self.max_rows, self.layers, self.kv_heads = max_rows, layers, kv_heads
        self.pointers = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.widths = torch.zeros(max_rows, **i32)
        self.prompt_lens = torch.zeros(max_rows, **i32)
        self.kept = torch.zeros(max_rows, layers, kv_heads, **i32)
        self.lengths = torch.zeros(max_rows, layers, kv_heads, **i32)
        self._rows = False  # whether the last fill wrote keep rows (the buffers then need clearing)

    def fill(self, n: int, rows: list[tuple[int, KeepStack, int, int]]) -> None:
        """A step of ``n`` batch rows; ``rows``: per keep row ``(batch row, keep stack, seq_len, prompt_len)``, the
        stack as :func:`.cache_decode.stacked_keep` returns it."""
        if n > self.max_rows:
            raise RuntimeError(f"a decode step of {n} rows; the keep rows' graph buffers hold {self.max_rows}")
        if not rows:
            if self._rows:  # every row, not only this step's: no stale length replays under a larger batch
                for buf in (self.pointers, self.widths, self.prompt_lens, self.kept, self.lengths):
                    buf.zero_()
                self._rows = False
            return
        self._rows = True
        cells = self.layers * self.kv_heads
        host = torch.zeros(n, 3 + 2 * cells, dtype=torch.int64)  # pointer, width, prompt_len, kept..., lengths...
        for r, stack, seq, prompt_len in rows:
            if tuple(stack.host_counts.shape) != (self.layers, self.kv_heads):
                raise RuntimeError(f"a keep stack of {tuple(stack.host_counts.shape)} (layers, KV heads); the graph's "
                                   f"buffers hold {(self.layers, self.kv_heads)}")
            kept = stack.host_counts.flatten().to(torch.int64)
            host[r, :3] = torch.tensor([stack.positions.data_ptr(), stack.positions.shape[-1], prompt_len])
            host[r, 3 : 3 + cells] = kept
            host[r, 3 + cells :] = kept + (seq - prompt_len)
        dev = to_device(host, self.pointers.device)
        self.pointers[:n].copy_(dev[:, 0])
        self.widths[:n].copy_(dev[:, 1])
        self.prompt_lens[:n].copy_(dev[:, 2])
        self.kept[:n].copy_(dev[:, 3 : 3 + cells].view(n, self.layers, self.kv_heads))
        self.lengths[:n].copy_(dev[:, 3 + cells :].view(n, self.layers, self.kv_heads))
        self.lengths[n:].zero_()  # (a graph padded past n rows reads no stale pointer: a row of length 0 reads nothing)

    def forward(self, layer: int, n: int, query: Tensor, kv_cache: Tensor, block_table: Tensor, out: Tensor) -> None:
        """One layer (its index in the requests' stacks) over the step's ``n`` batch rows (``query`` / ``out [n, h,
        d]``, ``block_table [n, max_blocks]``: vLLM's): the keep rows' outputs written, every other row's left as
        vLLM's kernel wrote it. Fixed shapes, no host sync: what the full graph captures."""
        from attention_backends.kernels.paged_decode import StackedPositions, paged_decode  # Triton: CUDA only

        k_cache, v_cache = kv_cache.unbind(1)
        table = block_table[:n, None, :].expand(n, self.kv_heads, block_table.shape[1])
        paged_decode(query, k_cache, v_cache, table, self.lengths[:n, layer], max_len=GRAPH_TOKENS, out=out,
                     keep=(StackedPositions(self.pointers[:n], self.widths[:n], layer), self.kept[:n, layer],
                           self.prompt_lens[:n]), skip_empty=True)
