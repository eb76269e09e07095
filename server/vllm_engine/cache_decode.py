"""Sparse decode rows, batched per layer over vLLM's own paged KV cache (the CUDA backend): Quest, SnapKV and
Ada-SnapKV.

vLLM's FlashAttention cache keeps every KV head of a block together (``kv_cache [blocks, 2, block_size, h_kv, d]``),
a layout the paged kernels of ``attention_backends.kernels`` read directly, so Quest keeps no copy of a request's
cache on this path:

* per layer, the key min/max of every (block, KV head), ``[num_blocks, h_kv, d]`` each (:class:`CacheBounds`:
  allocated once, with the first Quest request, for all layers: 1/``block_size`` of the KV cache);
* when a Quest request's prefill ends, every block of its prompt gets its bounds (:func:`prompt_bounds`);
* per step, the metadata builder gathers the Quest rows into :class:`QuestRows` (their block tables, lengths and
  page budgets; each row's current block, whose bounds the step writes);
* per layer, :func:`quest_rows_forward` writes those bounds from the cache (vLLM wrote the step's keys before the
  attention op runs), selects each (row, KV head)'s pages with Quest's kernel (one budget per row) and runs the
  paged attention over them, three Triton launches and no host sync for the whole batch;
* the rows' prompt and total tokens read add up on the device over the layers (``QuestRows.counts``); after the
  step, a reader thread reads them for the cost (:mod:`.count_reader`, :func:`step_reports`).

SnapKV and Ada-SnapKV (:class:`KeepRows`) fix each (layer, KV head)'s kept prompt positions at the end of prefill,
from the last ``window`` queries (kept while the prompt prefills) and the prompt's keys read back from vLLM's cache
(:func:`prompt_keys`); every step, one paged kernel per layer reads, for each (row, KV head), those positions and
then the generated tokens through the row's block table (``paged_decode(..., keep=...)``). What they read is known
on the host, so their report needs no device count. vLLM's cache still holds the evicted tokens: the methods save
reads, not memory, on this engine.

A request reads vLLM's cache this way when its decode method is Quest with pages of vLLM's block size, or SnapKV /
Ada-SnapKV; Quest rows whose budget is unbounded (``quest:1``) read every page, which is dense attention: vLLM's
own kernel runs them. Quest with another page size keeps the per-row decode state of :mod:`.backend`. No vLLM
import here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from attention_backends import DECODE_METHODS, DecodeCallReport, SparseSpec
from attention_backends.decode.paged import pow2_bucket
from attention_backends.decode.quest import budget_pages

log = logging.getLogger("sparse_serve.vllm_engine")


@dataclass(frozen=True)
class CacheLayout:
    """What the CUDA builder knows of this worker's KV cache (every attention layer's is alike)."""

    block_size: int
    num_blocks: int
    kv_heads: int  # of this rank
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def bounds(self, layers: int) -> CacheBounds:
        return CacheBounds(layers, self.num_blocks, self.kv_heads, self.head_dim, self.dtype, self.device)


def reads_cache(spec: SparseSpec, block_size: int | None) -> bool:
    """Whether a request of ``spec`` decodes over vLLM's cache (``block_size``: the cache's, None where the backend
    cannot read it)."""
    decode = spec.decode
    if block_size is None or decode.is_dense:
        return False
    return keeps_tokens(spec) or decode.method == "quest" and int(decode.params["page_size"]) == block_size


def keeps_tokens(spec: SparseSpec) -> bool:
    """Whether the decode method fixes a keep-set at the end of prefill (SnapKV, Ada-SnapKV)."""
    return DECODE_METHODS[spec.decode.method].evicts


def request_budget(spec: SparseSpec, prompt_len: int) -> int | None:
    """Pages a Quest row reads per KV head each step; None: every page (vLLM's kernel attends for it)."""
    return budget_pages(prompt_len, spec.decode)


class CacheBounds:
    """Quest's page summaries over vLLM's blocks: per layer ``(key_min, key_max)`` ``[num_blocks, h_kv, d]``."""

    def __init__(self, layers: int, num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (layers, num_blocks, kv_heads, head_dim)
        self.key_min = torch.empty(shape, dtype=dtype, device=device)  # written before read (quest_rows_forward)
        self.key_max = torch.empty(shape, dtype=dtype, device=device)
        self._index: dict[str, int] = {}

    def of(self, layer: str) -> tuple[Tensor, Tensor]:
        """The bounds of ``layer`` (a layer is given the next free index the first time it asks)."""
        i = self._index.setdefault(layer, len(self._index))
        if i >= self.key_min.shape[0]:
            raise RuntimeError(f"more attention layers than the {self.key_min.shape[0]} Quest bounds were made for")
        return self.key_min[i], self.key_max[i]


class RowGraphs:
    """CUDA graphs of the rows' per-layer kernels (the CUDA backend). Launched eagerly, a layer's three kernels and
    their small allocations cost about 0.5 ms of host time against 0.08 ms of GPU time (H200, batch 8, 2026-12-02),
    so every layer of a step was bound by launching. Here a step's rows are padded to a bucket and copied once into
    static buffers of their shape; each layer then gathers its query rows into a static input, replays its graph
    for (layer, shape) and scatters the output. A shape's first run is eager (it also compiles the kernels), then
    captured. A capture that fails leaves the rows eager from then on (logged)."""

    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

    def __init__(self) -> None:
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.static: dict[tuple, tuple[Any, Tensor, Tensor]] = {}
        self.pool: Any = None
        self.broken: str | None = None

    @classmethod
    def bucket(cls, n: int) -> int:
        return next((b for b in cls.BUCKETS if b >= n), n)

    def load(self, rows: Any, query: Tensor) -> tuple[Any, Tensor, Tensor]:
        """The static copy of ``rows`` (filled at the step's first layer) and its query input, gathered from this
        layer's ``query``, and output -> ``(rows copy, q [N, h, d], out [N, h, d])``."""
        if rows.static is not None:  # a later layer of the step: the copy is made
            copy, q, out = rows.static
        else:
            tensors = {name: getattr(rows, name) for name in rows.GRAPHED}
            key = (type(rows).__name__, *((name, tuple(t.shape), t.dtype) for name, t in tensors.items()),
                   tuple(query.shape[1:]), query.dtype)
            entry = self.static.get(key)
            if entry is None:
                copy = replace(rows, **{name: torch.empty_like(t) for name, t in tensors.items()})
                q = query.new_empty(rows.tokens.shape[0], *query.shape[1:])
                entry = self.static[key] = (copy, q, torch.empty_like(q))
            copy, q, out = entry
            for name, t in tensors.items():
                getattr(copy, name).copy_(t)
            for f in fields(rows):  # the host values the kernels read at capture (the graph key holds them)
                if f.name not in tensors:
                    setattr(copy, f.name, getattr(rows, f.name))
            rows.static = entry
            if hasattr(rows, "counts"):  # what the graphs add is what the step's end reads
                rows.counts = copy.counts
        torch.index_select(query, 0, copy.tokens, out=q)
        return copy, q, out

    def run(self, key: tuple, fn: Any) -> None:
        """Replay the graph of ``key``, or run ``fn`` (device work over static buffers only) and capture it."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        fn()  # this step's result, and the kernels compiled before the capture
        if self.broken is not None:
            return
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: vLLM's other threads may touch the GPU meanwhile (global mode would fail their calls)
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                fn()
        except Exception as e:  # the rows stay correct, only slower
            self.broken = repr(e)
            log.warning("sparse decode rows run without CUDA graphs: capturing failed (%s)", self.broken)
            return
        self.graphs[key] = graph


@dataclass
class QuestRows:
    """The Quest rows of one step (built by the metadata builder, read by every layer). Under CUDA graphs the rows
    are padded to a bucket (:class:`RowGraphs`): a padding row holds no token, so every kernel skips it."""

    states: list[Any]  # each real row's request (the backend's ``worker_state.RequestState``), in row order
    tokens: Tensor  # [N] int64: the rows' positions in the step's flattened batch (padding: 0)
    tables: Tensor  # [N, P] int32: the rows' block tables, cut to the step's longest row (or its bucket)
    lengths: Tensor  # [N, h_kv] int32: tokens in the cache, this step's included (padding: 0)
    budgets: Tensor  # [N] int32: pages per KV head
    prompt_lens: Tensor  # [N, h_kv] int32: the prompt's tokens (they come first)
    touched: Tensor  # [N] int32: each row's current block, whose bounds this step writes
    touched_fill: Tensor  # [N] int32: its tokens (padding: 0, nothing written)
    width: int  # the widest budget, a power of two
    block_size: int
    counts: Tensor  # [2, N] int64: prompt and total tokens read, summed over heads and layers (device)
    layers: int = 0  # layers that ran the rows
    element_bytes: int = 2  # of the cache (set by the layers)
    head_dim: int = 0  # (set by the layers)
    host: list[tuple[int, int, int]] = field(default_factory=list)  # per real row (seq_len, prompt_len, budget)
    static: Any = None  # (copy, q, out): this step's copy in RowGraphs' static buffers, once loaded

    GRAPHED = ("tokens", "tables", "lengths", "budgets", "prompt_lens", "touched", "touched_fill", "counts")

    @property
    def n(self) -> int:
        return len(self.host)

    @property
    def index(self) -> range:
        """Each real row's column in ``counts``."""
        return range(self.n)

    @property
    def kv_heads(self) -> int:
        return self.lengths.shape[1]


def to_device(host: Tensor, dev: torch.device) -> Tensor:
    """A step's host-built tensor on ``dev`` without waiting for the device. A plain ``.to("cuda")`` of pageable
    memory synchronises the stream, so the builder of the next step (which vLLM runs while this one computes) would
    wait for the GPU to drain and the GPU would then idle while the step is launched: copy from pinned memory
    instead (the caching host allocator keeps it until the copy is done)."""
    if dev.type == "cuda":
        host = host.pin_memory()
    return host.to(dev, non_blocking=True)


def build_quest_rows(states: list[Any], rows: list[tuple[int, int, int, int, int]], block_table: Tensor,
                     kv_heads: int, block_size: int, pad_to: int | None = None) -> QuestRows:
    """``rows``: per Quest row ``(token, batch row, seq_len, prompt_len, budget)``, its prompt's bounds written
    (:func:`prompt_bounds`); ``block_table [num_reqs, max_blocks]``: the step's (device); ``pad_to``: rows in all (a
    graph bucket; the table's width then a power of two too). One host-to-device copy."""
    dev = block_table.device
    n = len(rows)
    total = max(n, pad_to or n)
    pages = max(-(-seq // block_size) for _, _, seq, _, _ in rows)
    if pad_to is not None:
        pages = pow2_bucket(pages)
    host = torch.zeros(total, 7, dtype=torch.int64)  # token, batch row, seq, prompt, budget, current block, fill
    for i, (tok, r, seq, plen, bud) in enumerate(rows):
        last = (seq - 1) // block_size
        host[i] = torch.tensor([tok, r, seq, plen, bud, last, seq - last * block_size])
    dev_rows = to_device(host, dev)
    tables = block_table[dev_rows[:, 1]][:, :pages].to(torch.int32)
    row_heads = lambda col: dev_rows[:, col : col + 1].expand(total, kv_heads).to(torch.int32).contiguous()  # noqa: E731
    return QuestRows(
        states=states,
        tokens=dev_rows[:, 0],
        tables=tables,
        lengths=row_heads(2),
        budgets=dev_rows[:, 4].to(torch.int32),
        prompt_lens=row_heads(3),
        touched=tables.gather(1, dev_rows[:, 5:6].clamp(max=tables.shape[1] - 1)).view(-1).contiguous(),
        touched_fill=dev_rows[:, 6].to(torch.int32),
        width=min(pow2_bucket(max(bud for *_, bud in rows)), pow2_bucket(pages)),
        block_size=block_size,
        counts=torch.zeros(2, total, dtype=torch.int64, device=dev),
        host=[(seq, plen, bud) for _, _, seq, plen, bud in rows],
    )


def quest_layer(q: Tensor, k_cache: Tensor, v_cache: Tensor, bounds: tuple[Tensor, Tensor], tables: Tensor,
                lengths: Tensor, budgets: Tensor, prompt_lens: Tensor, touched: Tensor, touched_fill: Tensor,
                counts: Tensor, block_size: int, width: int, out: Tensor, skip_empty: bool = False) -> None:
    """One layer of Quest rows over vLLM's cache, on the device (no host sync, fixed shapes: what a CUDA graph
    captures): the touched blocks' bounds, each (row, KV head)'s pages (``tables [n, P]``, ``lengths`` /
    ``prompt_lens [n, h_kv]``, ``budgets [n]``), the paged attention into ``out``, and the tokens read added to
    ``counts [2, n]``. ``skip_empty``: a row without budget keeps its ``out`` (another kernel wrote it)."""
    from attention_backends.kernels.paged_decode import paged_decode  # Triton: CUDA only
    from attention_backends.kernels.quest_select import cache_page_bounds, quest_select

    key_min, key_max = bounds
    cache_page_bounds(k_cache, touched, touched_fill, key_min, key_max)
    n, h_kv = lengths.shape
    table = tables[:, None, :].expand(n, h_kv, tables.shape[1])
    prompt_read = torch.empty(n, h_kv, dtype=torch.int32, device=q.device)
    sel, sel_len = quest_select(q, key_min, key_max, table, lengths, budgets, block_size, width=width,
                                prompt_kept=prompt_lens, prompt_read=prompt_read, read_counts=counts)
    paged_decode(q, k_cache, v_cache, sel, sel_len, max_len=sel.shape[2] * block_size, out=out,
                 skip_empty=skip_empty)


def _quest_kernels(rows: QuestRows, q: Tensor, k_cache: Tensor, v_cache: Tensor, bounds: tuple[Tensor, Tensor],
                   out: Tensor) -> None:
    quest_layer(q, k_cache, v_cache, bounds, rows.tables, rows.lengths, rows.budgets, rows.prompt_lens, rows.touched,
                rows.touched_fill, rows.counts, rows.block_size, rows.width, out)


def quest_rows_forward(rows: QuestRows, layer: str, query: Tensor, kv_cache: Tensor, bounds: tuple[Tensor, Tensor],
                       out: Tensor, graphs: RowGraphs | None = None) -> None:
    """One layer: write the step's page bounds, select, attend; ``out [tokens, h, d]`` gets the rows' outputs.
    ``kv_cache``: the layer's ``[num_blocks, 2, block_size, h_kv, d]``. With ``graphs``, the layer's kernels replay
    a CUDA graph over static copies of the rows."""
    k_cache, v_cache = kv_cache.unbind(1)
    key_min, key_max = bounds
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or kv_cache.shape[0] > key_min.shape[0] \
            or kv_cache.shape[2] != rows.block_size:
        raise RuntimeError(f"vLLM's KV cache {tuple(kv_cache.shape)} is not the layout Quest's bounds were made for "
                           f"({key_min.shape[0]} blocks of {rows.block_size} tokens, [blocks, 2, block, heads, dim])")
    n = rows.n
    rows.layers += 1
    rows.element_bytes, rows.head_dim = kv_cache.element_size(), query.shape[-1]
    if graphs is None:
        res = torch.empty(rows.tokens.shape[0], *query.shape[1:], dtype=query.dtype, device=query.device)
        _quest_kernels(rows, query[rows.tokens], k_cache, v_cache, bounds, res)
    else:
        static, q, res = graphs.load(rows, query)
        key = ("quest", layer, *static.tables.shape, static.width)
        graphs.run(key, lambda: _quest_kernels(static, q, k_cache, v_cache, bounds, res))
    out.index_copy_(0, rows.tokens[:n], res[:n].to(out.dtype))


def prompt_bounds(kv_cache: Tensor, blocks: Tensor, prompt_len: int, bounds: tuple[Tensor, Tensor]) -> None:
    """At the end of a Quest request's prefill, one layer's key bounds of every block of its prompt (``blocks``: its
    block table row), read from vLLM's cache, which holds the prompt by then. Its decode steps then write only their
    current block's."""
    from attention_backends.kernels.quest_select import cache_page_bounds

    block = kv_cache.shape[2]
    used = -(-prompt_len // block)
    fill = torch.full((used,), block, dtype=torch.int32)
    fill[-1] = prompt_len - (used - 1) * block
    cache_page_bounds(kv_cache[:, 0], blocks[:used].to(torch.int32), to_device(fill, kv_cache.device), *bounds)


def step_reports(rows: QuestRows, counts: list[list[int]] | None = None) -> list[tuple[Any, DecodeCallReport, int]]:
    """``(request, report, generated tokens a dense step reads)`` per row for the whole step (every layer that ran
    it), from the device counts: ``counts``, ``rows.counts`` read on the host (the worker's :mod:`.count_reader`),
    else read here (one wait for the device)."""
    if not rows.layers:
        return []
    if counts is None:
        counts = rows.counts.tolist()
    kv_heads, head_dim = rows.kv_heads * rows.layers, rows.head_dim
    reports = []
    for i, (seq, plen, bud) in enumerate(rows.host):
        prompt_read, total = counts[0][rows.index[i]], counts[1][rows.index[i]]
        pages = math.ceil(seq / rows.block_size)
        state = rows.states[i]
        reports.append((state, DecodeCallReport.of_step(
            state.spec.decode, prompt_read=prompt_read, generated_read=total - prompt_read, prompt_len=plen,
            generated=seq - plen, kv_heads=kv_heads, head_dim=head_dim, element_bytes=rows.element_bytes,
            metadata_elements=2 * head_dim * pages * kv_heads, cache_tokens=seq * kv_heads,
            details={"page_size": rows.block_size, "budget": bud * rows.block_size,
                     "pages_selected": min(bud, pages)}), (seq - plen) * kv_heads))
    return reports


# ------------------------------------------------------------------------------------- SnapKV, Ada-SnapKV
def prompt_keys(kv_cache: Tensor, blocks: Tensor, n: int) -> Tensor:
    """A sequence's first ``n`` keys read back from the layer's cache ``[blocks, 2, block_size, h_kv, d]`` through
    its block table row ``blocks`` -> ``[h_kv, n, d]``."""
    k_cache = kv_cache[:, 0]
    bs = k_cache.shape[1]
    used = -(-n // bs)
    keys = k_cache[blocks[:used].long()]  # [used, bs, h_kv, d]
    return keys.reshape(used * bs, *keys.shape[2:])[:n].permute(1, 0, 2).contiguous()


def keep_window(window: Tensor | None, q: Tensor, size: int) -> Tensor:
    """The prompt's last ``size`` queries ``[h, <= size, d]`` after a prefill chunk's ``q [h, m, d]`` (a copy, never
    a view of vLLM's buffers)."""
    tail = q if window is None else torch.cat([window, q], dim=1)
    return tail[:, -size:].clone(memory_format=torch.contiguous_format)


def fix_keep_set(window: Tensor, kv_cache: Tensor, blocks: Tensor, spec: SparseSpec, prompt_len: int,
                 impl: str) -> tuple[Tensor, Tensor]:
    """At the end of prefill, one layer's keep-sets from the prompt's last queries and its keys in the cache."""
    from attention_backends import decode_keep

    return keep_set(decode_keep(window, prompt_keys(kv_cache, blocks, prompt_len), spec.decode, impl=impl))


def keep_set(keep: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-head kept positions (sorted, one tensor per KV head) as ``(positions [h_kv, K] int32, counts [h_kv]
    int32)`` (rows padded past their count)."""
    width = max(int(idx.numel()) for idx in keep)
    positions = torch.zeros(len(keep), width, dtype=torch.int32, device=keep[0].device)
    for j, idx in enumerate(keep):
        positions[j, : idx.numel()] = idx
    counts = torch.tensor([int(idx.numel()) for idx in keep], dtype=torch.int32, device=keep[0].device)
    return positions, counts


class KeepStack(NamedTuple):
    """A request's keep-sets for every layer (:func:`stacked_keep`)."""

    positions: Tensor  # [L, h_kv, K] int32 (device), each row padded past its count
    counts: Tensor  # [L, h_kv] int32 (device)
    total: int  # prompt tokens kept in all
    host_counts: Tensor  # ``counts`` on the host


def stacked_keep(state: Any, layers: list[str]) -> KeepStack:
    """A request's keep-sets for every layer, in ``layers`` order; built once (the keep-sets are fixed), kept on the
    request."""
    if state.keep_stack is None:
        sets = [state.keep[name] for name in layers]
        width = max(p.shape[1] for p, _ in sets)
        positions = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p, _ in sets])
        counts = torch.stack([c for _, c in sets])
        host = counts.cpu()  # (one read of the device per request)
        state.keep_stack = KeepStack(positions, counts, int(host.sum()), host)
    return state.keep_stack


@dataclass
class KeepRows:
    """The SnapKV / Ada-SnapKV rows of one step (padded to a bucket under CUDA graphs: a padding row reads nothing)."""

    tokens: Tensor  # [N] int64: the rows' positions in the step's flattened batch
    tables: Tensor  # [N, P] int32: block tables, cut to the step's longest row
    positions: Tensor  # [N, L, h_kv, K] int32: kept prompt positions per layer and head
    kept: Tensor  # [N, L, h_kv] int32
    lengths: Tensor  # [N, L, h_kv] int32: kept plus generated tokens (this step's included)
    prompt_lens: Tensor  # [N] int32
    max_len: int  # bounds every row's length
    layers: dict[str, int]  # layer name -> index in the stacks
    n: int  # real rows
    static: Any = None  # (copy, q, out): this step's copy in RowGraphs' static buffers, once loaded

    GRAPHED = ("tokens", "tables", "positions", "kept", "lengths", "prompt_lens")


def build_keep_rows(states: list[Any], rows: list[tuple[int, int, int, int]], block_table: Tensor,
                    layers: list[str], block_size: int, pad_to: int | None = None) -> KeepRows:
    """``rows``: per row ``(token, batch row, seq_len, prompt_len)``; ``layers``: every attention layer's name, in
    the order of the requests' stacks; ``pad_to`` as :func:`build_quest_rows` (the widths then powers of two)."""
    dev = block_table.device
    n = len(rows)
    total = max(n, pad_to or n)
    stacks = [stacked_keep(st, layers) for st in states]
    width = max(st.positions.shape[-1] for st in stacks)
    pages = max(-(-seq // block_size) for _, _, seq, _ in rows)
    max_len = width + max(seq - plen for _, _, seq, plen in rows)
    if pad_to is not None:
        width, pages, max_len = pow2_bucket(width), pow2_bucket(pages), pow2_bucket(max_len)
    positions = torch.zeros(total, len(layers), *stacks[0].positions.shape[1:-1], width, dtype=torch.int32,
                            device=dev)
    kept = torch.zeros(total, *stacks[0].counts.shape, dtype=torch.int32, device=dev)
    for i, st in enumerate(stacks):
        positions[i, ..., : st.positions.shape[-1]] = st.positions
        kept[i] = st.counts
    host = torch.zeros(total, 4, dtype=torch.int64)
    host[:n] = torch.tensor([[tok, r, seq - plen, plen] for tok, r, seq, plen in rows], dtype=torch.int64)
    dev_rows = to_device(host, dev)
    real = (torch.arange(total, device=dev) < n).view(-1, 1, 1)
    return KeepRows(
        tokens=dev_rows[:, 0],
        tables=block_table[dev_rows[:, 1]][:, :pages].to(torch.int32),
        positions=positions,
        kept=kept,
        lengths=torch.where(real, kept + dev_rows[:, 2].view(-1, 1, 1), 0).to(torch.int32),
        prompt_lens=dev_rows[:, 3].to(torch.int32),
        max_len=max_len,
        layers={name: i for i, name in enumerate(layers)},
        n=n,
    )


def _keep_kernels(rows: KeepRows, i: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, out: Tensor) -> None:
    from attention_backends.kernels.paged_decode import paged_decode  # Triton: CUDA only

    n, h_kv = rows.kept.shape[0], rows.kept.shape[2]
    table = rows.tables[:, None, :].expand(n, h_kv, rows.tables.shape[1])
    paged_decode(q, k_cache, v_cache, table, rows.lengths[:, i], max_len=rows.max_len, out=out,
                 keep=(rows.positions[:, i], rows.kept[:, i], rows.prompt_lens))


def keep_rows_forward(rows: KeepRows, layer: str, query: Tensor, kv_cache: Tensor, out: Tensor,
                      graphs: RowGraphs | None = None) -> None:
    """One layer: each row's kept prompt tokens and generated tokens, read from vLLM's cache; ``out`` and
    ``graphs`` as :func:`quest_rows_forward`."""
    i = rows.layers[layer]
    k_cache, v_cache = kv_cache.unbind(1)
    if graphs is None:
        res = torch.empty(rows.tokens.shape[0], *query.shape[1:], dtype=query.dtype, device=query.device)
        _keep_kernels(rows, i, query[rows.tokens], k_cache, v_cache, res)
    else:
        static, q, res = graphs.load(rows, query)
        key = ("keep", layer, *static.positions.shape, static.tables.shape[1], static.max_len)
        graphs.run(key, lambda: _keep_kernels(static, i, q, k_cache, v_cache, res))
    out.index_copy_(0, rows.tokens[: rows.n], res[: rows.n].to(out.dtype))


def host_step_report(spec: SparseSpec, prompt_read: int, seq_len: int, prompt_len: int, kv_heads: int,
                     head_dim: int, element_bytes: int) -> DecodeCallReport:
    """A step whose reads are known on the host, over ``kv_heads`` (every layer's): ``prompt_read`` prompt tokens
    (SnapKV / Ada-SnapKV: the kept ones; a Quest row that reads every page: all) and every generated token. The
    cache holds the whole sequence."""
    generated = seq_len - prompt_len
    return DecodeCallReport.of_step(
        spec.decode, prompt_read=prompt_read, generated_read=generated * kv_heads, prompt_len=prompt_len,
        generated=generated, kv_heads=kv_heads, head_dim=head_dim, element_bytes=element_bytes,
        cache_tokens=seq_len * kv_heads)
