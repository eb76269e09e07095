"""FlexPrefill (query-aware mode off, ``tau = 0``), the plain PyTorch reference; see ``docs/methods.md``.

Same estimate and index as Vertical-Slash (:mod:`.vertical_slash_index`), but each head gets its own
budget from attention-mass coverage:

    k_v[h] = max(min_budget, cover(vertical_scores[h] / W, alpha)),  k_s[h] likewise with the slash scores,

where ``cover(x, a)`` is the number of largest entries of ``x`` whose cumulative sum first reaches ``a``
(``cover(x, 0) = 0``). Both score vectors sum to 1 per head after dividing by ``W``. The forced entries
(first ``sink_tokens`` keys, offsets ``0..local_window-1``) are always kept and count towards the budget:
a head keeps the forced entries plus the non-forced ones among its top ``cover`` entries, topped up by
score to ``min_budget``. So the kept set always holds at least ``alpha`` of the estimated mass.

Parameters and the compression ratio ``r``:

* ``r = 1`` and ``alpha`` not given: dense, like every method at ratio 1 (no estimate).
* ``alpha`` given: used as given. ``min_budget`` defaults to 512 — capped, when ``r > 1``, at the
  uniform budget Vertical-Slash would use for ``r`` (below).
* ``r > 1`` and ``alpha`` not given: ``min_budget`` defaults to ``min(512, k_r)`` with ``k_r`` the uniform
  Vertical-Slash budget for ``r`` on the same index; ``alpha = 0`` with that floor *is* uniform
  Vertical-Slash at ``r`` (what the paper does at high ``r``), so the floor never makes the target
  unreachable. ``alpha`` is then the value in ``[0, 1]`` (bisection; density grows with ``alpha``) whose
  covered causal fraction is closest to ``1 / r``. When ``k_r <= 512`` this ends at ``alpha ~ 0``: the
  floor alone already meets the target and FlexPrefill coincides with Vertical-Slash; the coverage rule
  only adapts budgets per head at low ``r`` or long prompts (``k_r > 512``).

Reported: computed cells as counted by the masked attention, the Vertical-Slash estimation FLOPs (the
cover computation is a sort and a cumulative sum, inside its ``2 n log2 n`` term), and
``details = {alpha, min_budget, num_vertical, num_slash}`` with per-head budget lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..spec import PhaseSpec
from .common import PrefillOutcome, masked_causal_attention
from .vertical_slash import closest_budget
from .vertical_slash_index import Candidates, VerticalSlashIndex, estimate_scores, estimation_flops

DEFAULT_ALPHA = 0.9
DEFAULT_MIN_BUDGET = 512
ALPHA_STEPS = 30  # bisection steps on alpha (2^-30 resolution)


class Coverage:
    """``cover(x, alpha)`` per head for one score vector per head, in a forced-aware form.

    ``count(alpha)`` is how many leading entries of the keep order (forced first, then by descending
    score) a head must keep so that the forced entries plus the head's top-``cover(x, alpha)`` entries
    are all kept.
    """

    def __init__(self, scores: Tensor, window: int, forced: int):
        mass = scores / window  # each of the W estimate rows sums to 1, so each head's mass sums to 1
        by_score = torch.sort(mass, dim=-1, descending=True, stable=True)
        self.cumulative = by_score.values.cumsum(-1).contiguous()  # [h, n]
        not_forced = (by_score.indices >= forced).long()
        # unforced_in_top[h, c] = number of non-forced entries among the top c by score
        self.unforced_in_top = torch.cat([not_forced.new_zeros(scores.shape[0], 1), not_forced.cumsum(-1)], -1)
        self.forced = forced
        self.n = scores.shape[-1]

    def cover(self, alpha: float | Tensor) -> Tensor:
        """``[h]`` (``[h, A]`` for ``A`` alphas): number of largest entries whose cumulative sum first reaches
        ``alpha`` (0 for ``alpha <= 0``)."""
        alphas = torch.as_tensor(alpha, dtype=self.cumulative.dtype, device=self.cumulative.device)
        target = alphas.reshape(1, -1).expand(self.cumulative.shape[0], -1).contiguous()
        first = torch.searchsorted(self.cumulative, target)  # first index with cumsum >= alpha
        # (clamped: rounding may leave the total just below 1, then every entry is taken)
        top = torch.where(target > 0, (first + 1).clamp(max=self.n), 0)
        return top if alphas.dim() else top.squeeze(-1)

    def count(self, alpha: float | Tensor) -> Tensor:
        """``[h]`` (``[A, h]`` for ``A`` alphas): entries of the keep order each head keeps."""
        top = self.cover(alpha)
        counts = self.forced + self.unforced_in_top.gather(-1, top if top.dim() == 2 else top[:, None])
        return counts.T if top.dim() == 2 else counts.squeeze(-1)


@dataclass
class FlexBudget:
    alpha: float
    min_budget: int
    index: VerticalSlashIndex


def choose(candidates: Candidates, alpha: float | None, min_budget: int | None, ratio: float) -> FlexBudget:
    """Resolve ``alpha``/``min_budget`` per the module docstring and build the index."""
    scores = candidates.scores
    vertical = Coverage(scores.vertical, scores.window, candidates.forced_vertical)
    slash = Coverage(scores.slash, scores.window, candidates.forced_slash)

    if min_budget is None:
        min_budget = DEFAULT_MIN_BUDGET
        if ratio > 1.0:
            min_budget = min(min_budget, closest_budget(candidates, ratio))

    def fraction(a: float) -> float:
        return candidates.covered_fraction(vertical.count(a).clamp(min=min_budget),
                                           slash.count(a).clamp(min=min_budget))

    if alpha is None:
        alpha = search_alpha(fraction, ratio, ALPHA_STEPS)

    index = candidates.select(vertical.count(alpha).clamp(min=min_budget), slash.count(alpha).clamp(min=min_budget))
    return FlexBudget(alpha, min_budget, index)


def search_alpha(fraction: Callable[[float], float], ratio: float, steps: int) -> float:
    """The alpha in [0, 1] whose covered causal fraction (non-decreasing in alpha) is closest to 1 / ratio:
    bisection for ``steps`` steps."""
    target = 1.0 / ratio
    if fraction(0.0) >= target:
        return 0.0
    if fraction(1.0) <= target:
        return 1.0
    lo, hi = 0.0, 1.0  # fraction(lo) < target <= fraction(hi)
    f_lo: float | None = None
    f_hi: float | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        f = fraction(mid)
        if f >= target:
            hi, f_hi = mid, f
        else:
            lo, f_lo = mid, f
    f_lo = fraction(lo) if f_lo is None else f_lo
    f_hi = fraction(hi) if f_hi is None else f_hi
    return lo if abs(f_lo - target) < abs(f_hi - target) else hi


def build_index(q: Tensor, k: Tensor, phase: PhaseSpec, q_offset: int = 0) -> FlexBudget | None:
    """The budgets and index :func:`prefill` attends over, or ``None`` when it runs dense."""
    params = phase.params
    if phase.compression_ratio <= 1.0 and params["alpha"] is None:
        return None
    candidates = Candidates(estimate_scores(q, k, params["window"]), params["sink_tokens"],
                            params["local_window"], q_offset)
    return choose(candidates, params["alpha"], params["min_budget"], phase.compression_ratio)


def prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, q_offset: int = 0) -> PrefillOutcome:
    h, m, d = q.shape
    n = k.shape[1]
    budget = build_index(q, k, phase, q_offset)
    if budget is None:
        out, cells = masked_causal_attention(q, k, v, q_offset=q_offset)
        return PrefillOutcome(out, cells, 0.0, {"alpha": None, "min_budget": None,
                                                "num_vertical": [n] * h, "num_slash": [n] * h})
    out, cells = masked_causal_attention(q, k, v, budget.index.row_mask(), q_offset)
    window = min(phase.params["window"], m)
    details = {
        "alpha": budget.alpha,
        "min_budget": budget.min_budget,
        "num_vertical": budget.index.num_vertical.tolist(),
        "num_slash": budget.index.num_slash.tolist(),
    }
    return PrefillOutcome(out, cells, estimation_flops(h, n, d, window), details)
