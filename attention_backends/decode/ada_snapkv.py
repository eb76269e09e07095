"""Ada-SnapKV (AdaKV): SnapKV scores with the layer's budget shared adaptively across KV heads.

1. Observation-window attention as in SnapKV, but reduced with **max** over the window queries and over
   the KV head's GQA group of query heads (:func:`.window_scores.token_importance`).
2. Pooled with a 1-D **max** pool of ``kernel_size`` (stride 1, same length). The spec says only "then
   pooled"; max pooling keeps the scores as attention probabilities, which is what makes them comparable
   across heads in step 4, and keeps a sharp peak from being averaged away next to its neighbours.
3. Layer budget ``T = C * h_kv`` with ``C = capacity`` (default ``ceil(n / r)``, at most ``n``). Every head
   first keeps a floor of ``F = max(ceil(floor_fraction * C), P)`` tokens, its own protected ``P`` tokens
   (first ``sink_tokens`` and last ``local_window``) and then its own top entries. ``F`` is capped at
   ``C``, so the floors never exceed the budget: when the protected set alone exceeds ``C`` every head keeps
   exactly ``C`` (protected tokens by priority, sinks then most recent, as in SnapKV).
4. The remaining ``T - F * h_kv`` slots go to the globally highest remaining scores over all heads.

Heads therefore keep different lengths that sum to ``T`` exactly; achieved compression is ``n / C``.
Generated tokens are appended after prefill and never evicted.

:func:`keep` is the method (the engine calls it once per layer at the end of prefill, then evicts);
:func:`prepare` wraps its keep-sets in the public API's per-sequence decode state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..spec import PhaseSpec
from .keep_sets import keep_top, protected_in_priority, unpad
from .state import DecodeState, check_impl, eviction_capacity, state_class
from .window_scores import max_pool_same, token_importance


def per_head_floor(capacity: int, floor_fraction: float, protected: int) -> int:
    """Tokens every head keeps before the global allocation: ``min(C, max(ceil(f * C), protected))``."""
    return min(capacity, max(math.ceil(floor_fraction * capacity), protected))


def keep(q_window: Tensor, k: Tensor, phase: PhaseSpec, impl: str = "reference") -> list[Tensor]:
    """Sorted kept prompt positions of each KV head (as :func:`.snapkv.keep`; the heads' counts differ and sum
    to ``C * h_kv``). ``impl="triton"``: :func:`..kernels.snapkv_select.ada_snapkv_keep`."""
    params = phase.params
    h_kv, n, _ = k.shape
    capacity = eviction_capacity(phase, n)
    if check_impl(impl) == "triton":
        from ..kernels.snapkv_select import ada_snapkv_keep

        return unpad(*ada_snapkv_keep(q_window, k, capacity=capacity, window=params["window"],
                                      kernel_size=params["kernel_size"], sink_tokens=params["sink_tokens"],
                                      local_window=params["local_window"], floor_fraction=params["floor_fraction"]))
    layer_budget = capacity * h_kv
    scores = token_importance(q_window, k, params["window"], "max")
    scores = max_pool_same(scores, params["kernel_size"])
    protected = protected_in_priority(n, params["sink_tokens"], params["local_window"], device=k.device)
    floor = per_head_floor(capacity, params["floor_fraction"], protected.numel())

    # Each head's floor: its protected tokens, then its own top entries.
    kept = [keep_top(scores[j], protected, floor) for j in range(h_kv)]

    # The rest of the layer budget: the globally best (head, token) pairs not kept yet.
    remaining = scores.clone()
    for j in range(h_kv):
        remaining[j, kept[j]] = float("-inf")
    extra = remaining.flatten().topk(layer_budget - floor * h_kv).indices
    return [torch.cat([kept[j], extra[extra // n == j] % n]).sort().values for j in range(h_kv)]


def prepare(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, impl: str = "reference") -> DecodeState:
    params = phase.params
    n = k.shape[1]
    capacity = eviction_capacity(phase, n)
    protected = protected_in_priority(n, params["sink_tokens"], params["local_window"]).numel()
    kept = keep(q, k, phase, impl)
    details = {"capacity": capacity, "floor": per_head_floor(capacity, params["floor_fraction"], protected),
               "per_head": [int(idx.numel()) for idx in kept]}
    return state_class(impl)(phase, k, v, keep=kept, num_heads=q.shape[0], details=details)
