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

:func:`keep` is the method (the engine calls it once per layer at the end of prefill, then evicts);
:func:`prepare` wraps its keep-sets in the public API's per-sequence decode state.
"""

from __future__ import annotations

from torch import Tensor

from ..spec import PhaseSpec
from .keep_sets import keep_top, protected_in_priority, unpad
from .state import DecodeState, check_impl, eviction_capacity, state_class
from .window_scores import avg_pool_same, token_importance


def keep(q_window: Tensor, k: Tensor, phase: PhaseSpec, impl: str = "reference") -> list[Tensor]:
    """Sorted kept prompt positions of each KV head. ``q_window [h, m, d]``: the queries of the last ``m``
    prompt positions (at least the observation window; only its last ``window`` rows are read), ``k [h_kv,
    n, d]`` the whole prompt's keys. ``impl="triton"``: :func:`..kernels.snapkv_select.snapkv_keep`."""
    params = phase.params
    h_kv, n, _ = k.shape
    capacity = eviction_capacity(phase, n)
    if check_impl(impl) == "triton":
        from ..kernels.snapkv_select import snapkv_keep

        return unpad(*snapkv_keep(q_window, k, capacity=capacity, window=params["window"],
                                  kernel_size=params["kernel_size"], sink_tokens=params["sink_tokens"],
                                  local_window=params["local_window"]))
    scores = token_importance(q_window, k, params["window"], "sum_of_group_mean")
    scores = avg_pool_same(scores, params["kernel_size"])
    protected = protected_in_priority(n, params["sink_tokens"], params["local_window"], device=k.device)
    return [keep_top(scores[j], protected, capacity) for j in range(h_kv)]


def prepare(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, impl: str = "reference") -> DecodeState:
    details = {"capacity": eviction_capacity(phase, k.shape[1])}
    return state_class(impl)(phase, k, v, keep=keep(q, k, phase, impl), num_heads=q.shape[0], details=details)
