"""Sparse rows and vLLM's CUDA graphs.

A full CUDA graph replays a step's kernels without running Python, so the sparse rows' attention, which runs
eagerly inside the attention op (:mod:`.backend`), would not run in one. The CUDA backend therefore declares its
parent's graph support (dense traffic keeps vLLM's full decode graphs, and with them vLLM's decode speed), and
:func:`keep_sparse_steps_out_of_full_graphs` takes ``FULL`` out of the modes of any step dispatched while a sparse
row may run: vLLM then replays its piecewise graphs, whose attention runs eagerly. The same ``invalid_modes``
argument is how vLLM itself keeps cascade-attention steps out of full graphs (0.25.0 and 0.32.0 alike). With
``SPARSE_SERVE_VLLM_DENSE_GRAPHS=1`` the same wrapper also picks the size of a uniform decode step's graph: each step
replays a graph with only the sparse kernels its batch needs, a dense step one without any (:mod:`.graph_sizes`).
"""

from __future__ import annotations

import functools

from . import worker_state as ws


def keep_sparse_steps_out_of_full_graphs() -> None:
    """Wrap ``CudagraphDispatcher.dispatch`` (once per process; idempotent)."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    original = CudagraphDispatcher.dispatch
    if getattr(original, "sparse_serve", False):
        return

    @functools.wraps(original)
    def dispatch(self, num_tokens, *args, invalid_modes=None, **kwargs):
        if ws.full_graph_blocked():
            invalid_modes = {*(invalid_modes or ()), CUDAGraphMode.FULL}
        elif ws.GRAPH_SIZES is not None and kwargs.get("uniform_decode", args[0] if args else False) \
                and not _capturing():
            need = ws.decode_kernels()
            size = ws.GRAPH_SIZES.size_for(num_tokens, need)
            if size is not None:
                num_tokens = size
            elif need:  # wider than every size of its family: no full graph holds its kernels
                invalid_modes = {*(invalid_modes or ()), CUDAGraphMode.FULL}
        return original(self, num_tokens, *args, invalid_modes=invalid_modes, **kwargs)

    dispatch.sparse_serve = True  # type: ignore[attr-defined]
    CudagraphDispatcher.dispatch = dispatch  # type: ignore[method-assign]


def _capturing() -> bool:
    """Whether vLLM is still capturing its graphs (its dummy runs dispatch each capture size as it is; it turns the
    flag off once capture ends)."""
    from vllm.compilation import monitor

    return bool(monitor.cudagraph_capturing_enabled)
