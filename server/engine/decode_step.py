"""One decode step of a batch over the paged cache, written as a function of static device buffers, so that
CUDA graphs can capture it (per batch bucket) and replay it with no host work per layer.

The host fills the step's inputs (:class:`StepBuffers`), all int32 and packed into one copy: each row's
input token and position, Quest page budget (0: the row reads its whole tables), and per (layer, KV head) the
tokens held after this step's append and the prompt tokens kept; each row's page tables are copied only when
its sequence's tables changed (a new page every ``page_size`` tokens). :func:`decode_forward` then runs the
model; its attention callback, per layer:

1. writes this token's key/value at slot ``(length - 1) % page_size`` of page ``tables[(length - 1) //
   page_size]`` and updates that page's key min/max (Quest's page summary; every page keeps one);
2. Quest rows: selects pages with a budget per row (:class:`DecodeKernels`' ``select``) and attends over them;
   the other rows (dense, SnapKV, Ada-SnapKV: their eviction already shaped the tables) attend over their
   whole tables; a batch with both kinds runs both and keeps each row's own;
3. adds the prompt and total tokens Quest read to per-row counters on the device, read once after the step.

Rows past the batch (a bucket's padding) hold one token in a scratch page: they write and read only there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attention_backends.decode import quest
from attention_backends.decode.paged import page_fill, paged_decode_attention, pow2_bucket

from .page_pool import PagePool
from .sequence_kv import SequenceKV

try:  # Triton is a dependency, but a broken install must not take the CPU path down with it
    from attention_backends.kernels.paged_decode import paged_decode as triton_paged_decode

    from .fused_ops import append_token as triton_append_token
except Exception:  # pragma: no cover
    triton_paged_decode = triton_append_token = None

# Batch buckets CUDA graphs are captured for; a batch runs in the smallest bucket that holds it.
GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeKernels:
    """The cache update, paged attention and Quest selection in PyTorch (the portable path, and the reference
    of the Triton one)."""

    impl = "reference"  # the implementation of the methods' plan step (attention_backends.decode.quest.plan)

    def __init__(self, pool: PagePool):
        self.pool = pool

    def append(self, k: Tensor, v: Tensor, page: Tensor, slot: Tensor) -> None:
        """Write ``k``/``v [B, h_kv, d]`` at ``slot`` of ``page`` (``[B, h_kv]``); fold k into the page's min/max
        (a page's first token, slot 0, sets them: a fresh page's summary is whatever its last owner left)."""
        pool = self.pool
        k = k.to(pool.dtype)
        pool.keys[page, slot] = k
        pool.values[page, slot] = v.to(pool.dtype)
        first = (slot == 0).unsqueeze(-1)
        pool.key_min[page] = torch.where(first, k, torch.minimum(pool.key_min[page], k))
        pool.key_max[page] = torch.where(first, k, torch.maximum(pool.key_max[page], k))

    def attend(self, q: Tensor, tables: Tensor, lengths: Tensor) -> Tensor:
        """``q [B, h, d]`` over each (row, KV head)'s first ``lengths [B, h_kv]`` tokens of ``tables [B, h_kv, P]``.
        A row of length 0 gives NaN here and zeros in Triton: callers discard it."""
        fill = page_fill(lengths, tables.shape[-1], self.pool.page_size)
        return paged_decode_attention(q, self.pool.keys, self.pool.values, tables, fill)

    def select(self, q: Tensor, tables: Tensor, lengths: Tensor, budgets: Tensor, prompt_kept: Tensor, width: int,
               read_counts: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quest: each row's top ``budgets [B]`` pages per KV head (0: none), the current page forced ->
        (page tables ``[B, h_kv, <= width]``, token lengths ``[B, h_kv]``, prompt tokens among them ``[B, h_kv]``);
        ``read_counts [2, B]`` gets each row's (prompt, total) tokens read added."""
        pool = self.pool  # (the step carries one page budget per row: Quest's, the one method with a plan step)
        return quest.plan(q, pool.key_min, pool.key_max, tables, lengths, budgets, pool.page_size, prompt_kept,
                          width=width, impl=self.impl, read_counts=read_counts)


