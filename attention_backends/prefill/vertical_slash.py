"""Vertical-Slash (MInference), the plain PyTorch reference; ``docs/methods.md`` defines it.

1. Estimate, per query head, vertical scores (per key column) and slash scores (per offset ``o = i - j``)
   from the last ``W = min(window, n)`` queries (:func:`.vertical_slash_index.estimate_scores`).
2. Force-keep the first ``sink_tokens`` keys and the offsets ``0..local_window-1``; they count towards the
   budget (a budget below the forced count is raised to it).
3. Keep the top ``k_v`` verticals and ``k_s`` slashes per head (uniform budget: the same for every head).
4. Compute causal attention over exactly their union.

Ratio mapping (this project's extension). When ``num_vertical``/``num_slash`` are not given they are
derived from the target ratio ``r``: ``k_v = k_s = k`` with ``k`` the value whose *covered causal fraction*
(the built index, summed over heads, cells counted once) is closest to ``1 / r`` — a binary search over
``k``, valid because coverage only grows with ``k``. If exactly one of them is given, the other is searched
with it fixed. ``r = 1`` with neither given is dense: no estimate, every causal cell.

Reported: ``computed_cells`` as counted by the masked attention (equal to the index's covered cells),
``indexing_flops = h [2 d n W + 5 n W + 2 n log2 n]`` with the actual ``W``, and the budgets used.
"""

from __future__ import annotations

from torch import Tensor

from ..spec import PhaseSpec
from .common import PrefillOutcome, closest_budget_search, masked_causal_attention
from .vertical_slash_index import Candidates, VerticalSlashIndex, estimate_scores, estimation_flops


def closest_budget(candidates: Candidates, ratio: float, num_vertical: int | None = None,
                   num_slash: int | None = None) -> int:
    """The budget ``k`` in ``[1, n]`` whose index covers the fraction of causal cells closest to ``1/ratio``.

    ``k`` stands for whichever of ``num_vertical``/``num_slash`` is ``None`` (both when both are).
    """

    def fraction(k: int) -> float:
        kv = k if num_vertical is None else num_vertical
        ks = k if num_slash is None else num_slash
        return candidates.covered_fraction(kv, ks)

    return closest_budget_search(fraction, 1.0 / ratio, candidates.n)


def build_index(q: Tensor, k: Tensor, phase: PhaseSpec, q_offset: int = 0) -> VerticalSlashIndex | None:
    """The index :func:`prefill` attends over, or ``None`` when it runs dense (``r = 1``, no budgets)."""
    params = phase.params
    num_vertical, num_slash = params["num_vertical"], params["num_slash"]
    if phase.compression_ratio <= 1.0 and num_vertical is None and num_slash is None:
        return None
    scores = estimate_scores(q, k, params["window"])
    candidates = Candidates(scores, params["sink_tokens"], params["local_window"], q_offset)
    if num_vertical is None or num_slash is None:
        budget = closest_budget(candidates, phase.compression_ratio, num_vertical, num_slash)
        num_vertical = budget if num_vertical is None else num_vertical
        num_slash = budget if num_slash is None else num_slash
    return candidates.select(num_vertical, num_slash)


def prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, q_offset: int = 0) -> PrefillOutcome:
    h, m, d = q.shape
    n = k.shape[1]
    index = build_index(q, k, phase, q_offset)
    if index is None:
        out, cells = masked_causal_attention(q, k, v, q_offset=q_offset)
        return PrefillOutcome(out, cells, 0.0, {"num_vertical": n, "num_slash": n})
    out, cells = masked_causal_attention(q, k, v, index.row_mask(), q_offset)
    window = min(phase.params["window"], m)
    details = {"num_vertical": int(index.num_vertical[0]), "num_slash": int(index.num_slash[0])}
    return PrefillOutcome(out, cells, estimation_flops(h, n, d, window), details)
