"""SnapKV: evict prompt tokens once, after prefill, by observation-window attention.

1. The last ``W = min(window, n)`` prompt queries attend causally over the prompt (float32).
2. Importance of token ``j`` for a KV head = sum over window queries of the mean over the head's GQA
   group of query heads (:func:`.window_scores.token_importance`).
3. Smoothed by a 1-D average pool of ``kernel_size`` (stride 1, same length, zero padding counted; see
   :func:`.window_scores.avg_pool_same`).
4. The first ``sink_tokens`` and the last ``local_window`` prompt tokens are always kept and count towards
   the capacity.
5. Every KV head keeps ``C = capacity`` (default ``ceil(n / r)``, at most ``n``) prompt tokens: the
   protected ones, then its highest-scoring others. If ``C`` is below the protected count, the protected
   tokens are kept by priority: sinks first, then the most recent. Generated tokens are appended after
   prefill and never evicted.

Achieved compression is ``n / C``.
"""

from __future__ import annotations

from torch import Tensor

from ..spec import PhaseSpec
from .keep_sets import keep_top, protected_in_priority
from .state import DecodeState, eviction_capacity
from .window_scores import avg_pool_same, token_importance


def prepare(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec) -> DecodeState:
    params = phase.params
    h_kv, n, _ = k.shape
    capacity = eviction_capacity(phase, n)

    scores = token_importance(q, k, params["window"], "sum_of_group_mean")
    scores = avg_pool_same(scores, params["kernel_size"])
    protected = protected_in_priority(n, params["sink_tokens"], params["local_window"], device=k.device)
    keep = [keep_top(scores[j], protected, capacity) for j in range(h_kv)]
    return DecodeState(phase, k, v, keep=keep, num_heads=q.shape[0], details={"capacity": capacity})
