"""The public, single-sequence API: ``sparse_prefill``, ``prepare_decode``, ``sparse_decode``.

Shapes: ``q [h, n, d]``, ``k``/``v`` ``[h_kv, n, d]`` (GQA: ``h`` a multiple of ``h_kv``), causal. These
calls cover one attention layer of one sequence; an engine calls them per layer and sums the reports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from .cost import causal_cells, flops_per_cell
from .decode import ada_snapkv, quest, snapkv
from .decode import dense as dense_decode
from .decode.state import DecodeState, check_impl
from .prefill import block_sparse, flexprefill, vertical_slash
from .prefill import dense as dense_prefill
from .prefill.common import PrefillOutcome, check_shapes
from .prefill_cost import prefill_fallback
from .reports import DecodeCallReport, PrefillCallReport
from .spec import DECODE_METHODS, PhaseSpec, SparseSpec

PrefillFn = Callable[..., PrefillOutcome]  # (q, k, v, phase, q_offset=0)
PrepareFn = Callable[[Tensor, Tensor, Tensor, PhaseSpec], DecodeState]
KeepFn = Callable[..., list[Tensor]]  # (q_window, k, phase, impl) -> sorted kept positions per KV head

# The plain PyTorch reference of every method in the table (:data:`.spec.METHODS`).
REFERENCE_PREFILL: dict[str, PrefillFn] = {
    "dense": dense_prefill.prefill,
    "vertical_slash": vertical_slash.prefill,
    "flexprefill": flexprefill.prefill,
    "block_sparse": block_sparse.prefill,
}
REFERENCE_DECODE: dict[str, PrepareFn] = {
    "dense": dense_decode.prepare,
    "snapkv": snapkv.prepare,
    "ada_snapkv": ada_snapkv.prepare,
    "quest": quest.prepare,
}


def method_step(name: str) -> Callable:
    """A decode method's step that its table entry names (``MethodInfo.keep`` / ``.plan``, e.g.
    ``"snapkv.keep"``): the function in ``attention_backends/decode/<module>.py``."""
    module, function = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__package__}.decode.{module}"), function)


def implementations(impl: str) -> tuple[dict[str, PrefillFn], dict[str, PrepareFn]]:
    """The (prefill, decode) registries of ``impl``: ``"reference"``, the plain PyTorch methods; ``"triton"``,
    the fast path (:mod:`.kernels.methods`, same contract; CUDA, or the CPU under ``TRITON_INTERPRET=1``)."""
    if check_impl(impl) == "reference":
        return REFERENCE_PREFILL, REFERENCE_DECODE
    from .kernels import methods  # imports Triton: only when asked for

    return methods.PREFILL, methods.DECODE


def engine_impl(device: torch.device) -> str:
    """The implementation an engine runs on ``device``: the Triton kernels on CUDA, the references elsewhere (on
    the CPU, Triton runs only in its interpreter, for tests)."""
    return "triton" if device.type == "cuda" else "reference"


def sparse_prefill(q: Tensor, k: Tensor, v: Tensor, spec: SparseSpec, *, impl: str = "reference",
                   q_offset: int = 0, defer: bool = False) -> tuple[Tensor, PrefillCallReport]:
    """Causal attention over the prompt with ``spec.prefill``; returns ``out [h, n, d]`` and its report.
    ``q``/``k``/``v`` may be views (e.g. ``[n, h, d]`` transposed): the Triton kernels get contiguous rows.

    Where the device's profile predicts that the method costs more than dense attention at this length
    (:mod:`.prefill_cost`; unless ``spec.prefill.fallback == "never"``), dense attention (SDPA) runs instead and
    the report says ``fallback="dense"`` with every cell computed.

    Chunked prefill: ``q [h, m, d]`` holds the queries of positions ``[q_offset, n)`` and ``k``/``v`` all ``n``
    keys; the method runs on that chunk (``docs/methods.md``, "Chunked prefill"; the fallback is decided for the
    chunk: its queries against its ``n`` keys) and the report covers the chunk's causal cells (a request's reports
    sum over its chunks).

    ``defer``: the report may hold device scalars (:attr:`PrefillCallReport.pending`; the Triton vertical_slash
    path reads nothing back from the device) for the caller to read once, later (:meth:`~PrefillCallReport.resolved`;
    engines do it when a request's prefill ends). Otherwise the report holds Python numbers."""
    check_shapes(q, k, v, q_offset)
    h, _, d = q.shape
    n = k.shape[1]
    phase = spec.prefill
    fallback = prefill_fallback(phase, (h, n, d), q.device, impl, q_offset)  # the dense run's report, or None
    if fallback is not None:  # the method would not pay at this length (prefill_cost)
        return dense_prefill.sdpa(q, k, v, q_offset), fallback
    if impl == "triton":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    outcome = implementations(impl)[0][phase.method](q, k, v, phase, q_offset=q_offset)
    dense = causal_cells(n, q_offset) * h
    report = PrefillCallReport(
        method=phase.method,
        target_compression_ratio=phase.compression_ratio,
        computed_cells=outcome.computed_cells,
        dense_cells=dense,
        attention_flops=outcome.computed_cells * flops_per_cell(d),
        dense_attention_flops=float(dense * flops_per_cell(d)),
        indexing_flops=float(outcome.indexing_flops),
        details=outcome.details,
    )
    return outcome.out, (report if defer else report.resolved())


def prepare_decode(q: Tensor, k: Tensor, v: Tensor, spec: SparseSpec, *, impl: str = "reference") -> DecodeState:
    """Build the decode cache from the prompt's q/k/v (after prefill) for ``spec.decode``: SnapKV and
    Ada-SnapKV keep-sets, Quest page summaries, or keep-all for dense. With ``impl="triton"`` the state
    keeps its tokens in pages and every :func:`sparse_decode` step runs the paged Triton kernel."""
    check_shapes(q, k, v)
    return implementations(impl)[1][spec.decode.method](q, k, v, spec.decode)


def decode_keep(q_window: Tensor, k: Tensor, phase: PhaseSpec, *, impl: str = "reference") -> list[Tensor]:
    """An evicting decode method's keep-sets at the end of prefill: the sorted prompt positions each KV head
    keeps. ``q_window [h, m, d]`` holds the queries of the prompt's last ``m`` positions, at least the method's
    observation ``window`` of them (e.g. the last prefill chunk); ``k [h_kv, n, d]`` all the prompt's keys."""
    name = DECODE_METHODS[phase.method].keep
    if name is None:
        raise ValueError(f"decode method {phase.method!r} keeps every token (it has no keep step)")
    keep: KeepFn = method_step(name)
    return keep(q_window, k, phase, impl)


def sparse_decode(q_t: Tensor, k_t: Tensor, v_t: Tensor, state: DecodeState) -> tuple[Tensor, DecodeCallReport]:
    """One decode step: append ``k_t``/``v_t`` ``[h_kv, d]`` to the cache, attend ``q_t [h, d]``."""
    if q_t.dim() != 2 or k_t.shape != (state.num_kv_heads, state.head_dim) or v_t.shape != k_t.shape:
        raise ValueError(f"expected q_t [h, d], k_t/v_t [{state.num_kv_heads}, {state.head_dim}]; "
                         f"got {tuple(q_t.shape)}, {tuple(k_t.shape)}, {tuple(v_t.shape)}")
    return state.step(q_t, k_t, v_t)
