"""The Sparse Frontier paper's FLOP accounting, reproduced on the Qwen2.5 models it studies (an analysis, not
what the server reports: the server's convention is :mod:`attention_backends.cost`).

    python benchmarks/paper_flops.py      # prints the table below

The paper's appendix counts prefill attention as the full square, ``n^2`` cells per query head per layer (no
causal halving), and puts the Q/K/V/O projections inside the "attention block". With that accounting the
dense attention share of prefill FLOPs, averaged over Qwen2.5 7B/14B/32B/72B, is (:func:`attention_share`):

============  =========  =========  ==========
logits for    16K        64K        128K
============  =========  =========  ==========
all n pos.    40.2 %     67.7 %     79.9 %
1 position    41.5 %     68.8 %     80.7 %
============  =========  =========  ==========

against the paper's 40 / 68 / 80 %. What makes the numbers land is the full ``n^2`` count together with the
projections inside the attention block: with causal cells the same block gives 31 / 55 / 69 %, and the core
alone with ``n^2`` cells gives 30 / 63 / 77 %. ``4d + 3`` versus ``4d`` per cell changes < 0.2 points. Logits
are within tolerance either way (1-3 % of the total at these lengths); counting them for all ``n`` positions
(a full LM forward over the sequence, the usual "total model FLOPs" count) matches to within 0.3 points at
every length, so :func:`attention_share` does that by default for the paper's accounting.

Decode bytes per step (the paper's memory-bound view): KV ``2 * tokens * d * bytes`` with ``tokens`` summed
over KV heads and layers (a dense step reads ``L * h_kv * L_ctx``; per-head lengths just sum), the weights
once per step per batch (a request's share is ``weight_bytes / batch_size``), and Quest's page min/max,
``2 L h_kv d ceil(L_ctx / B)`` elements.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Literal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention_backends.cost import ModelShape, flops_per_cell, prefill_flops  # noqa: E402
from server.engine.model_config import ModelConfig  # noqa: E402

Convention = Literal["causal", "paper"]


def _qwen25(layers: int, heads: int, kv_heads: int, hidden: int, inter: int) -> ModelConfig:
    return ModelConfig(layers, heads, kv_heads, hidden // heads, hidden, inter, 152064, attention_bias=True,
                       tie_word_embeddings=False, model_type="qwen2")


# Published config.json values of the Qwen2.5 instruct/base models (head_dim 128 for all four).
QWEN2_5_7B = _qwen25(28, 28, 4, 3584, 18944)
QWEN2_5_14B = _qwen25(48, 40, 8, 5120, 13824)
QWEN2_5_32B = _qwen25(64, 40, 8, 5120, 27648)
QWEN2_5_72B = _qwen25(80, 64, 8, 8192, 29568)
PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-7b": QWEN2_5_7B,
    "qwen2.5-14b": QWEN2_5_14B,
    "qwen2.5-32b": QWEN2_5_32B,
    "qwen2.5-72b": QWEN2_5_72B,
}


def parameter_count(config: ModelConfig) -> int:
    """Parameters: embeddings (+ untied LM head), per layer Q/K/V/O (+ biases), MLP, 2 RMSNorms, final norm."""
    D, q_dim, kv_dim, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    attn = D * q_dim + 2 * D * kv_dim + q_dim * D
    attn += (q_dim + 2 * kv_dim if config.attention_bias else 0) + (D if config.attention_out_bias else 0)
    mlp = 3 * D * inter + ((2 * inter + D) if config.mlp_bias else 0)
    embeddings = config.vocab_size * D * (1 if config.tie_word_embeddings else 2)
    return config.num_layers * (attn + mlp + 2 * D) + embeddings + D


def weight_bytes(config: ModelConfig, bytes_per_param: float = 2.0) -> float:
    """Bytes of all weights, read once per decode step per batch. Counts the input embedding table whole (an
    upper bound: a step gathers only its tokens' rows; the difference is ``(V - batch) D`` bytes if untied)."""
    return parameter_count(config) * bytes_per_param


# ------------------------------------------------------------------------------------------------- prefill
def attention_share(shape: ModelShape, n: int, convention: Convention = "paper",
                    logits_positions: int | None = None) -> float:
    """Dense attention's fraction of dense prefill FLOPs. ``"paper"``: attention block = core (``n^2`` cells)
    + Q/K/V/O projections, logits for all n positions by default. ``"causal"`` (the server's count): the core
    (causal cells) alone, logits for 1 position by default."""
    paper = convention == "paper"
    if logits_positions is None:
        logits_positions = n if paper else 1
    f = prefill_flops(shape, n, logits_positions=logits_positions)
    if not paper:
        return f.attention_dense / f.total_dense
    square = float(shape.num_layers * shape.num_heads * n * n * flops_per_cell(shape.head_dim))
    block = square + f.projections
    return block / (block + f.mlp + f.logits)


# -------------------------------------------------------------------------------------------------- decode
def dense_kv_tokens(shape: ModelShape, context_tokens: int) -> int:
    """KV tokens a dense step reads, summed over KV heads and layers: ``L h_kv L_ctx``."""
    return shape.num_layers * shape.num_kv_heads * context_tokens


def quest_metadata_elements(shape: ModelShape, context_tokens: int, page_size: int = 16) -> int:
    """Quest metadata read per decode step: a min and a max key (d values each) per page, KV head and layer."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * math.ceil(context_tokens / page_size)


def quest_metadata_bytes(shape: ModelShape, context_tokens: int, page_size: int = 16,
                         bytes_per_element: float = 2.0) -> float:
    return quest_metadata_elements(shape, context_tokens, page_size) * bytes_per_element


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one decode step reads for one request; ``weights`` is its share of the batch's weight read."""

    kv_actual: float
    kv_dense: float
    metadata: float
    weights: float
    total_actual: float  # the kept KV, the method's metadata and the weights
    total_dense: float  # every KV token and the weights (a dense step reads no metadata)


def decode_step_bytes(config: ModelConfig, tokens_read: float, dense_tokens_read: float, *,
                      metadata_elements: float = 0.0, bytes_per_element: float = 2.0,
                      bytes_per_param: float = 2.0, batch_size: int = 1) -> DecodeBytes:
    """One step's bytes. ``tokens_read``/``dense_tokens_read``: KV tokens read summed over KV heads and layers
    (include the generated tokens in both); ``metadata_elements`` e.g. :func:`quest_metadata_elements`."""
    token_bytes = 2.0 * config.head_dim * bytes_per_element  # K and V of one token of one KV head
    kv_actual, kv_dense = tokens_read * token_bytes, dense_tokens_read * token_bytes
    metadata = float(metadata_elements * bytes_per_element)
    weights = weight_bytes(config, bytes_per_param) / max(batch_size, 1)
    return DecodeBytes(kv_actual, kv_dense, metadata, weights, total_actual=kv_actual + metadata + weights,
                       total_dense=kv_dense + weights)


def main() -> None:
    models = list(PRESETS.values())
    print("dense attention share of prefill FLOPs, mean over Qwen2.5 7B/14B/32B/72B (paper: 40 / 68 / 80 %)")
    for label, positions in (("all n pos.", None), ("1 position", 1)):
        shares = []
        for n in (16384, 65536, 131072):
            share = sum(attention_share(m, n, "paper", positions) for m in models) / len(models)
            shares.append(f"{share:6.1%}")
        print(f"  logits for {label}: " + "  ".join(shares))
    print("the server's causal count, core only:",
          "  ".join(f"{sum(attention_share(m, n, 'causal') for m in models) / len(models):6.1%}"
                    for n in (16384, 65536, 131072)))
    for name, m in PRESETS.items():
        print(f"  {name}: {parameter_count(m) / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()
