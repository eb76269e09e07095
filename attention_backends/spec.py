"""SparseSpec: what a request asks for, parsed and validated.

A pattern names at most one prefill method and one decode method, each with a target compression ratio
``r >= 1`` (``r = 1`` means dense) and optional parameter overrides. Two input forms are accepted
(``docs/api.md``):

* string: ``METHOD[:RATIO]`` or ``PREFILL[:RATIO]+DECODE[:RATIO]``, e.g. ``"vertical_slash:8+quest:20"``;
  a lone method applies to its own phase and the other phase stays dense;
* object: ``{"prefill": {"method": ..., "compression_ratio": ..., "params": {...}, "fallback": ...},
  "decode": {...}}`` (``fallback``, prefill only: ``"auto"``, the default, or ``"never"``; see
  :mod:`.prefill_cost`).

A ``compression_ratio`` given beside the pattern applies to any phase that names no ratio. Every error
raises :class:`InvalidSparsePattern` whose ``param`` names the offending field, so the HTTP layer can
turn it into a 400 without guessing.

The parameter table (:data:`METHODS`) is the single source of truth for names, defaults and ranges: the
references read their parameters from it and ``GET /v1/sparse/patterns`` publishes it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Phase = Literal["prefill", "decode"]


class InvalidSparsePattern(ValueError):
    """A pattern, ratio or parameter that cannot be served. ``param`` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ParamSpec:
    """One tunable parameter of a method. ``default=None`` means "derived from the compression ratio"."""

    name: str
    kind: type  # int, float or bool
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    doc: str = ""

    def validate(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidSparsePattern(where, f"{self.name} must be a boolean, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidSparsePattern(where, f"{self.name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidSparsePattern(where, f"{self.name} must be finite, got {value!r}")
        if self.kind is int:
            if float(value) != int(value):
                raise InvalidSparsePattern(where, f"{self.name} must be an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if self.choices is not None and value not in self.choices:
            raise InvalidSparsePattern(where, f"{self.name} must be one of {list(self.choices)}, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise InvalidSparsePattern(where, f"{self.name} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidSparsePattern(where, f"{self.name} must be <= {self.maximum}, got {value!r}")
        return value

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind.__name__, "default": self.default, "description": self.doc}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


@dataclass(frozen=True)
class MethodInfo:
    """One method of the table, with what an engine must know to run it (its capabilities), so that engines
    ask ``info.evicts`` rather than comparing method names."""

    name: str
    phase: Phase
    summary: str
    params: tuple[ParamSpec, ...] = ()
    # decode, ``"<module>.<function>"`` in ``attention_backends/decode/`` (resolved by :func:`.api.method_step`):
    # ``keep``, once at the end of prefill, the prompt positions each KV head keeps (the engine evicts the rest);
    # ``plan``, every step, the pages each KV head reads. Neither: every token is kept and read.
    keep: str | None = None
    plan: str | None = None
    # prefill: the parameters that, all given, set the budget instead of the ratio (then the computed cells are
    # known only once the index is built, and the dense-fallback rule of :mod:`.prefill_cost` cannot predict)
    budget_params: tuple[str, ...] = ()

    @property
    def evicts(self) -> bool:
        """Decode: keeps a subset of the prompt's KV after prefill and drops the rest (an engine frees those
        pages)."""
        return self.keep is not None

    @property
    def selects_pages(self) -> bool:
        """Decode: keeps every token but reads a query-chosen subset of pages each step, from per-page key bounds
        (an engine keeps those bounds current; the ``page_size`` parameter is the page)."""
        return self.plan is not None

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": self.phase,
            "description": self.summary,
            "params": {p.name: p.describe() for p in self.params},
        }


_INT_MAX = 1 << 30

# Parameters two methods share: one definition each.
_WINDOW = ParamSpec("window", int, 256, 1, _INT_MAX, doc="last-query approximation window W")
_PREFILL_FORCED = (
    ParamSpec("sink_tokens", int, 4, 0, _INT_MAX, doc="first keys always kept"),
    ParamSpec("local_window", int, 64, 1, _INT_MAX, doc="offsets 0..local_window-1 always kept"),
)
_OBSERVATION = (
    ParamSpec("window", int, 256, 1, _INT_MAX, doc="observation window (last prompt queries)"),
    ParamSpec("kernel_size", int, 21, 1, 255, doc="1-D pool kernel (odd; SnapKV averages, Ada-SnapKV takes the max)"),
    ParamSpec("sink_tokens", int, 4, 0, _INT_MAX, doc="first tokens always kept"),
    ParamSpec("local_window", int, 128, 0, _INT_MAX, doc="last prompt tokens always kept"),
)


def _snapkv_family(name: str, summary: str, *extra: ParamSpec, capacity_doc: str) -> MethodInfo:
    """An eviction method scored by the observation window: its parameters, ``extra``, then its capacity."""
    capacity = ParamSpec("capacity", int, None, 1, _INT_MAX, doc=f"{capacity_doc} (default ceil(n/r))")
    return MethodInfo(name, "decode", summary, (*_OBSERVATION, *extra, capacity), keep=f"{name}.keep")


_METHOD_LIST: tuple[MethodInfo, ...] = (
    MethodInfo("dense", "prefill", "Full causal attention (no sparsity)."),
    MethodInfo(
        "vertical_slash",
        "prefill",
        "MInference Vertical-Slash: top vertical columns and slash diagonals per head, estimated from "
        "the last queries; k chosen so that the covered causal fraction is 1/r.",
        (
            _WINDOW,
            ParamSpec("num_vertical", int, None, 1, _INT_MAX, doc="verticals per head (default: from r)"),
            ParamSpec("num_slash", int, None, 1, _INT_MAX, doc="slash lines per head (default: from r)"),
            *_PREFILL_FORCED,
        ),
        budget_params=("num_vertical", "num_slash"),
    ),
    MethodInfo(
        "flexprefill",
        "prefill",
        "FlexPrefill: vertical/slash budgets per head by attention-mass coverage alpha "
        "(query-aware mode off, tau = 0).",
        (
            _WINDOW,
            ParamSpec("alpha", float, None, 0.0, 1.0, doc="coverage of attention mass (default 0.9, "
                      "or searched for the target r when a ratio is given)"),
            ParamSpec("min_budget", int, None, 0, _INT_MAX, doc="minimum verticals/slashes per head "
                      "(default 512, capped by the target budget when a ratio is given)"),
            *_PREFILL_FORCED,
        ),
        budget_params=("alpha",),
    ),
    MethodInfo(
        "block_sparse",
        "prefill",
        "MInference block-sparse: each query block keeps its top-k key blocks by mean-pooled scores.",
        (
            ParamSpec("block_size", int, 16, choices=(16, 32, 64, 128), doc="block edge B in tokens"),
            ParamSpec("top_k", int, None, 1, _INT_MAX, doc="key blocks per query block (default: from r)"),
        ),
        budget_params=("top_k",),
    ),
    MethodInfo("dense", "decode", "Reads the whole KV cache."),
    _snapkv_family("snapkv", "SnapKV: after prefill, keep the top ceil(n/r) prompt tokens per KV head by "
                   "observation-window attention; evict the rest.", capacity_doc="tokens kept per KV head"),
    _snapkv_family("ada_snapkv", "Ada-SnapKV: SnapKV scores (max-aggregated) with the layer budget allocated "
                   "adaptively across KV heads above a per-head floor.",
                   ParamSpec("floor_fraction", float, 0.2, 0.0, 1.0, doc="per-head floor as a fraction of C"),
                   capacity_doc="mean tokens per KV head"),
    MethodInfo(
        "quest",
        "decode",
        "Quest: full cache in pages; each step reads the top pages by a query-aware upper bound from "
        "per-page key min/max.",
        (
            ParamSpec("page_size", int, 16, choices=(8, 16, 32, 64), doc="page size in tokens"),
            ParamSpec("budget", int, None, 1, _INT_MAX, doc="tokens read per step (default ceil(n/r), "
                      "rounded to a page)"),
        ),
        plan="quest.plan",
    ),
)

PREFILL_METHODS: dict[str, MethodInfo] = {m.name: m for m in _METHOD_LIST if m.phase == "prefill"}
DECODE_METHODS: dict[str, MethodInfo] = {m.name: m for m in _METHOD_LIST if m.phase == "decode"}
METHODS: dict[Phase, dict[str, MethodInfo]] = {"prefill": PREFILL_METHODS, "decode": DECODE_METHODS}


@dataclass(frozen=True)
class PhaseSpec:
    """One phase's choice: a method, its target compression ratio and its resolved parameters.

    ``params`` holds every parameter of the method: user overrides, else the table default (``None`` for
    those derived from the ratio at run time, when the sequence length is known). :func:`parse_pattern`
    resolves them, once; the methods read ``params`` as they are, so build a PhaseSpec with it.
    """

    method: str = "dense"
    compression_ratio: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    # prefill only: "auto" runs dense where the method's predicted cost exceeds dense attention's
    # (:mod:`.prefill_cost`); "never" runs the method regardless (for experiments)
    fallback: str = "auto"

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "compression_ratio": self.compression_ratio, "params": dict(self.params),
                "fallback": self.fallback}

    def __hash__(self) -> int:  # params is a dict; hash its items so specs can key batches
        return hash((self.method, self.compression_ratio, tuple(sorted(self.params.items())), self.fallback))


@dataclass(frozen=True)
class SparseSpec:
    """A request's sparse attention choice for both phases."""

    prefill: PhaseSpec = field(default_factory=PhaseSpec)
    decode: PhaseSpec = field(default_factory=PhaseSpec)

    @property
    def is_dense(self) -> bool:
        return self.prefill.is_dense and self.decode.is_dense

    def to_string(self) -> str:
        """The canonical string form, e.g. ``vertical_slash:8+quest:20`` (parameters are not included)."""

        def one(p: PhaseSpec) -> str:
            return p.method if p.is_dense else f"{p.method}:{p.compression_ratio:g}"

        if self.decode.is_dense:
            return one(self.prefill)
        if self.prefill.is_dense:
            return one(self.decode)
        return f"{one(self.prefill)}+{one(self.decode)}"

    def to_dict(self) -> dict[str, Any]:
        return {"prefill": self.prefill.to_dict(), "decode": self.decode.to_dict()}


DENSE = SparseSpec()


_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


def validate_ratio(value: Any, param: str) -> float:
    """A compression ratio: a finite number >= 1 (numeric strings are accepted, as headers are strings)."""
    if isinstance(value, bool):
        raise InvalidSparsePattern(param, f"compression ratio must be a number >= 1, got {value!r}")
    if isinstance(value, str):
        if not _DECIMAL.match(value.strip()):  # float() also takes "1_0", "nan" and non-ASCII digits
            raise InvalidSparsePattern(param, f"compression ratio must be a number >= 1, got {value!r}")
        value = float(value.strip())
    if not isinstance(value, (int, float)):
        raise InvalidSparsePattern(param, f"compression ratio must be a number >= 1, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 1.0:
        raise InvalidSparsePattern(param, f"compression ratio must be a finite number >= 1, got {value!r}")
    return value


def _lookup(name: Any, param: str, phase: Phase | None) -> MethodInfo:
    if not isinstance(name, str) or not name:
        raise InvalidSparsePattern(param, f"method must be a non-empty string, got {name!r}")
    name = name.strip().lower()
    if phase is not None:
        if name in METHODS[phase]:
            return METHODS[phase][name]
        other: Phase = "decode" if phase == "prefill" else "prefill"
        if name in METHODS[other]:
            raise InvalidSparsePattern(param, f"{name!r} is a {other} method, not a {phase} method")
    else:
        for ph in ("prefill", "decode"):
            if name in METHODS[ph]:
                return METHODS[ph][name]
    known = sorted(set(PREFILL_METHODS) | set(DECODE_METHODS))
    raise InvalidSparsePattern(param, f"unknown sparse method {name!r}; known methods: {', '.join(known)}")


def _resolve_params(info: MethodInfo, overrides: Any, param: str) -> dict[str, Any]:
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise InvalidSparsePattern(param, f"params must be an object, got {overrides!r}")
    values = info.defaults()
    for key, value in overrides.items():
        try:
            spec = info.param(key)
        except KeyError:
            valid = ", ".join(p.name for p in info.params) or "none"
            raise InvalidSparsePattern(
                f"{param}.{key}", f"unknown parameter {key!r} for {info.name}; valid: {valid}"
            ) from None
        values[key] = spec.validate(value, f"{param}.{key}")
    return values


FALLBACK_MODES = ("auto", "never")


def _phase(info: MethodInfo, ratio: float | None, params: Any, param: str, fallback: Any = None) -> PhaseSpec:
    resolved = _resolve_params(info, params, f"{param}.params")
    if fallback is None:
        fallback = "auto"
    elif fallback not in FALLBACK_MODES:
        raise InvalidSparsePattern(f"{param}.fallback", f"fallback must be one of {list(FALLBACK_MODES)}, "
                                   f"got {fallback!r}")
    if info.name == "dense":
        return PhaseSpec("dense", 1.0, resolved, fallback)
    if info.name == "flexprefill" and ratio is None and resolved.get("alpha") is None:
        # FlexPrefill is defined by its coverage alpha, not a ratio: named alone it runs its own default
        # (alpha 0.9), while an explicit ratio (1 included) sets the target as for every other method.
        resolved["alpha"] = 0.9
    return PhaseSpec(info.name, 1.0 if ratio is None else ratio, resolved, fallback)


def _parse_string(text: str, default_ratio: float | None, param: str) -> SparseSpec:
    parts = [p.strip() for p in text.split("+")]
    if len(parts) > 2 or any(not p for p in parts):
        raise InvalidSparsePattern(param, f"malformed pattern {text!r}; expected METHOD[:RATIO][+METHOD[:RATIO]]")
    phases: dict[str, PhaseSpec] = {}
    for i, part in enumerate(parts):
        name, sep, ratio_text = part.partition(":")
        ratio = validate_ratio(ratio_text, param) if sep else default_ratio
        # With two parts the first is the prefill method and the second the decode method.
        wanted: Phase | None = None if len(parts) == 1 else ("prefill" if i == 0 else "decode")
        if len(parts) == 1 and name.strip().lower() == "dense":
            return DENSE
        info = _lookup(name, param, wanted)
        if info.phase in phases:
            raise InvalidSparsePattern(param, f"pattern {text!r} names two {info.phase} methods")
        phases[info.phase] = _phase(info, ratio, None, param)
    return SparseSpec(prefill=phases.get("prefill", PhaseSpec()), decode=phases.get("decode", PhaseSpec()))


def _parse_object(obj: dict[str, Any], default_ratio: float | None, param: str) -> SparseSpec:
    unknown = set(obj) - {"prefill", "decode"}
    if unknown:
        key = sorted(unknown)[0]
        raise InvalidSparsePattern(f"{param}.{key}", f"unknown field {key!r}; expected 'prefill' and/or 'decode'")
    phases: dict[str, PhaseSpec] = {}
    for phase in ("prefill", "decode"):
        entry = obj.get(phase)
        where = f"{param}.{phase}"
        if entry is None:
            phases[phase] = PhaseSpec()
            continue
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict):
            raise InvalidSparsePattern(where, f"{phase} must be an object or a method name, got {entry!r}")
        extra = set(entry) - {"method", "compression_ratio", "params"} - ({"fallback"} if phase == "prefill" else set())
        if extra:
            key = sorted(extra)[0]
            raise InvalidSparsePattern(f"{where}.{key}", f"unknown field {key!r} in {phase}")
        info = _lookup(entry.get("method"), f"{where}.method", phase)  # type: ignore[arg-type]
        ratio = entry.get("compression_ratio")
        ratio = default_ratio if ratio is None else validate_ratio(ratio, f"{where}.compression_ratio")
        phases[phase] = _phase(info, ratio, entry.get("params"), where, entry.get("fallback"))
    return SparseSpec(prefill=phases["prefill"], decode=phases["decode"])


def parse_pattern(
    pattern: str | dict[str, Any] | SparseSpec | None,
    compression_ratio: float | str | None = None,
    *,
    param: str = "sparse_pattern",
) -> SparseSpec:
    """Parse a sparse pattern (string grammar or object form) into a validated :class:`SparseSpec`.

    ``compression_ratio`` applies to every phase whose method names no ratio. ``param`` is the name of the
    field the pattern came from (``sparse_pattern`` for a body, ``X-Sparse-Pattern`` for a header), used in
    error messages. ``None`` means dense.
    """
    default_ratio = None if compression_ratio is None else validate_ratio(compression_ratio, "compression_ratio")
    if pattern is None:
        return DENSE
    if isinstance(pattern, SparseSpec):
        return pattern
    if isinstance(pattern, str):
        if not pattern.strip():
            raise InvalidSparsePattern(param, "pattern must not be empty")
        return _parse_string(pattern.strip(), default_ratio, param)
    if isinstance(pattern, dict):
        return _parse_object(pattern, default_ratio, param)
    raise InvalidSparsePattern(param, f"pattern must be a string or an object, got {type(pattern).__name__}")


def describe_methods() -> dict[str, Any]:
    """Every method with its phase, parameters, defaults and valid ranges (for ``/v1/sparse/patterns``)."""
    return {
        "prefill": [m.describe() for m in PREFILL_METHODS.values()],
        "decode": [m.describe() for m in DECODE_METHODS.values()],
        "grammar": "METHOD[:RATIO] | PREFILL[:RATIO]+DECODE[:RATIO]",
        "prefill_fallback": {"choices": list(FALLBACK_MODES), "default": "auto",
                             "description": "object form, prefill phase: 'auto' runs dense attention where the "
                             "method is predicted to cost more than dense at the prompt's length (reported as "
                             "sparse.prefill.fallback 'dense'); 'never' always runs the method"},
    }
