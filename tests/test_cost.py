"""Cost accounting (attention_backends/cost.py): the paper's sanity anchor, the causal convention, decode bytes."""

from __future__ import annotations

import math

import pytest

from attention_backends import cost
from attention_backends.cost import (
    PRESETS,
    QWEN2_5_7B,
    ModelShape,
    attention_share,
    decode_step_bytes,
    decode_token_flops,
    dense_kv_tokens,
    parameter_count,
    prefill_flops,
    quest_metadata_bytes,
    quest_metadata_elements,
)

QWENS = [PRESETS[k] for k in ("qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b")]
ANCHORS = {16384: 0.40, 65536: 0.68, 131072: 0.80}


@pytest.mark.parametrize("logits_positions", ["all", "one"])
def test_paper_convention_attention_share(logits_positions: str) -> None:
    for n, target in ANCHORS.items():
        shares = [attention_share(s, n, "paper", n if logits_positions == "all" else 1) for s in QWENS]
        avg = sum(shares) / len(shares)
        detail = ", ".join(f"{k}={v:.1%}" for k, v in zip(("7B", "14B", "32B", "72B"), shares, strict=True))
        assert abs(avg - target) <= 0.03, f"n={n} logits={logits_positions}: avg {avg:.1%} vs {target:.0%} ({detail})"


def test_causal_convention_is_not_the_papers() -> None:
    # The causal count halves the core: the anchor only holds with the paper's accounting.
    avg = sum(attention_share(s, 65536, "causal") for s in QWENS) / 4
    assert avg < 0.60, f"{avg:.1%}"


def test_presets_parameter_counts() -> None:
    # Published sizes: 7.61B, 14.7B, 32.5B, 72.7B.
    for shape, billions in zip(QWENS, (7.61, 14.7, 32.5, 72.7), strict=True):
        got = parameter_count(shape) / 1e9
        assert abs(got - billions) / billions < 0.01, f"{got:.2f}B vs {billions}B"


def test_causal_dense_cells_and_sparse_scaling() -> None:
    s = QWEN2_5_7B
    n = 1000
    dense = prefill_flops(s, n)
    cells_per_layer = n * (n + 1) // 2 * s.num_heads
    assert dense.attention_dense == s.num_layers * cells_per_layer * (4 * s.head_dim + 3)
    assert dense.attention_actual == dense.attention_dense and dense.total_actual == dense.total_dense
    total_cells = s.num_layers * cells_per_layer
    sparse = prefill_flops(s, n, computed_cells=total_cells // 10, indexing_flops=123.0)
    assert sparse.attention_actual == (total_cells // 10) * cost.flops_per_cell(s.head_dim)
    assert sparse.density == pytest.approx(0.1, rel=1e-6)
    # dense-equivalent and actual differ only in attention (and the method's indexing)
    assert sparse.total_dense == dense.total_dense
    assert sparse.total_actual - sparse.total_dense == pytest.approx(
        sparse.attention_actual - sparse.attention_dense + 123.0)
    for f in ("projections", "mlp", "logits"):
        assert getattr(sparse, f) == getattr(dense, f)
    assert prefill_flops(s, n, density=0.25).attention_actual == pytest.approx(0.25 * dense.attention_dense)
    assert dense.logits == 2 * s.hidden_size * s.vocab_size


def test_projection_and_mlp_formulas() -> None:
    s = QWEN2_5_7B
    n, D, d = 77, s.hidden_size, s.head_dim
    f = prefill_flops(s, n)
    assert f.projections == s.num_layers * 2 * n * D * (2 * D + 2 * d * s.num_kv_heads)
    assert f.mlp == s.num_layers * 2 * n * s.intermediate_size * 3 * D


def test_decode_bytes_and_quest_metadata() -> None:
    s = QWEN2_5_7B
    ctx, bpe = 10_000, 2
    dense_tokens = dense_kv_tokens(s, ctx)
    # variable per-(layer, KV head) kept lengths: just their sum
    kept = [[1000 + 10 * h + layer for h in range(s.num_kv_heads)] for layer in range(s.num_layers)]
    kept_sum = sum(map(sum, kept))
    b = decode_step_bytes(s, kept_sum, dense_tokens, metadata_elements=0, bytes_per_element=bpe)
    assert b.kv_dense == 2 * s.num_layers * ctx * s.head_dim * s.num_kv_heads * bpe
    assert b.kv_actual == 2 * kept_sum * s.head_dim * bpe
    assert b.kv_actual / b.kv_dense == pytest.approx(kept_sum / dense_tokens)
    assert b.weights == parameter_count(s) * 2
    assert decode_step_bytes(s, kept_sum, dense_tokens, batch_size=4).weights == b.weights / 4

    page = 16
    elements = quest_metadata_elements(s, ctx + 5, page)
    assert elements == 2 * s.num_layers * s.num_kv_heads * s.head_dim * math.ceil((ctx + 5) / page)
    assert quest_metadata_bytes(s, ctx + 5, page, bpe) == elements * bpe
    q = decode_step_bytes(s, dense_tokens // 8, dense_tokens, metadata_elements=elements, bytes_per_element=bpe)
    assert q.metadata == elements * bpe
    assert q.total_actual == q.kv_actual + q.metadata + q.weights
    assert q.total_dense == q.kv_dense + q.weights


def test_decode_token_flops() -> None:
    s = QWEN2_5_7B
    ctx = 4096
    dense = dense_kv_tokens(s, ctx)
    t = decode_token_flops(s, dense // 4, dense)
    # per layer and query head: L (4d + 3)
    assert t.attention_dense == s.num_layers * s.num_heads * ctx * (4 * s.head_dim + 3)
    assert t.attention_actual == pytest.approx(t.attention_dense / 4)
    assert t.total_dense - t.total_actual == pytest.approx(t.attention_dense - t.attention_actual)


LLAMA_CFG = {  # Llama-3.1-8B config.json keys
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "attention_bias": False,
}
QWEN2_CFG = {  # Qwen2.5-7B-Instruct config.json keys
    "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
}


def test_from_hf_config() -> None:
    llama = ModelShape.from_hf_config(LLAMA_CFG)
    assert (llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim) == (32, 32, 8, 128)
    assert (llama.hidden_size, llama.intermediate_size, llama.vocab_size) == (4096, 14336, 128256)
    assert not llama.attention_bias
    assert abs(parameter_count(llama) / 1e9 - 8.03) < 0.02
    assert ModelShape.from_hf_config(QWEN2_CFG) == QWEN2_5_7B
    # explicit head_dim (h d != D) is respected; null falls back to D / h; missing kv heads = MHA
    explicit = ModelShape.from_hf_config({**QWEN2_CFG, "head_dim": 256})
    assert explicit.head_dim == 256
    assert ModelShape.from_hf_config({**LLAMA_CFG, "head_dim": None}).head_dim == 128
    mha = {k: v for k, v in LLAMA_CFG.items() if k != "num_key_value_heads"}
    assert ModelShape.from_hf_config(mha).num_kv_heads == 32
    f = prefill_flops(explicit, 10)
    assert f.projections == 28 * 2 * 10 * 3584 * (2 * 28 * 256 + 2 * 256 * 4)
