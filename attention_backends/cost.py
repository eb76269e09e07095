"""Cost accounting: the FLOPs of a request, dense-equivalent and actual (``docs/methods.md``,
"Cost accounting"). Pure arithmetic on Python numbers: no torch, no engine state.

Notation: ``L`` layers, ``h`` query heads, ``h_kv`` KV heads (GQA group ``g = h / h_kv``), ``d`` head dim,
``D`` hidden size (d_model), ``I`` MLP intermediate size (d_mlp), ``V`` vocabulary, ``n`` prompt tokens.

Building blocks (per layer unless said otherwise)
-------------------------------------------------
- Attention core: ``cells * (4 d + 3)`` where a *cell* is one query-key product of one query head
  (QK^T and AV are 2d FLOPs each, the softmax about 3). See :func:`flops_per_cell`.
- Q/K/V/O projections: ``2 n D (2 h d + 2 d h_kv)``; with ``h d = D`` (the usual case) this is the spec's
  ``2 n D (2 D + 2 d h_kv)`` (q and o are D x D, k and v are D x d h_kv).
- MLP (SwiGLU, three matrices): ``2 n I (3 D)``.
- Logits: ``2 D V`` per position whose logits are computed (once per model, not per layer).

Prefill attention FLOPs count the causal cells really computed: dense attention computes ``n (n + 1) / 2``
per query head per layer; a sparse method computes ``rho`` of that. The engine passes the actual computed
cells summed over query heads and layers (the sum of ``PrefillCallReport.computed_cells``), so
``attention_actual`` is exactly what the kernels did. "Attention" here is the core only; projections are
counted with the rest of the model, because sparse methods do not change them. Prefill computes logits for 1
position (the first generated token), so logits are negligible. (The Sparse Frontier paper's accounting,
``n^2`` cells with the projections inside the attention block, is reproduced in
``benchmarks/paper_flops.py``.)

Decode
------
FLOPs per generated token: the non-attention parts for one position (including its logits) plus
``g * tokens * (4 d + 3)`` for attention, with ``tokens`` the KV tokens read summed over KV heads and layers
(each is read by the ``g`` query heads of its group).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------- model shape


def hf_text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a Hugging Face ``config.json`` dict: multimodal wrappers nest it under
    ``text_config``."""
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), Mapping):
        return config["text_config"]
    return config


@dataclass
class ModelShape:
    """The dimensions that cost accounting needs (decoder-only, GQA, SwiGLU MLP)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face ``config.json`` dict (Llama, Qwen2, Mistral key names; see :func:`hf_text_config`):
        the one reading of these keys (``ModelConfig.from_hf_dict`` builds on it). ``head_dim`` defaults to
        ``hidden_size / num_attention_heads`` when absent or null; ``num_key_value_heads`` to the head count."""
        config = hf_text_config(config)
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
        )


# ----------------------------------------------------------------------------------------- building blocks


def flops_per_cell(head_dim: int) -> int:
    """FLOPs per computed query-key cell: QK^T and AV are 2d each, plus about 3 for the softmax."""
    return 4 * head_dim + 3


def causal_cells(n: int, q_offset: int = 0) -> int:
    """Causal cells of one head over an n-token prompt: n (n + 1) / 2; with ``q_offset``, those of the query
    rows ``[q_offset, n)`` only (one prefill chunk)."""
    return n * (n + 1) // 2 - q_offset * (q_offset + 1) // 2


def dense_prefill_cells(shape: ModelShape, n: int) -> int:
    """Cells of dense prefill summed over query heads and layers: ``n (n + 1) / 2`` per head per layer."""
    return shape.num_layers * shape.num_heads * causal_cells(n)


def projection_flops(shape: ModelShape, tokens: int) -> float:
    """Q/K/V/O projections over all layers: ``2 tokens D (2 h d + 2 d h_kv)`` per layer."""
    D, d = shape.hidden_size, shape.head_dim
    return float(shape.num_layers * 2 * tokens * D * (2 * shape.num_heads * d + 2 * d * shape.num_kv_heads))


