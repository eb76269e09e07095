"""Cost accounting: FLOPs and bytes of a request, dense-equivalent and actual (``docs/methods.md``,
"Cost accounting"). Pure arithmetic on Python numbers: no torch, no engine state.

Notation: ``L`` layers, ``h`` query heads, ``h_kv`` KV heads (GQA group ``g = h / h_kv``), ``d`` head dim,
``D`` hidden size (d_model), ``I`` MLP intermediate size (d_mlp), ``V`` vocabulary, ``n`` prompt tokens.

Building blocks (per layer unless said otherwise)
-------------------------------------------------
- Attention core: ``cells * (4 d + 3)`` where a *cell* is one query-key product of one query head
  (QK^T and AV are 2d FLOPs each, the softmax about 3). See :func:`flops_per_cell`.
- Q/K/V/O projections: ``2 n D (2 h d + 2 d h_kv)``; with ``h d = D`` (every preset) this is the spec's
  ``2 n D (2 D + 2 d h_kv)`` (q and o are D x D, k and v are D x d h_kv).
- MLP (SwiGLU, three matrices): ``2 n I (3 D)``.
- Logits: ``2 D V`` per position whose logits are computed (once per model, not per layer).

Two conventions for prefill attention FLOPs
-------------------------------------------
``"causal"`` (the server's convention; what the response and the metrics report)
    Cells are the causal cells really computed: dense attention computes ``n (n + 1) / 2`` per query head per
    layer; a sparse method computes ``rho`` of that. The engine passes the actual computed cells summed over
    query heads and layers (the sum of ``PrefillReport.computed_cells``), so ``attention_actual`` is exactly
    what the kernels did. "Attention" here is the core only; projections are counted with the rest of the
    model, because sparse methods do not change them. Prefill computes logits for 1 position (the first
    generated token), so logits are negligible.

``"paper"`` (the Sparse Frontier appendix's accounting, used only to check the paper's sanity anchor)
    Cells are the full square, ``n^2`` per query head per layer (no causal halving), and the "attention block"
    is the core *plus* the Q/K/V/O projections. With this accounting the dense attention share of prefill
    FLOPs, averaged over Qwen2.5 7B/14B/32B/72B, is (see :func:`attention_share`):

    ============  =========  =========  ==========
    logits for    16K        64K        128K
    ============  =========  =========  ==========
    all n pos.    40.2 %     67.7 %     79.9 %
    1 position    41.5 %     68.8 %     80.7 %
    ============  =========  =========  ==========

    against the paper's 40 / 68 / 80 %. What makes the numbers land is the full ``n^2`` count together with
    the projections inside the attention block: with causal cells the same block gives 31 / 55 / 69 %, and the
    core alone with ``n^2`` cells gives 30 / 63 / 77 %. ``4d + 3`` versus ``4d`` per cell changes < 0.2 points.
    Logits are within tolerance either way (they are 1-3 % of the total at these lengths); counting them for
    all ``n`` positions (a full LM forward over the sequence, the usual "total model FLOPs" count) matches
    to within 0.3 points at every length, so :func:`attention_share` uses that by default for ``"paper"``.

Decode
------
Per step, bytes read: KV ``2 * tokens * d * bytes`` where ``tokens`` is summed over KV heads and layers (a dense
step reads ``L * h_kv * L_ctx`` of them, i.e. ``2 L L_ctx d h_kv bytes``; per-head lengths just sum), the
weights once per step per batch (a request's share is ``weight_bytes / batch_size``), and method metadata
(Quest page min/max: ``2 L h_kv d ceil(L_ctx / B)`` elements). FLOPs per generated token: the non-attention
parts for one position (including its logits) plus ``g * tokens * (4 d + 3)`` for attention, with ``tokens``
the KV tokens read summed over KV heads and layers (each is read by the ``g`` query heads of its group).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Convention = Literal["causal", "paper"]


# ---------------------------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that cost accounting needs (decoder-only, GQA, SwiGLU MLP)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False  # only affects parameter_count / weight_bytes
    attention_bias: bool = False  # q/k/v projection biases (Qwen2); only affects parameter_count

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face ``config.json`` dict (Llama, Qwen2, Mistral key names). ``head_dim`` defaults to
        ``hidden_size / num_attention_heads`` when absent or null; ``num_key_value_heads`` to the head count."""
        if "num_hidden_layers" not in config and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]  # multimodal wrappers nest the language model's config
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        bias = config.get("attention_bias")
        if bias is None:
            bias = config.get("model_type") == "qwen2"  # Qwen2 has q/k/v biases without a config key
        return cls(
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(bias),
        )


def _qwen25(layers: int, heads: int, kv_heads: int, hidden: int, inter: int) -> ModelShape:
    return ModelShape(layers, heads, kv_heads, hidden // heads, hidden, inter, 152064,
                      tie_word_embeddings=False, attention_bias=True)


