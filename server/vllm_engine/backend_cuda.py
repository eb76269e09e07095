"""The sparse backend on CUDA: a new backend name (``SPARSE_ATTN``) over vLLM's FlashAttention backend.

Same mixins as the CPU backend. The sparse rows run eager PyTorch inside the attention op, so full CUDA
graphs are turned off for this backend (``_cudagraph_support = NEVER``; piecewise graphs still capture
everything but attention). Not tested here (no CUDA build of vLLM can run on this project's CI machines).
"""

from __future__ import annotations

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from .backend import SparseBuilderMixin, SparseImplMixin


class SparseFlashAttentionMetadataBuilder(SparseBuilderMixin, FlashAttentionMetadataBuilder):
    _cudagraph_support = AttentionCGSupport.NEVER
    supports_update_block_table = False  # a reused metadata object would carry another group's plan


class SparseFlashAttentionImpl(SparseImplMixin, FlashAttentionImpl):
    pass


class SparseFlashAttentionBackend(FlashAttentionBackend):
    sparse_serve = True

    @staticmethod
    def get_name() -> str:
        return "SPARSE_ATTN"

    @staticmethod
    def get_impl_cls():
        return SparseFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return SparseFlashAttentionMetadataBuilder
