"""The per-sequence, per-layer decode cache of the references: a variable-length KV list per KV head.

Every decode method is "which tokens does each KV head attend to": dense keeps all, SnapKV keeps the same
number per head, Ada-SnapKV a different number per head, Quest keeps all and reads a query-dependent
subset. :class:`DecodeState` holds each head's kept prompt tokens followed by every generated token
(generated tokens are never evicted) and attends over the subset that :meth:`DecodeState.select` returns.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..reports import DecodeCallReport
from ..spec import PhaseSpec


class DecodeState:
    """Keep-set decode cache (dense, SnapKV, Ada-SnapKV). Subclasses override :meth:`select`."""

    def __init__(self, phase: PhaseSpec, k: Tensor, v: Tensor, keep: list[Tensor] | None = None,
                 num_heads: int | None = None, details: dict[str, Any] | None = None):
        """``k``/``v`` are the prompt's ``[h_kv, n, d]``; ``keep[j]`` the sorted prompt positions KV head
        ``j`` keeps (``None``: all). ``num_heads`` is the query-head count (defaults to ``h_kv``)."""
        self._init_keep_set(phase, k, keep, num_heads, details)
        self.keys: list[Tensor] = [k[j, idx] for j, idx in enumerate(self.kept_positions)]
        self.values: list[Tensor] = [v[j, idx] for j, idx in enumerate(self.kept_positions)]

    def _init_keep_set(self, phase: PhaseSpec, k: Tensor, keep: list[Tensor] | None, num_heads: int | None,
                       details: dict[str, Any] | None) -> None:
        """Shapes, the kept positions and counters; where the tokens are stored is the subclass's choice."""
        h_kv, n, d = k.shape
        self.phase = phase
        self.prompt_len = n
        self.num_kv_heads = h_kv
        self.head_dim = d
        self.num_heads = num_heads or h_kv
        self.element_bytes = k.element_size()
        self.details = dict(details or {})
        if keep is None:
            keep = [torch.arange(n, device=k.device) for _ in range(h_kv)]
        self.kept_positions: list[Tensor] = [idx.to(k.device).sort().values for idx in keep]
        self.prompt_kept: list[int] = [int(idx.numel()) for idx in self.kept_positions]
        self.generated = 0

    # -- what subclasses change -------------------------------------------------------------------------
    def select(self, q_t: Tensor) -> list[Tensor] | None:
        """Indices into each head's cache to read this step (``None``: everything held)."""
        return None

    def metadata_elements_read(self) -> int:
        """Method metadata read this step, in elements (Quest's page min/max)."""
        return 0

    def on_append(self, k_t: Tensor) -> None:
        """Hook for metadata kept alongside the cache (Quest updates its last page)."""

    # -- the shared step --------------------------------------------------------------------------------
    @property
    def cache_tokens(self) -> int:
        """Tokens resident in the cache, summed over KV heads."""
        return sum(key.shape[0] for key in self.keys)

    def append(self, k_t: Tensor, v_t: Tensor) -> None:
        for j in range(self.num_kv_heads):
            self.keys[j] = torch.cat([self.keys[j], k_t[j : j + 1].to(self.keys[j].dtype)])
            self.values[j] = torch.cat([self.values[j], v_t[j : j + 1].to(self.values[j].dtype)])
        self.generated += 1
        self.on_append(k_t)

    def step(self, q_t: Tensor, k_t: Tensor, v_t: Tensor) -> tuple[Tensor, DecodeCallReport]:
        """Append this step's key/value, then attend ``q_t [h, d]`` over the selected tokens of each head."""
        self.append(k_t, v_t)
        chosen = self.select(q_t)
        h, d = q_t.shape
        group = h // self.num_kv_heads
        out = torch.empty_like(q_t)
        prompt_read = generated_read = 0
        for j in range(self.num_kv_heads):
            keys, values = self.keys[j], self.values[j]
            idx = chosen[j] if chosen is not None else None
            if idx is not None:
                keys, values = keys[idx], values[idx]
                n_prompt = int((idx < self.prompt_kept[j]).sum())
            else:
                n_prompt = self.prompt_kept[j]
            prompt_read += n_prompt
            generated_read += keys.shape[0] - n_prompt
            qg = q_t[j * group : (j + 1) * group].float()
            scores = qg @ keys.float().T / math.sqrt(d)
            out[j * group : (j + 1) * group] = (torch.softmax(scores, dim=-1) @ values.float()).to(q_t.dtype)
        report = DecodeCallReport.of_step(
            self.phase, prompt_read=prompt_read, generated_read=generated_read, prompt_len=self.prompt_len,
            generated=self.generated, kv_heads=self.num_kv_heads, head_dim=d, element_bytes=self.element_bytes,
            metadata_elements=self.metadata_elements_read(), cache_tokens=self.cache_tokens, details=self.details)
        return out, report


def capacity_for(n: int, ratio: float) -> int:
    """Tokens kept per KV head for a target ratio: ceil(n / r), at least 1 and at most n."""
    return max(1, min(n, math.ceil(n / ratio)))


def eviction_capacity(phase: PhaseSpec, n: int) -> int:
    """``C``, the prompt tokens an evicting method (SnapKV, Ada-SnapKV) keeps per KV head of an ``n``-token
    prompt (Ada-SnapKV: on average over a layer's heads): the ``capacity`` parameter when given (at most
    ``n``), else :func:`capacity_for` of the target ratio."""
    capacity = phase.params.get("capacity")
    return capacity_for(n, phase.compression_ratio) if capacity is None else min(int(capacity), n)


IMPLS = ("reference", "triton")


def check_impl(impl: str) -> str:
    """``impl`` if it names an implementation (``"reference"``: PyTorch; ``"triton"``: the kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected 'reference' or 'triton'")
    return impl


def state_class(impl: str) -> type[DecodeState]:
    """The keep-set decode state of ``impl``: this reference (a tensor list per head), or the Triton path's
    paged one (:class:`..kernels.paged_state.PagedDecodeState`)."""
    if check_impl(impl) == "triton":
        from ..kernels.paged_state import PagedDecodeState  # imports Triton: only when asked for

        return PagedDecodeState
    return DecodeState
