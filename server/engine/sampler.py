"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators, logprobs.

Each request brings its own parameters, so rows are sampled one by one after one batched log-softmax;
greedy rows (temperature 0) take the argmax. Logprobs are those of the model's raw distribution (before
temperature and truncation), as OpenAI-compatible servers report them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.contract.engine import SamplingParams, TokenLogprob


@dataclass
class SamplerState:
    """Per-request sampling state: the seeded generator (``None`` for greedy)."""

    generator: torch.Generator | None = None

    @classmethod
    def for_params(cls, params: SamplingParams) -> SamplerState:
        if params.temperature == 0:
            return cls(None)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        return cls(gen)


@dataclass
class Sampled:
    token_id: int
    logprob: TokenLogprob | None = field(default=None)


def _filtered_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    scaled = logits / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def greedy_only(params: list[SamplingParams], states: list[SamplerState]) -> bool:
    """Every row takes its argmax and wants no logprobs: its token is the logits' argmax, nothing else."""
    return all(st.generator is None for st in states) and all(p.logprobs is None for p in params)


def sample(logits: Tensor, params: list[SamplingParams], states: list[SamplerState]) -> list[Sampled]:
    """``logits [B, V]`` (float32, on any device) -> one token per row.

    Greedy rows take their argmax where the logits are (one small copy back); the logits come to the host only
    for logprobs and for sampled rows, whose seeded generators live there."""
    greedy_rows = [i for i, st in enumerate(states) if st.generator is None]
    greedy = dict(zip(greedy_rows, logits[greedy_rows].argmax(dim=-1).tolist(), strict=True)) if greedy_rows else {}
    if greedy_only(params, states):
        return [Sampled(greedy[row]) for row in range(len(params))]
    logits = logits.cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    out: list[Sampled] = []
    for row, (p, st) in enumerate(zip(params, states, strict=True)):
        if row in greedy:
            token = greedy[row]
        else:
            probs = _filtered_probs(logits[row], p)
            token = int(torch.multinomial(probs, 1, generator=st.generator))
        lp = None
        if p.logprobs is not None:
            lp = token_logprobs(logprobs[row : row + 1], torch.tensor([token]), p.logprobs)[0]
        out.append(Sampled(token, lp))
    return out


def token_logprobs(logprobs: Tensor, tokens: Tensor, k: int) -> list[TokenLogprob]:
    """Each row's logprob of its token, with the row's top ``k`` (``logprobs [B, V]``, ``tokens [B]``)."""
    chosen = logprobs.gather(1, tokens[:, None].to(logprobs.device))[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens.tolist(), chosen, tops, strict=True)]
