"""Training-free sparse attention methods, independent of any server.

The public API (single sequence, one layer, plain tensors)::

    spec = parse_pattern("vertical_slash:8+quest:20")
    out, prefill_report = sparse_prefill(q, k, v, spec)          # q [h, n, d], k/v [h_kv, n, d]
    state = prepare_decode(q, k, v, spec)
    out_t, decode_report = sparse_decode(q_t, k_t, v_t, state)   # q_t [h, d], k_t/v_t [h_kv, d]

Methods (``docs/methods.md``): prefill ``dense``, ``vertical_slash``, ``flexprefill``,
``block_sparse``; decode ``dense``, ``snapkv``, ``ada_snapkv``, ``quest``.
"""

from .api import decode_keep, engine_impl, prepare_decode, sparse_decode, sparse_prefill
from .decode.state import DecodeState
from .reports import DecodeCallReport, PrefillCallReport
from .spec import (
    DECODE_METHODS,
    DENSE,
    PREFILL_METHODS,
    InvalidSparsePattern,
    PhaseSpec,
    SparseSpec,
    describe_methods,
    parse_pattern,
)

__all__ = [
    "DECODE_METHODS",
    "DENSE",
    "PREFILL_METHODS",
    "DecodeCallReport",
    "DecodeState",
    "InvalidSparsePattern",
    "PhaseSpec",
    "PrefillCallReport",
    "SparseSpec",
    "decode_keep",
    "describe_methods",
    "engine_impl",
    "parse_pattern",
    "prepare_decode",
    "sparse_decode",
    "sparse_prefill",
]