def mlp_flops(shape: ModelShape, tokens: int) -> float:
    """SwiGLU MLP over all layers: ``2 tokens I (3 D)`` per layer."""
    return float(shape.num_layers * 2 * tokens * shape.intermediate_size * 3 * shape.hidden_size)


def dense_chunk_flops(shape: ModelShape, start: int, end: int) -> float:
    """FLOPs of prefilling prompt positions ``[start, end)`` with dense attention, logits left out: the chunk's
    projections and MLP, and its queries against every key up to their own position (``start=0``: a whole
    prompt)."""
    m = end - start
    cells = shape.num_layers * shape.num_heads * causal_cells(end, start)
    return projection_flops(shape, m) + mlp_flops(shape, m) + float(cells * flops_per_cell(shape.head_dim))


def logits_flops(shape: ModelShape, positions: int) -> float:
    """LM head: ``2 D V`` per position whose logits are computed."""
    return float(2 * shape.hidden_size * shape.vocab_size * positions)


# ------------------------------------------------------------------------------------------------- prefill


@dataclass(frozen=True)
class PrefillFlops:
    """Prefill FLOPs of one request, summed over layers. ``attention_*`` is the attention core only."""

    attention_actual: float
    attention_dense: float
    indexing: float
    projections: float
    mlp: float
    logits: float

    @property
    def total_actual(self) -> float:
        return self.attention_actual + self.indexing + self.projections + self.mlp + self.logits

    @property
    def total_dense(self) -> float:
        return self.attention_dense + self.projections + self.mlp + self.logits

    @property
    def density(self) -> float:
        """rho = actual / dense attention FLOPs (1 / achieved compression ratio)."""
        return self.attention_actual / self.attention_dense if self.attention_dense else 1.0


def prefill_flops(
    shape: ModelShape,
    n: int,
    *,
    computed_cells: float | None = None,
    density: float | None = None,
    indexing_flops: float = 0.0,
    logits_positions: int = 1,
) -> PrefillFlops:
    """Prefill FLOPs of an n-token prompt.

    The actual attention is given by ``computed_cells`` (the causal cells the kernels really computed, summed
    over query heads *and layers*) or by ``density`` rho; neither means dense. ``indexing_flops`` (the
    method's estimation cost, all layers) goes into ``total_actual`` only. ``logits_positions`` is 1 for a
    serving prefill.
    """
    if computed_cells is not None and density is not None:
        raise ValueError("give computed_cells or density, not both")
    per_cell = flops_per_cell(shape.head_dim)
    dense = float(dense_prefill_cells(shape, n) * per_cell)
    if computed_cells is not None:
        actual = float(computed_cells * per_cell)
    else:
        actual = dense * (1.0 if density is None else density)
    return PrefillFlops(
        attention_actual=actual,
        attention_dense=dense,
        indexing=float(indexing_flops),
        projections=projection_flops(shape, n),
        mlp=mlp_flops(shape, n),
        logits=logits_flops(shape, logits_positions),
    )


# -------------------------------------------------------------------------------------------------- decode


@dataclass(frozen=True)
class TokenFlops:
    """Model FLOPs of one decode step (one generated token), summed over layers."""

    attention_actual: float
    attention_dense: float
    indexing: float
    non_attention: float  # projections + MLP + logits of one position

    @property
    def total_actual(self) -> float:
        return self.attention_actual + self.indexing + self.non_attention

    @property
    def total_dense(self) -> float:
        return self.attention_dense + self.non_attention


def decode_token_flops(
    shape: ModelShape, tokens_read: float, dense_tokens_read: float, *, indexing_flops: float = 0.0
) -> TokenFlops:
    """FLOPs of one generated token. ``tokens_read``: KV tokens read summed over KV heads and layers; each is
    attended by the g query heads of its group, so attention is ``g tokens (4 d + 3)`` (per layer and query
    head: ``L_read (4 d + 3)``)."""
    per_token = shape.group_size * flops_per_cell(shape.head_dim)
    return TokenFlops(
        attention_actual=float(tokens_read * per_token),
        attention_dense=float(dense_tokens_read * per_token),
        indexing=float(indexing_flops),
        non_attention=projection_flops(shape, 1) + mlp_flops(shape, 1) + logits_flops(shape, 1),
    )