class TritonDecodeKernels(DecodeKernels):
    """The same operations as Triton kernels: no host sync, fixed grids (CUDA-graph safe)."""

    impl = "triton"

    def append(self, k: Tensor, v: Tensor, page: Tensor, slot: Tensor) -> None:
        pool = self.pool
        triton_append_token(k, v, pool.keys, pool.values, pool.key_min, pool.key_max, page, slot)

    def attend(self, q: Tensor, tables: Tensor, lengths: Tensor) -> Tensor:
        return triton_paged_decode(q, self.pool.keys, self.pool.values, tables, lengths,
                                   max_len=tables.shape[-1] * self.pool.page_size)


@dataclass(frozen=True)
class StepShape:
    """What a captured step is specialised to (the CUDA-graph key)."""

    rows: int  # batch rows, padding included
    table_pages: int  # table columns attention may read (the buffers' width under graphs: lengths bound reads)
    full_rows: bool  # some row reads its whole tables
    quest_width: int = 0  # largest Quest budget in pages (a power of two); 0: no Quest row
    quest_pages: int = 0  # table columns Quest scores (a power of two >= every row's pages)


class StepBuffers:
    """The device inputs of decode steps of up to ``rows`` rows; a step of ``n`` rows uses the first ``n``."""

    def __init__(self, rows: int, layers: int, kv_heads: int, pages: int, device: torch.device):
        lh = layers * kv_heads
        self.rows, self.layers, self.kv_heads, self.pages = rows, layers, kv_heads, pages
        self.tables = torch.zeros(rows, layers, kv_heads, pages, dtype=torch.int32, device=device)
        # ids | positions | budgets | lengths [L, H] | prompt_kept [L, H], one int32 row per batch row
        self.packed = torch.zeros(rows, 3 + 2 * lh, dtype=torch.int32, device=device)
        # Host staging, two of each: a step may be launched while the previous one's copies have not run yet
        # (the engine launches a greedy batch's next step before reading this one), so a load never writes the
        # staging the previous load's copy reads.
        pin = device.type == "cuda"
        self._hosts = [torch.zeros(self.packed.shape, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.ids, self.positions, self.budgets = self.packed[:, 0], self.packed[:, 1], self.packed[:, 2]
        self.lengths = self.packed[:, 3 : 3 + lh].view(rows, layers, kv_heads)
        self.prompt_kept = self.packed[:, 3 + lh :].view(rows, layers, kv_heads)
        self.quest_read = torch.zeros(2, rows, dtype=torch.int64, device=device)  # prompt, total tokens
        # (uid, version, grown entries applied) of the tables a row holds
        self._owner: list[tuple[int, int, int] | None] = [None] * rows
        # a step's new table entries (flat index into ``tables``, page id): a head gets at most one page a step
        self.edits_cap = rows * lh
        self._edit_hosts = [torch.zeros(2, self.edits_cap, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.edits = torch.zeros(2, self.edits_cap, dtype=torch.int64, device=device)
        self._flip = 0

    def load(self, seqs: list[SequenceKV], ids: list[int] | Tensor, positions: list[int], budgets: list[int],
             lengths: Tensor, prompt_kept: Tensor, rows: int, pad_page: int) -> None:
        """Fill rows ``[0, rows)``: the batch, then padding rows (one token in ``pad_page``). ``ids``: the input
        tokens, or a tensor of them on the device (the previous step's argmax, copied device to device)."""
        b, lh = len(seqs), self.layers * self.kv_heads
        self._flip ^= 1
        host = self._hosts[self._flip][:rows]
        on_device = isinstance(ids, Tensor)
        host[:b, 0] = 0 if on_device else torch.tensor(ids, dtype=torch.int32)
        host[:b, 1] = torch.tensor(positions, dtype=torch.int32)
        host[:b, 2] = torch.tensor(budgets, dtype=torch.int32)
        host[:b, 3 : 3 + lh] = lengths.view(b, lh)
        host[:b, 3 + lh :] = prompt_kept.view(b, lh)
        host[b:] = 0
        host[b:, 3 : 3 + lh] = 1
        self.packed[:rows].copy_(host, non_blocking=True)
        if on_device:
            self.ids[:b].copy_(ids[:b])
        edits: list[tuple[int, Tensor]] = []
        for i, seq in enumerate(seqs):
            owner, grown = self._owner[i], len(seq.grown)
            if owner is not None and owner[:2] == (seq.uid, seq.version):
                edits += [(i, g) for g in seq.grown[owner[2] :]]  # this row's pages since it was loaded
            else:
                self._copy_whole(i, seq)
            self._owner[i] = (seq.uid, seq.version, grown)
        for i in range(b, rows):
            if self._owner[i] != (-1, pad_page, 0):
                self.tables[i].fill_(pad_page)
                self._owner[i] = (-1, pad_page, 0)
        if edits:
            self._apply(edits, seqs)

    def _copy_whole(self, i: int, seq: SequenceKV) -> None:
        width = min(seq.tables.shape[2], self.pages)  # (columns past the buffer: never read, lengths bound reads)
        self.tables[i, :, :, :width].copy_(seq.tables[:, :, :width])

    def _apply(self, edits: list[tuple[int, Tensor]], seqs: list[SequenceKV]) -> None:
        """Write the rows' new page ids into their tables with one pinned copy and one scatter (no host sync);
        when more than fit (sequences that missed steps), copy those rows whole."""
        if sum(len(g) for _, g in edits) > self.edits_cap:
            for i in {i for i, _ in edits}:
                self._copy_whole(i, seqs[i])
            return
        rows = torch.cat([torch.full((len(g),), i, dtype=torch.int64) for i, g in edits])
        g = torch.cat([g for _, g in edits]).long()  # (layer, head, index, page)
        inside = g[:, 2] < self.pages
        rows, g = rows[inside], g[inside]
        m = len(g)
        st = self.tables.stride()
        host = self._edit_hosts[self._flip][:, :m]
        host[0] = rows * st[0] + g[:, 0] * st[1] + g[:, 1] * st[2] + g[:, 2]
        host[1] = g[:, 3]
        dev = self.edits[:, :m]
        dev.copy_(host, non_blocking=True)
        self.tables.view(-1).scatter_(0, dev[0], dev[1].to(self.tables.dtype))


def decode_forward(model: torch.nn.Module, pool: PagePool, kernels: DecodeKernels, buf: StepBuffers,
                   shape: StepShape) -> Tensor:
    """Run one decode step over rows ``[0, shape.rows)`` of ``buf``; returns logits ``[rows, V]`` and leaves
    Quest's per-row token counts in ``buf.quest_read``. Device work only (capturable)."""
    n, ps = shape.rows, pool.page_size
    tables = buf.tables[:n, :, :, : shape.table_pages]
    lengths, prompt_kept, budgets = buf.lengths[:n], buf.prompt_kept[:n], buf.budgets[:n]
    last = lengths.long() - 1  # [n, L, H] this token's index in each head
    write_page = tables.gather(3, (last // ps).unsqueeze(-1)).squeeze(-1).long()
    write_slot = last % ps
    quest_read = buf.quest_read[:, :n]
    quest_read.zero_()
    is_quest = (budgets > 0).view(n, 1, 1)
    full_lengths = torch.where(is_quest, 0, lengths)  # Quest rows skip the whole-table pass

    def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kernels.append(k, v, write_page[:, layer], write_slot[:, layer])
        tbl = tables[:, layer]
        if not shape.quest_width:
            return kernels.attend(q, tbl, lengths[:, layer])
        sel, sel_len, _ = kernels.select(q, tbl[..., : shape.quest_pages], lengths[:, layer], budgets,
                                         prompt_kept[:, layer], shape.quest_width, quest_read)
        out = kernels.attend(q, sel, sel_len)
        if shape.full_rows:
            out = torch.where(is_quest, out, kernels.attend(q, tbl, full_lengths[:, layer]))
        return out

    return model(buf.ids[:n].long(), buf.positions[:n].long(), attention)


def bucket_sizes(max_rows: int) -> tuple[int, ...]:
    """The batch buckets of an engine running at most ``max_rows`` requests."""
    return tuple(b for b in GRAPH_BUCKETS if b < max_rows) + (max_rows,)


class DecodeStepper:
    """Runs decode steps.

    Exact (default; the CPU): buffers sized to each batch, tables cut to its longest row. Bucketed (``buckets``
    given; CUDA): one set of static buffers of ``max(buckets)`` rows and ``max_pages`` table columns, each
    batch padded to its bucket; with ``capture``, the first step of each :class:`StepShape` runs eagerly and is
    then captured as a CUDA graph, which every later step of that shape replays."""

    def __init__(self, model: torch.nn.Module, pool: PagePool, num_layers: int, num_kv_heads: int, *,
                 use_triton: bool, buckets: tuple[int, ...] = (), max_pages: int = 0, capture: bool = False):
        self.model, self.pool = model, pool
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.kernels = TritonDecodeKernels(pool) if use_triton else DecodeKernels(pool)
        self.buckets, self.capture = buckets, capture
        self.graphs: dict[StepShape, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        if buckets:
            self.buffers = StepBuffers(max(buckets), num_layers, num_kv_heads, max_pages, pool.device)
            self.pad_page = int(pool.allocate(1)[0])  # padding rows write and read here, never a request's page
        if capture:
            self._mempool = torch.cuda.graph_pool_handle()

    @staticmethod
    def shape_of(budgets: list[int], max_pages: int, rows: int, table_pages: int) -> StepShape:
        quest = [b for b in budgets if b > 0]
        if not quest:
            return StepShape(rows, table_pages, True)
        return StepShape(rows, table_pages, len(quest) < len(budgets), pow2_bucket(max(quest)),
                         min(pow2_bucket(max_pages), table_pages))

    def run(self, seqs: list[SequenceKV], ids: list[int] | Tensor, positions: list[int], budgets: list[int],
            lengths: Tensor, prompt_kept: Tensor) -> tuple[Tensor, Tensor]:
        """Start one step; ``ids``: input tokens (a list, or a tensor on the device); ``lengths`` and
        ``prompt_kept [B, L, H]`` (host) include this step's token. Returns logits ``[B, V]`` and Quest's counts
        ``[2, B]`` (prompt, total tokens read, summed over layers and heads; zeros for other rows), both on the
        device and valid until the next step. Nothing waits for the device."""
        b = len(seqs)
        max_pages = -(-int(lengths.max()) // self.pool.page_size)
        if not self.buckets:
            buf = StepBuffers(b, self.num_layers, self.num_kv_heads, max_pages, self.pool.device)
            buf.load(seqs, ids, positions, budgets, lengths, prompt_kept, b, 0)
            shape = self.shape_of(budgets, max_pages, b, max_pages)
            logits = decode_forward(self.model, self.pool, self.kernels, buf, shape)
            return logits, buf.quest_read
        rows = next(r for r in self.buckets if r >= b)
        buf = self.buffers
        buf.load(seqs, ids, positions, budgets, lengths, prompt_kept, rows, self.pad_page)
        shape = self.shape_of(budgets, max_pages, rows, buf.pages)
        graph = self.graphs.get(shape)
        if graph is None:
            logits = decode_forward(self.model, self.pool, self.kernels, buf, shape)  # this step's result
            if self.capture:
                self._capture(shape)
        else:
            graph[0].replay()
            logits = graph[1]
        return logits[:b], buf.quest_read[:, :b]

    def _capture(self, shape: StepShape) -> None:
        """Record the step for ``shape`` (capture runs nothing: the pool and buffers are not touched)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = decode_forward(self.model, self.pool, self.kernels, self.buffers, shape)
        self.graphs[shape] = (graph, logits)
