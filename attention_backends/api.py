"""The public, single-sequence API: ``sparse_prefill``, ``prepare_decode``, ``sparse_decode``.

Shapes: ``q [h, n, d]``, ``k``/``v`` ``[h_kv, n, d]`` (GQA: ``h`` a multiple of ``h_kv``), causal. These
calls cover one attention layer of one sequence; an engine calls them per layer and sums the reports.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import Tensor

from .cost import flops_per_cell
from .decode.state import DecodeState
from .prefill.common import causal_cells, check_shapes
from .reports import DecodeReport, PrefillReport
from .spec import SparseSpec


def _method_module(phase: str, name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{phase}.{name}")


def _impl_module(phase: str, name: str, impl: str):
    """``impl="reference"``: the plain PyTorch method module; ``impl="triton"``: the fast path
    (:mod:`.kernels.methods`, same contract; CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""
    if impl == "reference":
        return _method_module(phase, name)
    if impl == "triton":
        return importlib.import_module(f"{__package__}.kernels.methods")
    raise ValueError(f"unknown impl {impl!r}; expected 'reference' or 'triton'")


def sparse_prefill(q: Tensor, k: Tensor, v: Tensor, spec: SparseSpec, *, impl: str = "reference"
                   ) -> tuple[Tensor, PrefillReport]:
    """Causal attention over the prompt with ``spec.prefill``; returns ``out [h, n, d]`` and its report."""
    check_shapes(q, k, v)
    h, n, d = q.shape
    phase = spec.prefill
    outcome = _impl_module("prefill", phase.method, impl).prefill(q, k, v, phase)
    dense = causal_cells(n) * h
    report = PrefillReport(
        method=phase.method,
        target_compression_ratio=phase.compression_ratio,
        computed_cells=outcome.computed_cells,
        dense_cells=dense,
        attention_flops=float(outcome.computed_cells * flops_per_cell(d)),
        dense_attention_flops=float(dense * flops_per_cell(d)),
        indexing_flops=float(outcome.indexing_flops),
        details=outcome.details,
    )
    return outcome.out, report


def prepare_decode(q: Tensor, k: Tensor, v: Tensor, spec: SparseSpec, *, impl: str = "reference") -> DecodeState:
    """Build the decode cache from the prompt's q/k/v (after prefill) for ``spec.decode``: SnapKV and
    Ada-SnapKV keep-sets, Quest page summaries, or keep-all for dense. With ``impl="triton"`` the state
    keeps its tokens in pages and every :func:`sparse_decode` step runs the paged Triton kernel."""
    check_shapes(q, k, v)
    return _impl_module("decode", spec.decode.method, impl).prepare(q, k, v, spec.decode)


def sparse_decode(q_t: Tensor, k_t: Tensor, v_t: Tensor, state: DecodeState) -> tuple[Tensor, DecodeReport]:
    """One decode step: append ``k_t``/``v_t`` ``[h_kv, d]`` to the cache, attend ``q_t [h, d]``."""
    if q_t.dim() != 2 or k_t.shape != (state.num_kv_heads, state.head_dim) or v_t.shape != k_t.shape:
        raise ValueError(f"expected q_t [h, d], k_t/v_t [{state.num_kv_heads}, {state.head_dim}]; "
                         f"got {tuple(q_t.shape)}, {tuple(k_t.shape)}, {tuple(v_t.shape)}")
    return state.step(q_t, k_t, v_t)
