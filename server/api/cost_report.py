"""The response's ``sparse`` object: a :class:`~server.contract.cost.RequestCost` under the JSON names of the API's
schema (:class:`~server.api.schemas.SparseReport`). The names are the API's to keep stable, not the engines'."""

from __future__ import annotations

from typing import Any

from server.contract.cost import RequestCost


def cost_report(cost: RequestCost) -> dict[str, Any]:
    p, d = cost.prefill, cost.decode
    return {
        "prefill": {
            "method": p.method,
            "target_compression_ratio": p.target_compression_ratio,
            "achieved_compression_ratio": p.achieved_compression_ratio,
            "attention_flops": p.attention_flops,
            "dense_attention_flops": p.dense_attention_flops,
            "indexing_flops": p.indexing_flops,
            "fallback": p.fallback,
        },
        "decode": {
            "method": d.method,
            "target_compression_ratio": d.target_compression_ratio,
            "achieved_compression_ratio": d.achieved_compression_ratio,
            "kv_bytes_read": d.kv_bytes_read,
            "dense_kv_bytes_read": d.dense_kv_bytes_read,
            "metadata_bytes_read": d.metadata_bytes_read,
            "kv_cache_tokens": d.kv_cache_tokens,
        },
        "model_flops": cost.model_flops,
        "dense_model_flops": cost.dense_model_flops,
    }
