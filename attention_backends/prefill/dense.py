"""Dense causal prefill: the baseline every sparse method is measured against."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from ..spec import PhaseSpec
from .common import PrefillOutcome, masked_causal_attention


def prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec, q_offset: int = 0) -> PrefillOutcome:
    out, cells = masked_causal_attention(q, k, v, q_offset=q_offset)
    return PrefillOutcome(out, cells)


def sdpa(q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> Tensor:
    """Causal dense attention ``[h, m, d]`` through SDPA (GQA without repeating K/V): the fast path, on every
    device; same result as :func:`prefill` up to rounding. With ``q_offset`` (a chunk) the ``m`` queries are the
    last positions of the ``n`` keys: the causal mask is aligned to the lower right (SDPA's ``is_causal`` aligns
    it to the upper left), without materialising it on CUDA."""
    mask = causal_lower_right(q.shape[1], k.shape[1]) if q_offset else None
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=not q_offset,
                                          enable_gqa=True)[0]
