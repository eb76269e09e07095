"""Dense decode: keep and read every token."""

from __future__ import annotations

from torch import Tensor

from ..spec import PhaseSpec
from .state import DecodeState


def prepare(q: Tensor, k: Tensor, v: Tensor, phase: PhaseSpec) -> DecodeState:
    return DecodeState(phase, k, v, num_heads=q.shape[0])
