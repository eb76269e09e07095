"""Cost accounting (attention_backends/cost.py): the causal convention and decode FLOPs, and the one reading of
a Hugging Face config.json's shape (``ModelShape.from_hf_config``, which ``ModelConfig.from_hf_dict`` builds on).
The paper's accounting is an analysis: tests/test_paper_flops.py."""

from __future__ import annotations

import pytest

from attention_backends import cost
from attention_backends.cost import ModelShape, decode_token_flops, prefill_flops
from server.engine.model_config import ModelConfig

# Qwen2.5-7B's shape (config.json: 28 layers, 28 heads, 4 KV heads, hidden 3584, MLP 18944, vocab 152064)
QWEN2_5_7B = ModelShape(28, 28, 4, 128, 3584, 18944, 152064)


def dense_kv_tokens(s: ModelShape, ctx: int) -> int:
    return s.num_layers * s.num_kv_heads * ctx


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
    assert ModelShape.from_hf_config(QWEN2_CFG) == QWEN2_5_7B
    # explicit head_dim (h d != D) is respected; null falls back to D / h; missing kv heads = MHA
    explicit = ModelShape.from_hf_config({**QWEN2_CFG, "head_dim": 256})
    assert explicit.head_dim == 256
    assert ModelShape.from_hf_config({**LLAMA_CFG, "head_dim": None}).head_dim == 128
    mha = {k: v for k, v in LLAMA_CFG.items() if k != "num_key_value_heads"}
    assert ModelShape.from_hf_config(mha).num_kv_heads == 32
    f = prefill_flops(explicit, 10)
    assert f.projections == 28 * 2 * 10 * 3584 * (2 * 28 * 256 + 2 * 256 * 4)


def test_one_reading_of_config_json() -> None:
    # The engine's config reads the shape the way cost accounting does, wrapped or not.
    for hf in (LLAMA_CFG, QWEN2_CFG, {**QWEN2_CFG, "head_dim": 256}):
        assert ModelConfig.from_hf_dict(hf).to_model_shape() == ModelShape.from_hf_config(hf)
    # a multimodal wrapper nests the language model under text_config: both readers take it
    wrapped = {"model_type": "llava", "text_config": QWEN2_CFG, "vision_config": {"hidden_size": 1024}}
    assert ModelShape.from_hf_config(wrapped) == QWEN2_5_7B
    assert ModelConfig.from_hf_dict(wrapped) == ModelConfig.from_hf_dict(QWEN2_CFG)
    # Qwen2 has q/k/v biases whatever its attention_bias key says (one rule, in the engine's config)
    assert ModelConfig.from_hf_dict({**QWEN2_CFG, "attention_bias": False}).attention_bias
    assert not ModelConfig.from_hf_dict(LLAMA_CFG).attention_bias


def test_a_request_cost_adds_deferred_reports_in_their_order() -> None:
    """A sparse chunk's report with device scalars waits for ``settle``; a later dense-fallback chunk's report
    must not overtake it: the request's ``fallback`` is its last chunk's, its cells the sum of all."""
    import torch

    from attention_backends.reports import PrefillCallReport
    from server.contract.cost import RequestCost

    sparse = PrefillCallReport("vertical_slash", 10.0, torch.tensor(100), 1000, torch.tensor(800.0), 8000.0)
    last = PrefillCallReport.dense(3000, 16, fallback="dense")
    c = RequestCost()
    c.add_prefill(sparse)
    c.add_prefill(last)
    assert c.prefill.dense_units == 0  # nothing read before settle
    c.settle()
    assert c.prefill.fallback == "dense"
    assert c.prefill.actual_units == 100 + 3000 and c.prefill.dense_units == 1000 + 3000
    assert not isinstance(c.prefill.actual_units, torch.Tensor)  # read into a Python number
