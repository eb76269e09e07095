"""A request's sparse attention choice: body, ``vllm_xargs``, headers and the server default -> SparseSpec.

Precedence (``docs/api.md``): body > headers > server default. The body's own fields win over its
``vllm_xargs``. The pattern and the ratio are chosen independently, so ``compression_ratio: 8`` in a body
applies to a pattern named by the ``X-Sparse-Pattern`` header (or by the server default). Every value given
is validated, used or not, and an invalid one is a 400 whose ``param`` names where it came from.

``auto`` / ``auto:<max_drop>`` (from any of these places) resolves to an :class:`AutoRequest`: the pattern is
chosen later, per prompt, from its length (``server.sparse_policy``); a ratio cannot be combined with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attention_backends import InvalidSparsePattern, SparseSpec, parse_pattern
from attention_backends.spec import validate_ratio
from server.sparse_policy import AutoRequest, parse_auto

from .errors import APIError, bad_request

PATTERN_HEADER = "X-Sparse-Pattern"
RATIO_HEADER = "X-Compression-Ratio"

_XARGS_KEYS = ("sparse_pattern", "compression_ratio")


def _invalid(e: InvalidSparsePattern) -> APIError:
    return bad_request(e.message, param=e.param, code="invalid_sparse_pattern")


def resolve_sparse_spec(
    *,
    body_pattern: Any = None,
    body_ratio: Any = None,
    xargs: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    default_pattern: str = "dense",
) -> SparseSpec | AutoRequest:
    """The request's :class:`SparseSpec` (or :class:`AutoRequest`); raises :class:`APIError` (400) naming the
    bad field. The default is the pattern's text, parsed per request: a request's ratio applies to the phases
    that the default names no ratio for, which only the text says."""
    xargs = xargs or {}
    headers = headers or {}
    # (value, param) candidates, best first; None values are "not given".
    patterns: list[tuple[Any, str]] = [
        (body_pattern, "sparse_pattern"),
        (xargs.get("sparse_pattern"), "vllm_xargs.sparse_pattern"),
        (headers.get(PATTERN_HEADER), PATTERN_HEADER),
    ]
    ratios: list[tuple[Any, str]] = [
        (body_ratio, "compression_ratio"),
        (xargs.get("compression_ratio"), "vllm_xargs.compression_ratio"),
        (headers.get(RATIO_HEADER), RATIO_HEADER),
    ]
    try:
        valid_ratios = [(validate_ratio(v, p), p) for v, p in ratios if v is not None]
        ratio = valid_ratios[0][0] if valid_ratios else None
        given = [(v, p) for v, p in patterns if v is not None] or [(default_pattern, "--default-sparse-pattern")]
        specs = [parse_auto(v, p) or parse_pattern(v, ratio, param=p) for v, p in given]
        if isinstance(specs[0], AutoRequest) and valid_ratios:
            raise InvalidSparsePattern(valid_ratios[0][1], "a compression ratio cannot be combined with "
                                       "sparse_pattern 'auto' (the policy chooses the ratio)")
        return specs[0]
    except InvalidSparsePattern as e:
        raise _invalid(e) from None


def spec_labels(spec: SparseSpec | AutoRequest | None) -> tuple[str, str]:
    """(prefill_method, decode_method) for metrics labels; ``none`` when the spec never parsed."""
    if spec is None:
        return "none", "none"
    if isinstance(spec, AutoRequest):
        return "auto", "auto"
    return spec.prefill.method, spec.decode.method
