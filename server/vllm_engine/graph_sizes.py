"""Dense decode steps in full graphs of their own sizes (``SPARSE_SERVE_VLLM_DENSE_GRAPHS=1``; off by default).

vLLM captures one full decode graph per batch size, and the sparse rows' kernels (:mod:`.quest_slots`,
:mod:`.keep_slots`) sit in every one of them, so a dense step launches them too: about 17.5 us a layer at batch 1,
most of the 0.89x dense through the plugin (H200, 2026-12-03). A CUDA-graph IF node could skip them, but vLLM 0.25's
torch 2.11 cannot capture one (``CUDAGraph.begin_capture_to_if_node`` is absent there). This module gives dense steps
graphs without them instead:

* vLLM captures the usual sizes (``base``, vLLM 0.25's default list) and a twin ``s + 1`` of each base size a decode
  batch can reach (``twins``), through ``compilation_config.cudagraph_capture_sizes`` (:meth:`GraphSizes.all`);
* the builder captures the sparse kernels into the twins only (:func:`.step_plan.make_plan` asks
  :meth:`GraphSizes.takes_sparse`);
* vLLM's dispatcher pads a step to a capture size, and its runner takes the padded size from what the dispatcher
  returns. The wrapper of :mod:`.graphs` sends a uniform decode step to the smallest base size that holds it, or,
  while a request with a sparse decode method is in the batch, to the smallest twin (one row of padding more than
  vLLM's own choice).

Start-up captures twice as many graphs. Built on vLLM 0.25's dispatcher and V1 runner (read from its source), tested
on the CPU against a stand-in dispatcher. **Not yet run on a GPU.**
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

DENSE_GRAPHS_ENV = "SPARSE_SERVE_VLLM_DENSE_GRAPHS"


def enabled() -> bool:
    return os.environ.get(DENSE_GRAPHS_ENV, "0") == "1"


@dataclass(frozen=True)
class GraphSizes:
    base: tuple[int, ...]  # ascending: dense steps' graphs, without the sparse kernels
    twins: tuple[int, ...]  # ascending: sparse steps' graphs, with them

    @classmethod
    def for_batch(cls, max_num_seqs: int, max_num_batched_tokens: int) -> GraphSizes:
        """vLLM 0.25's default sizes (``VllmConfig._set_cudagraph_sizes``: 1, 2, 4, multiples of 8 below 256, then of
        16, up to twice ``max_num_seqs``, at most 512 and ``max_num_batched_tokens``), and a twin of each that a
        decode batch (at most ``max_num_seqs`` rows) can use."""
        cap = min(2 * max_num_seqs, 512, max_num_batched_tokens)
        base = [s for s in [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)] if s <= cap]
        twins = [s + 1 for s in base if s + 1 <= max_num_seqs and s + 1 not in base]
        return cls(tuple(base), tuple(twins))

    @property
    def all(self) -> list[int]:
        """What vLLM captures: ``compilation_config.cudagraph_capture_sizes``."""
        return sorted(self.base + self.twins)

    def size_for(self, n: int, sparse: bool) -> int | None:
        """The graph a uniform decode step of ``n`` rows replays: the smallest twin (``sparse``) or base size that
        holds it; None where none does (vLLM then does not replay a full graph)."""
        sizes = self.twins if sparse else self.base
        i = bisect.bisect_left(sizes, n)
        return sizes[i] if i < len(sizes) else None

    def takes_sparse(self, n: int) -> bool:
        """Whether a uniform decode step of ``n`` rows (padded) may hold sparse kernels: every size but a base one."""
        return n not in self.base
