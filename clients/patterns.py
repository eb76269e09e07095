"""Sparse-pattern strings on the client side: expanding a `--patterns` list over `--ratios`, naming methods.

The grammar is the server's: `METHOD[:RATIO]` or `PREFILL[:RATIO]+DECODE[:RATIO]` (e.g. `dense`, `quest:20`,
`vertical_slash:8+quest:20`). The client does not validate method names (the server does, with a 400 naming
the field); it only needs to split, strip and add ratios.

Expansion rules (`expand_patterns`): `dense` (or `dense+dense`) runs once as `dense`; a pattern that names no
ratio is crossed with every ratio, each sparse phase getting it (`vertical_slash+quest` x 5 ->
`vertical_slash:5+quest:5`; a dense phase never takes a ratio); a pattern that names a ratio anywhere runs as
given; with no ratios at all, patterns run as given (method defaults). `auto` and `auto:<max_drop>` (the
server's policy picks the pattern per prompt) are never crossed with ratios.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["split_patterns", "parse_parts", "expand_patterns", "method_label", "nominal_ratio", "fmt_ratio",
           "is_dense", "parse_ratios"]


def fmt_ratio(r: float) -> str:
    return f"{float(r):g}"


def split_patterns(text: str | Sequence[str]) -> list[str]:
    """`"dense, quest:20,vertical_slash+quest"` -> list of pattern strings (whitespace removed)."""
    items = [text] if isinstance(text, str) else list(text)
    out = []
    for item in items:
        for p in item.split(","):
            p = "".join(p.split())
            if p:
                out.append(p)
    return out


def parse_ratios(text: str | Sequence[float] | None) -> list[float]:
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for x in items:
        if isinstance(x, str) and not x.strip():
            continue
        r = float(x)
        if not math.isfinite(r) or r < 1:
            raise ValueError(f"compression ratio must be a finite number >= 1, got {x!r}")
        out.append(r)
    return out


def parse_parts(pattern: str) -> list[tuple[str, float | None]]:
    """`"vertical_slash:8+quest"` -> [("vertical_slash", 8.0), ("quest", None)]."""
    parts = []
    for part in pattern.split("+"):
        method, sep, ratio = part.partition(":")
        method = method.strip()
        if not method:
            raise ValueError(f"empty method in pattern {pattern!r}")
        if sep:
            try:
                r = float(ratio)
            except ValueError:
                raise ValueError(f"bad ratio {ratio!r} in pattern {pattern!r}") from None
            parts.append((method, r))
        else:
            parts.append((method, None))
    if len(parts) > 2:
        raise ValueError(f"pattern {pattern!r} has more than two phases (PREFILL+DECODE)")
    return parts


def _join(parts: Iterable[tuple[str, float | None]]) -> str:
    return "+".join(m if r is None or m == "dense" else f"{m}:{fmt_ratio(r)}" for m, r in parts)


def is_dense(pattern: str) -> bool:
    return all(m == "dense" for m, _ in parse_parts(pattern))


def expand_patterns(patterns: Sequence[str], ratios: Sequence[float]) -> list[str]:
    """The concrete pattern strings to run, in order, without duplicates (see the module docstring)."""
    out: list[str] = []

    def add(p: str) -> None:
        if p not in out:
            out.append(p)

    for pattern in patterns:
        parts = parse_parts(pattern)
        if parts[0][0].lower() == "auto":
            add(pattern)
        elif all(m == "dense" for m, _ in parts):
            add("dense")
        elif any(r is not None for m, r in parts if m != "dense") or not ratios:
            add(_join(parts))
        else:
            for r in ratios:
                add(_join((m, None if m == "dense" else r) for m, _ in parts))
    return out


def method_label(pattern: str) -> str:
    """The pattern without its ratios (`vertical_slash:8+quest:8` -> `vertical_slash+quest`); a dense phase
    next to a sparse one is dropped (`dense+quest:4` -> `quest`)."""
    parts = [m for m, _ in parse_parts(pattern)]
    sparse = [m for m in parts if m != "dense"]
    return "+".join(sparse) if sparse else "dense"


def nominal_ratio(pattern: str, default: float | None = None) -> float | None:
    """The compression the pattern asks for: the largest ratio of its sparse phases (1 for dense; `default`
    when a sparse phase names none)."""
    ratios = [r for m, r in parse_parts(pattern) if m != "dense"]
    if not ratios and is_dense(pattern):
        return 1.0
    known = [r for r in ratios if r is not None]
    if len(known) < len(ratios):
        return default if not known else max(known + ([default] if default else []))
    return max(known)
