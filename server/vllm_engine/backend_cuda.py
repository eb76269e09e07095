"""The sparse backend on CUDA: vLLM's ``CUSTOM`` backend slot, over vLLM's FlashAttention backend.

Same mixins as the CPU backend. The sparse rows run eager PyTorch inside the attention op, so a step that may
have one never replays a full CUDA graph (:mod:`.graphs`: piecewise graphs capture everything but attention);
the builder keeps its parent's graph support, so steps of dense requests alone replay vLLM's full graphs. Runs on
the GPU machine with vLLM 0.25 (``benchmarks/e2e.py``, ``tests/gpu/``); CI has no CUDA build of vLLM.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from .backend import SparseBuilderMixin, SparseImplMixin


class SparseFlashAttentionMetadataBuilder(SparseBuilderMixin, FlashAttentionMetadataBuilder):
    supports_update_block_table = False  # a reused metadata object would carry another group's plan


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
