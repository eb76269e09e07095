"""Sparse kernels a replayed CUDA graph skips when the step has no sparse row.

vLLM captures one full decode graph per batch size, and the sparse rows' kernels (:mod:`.quest_slots`,
:mod:`.keep_slots`) sit in it whether a step has sparse rows or not. In a dense step each of them still launches and
exits at once: five to seven launches a layer, about 12 us, which is 6% of a batch-1 step at 32K (H200, 2026-12-03).
Captured under :func:`only_if`, they become the body of a CUDA-graph IF node (CUDA 12.4+, PyTorch's
``CUDAGraph.begin_capture_to_if_node``): at replay the body runs only while its flag, a boolean scalar on the device,
is true. The builder sets a flag when a step's sparse rows appear and clears it when they go (eager, before the
replay), so a dense step pays one small kernel a layer (the one that reads the flag) instead of the sparse launches.

On the H200's stack (vLLM 0.25, torch 2.11) PyTorch has no such API, so there the body is captured unconditionally:
this path has not run on a GPU yet (``tests/test_vllm_cache_decode.py`` checks it wherever the API exists).

Eager code (no capture running: the CPU, piecewise or eager steps) runs the body unconditionally; reading the flag
there would wait for the device, and the kernels skip rows without work anyway. ``SPARSE_SERVE_VLLM_GRAPH_IF=0``
captures the body unconditionally too (to compare, or on a PyTorch without conditional nodes, where that is what
happens anyway).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor

GRAPH_IF_ENV = "SPARSE_SERVE_VLLM_GRAPH_IF"


def conditional_nodes() -> bool:
    """Whether this PyTorch captures IF nodes (2.13 does; 2.11, vLLM 0.25's, does not)."""
    graph_cls = torch.cuda.CUDAGraph
    return hasattr(graph_cls, "get_currently_capturing_graph") and hasattr(graph_cls, "begin_capture_to_if_node")


def _capturing_graph():
    """The CUDA graph being captured on the current stream, if conditional nodes can go into it."""
    if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
        return None
    if os.environ.get(GRAPH_IF_ENV, "1") == "0" or not conditional_nodes():
        return None  # (the body is captured unconditionally)
    return torch.cuda.CUDAGraph.get_currently_capturing_graph()


def flag(device: torch.device) -> Tensor:
    """A flag for :func:`only_if`, false."""
    return torch.zeros((), dtype=torch.bool, device=device)


@contextlib.contextmanager
def only_if(pred: Tensor) -> Iterator[None]:
    """The kernels launched in the body replay only while ``pred`` (a boolean scalar on the device) is true."""
    graph = _capturing_graph()
    if graph is None:
        yield
        return
    graph.begin_capture_to_if_node(pred)
    try:
        yield
    finally:
        graph.end_capture_to_conditional_node()