# Published config.json values of the Qwen2.5 instruct/base models (head_dim 128 for all four).
QWEN2_5_7B = _qwen25(28, 28, 4, 3584, 18944)
QWEN2_5_14B = _qwen25(48, 40, 8, 5120, 13824)
QWEN2_5_32B = _qwen25(64, 40, 8, 5120, 27648)
QWEN2_5_72B = _qwen25(80, 64, 8, 8192, 29568)
PRESETS: dict[str, ModelShape] = {
    "qwen2.5-7b": QWEN2_5_7B,
    "qwen2.5-14b": QWEN2_5_14B,
    "qwen2.5-32b": QWEN2_5_32B,
    "qwen2.5-72b": QWEN2_5_72B,
}


def parameter_count(shape: ModelShape, tied_embeddings: bool | None = None) -> int:
    """Parameters: embeddings (+ untied LM head), per layer Q/K/V/O (+ q/k/v biases), MLP, 2 RMSNorms, final norm.
    ``tied_embeddings`` overrides ``shape.tie_word_embeddings``."""
    tied = shape.tie_word_embeddings if tied_embeddings is None else tied_embeddings
    D, q_dim, kv_dim = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attn = D * q_dim + 2 * D * kv_dim + q_dim * D + ((q_dim + 2 * kv_dim) if shape.attention_bias else 0)
    layer = attn + 3 * D * shape.intermediate_size + 2 * D
    embeddings = shape.vocab_size * D * (1 if tied else 2)
    return shape.num_layers * layer + embeddings + D


def weight_bytes(shape: ModelShape, bytes_per_param: float = 2.0, tied_embeddings: bool | None = None) -> float:
    """Bytes of all weights, read once per decode step per batch. Counts the input embedding table whole (an
    upper bound: a step gathers only its tokens' rows; the difference is ``(V - batch) D`` bytes if untied)."""
    return parameter_count(shape, tied_embeddings) * bytes_per_param


# ----------------------------------------------------------------------------------------- building blocks


def flops_per_cell(head_dim: int) -> int:
    """FLOPs per computed query-key cell: QK^T and AV are 2d each, plus about 3 for the softmax."""
    return 4 * head_dim + 3


def causal_cells(n: int) -> int:
    """Causal cells of one head over an n-token prompt: n (n + 1) / 2."""
    return n * (n + 1) // 2


def dense_prefill_cells(shape: ModelShape, n: int, convention: Convention = "causal") -> int:
    """Cells of dense prefill summed over query heads and layers (``n (n+1)/2`` or ``n^2`` per head per layer)."""
    per_head = causal_cells(n) if convention == "causal" else n * n
    return shape.num_layers * shape.num_heads * per_head


def projection_flops(shape: ModelShape, tokens: int) -> float:
    """Q/K/V/O projections over all layers: ``2 tokens D (2 h d + 2 d h_kv)`` per layer."""
    D, d = shape.hidden_size, shape.head_dim
    return float(shape.num_layers * 2 * tokens * D * (2 * shape.num_heads * d + 2 * d * shape.num_kv_heads))


def mlp_flops(shape: ModelShape, tokens: int) -> float:
    """SwiGLU MLP over all layers: ``2 tokens I (3 D)`` per layer."""
    return float(shape.num_layers * 2 * tokens * shape.intermediate_size * 3 * shape.hidden_size)


def logits_flops(shape: ModelShape, positions: int) -> float:
    """LM head: ``2 D V`` per position whose logits are computed."""
    return float(2 * shape.hidden_size * shape.vocab_size * positions)


# ------------------------------------------------------------------------------------------------- prefill


@dataclass(frozen=True)
class PrefillFlops:
    """Prefill FLOPs of one request, summed over layers. ``attention_*`` is the attention core only."""

    convention: Convention
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
    convention: Convention = "causal",
) -> PrefillFlops:
    """Prefill FLOPs of an n-token prompt.

    The actual attention is given by ``computed_cells`` (the causal cells the kernels really computed, summed
    over query heads *and layers*) or by ``density`` rho; neither means dense. Under ``"paper"`` the actual is
    ``rho * dense`` with rho taken against the causal count. ``indexing_flops`` (the method's estimation cost,
    all layers) goes into ``total_actual`` only. ``logits_positions`` is 1 for a serving prefill.
    """
    if computed_cells is not None and density is not None:
        raise ValueError("give computed_cells or density, not both")
    per_cell = flops_per_cell(shape.head_dim)
    dense = float(dense_prefill_cells(shape, n, convention) * per_cell)
    if computed_cells is not None:
        rho = computed_cells / dense_prefill_cells(shape, n, "causal") if n else 1.0
    else:
        rho = 1.0 if density is None else density
    actual = float(computed_cells * per_cell) if computed_cells is not None and convention == "causal" else rho * dense
    return PrefillFlops(
        convention=convention,
        attention_actual=actual,
        attention_dense=dense,
        indexing=float(indexing_flops),
        projections=projection_flops(shape, n),
        mlp=mlp_flops(shape, n),
        logits=logits_flops(shape, logits_positions),
    )


