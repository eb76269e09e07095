"""The sparse backend on CUDA: vLLM's ``CUSTOM`` backend slot, over vLLM's FlashAttention backend.

Same mixins as the CPU backend. The builder keeps its parent's graph support, so uniform decode steps replay vLLM's
full graphs; those graphs also hold the Quest rows' kernels over persistent per-row buffers (:mod:`.quest_slots`).
Any other sparse row runs eager PyTorch inside the attention op, so a step that may have one replays piecewise
graphs (:mod:`.graphs`: they capture everything but attention). The builder
tells :mod:`.worker_state` the cache's layout, so Quest, SnapKV and Ada-SnapKV rows read vLLM's cache
(:mod:`.cache_decode`), and, unless vLLM runs eager, turns on their per-layer CUDA graphs. Runs on
the GPU machine with vLLM 0.25 (``benchmarks/e2e.py``, ``tests/gpu/``); CI has no CUDA build of vLLM.
"""

from __future__ import annotations

import logging
import os

import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from . import graph_sizes
from . import worker_state as ws
from .backend import SparseBuilderMixin, SparseImplMixin
from .cache_decode import CacheLayout, RowGraphs
from .graph_sizes import GraphSizes
from .keep_slots import KeepSlots
from .quest_slots import QuestSlots

log = logging.getLogger(__name__)

# SPARSE_SERVE_VLLM_QUEST_GRAPH=0: Quest rows never run inside vLLM's full decode graphs (the steps that hold them
# replay piecewise graphs, the rows in their own per-layer graphs), to compare or to rule the full-graph path out
QUEST_GRAPH_ENV = "SPARSE_SERVE_VLLM_QUEST_GRAPH"
# SPARSE_SERVE_VLLM_KEEP_GRAPH=0: SnapKV / Ada-SnapKV rows stay out of those graphs (the per-step path, replayed
# piecewise). On by default (:mod:`.keep_slots`; H200, 2026-12-03, fourth session: snapkv:10 at batch 32 0.56x -> 2.31x
# bare vLLM); its launch sits in every decode graph, so a dense step pays about 6 us a layer more at batch 1
KEEP_GRAPH_ENV = "SPARSE_SERVE_VLLM_KEEP_GRAPH"


class SparseFlashAttentionMetadataBuilder(SparseBuilderMixin, FlashAttentionMetadataBuilder):
    supports_update_block_table = False  # a reused metadata object would carry another group's plan

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        blocks = vllm_config.cache_config.num_gpu_blocks
        if kv_cache_spec.dtype in (torch.float16, torch.bfloat16) and blocks:  # (not a quantized cache)
            ws.CACHE = CacheLayout(kv_cache_spec.block_size, int(blocks), kv_cache_spec.num_kv_heads,
                                   kv_cache_spec.head_size, kv_cache_spec.dtype, torch.device(device))
            if not vllm_config.model_config.enforce_eager and ws.GRAPHS is None:
                ws.GRAPHS = RowGraphs()
                if os.environ.get(QUEST_GRAPH_ENV, "1") != "0":
                    ws.QUEST_GRAPH = QuestSlots(vllm_config.scheduler_config.max_num_seqs, kv_cache_spec.num_kv_heads,
                                                kv_cache_spec.block_size, torch.device(device))
                    if os.environ.get(KEEP_GRAPH_ENV, "1") != "0":
                        ws.KEEP_GRAPH = KeepSlots(vllm_config.scheduler_config.max_num_seqs, len(layer_names),
                                                  kv_cache_spec.num_kv_heads, torch.device(device))
                    ws.GRAPH_SIZES = dense_graph_sizes(vllm_config)


def dense_graph_sizes(vllm_config) -> GraphSizes | None:
    """Dense steps' own graph sizes where asked and where vLLM captures them (:mod:`.graph_sizes`; the engine asks
    for them in its engine arguments)."""
    if not graph_sizes.enabled():
        return None
    sched = vllm_config.scheduler_config
    sizes = GraphSizes.for_batch(sched.max_num_seqs, sched.max_num_batched_tokens)
    captured = sorted(vllm_config.compilation_config.cudagraph_capture_sizes or [])
    if captured != sizes.all:
        log.warning("%s=1, but vLLM captures the sizes %s, not %s: dense steps keep the sparse graphs",
                    graph_sizes.DENSE_GRAPHS_ENV, captured, sizes.all)
        return None
    return sizes


class SparseFlashAttentionImpl(SparseImplMixin, FlashAttentionImpl):
    pass


class SparseFlashAttentionBackend(FlashAttentionBackend):
    sparse_serve = True

    @staticmethod
    def get_name() -> str:
        from .plugin import CUDA_BACKEND_NAME

        return CUDA_BACKEND_NAME  # vLLM maps the name back to its enum member

    @staticmethod
    def get_impl_cls():
        return SparseFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return SparseFlashAttentionMetadataBuilder
