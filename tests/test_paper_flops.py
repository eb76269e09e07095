"""The paper's FLOP accounting (benchmarks/paper_flops.py, an analysis): its sanity anchor, parameter counts of
the Qwen2.5 presets, decode bytes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from test_cost import LLAMA_CFG, QWEN2_CFG  # config.json dicts

from attention_backends.cost import ModelShape
from server.engine.model_config import ModelConfig

_SPEC = importlib.util.spec_from_file_location(
    "paper_flops", Path(__file__).resolve().parents[1] / "benchmarks" / "paper_flops.py")
pf = sys.modules["paper_flops"] = importlib.util.module_from_spec(_SPEC)  # registered first: it has dataclasses
_SPEC.loader.exec_module(pf)

QWENS = [pf.PRESETS[k] for k in ("qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b")]
ANCHORS = {16384: 0.40, 65536: 0.68, 131072: 0.80}


@pytest.mark.parametrize("logits_positions", ["all", "one"])
def test_paper_convention_attention_share(logits_positions: str) -> None:
    for n, target in ANCHORS.items():
        shares = [pf.attention_share(s, n, "paper", n if logits_positions == "all" else 1) for s in QWENS]
        avg = sum(shares) / len(shares)
        detail = ", ".join(f"{k}={v:.1%}" for k, v in zip(("7B", "14B", "32B", "72B"), shares, strict=True))
        assert abs(avg - target) <= 0.03, f"n={n} logits={logits_positions}: avg {avg:.1%} vs {target:.0%} ({detail})"


def test_causal_convention_is_not_the_papers() -> None:
    # The causal count halves the core: the anchor only holds with the paper's accounting.
    avg = sum(pf.attention_share(s, 65536, "causal") for s in QWENS) / 4
    assert avg < 0.60, f"{avg:.1%}"


def test_presets_parameter_counts() -> None:
    # Published sizes: 7.61B, 14.7B, 32.5B, 72.7B.
    for shape, billions in zip(QWENS, (7.61, 14.7, 32.5, 72.7), strict=True):
        got = pf.parameter_count(shape) / 1e9
        assert abs(got - billions) / billions < 0.01, f"{got:.2f}B vs {billions}B"


def test_parameter_counts_from_config_json() -> None:
    llama = ModelConfig.from_hf_dict(LLAMA_CFG)
    assert not llama.attention_bias
    assert abs(pf.parameter_count(llama) / 1e9 - 8.03) < 0.02
    qwen = ModelConfig.from_hf_dict(QWEN2_CFG)
    assert pf.parameter_count(qwen) == pf.parameter_count(pf.QWEN2_5_7B)
    # Qwen2's q/k/v biases are there even when its config says attention_bias: false
    assert pf.parameter_count(ModelConfig.from_hf_dict({**QWEN2_CFG, "attention_bias": False})) == \
        pf.parameter_count(qwen)


def test_decode_bytes_and_quest_metadata() -> None:
    s = pf.QWEN2_5_7B
    ctx, bpe = 10_000, 2
    dense_tokens = pf.dense_kv_tokens(s, ctx)
    # variable per-(layer, KV head) kept lengths: just their sum
    kept = [[1000 + 10 * h + layer for h in range(s.num_kv_heads)] for layer in range(s.num_layers)]
    kept_sum = sum(map(sum, kept))
    b = pf.decode_step_bytes(s, kept_sum, dense_tokens, metadata_elements=0, bytes_per_element=bpe)
    assert b.kv_dense == 2 * s.num_layers * ctx * s.head_dim * s.num_kv_heads * bpe
    assert b.kv_actual == 2 * kept_sum * s.head_dim * bpe
    assert b.kv_actual / b.kv_dense == pytest.approx(kept_sum / dense_tokens)
    assert b.weights == pf.parameter_count(s) * 2
    assert pf.decode_step_bytes(s, kept_sum, dense_tokens, batch_size=4).weights == b.weights / 4

    page = 16
    elements = pf.quest_metadata_elements(s, ctx + 5, page)
    assert elements == 2 * s.num_layers * s.num_kv_heads * s.head_dim * math.ceil((ctx + 5) / page)
    assert pf.quest_metadata_bytes(s, ctx + 5, page, bpe) == elements * bpe
    q = pf.decode_step_bytes(s, dense_tokens // 8, dense_tokens, metadata_elements=elements, bytes_per_element=bpe)
    assert q.metadata == elements * bpe
    assert q.total_actual == q.kv_actual + q.metadata + q.weights
    assert q.total_dense == q.kv_dense + q.weights


def test_presets_are_the_config_json_shapes() -> None:
    assert pf.QWEN2_5_7B.to_model_shape() == ModelShape.from_hf_config(QWEN2_CFG)
