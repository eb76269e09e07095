"""Dense causal prefill: the baseline every sparse method is measured against."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..spec import PhaseSpec
from .common import PrefillOutcome, masked_causal_attention


def prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec) -> PrefillOutcome:
    out, cells = masked_causal_attention(q, k, v)
    return PrefillOutcome(out, cells)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal dense attention ``[h, n, d]`` through SDPA (GQA without repeating K/V): the fast path, on every
    device; same result as :func:`prefill` up to rounding."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
