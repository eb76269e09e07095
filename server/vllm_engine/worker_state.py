"""Worker-side state of the sparse path: which persistent-batch slot holds which sparse request, and each
sparse request's per-layer read-side state. Lives in the process that runs the model (vLLM's worker);
written by the logits processors (side channel), read by the attention metadata builder and impl.

No vLLM import here.

A slot is the V1 runner's persistent-batch row (attention row ``r`` is slot ``r``) or the V2 runner's
request-table index (``CommonAttentionMetadata.req_idx[r]``). Only sparse requests get an entry; dense
requests never touch this module.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attention_backends import DecodeCallReport, DecodeState, InvalidSparsePattern, SparseSpec, parse_pattern
from attention_backends.cost import ModelShape
from server.contract.cost import RequestCost

from . import cache_decode, graph_sizes
from .accounting import COST_DIR_ENV, write_cost
from .count_reader import CountReader
from .graph_sizes import GraphSizes
from .keep_slots import KeepSlots
from .quest_slots import QuestSlots

log = logging.getLogger("sparse_serve.vllm_engine")

PATTERN_KEY = "sparse_pattern"  # SamplingParams.extra_args key: the spec (string grammar or object form)
REQUEST_KEY = "sparse_serve_key"  # SamplingParams.extra_args key: the cost side-file name


def encode_spec(spec: SparseSpec) -> dict[str, Any]:
    """A SparseSpec as the object form ``parse_pattern`` reads back (flat JSON; unset params left out; the
    prefill phase's dense-fallback mode included)."""

    def phase(p) -> dict[str, Any]:
        params = {k: v for k, v in p.params.items() if v is not None}
        return {"method": p.method, "compression_ratio": p.compression_ratio, "params": params}

    return {"prefill": {**phase(spec.prefill), "fallback": spec.prefill.fallback}, "decode": phase(spec.decode)}


def spec_from_extra_args(extra_args: dict[str, Any] | None) -> SparseSpec | None:
    """The request's spec, or None for dense. Raises InvalidSparsePattern for a bad one."""
    if not extra_args or extra_args.get(PATTERN_KEY) is None:
        return None
    raw = extra_args[PATTERN_KEY]
    if isinstance(raw, str) and raw.strip().startswith("{"):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise InvalidSparsePattern(PATTERN_KEY, "sparse_pattern is not valid JSON") from None
    spec = parse_pattern(raw, extra_args.get("compression_ratio"))
    return None if spec.is_dense else spec


def validate_sampling_params(params: Any) -> None:
    """Admission check shared by the V1 and V2 processors: a bad spec raises ValueError (HTTP 400)."""
    try:
        spec_from_extra_args(getattr(params, "extra_args", None))
    except InvalidSparsePattern as e:
        raise ValueError(f"invalid sparse_pattern ({e.param}): {e.message}") from None


@dataclass
class LayerState:
    """One layer of one request: the prompt's fresh q/k/v until prefill ends, then the decode state."""

    q: list[Tensor] = field(default_factory=list)
    k: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    decode: DecodeState | None = None
    window: Tensor | None = None  # the prompt's last queries so far (keeps_over_cache)


@dataclass
class RequestState:
    key: str | None
    spec: SparseSpec
    prompt_len: int
    cost: RequestCost
    layers: dict[str, LayerState] = field(default_factory=dict)
    seen: int = 0  # prompt tokens this state has seen fresh (per layer)
    fallback: str | None = None  # why the request runs dense after all (then nothing sparse happens)
    dirty: bool = False
    # KV tokens this step's layers read and would read dense (summed over layers and KV heads), for the step's
    # whole-model FLOPs at its end
    step_read: int = 0
    step_dense: int = 0
    decode_steps: int = 0  # steps folded into the account (its cost file says so: the front end waits for all)
    # decode over vLLM's own cache (:mod:`.cache_decode`): then no layer keeps a decode state
    cache_decode: bool = False
    budget: int | None = None  # its Quest pages per KV head (None: every page)
    bounds_ready: bool = False  # its prompt's page bounds are written
    cache_tokens: int = 0  # tokens in its cache, summed over layers and KV heads (cache_decode)
    # SnapKV / Ada-SnapKV over vLLM's cache: per layer (positions [h_kv, K], counts [h_kv]), then all layers stacked
    keep: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    keep_stack: cache_decode.KeepStack | None = None

    @property
    def reads_every_page(self) -> bool:
        """A Quest request over vLLM's cache whose budget is every page (dense attention: vLLM's kernel runs it)."""
        return self.cache_decode and not self.keeps_over_cache and self.budget is None

    @property
    def counted_on_device(self) -> bool:
        """A Quest request over vLLM's cache with a page budget: its decode reads are counted on the device and its
        decode steps are folded by the reader thread (:mod:`.count_reader`), under :data:`LOCK`."""
        return self.cache_decode and not self.keeps_over_cache and self.budget is not None

    @property
    def keeps_over_cache(self) -> bool:
        """SnapKV / Ada-SnapKV reading vLLM's cache: the prompt's last queries until prefill ends, then keep-sets."""
        return self.cache_decode and cache_decode.keeps_tokens(self.spec)

    def add_decode(self, report: DecodeCallReport, generated_dense: int) -> None:
        """One layer of one decode step (or all of them: :mod:`.cache_decode`). ``generated_dense``: generated
        tokens a dense step reads in the layers (summed over KV heads)."""
        self.cost.add_decode_report(report)
        if self.cache_decode:
            self.cache_tokens = report.kv_cache_tokens
        self.step_read += report.kv_tokens_read + report.generated_tokens_read
        self.step_dense += report.dense_kv_tokens_read + generated_dense
        self.dirty = True

    def end_decode_step(self, shape: ModelShape) -> None:
        if not self.step_dense:
            return
        self.cost.end_decode_step(shape, self.step_read, self.step_dense)
        self.decode_steps += 1
        self.cost.decode.kv_cache_tokens = self.cache_tokens or sum(
            ls.decode.cache_tokens for ls in self.layers.values() if ls.decode is not None)
        self.step_read = self.step_dense = 0

    def disable(self, reason: str) -> None:
        if self.fallback is None:
            log.warning("sparse request %s runs dense: %s", self.key, reason)
            self.fallback = reason
            self.layers.clear()


SLOTS: dict[int, RequestState] = {}
UNSUPPORTED: str | None = None  # why this model's attention cannot run the methods (set by the impls at start)
HEADS: tuple[int, int] | None = None  # (query heads of this rank, head dim) of the attention layers (the impls)
_SHAPE: ModelShape | None = None
WRITES_COST = True  # False on tensor-parallel ranks other than 0
CACHE: cache_decode.CacheLayout | None = None  # set by the CUDA backend's builder: decode may read vLLM's cache
_BOUNDS: cache_decode.CacheBounds | None = None
GRAPHS: cache_decode.RowGraphs | None = None  # set with CACHE where CUDA graphs run the rows (not enforce_eager)
QUEST_GRAPH: QuestSlots | None = None  # set with GRAPHS: Quest rows inside vLLM's full decode graphs
KEEP_GRAPH: KeepSlots | None = None  # set with QUEST_GRAPH (unless switched off): SnapKV / Ada-SnapKV rows in them
GRAPH_SIZES: GraphSizes | None = None  # set with QUEST_GRAPH where asked: dense steps' own graphs (:mod:`.graph_sizes`)
PENDING: list[cache_decode.QuestRows] = []  # this step's Quest rows, for end_step's accounting
LOCK = threading.Lock()  # the accounts and cost files: the step's end and the count reader's thread both write them


def cache_bounds() -> cache_decode.CacheBounds | None:
    """Quest's bounds over vLLM's blocks, made with the first Quest row (None: they do not fit in memory)."""
    global _BOUNDS, CACHE
    if _BOUNDS is None and CACHE is not None and _SHAPE is not None:
        try:
            _BOUNDS = CACHE.bounds(_SHAPE.num_layers)
        except torch.OutOfMemoryError:
            log.error("Quest's page bounds over vLLM's KV cache (1/%d of it) do not fit beside it: Quest requests run "
                      "dense; lower --gpu-memory-utilization to leave room", CACHE.block_size)
            CACHE = None
    return _BOUNDS


def layers() -> int:
    return _SHAPE.num_layers if _SHAPE is not None else 0


LAYER_NAMES: dict[str, None] = {}  # the attention layers' names, in the order they first ran (an ordered set)


def layer_names(name: str | None = None) -> list[str]:
    """Every attention layer's name in forward order (``name``: note a layer that runs)."""
    if name is not None:
        LAYER_NAMES.setdefault(name, None)
    return list(LAYER_NAMES)


def layer_index(name: str) -> int:
    """A layer's place in :func:`layer_names` (the order of the requests' keep stacks)."""
    return layer_names(name).index(name)


def set_model_shape(shape: ModelShape) -> None:
    global _SHAPE
    _SHAPE = shape


def add(slot: int, params: Any, prompt_len: int, resumed: bool) -> None:
    try:
        spec = spec_from_extra_args(getattr(params, "extra_args", None))
    except InvalidSparsePattern:  # validated at admission; never fail a running batch here
        spec = None
    if spec is None:
        SLOTS.pop(slot, None)
        return
    key = (params.extra_args or {}).get(REQUEST_KEY)
    state = RequestState(key=key, spec=spec, prompt_len=prompt_len, cost=RequestCost.for_spec(spec))
    if cache_decode.reads_cache(spec, CACHE.block_size if CACHE is not None else None):
        state.cache_decode = True
        if not cache_decode.keeps_tokens(spec):
            state.budget = cache_decode.request_budget(spec, prompt_len)
    if resumed:
        state.disable("resumed after preemption (its prompt state is gone)")
    SLOTS[slot] = state


def in_full_graph(state: RequestState) -> bool:
    """Whether a decoding request's rows run inside vLLM's full decode graph: dense decode rows (vLLM's kernel), Quest
    rows over vLLM's cache whose budget the graph's buffers take (:mod:`.quest_slots`), and, where the graph holds
    them (:mod:`.keep_slots`), SnapKV / Ada-SnapKV rows over vLLM's cache."""
    if state.spec.decode.is_dense or state.reads_every_page:
        return True
    if state.keeps_over_cache:
        return KEEP_GRAPH is not None  # (set only beside QUEST_GRAPH, whose step plan fills it)
    return (state.counted_on_device and state.bounds_ready and QUEST_GRAPH is not None
            and QUEST_GRAPH.takes(state.budget) and cache_bounds() is not None)


def full_graph_blocked() -> bool:
    """Whether the next step may run a sparse row outside vLLM's full decode graph: some sparse request (not run
    dense) still prefilling, or decoding with a sparse method the graph does not take."""
    return any(st.fallback is None and (st.seen < st.prompt_len or not in_full_graph(st)) for st in SLOTS.values())


def decode_kernels() -> graph_sizes.Kernels:
    """The sparse kernels the next uniform decode step needs: Quest's for a Quest row with a page budget, the keep
    launch for a SnapKV / Ada-SnapKV row (the graph it replays: :mod:`.graph_sizes`). Every request of a step is in
    :data:`SLOTS` before vLLM dispatches it."""
    need = {graph_sizes.KEEP if st.keeps_over_cache else graph_sizes.QUEST for st in SLOTS.values()
            if st.fallback is None and not st.spec.decode.is_dense and not st.reads_every_page}
    return frozenset(need)


def step_kernels(n: int) -> graph_sizes.Kernels:
    """The sparse kernels a uniform decode step padded to ``n`` rows runs (captures, or replays): those of its graph
    size's family where graphs have sizes per family, else every kernel the graphs take."""
    every = frozenset({graph_sizes.QUEST} | ({graph_sizes.KEEP} if KEEP_GRAPH is not None else set()))
    return every if GRAPH_SIZES is None else GRAPH_SIZES.kernels(n) & every


def remove(slot: int) -> None:
    SLOTS.pop(slot, None)


def move(src: int, dst: int, swap: bool) -> None:
    a, b = SLOTS.pop(src, None), SLOTS.pop(dst, None)
    if a is not None:
        SLOTS[dst] = a
    if swap and b is not None:
        SLOTS[src] = b


def end_step(slots: list[int] | None = None) -> None:
    """After a step's forward: fold decode steps into the costs and write the dirty side files."""
    with torch.profiler.record_function("sparse_serve::end_step"):
        _end_step(slots)


def _end_step(slots: list[int] | None) -> None:
    READER.submit(PENDING[:])  # this step's Quest counts: folded when the device has them, not waited for here
    PENDING.clear()
    with LOCK:
        for slot, state in list(SLOTS.items()):
            if (slots is None or slot in slots) and state.dirty:
                _settle(state)


def _fold_quest_counts(batches: list[cache_decode.QuestRows], counts: list[list[list[int]]]) -> None:
    """(the count reader's ``fold``) One step's Quest reports into their requests' accounts, and their files."""
    with LOCK:
        settled = {}
        for rows, rows_counts in zip(batches, counts, strict=True):
            for state, report, generated_dense in cache_decode.step_reports(rows, rows_counts):
                state.add_decode(report, generated_dense)
                settled[id(state)] = state
        for state in settled.values():
            _settle(state)


READER = CountReader(_fold_quest_counts)


def _settle(state: RequestState) -> None:
    """Fold the step into a dirty request's account and write its cost file (under :data:`LOCK`)."""
    state.dirty = False
    if _SHAPE is not None:
        state.end_decode_step(_SHAPE)
    # read when used, not at import: a worker forked from a front end that imported this module before
    # VllmEngine.start() set the variable (vLLM forks on CUDA) would otherwise never write a cost file
    cost_dir = os.environ.get(COST_DIR_ENV)
    if cost_dir and WRITES_COST and state.key and state.fallback is None:
        state.cost.settle()  # the step's sparse prefill reports, read once per step
        try:
            write_cost(cost_dir, state.key, state.cost, decode_steps=state.decode_steps,
                       counted_on_device=state.counted_on_device)
        except OSError:
            log.exception("could not write the cost of %s", state.key)


def cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
