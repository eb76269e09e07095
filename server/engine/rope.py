"""Rotary position embeddings (RoPE) with the scalings Llama-family models use: linear, ``llama3``, YaRN.

Frequencies follow Hugging Face transformers' definitions (``modeling_rope_utils``) so logits match it; the
layout is the "rotate half" one (HF), not llama.cpp's interleaved pairs: GGUF q/k weights are un-permuted on
load (:mod:`server.engine.weights`).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def compute_inv_freq(
    head_dim: int,
    theta: float,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int | None = None,
    freq_factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The inverse frequencies ``[head_dim // 2]`` (float32) and the cos/sin scale (YaRN's attention factor).

    ``freq_factors`` (llama.cpp's ``rope_freqs`` tensor, as GGUF files of Llama 3.1+ carry it) divide the base
    frequencies and replace a ``llama3`` scaling computed from parameters.
    """
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    inv_freq = _base_inv_freq(head_dim, theta)
    if freq_factors is not None:
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope frequency factors cannot be combined with {rope_type!r} scaling")
        return inv_freq / freq_factors.float().cpu(), 1.0
    if rope_type == "default":
        return inv_freq, 1.0
    assert rope_scaling is not None
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(rope_scaling["factor"])
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        old_len = float(rope_scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, rope_scaling, max_position_embeddings)
    raise ValueError(f"unsupported RoPE scaling type {rope_type!r}")


def _yarn(
    head_dim: int, theta: float, p: dict[str, Any], max_position_embeddings: int | None
) -> tuple[torch.Tensor, float]:
    orig = p.get("original_max_position_embeddings") or max_position_embeddings
    if orig is None:
        raise ValueError("YaRN needs original_max_position_embeddings")
    factor = p.get("factor")
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError("YaRN needs a factor")
        factor = max_position_embeddings / orig
    factor = float(factor)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Computes cos/sin for arbitrary (flat, possibly packed) positions and applies them."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int | None = None,
        freq_factors: torch.Tensor | None = None,
    ):
        super().__init__()
        inv_freq, self.attention_scaling = compute_inv_freq(
            head_dim, theta, rope_scaling, max_position_embeddings, freq_factors
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # always float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and a sign-folded sin, ``[T, 1, head_dim]`` in ``dtype`` (computed in float32, like transformers).

        The sin's first half is negated so that :func:`apply_rotary` needs one ``roll`` instead of
        transformers' ``rotate_half`` (slice, negate, concatenate); the products are the same.
        """
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos = torch.cat((cos, cos), dim=-1).to(dtype)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, head_dim]`` rotated by :meth:`RotaryEmbedding.cos_sin`'s output; returns a new tensor.

    Equals ``x * cos + rotate_half(x) * sin`` (HF layout: the pairs are (i, i + head_dim / 2)).
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin
