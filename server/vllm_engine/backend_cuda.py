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
                kernels = graph_sizes.graph_kernels()  # (the switches: graph_sizes.py)
                if graph_sizes.QUEST in kernels:
                    ws.QUEST_GRAPH = QuestSlots(vllm_config.scheduler_config.max_num_seqs, kv_cache_spec.num_kv_heads,
                                                kv_cache_spec.block_size, torch.device(device))
                    if graph_sizes.KEEP in kernels:
                        ws.KEEP_GRAPH = KeepSlots(vllm_config.scheduler_config.max_num_seqs, len(layer_names),
                                                  kv_cache_spec.num_kv_heads, torch.device(device))
                    ws.GRAPH_SIZES = dense_graph_sizes(vllm_config)


def dense_graph_sizes(vllm_config) -> GraphSizes | None:
    """Graph sizes per set of sparse kernels where asked and where vLLM captures them (:mod:`.graph_sizes`; the engine
    asks for them in its engine arguments)."""
    if not graph_sizes.enabled():
        return None
    sched = vllm_config.scheduler_config
    sizes = GraphSizes.for_batch(sched.max_num_seqs, sched.max_num_batched_tokens, graph_sizes.graph_kernels())
    captured = sorted(vllm_config.compilation_config.cudagraph_capture_sizes or [])
    if captured != sizes.all:
        log.warning("%s=1, but vLLM captures the sizes %s, not %s: every decode graph keeps every sparse kernel",
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