def attention_share(
    shape: ModelShape, n: int, convention: Convention = "paper", logits_positions: int | None = None
) -> float:
    """Dense attention's fraction of dense prefill FLOPs. ``"paper"``: attention block = core (n^2 cells) + Q/K/V/O
    projections, logits for all n positions by default. ``"causal"``: the core (causal cells) alone, logits for 1
    position by default."""
    if logits_positions is None:
        logits_positions = n if convention == "paper" else 1
    f = prefill_flops(shape, n, logits_positions=logits_positions, convention=convention)
    block = f.attention_dense + (f.projections if convention == "paper" else 0.0)
    return block / f.total_dense


# ---------------------------------------------------------------------------------------- indexing helpers


def vertical_slash_indexing_flops(
    shape: ModelShape,
    n: int,
    window: int = 256,
    *,
    k_v: int = 0,
    k_s: int = 0,
    block_size: int = 64,
) -> float:
    """Vertical-Slash (and FlexPrefill) estimation, all layers: ``h [2 d n W + 5 n W + 2 n log2 n]`` per layer
    (the W x n score matmul; softmax ~3 plus the vertical and slash sums per score; top-k of verticals and
    slashes by sorting), plus index building when ``k_v``/``k_s`` are given: each of the ``ceil(n / block_size)``
    query blocks merges its ``k_v + k_s`` selected lines, ``h ceil(n / B) (k_v + k_s)``."""
    w = min(window, n)
    per_head = 2 * shape.head_dim * n * w + 5 * n * w + 2 * n * math.log2(max(n, 1))
    build = math.ceil(n / block_size) * (k_v + k_s)
    return float(shape.num_layers * shape.num_heads * (per_head + build))


def block_sparse_indexing_flops(shape: ModelShape, n: int, block_size: int = 16) -> float:
    """Block-sparse estimation, all layers (an estimate): mean-pooling q and k (``(h + h_kv) n d`` adds), the
    causal pooled score ``2 d`` per block cell over ``nb (nb + 1) / 2`` block cells per head, and a sort-based
    top-k per query-block row (``log2 nb`` per block cell)."""
    nb = math.ceil(n / block_size)
    block_cells = nb * (nb + 1) / 2
    pool = (shape.num_heads + shape.num_kv_heads) * n * shape.head_dim
    per_head = block_cells * (2 * shape.head_dim + math.log2(max(nb, 2)))
    return float(shape.num_layers * (pool + shape.num_heads * per_head))


def quest_metadata_elements(shape: ModelShape, context_tokens: int, page_size: int = 16) -> int:
    """Quest metadata read per decode step: a min and a max key (d values each) per page, KV head and layer,
    ``2 L h_kv d ceil(L_ctx / B)``."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * math.ceil(context_tokens / page_size)


def quest_metadata_bytes(shape: ModelShape, context_tokens: int, page_size: int = 16,
                         bytes_per_element: float = 2.0) -> float:
    return quest_metadata_elements(shape, context_tokens, page_size) * bytes_per_element


def quest_indexing_flops(shape: ModelShape, context_tokens: int, page_size: int = 16) -> float:
    """Quest page scoring per decode step, all layers: per query head and page, ``sum_d max(q min, q max)`` is
    ~4d FLOPs (2 products, a max, an add per dimension)."""
    pages = math.ceil(context_tokens / page_size)
    return float(shape.num_layers * shape.num_heads * pages * 4 * shape.head_dim)


# -------------------------------------------------------------------------------------------------- decode


def dense_kv_tokens(shape: ModelShape, context_tokens: int) -> int:
    """KV tokens a dense step reads, summed over KV heads and layers: ``L h_kv L_ctx``."""
    return shape.num_layers * shape.num_kv_heads * context_tokens


def kv_bytes(shape: ModelShape, tokens: float, bytes_per_element: float = 2.0) -> float:
    """K and V bytes for ``tokens`` KV tokens summed over KV heads and layers: ``2 tokens d bytes``. With
    ``tokens = L h_kv L_kept`` this is the spec's ``2 L L_kept d h_kv bytes``; per-head lengths simply sum."""
    return 2.0 * tokens * shape.head_dim * bytes_per_element


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one decode step reads for one request."""

    kv_actual: float
    kv_dense: float
    metadata: float
    weights: float  # this request's share of the weights read once for the batch

    @property
    def total_actual(self) -> float:
        return self.kv_actual + self.metadata + self.weights

    @property
    def total_dense(self) -> float:
        return self.kv_dense + self.weights


def decode_step_bytes(
    shape: ModelShape,
    tokens_read: float,
    dense_tokens_read: float,
    *,
    metadata_elements: float = 0.0,
    bytes_per_element: float = 2.0,
    bytes_per_param: float = 2.0,
    batch_size: int = 1,
) -> DecodeBytes:
    """One step's bytes. ``tokens_read``/``dense_tokens_read``: KV tokens read summed over KV heads and layers
    (include the generated tokens in both); ``metadata_elements`` e.g. :func:`quest_metadata_elements`."""
    return DecodeBytes(
        kv_actual=kv_bytes(shape, tokens_read, bytes_per_element),
        kv_dense=kv_bytes(shape, dense_tokens_read, bytes_per_element),
        metadata=float(metadata_elements * bytes_per_element),
        weights=weight_bytes(shape, bytes_per_param) / max(batch_size, 1),
    )


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
