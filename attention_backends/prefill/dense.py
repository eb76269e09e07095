"""Dense causal prefill: the baseline every sparse method is measured against."""

from __future__ import annotations

from torch import Tensor

from ..spec import PhaseSpec
from .common import PrefillOutcome, masked_causal_attention


def prefill(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec) -> PrefillOutcome:
    out, cells = masked_causal_attention(q, k, v)
    return PrefillOutcome(out, cells)
