"""``sparse_pattern: "auto"``: the server picks the pattern of a request from its prompt length, by a policy.

A policy is a JSON file (written by ``sparse-eval fit --write-policy``, loaded by ``--sparse-policy``)::

    {"version": 1, "max_drop": 0.05, "source": "...",
     "bands": [{"min_tokens": 0, "max_tokens": 973, "candidates": []},
               {"min_tokens": 973, "max_tokens": null,
                "candidates": [{"pattern": "block_sparse:8", "predicted_drop": 0.01, "margin": 0.03}, ...]}]}

Bands are half-open token ranges ``[min_tokens, max_tokens)`` (``null``: no upper end); they must not overlap.
Candidates are listed cheapest first. A request asking ``auto`` gets, in the band of its prompt length, the
first candidate whose ``predicted_drop + margin`` is at most the budget (the policy's ``max_drop``, or the
request's own with ``auto:<max_drop>``); with none, or outside every band, it gets dense. A candidate with
``predicted_drop: null`` was never measured: it is taken only by a plain ``auto`` under a policy without a
``max_drop`` (the built-in default), never to meet an explicit budget.

Without ``--sparse-policy`` the built-in :data:`DEFAULT_POLICY` applies: dense below 4K tokens, then
Vertical-Slash + Quest at ratios that grow with the length, prefill always half as sparse as decode (the
paper's findings: longer inputs tolerate more sparsity, decode more than prefill).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attention_backends import InvalidSparsePattern, SparseSpec, parse_pattern

AUTO = "auto"
_AUTO_RE = re.compile(r"^\s*auto\s*(?::\s*(?P<budget>[^\s]+)\s*)?$", re.IGNORECASE)
DENSE = "dense"


class PolicyError(ValueError):
    """An invalid policy; the message names the file and the offending entry."""


@dataclass(frozen=True)
class AutoRequest:
    """A request asked for ``auto`` (``max_drop`` None: the policy's budget)."""

    max_drop: float | None
    param: str  # the field it came from, for error messages


def parse_auto(value: Any, param: str = "sparse_pattern") -> AutoRequest | None:
    """``"auto"`` / ``"auto:0.05"`` -> AutoRequest; anything else -> None (an ordinary pattern). A malformed
    budget raises :class:`InvalidSparsePattern` naming ``param``."""
    if not isinstance(value, str):
        return None
    m = _AUTO_RE.match(value)
    if not m:
        return None
    budget = m.group("budget")
    if budget is None:
        return AutoRequest(None, param)
    try:
        drop = float(budget)
    except ValueError:
        drop = float("nan")
    if not math.isfinite(drop) or not 0 <= drop <= 1:
        raise InvalidSparsePattern(param, f"auto:<max_drop> takes an accuracy drop between 0 and 1 (0.05 = 5 "
                                   f"points), got {budget!r}")
    return AutoRequest(drop, param)


@dataclass(frozen=True)
class Candidate:
    pattern: str
    spec: SparseSpec
    predicted_drop: float | None
    margin: float

    def fits(self, budget: float | None) -> bool:
        if self.predicted_drop is None:
            return budget is None
        return budget is not None and self.predicted_drop + self.margin <= budget


@dataclass(frozen=True)
class Band:
    min_tokens: int
    max_tokens: int | None  # exclusive; None = unbounded
    candidates: tuple[Candidate, ...]

    def holds(self, n: int) -> bool:
        return n >= self.min_tokens and (self.max_tokens is None or n < self.max_tokens)

    def label(self) -> str:
        return f"[{self.min_tokens}, {self.max_tokens if self.max_tokens is not None else 'inf'})"


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` chose for one prompt, and why (the ``auto`` object of the response's sparse report)."""

    spec: SparseSpec
    requested: str  # "auto" or "auto:<max_drop>"
    max_drop: float | None
    prompt_tokens: int
    band: Band | None
    candidate: Candidate | None  # None: dense, no candidate fitted the budget (or no band)
    source: str

    def to_dict(self) -> dict[str, Any]:
        if self.band is None:
            reason = "no band of the policy holds this prompt length: dense"
        elif self.candidate is None:
            reason = "no pattern of this band is predicted within the budget: dense"
        elif self.candidate.predicted_drop is None:
            reason = "the policy's pattern for this band (no budget given, drop not measured)"
        else:
            reason = "the cheapest pattern of this band predicted within the budget"
        return {
            "requested": self.requested, "chosen": self.spec.to_string(), "max_drop": self.max_drop,
            "prompt_tokens": self.prompt_tokens,
            "band": None if self.band is None else {"min_tokens": self.band.min_tokens,
                                                    "max_tokens": self.band.max_tokens},
            "predicted_drop": None if self.candidate is None else self.candidate.predicted_drop,
            "margin": None if self.candidate is None else self.candidate.margin,
            "reason": reason, "policy": self.source,
        }


@dataclass(frozen=True)
class SparsePolicy:
    bands: tuple[Band, ...]
    max_drop: float | None
    source: str

    def choose(self, prompt_tokens: int, auto: AutoRequest | None = None) -> AutoChoice:
        budget = auto.max_drop if auto is not None and auto.max_drop is not None else self.max_drop
        requested = AUTO if auto is None or auto.max_drop is None else f"{AUTO}:{auto.max_drop:g}"
        band = next((b for b in self.bands if b.holds(prompt_tokens)), None)
        cand = None
        if band is not None:
            cand = next((c for c in band.candidates if c.fits(budget)), None)
        spec = cand.spec if cand is not None else parse_pattern(DENSE)
        return AutoChoice(spec, requested, budget, prompt_tokens, band, cand, self.source)

    def describe(self) -> dict[str, Any]:
        """For /v1/sparse/patterns: the bands and their candidates."""
        return {"source": self.source, "max_drop": self.max_drop, "bands": [
            {"min_tokens": b.min_tokens, "max_tokens": b.max_tokens,
             "candidates": [{"pattern": c.pattern, "predicted_drop": c.predicted_drop, "margin": c.margin}
                            for c in b.candidates]} for b in self.bands]}


def policy_from_dict(data: Any, source: str) -> SparsePolicy:
    """Validate a policy document; :class:`PolicyError` names what is wrong and where."""
    def fail(msg: str) -> PolicyError:
        return PolicyError(f"sparse policy {source}: {msg}")

    if not isinstance(data, dict):
        raise fail("expected a JSON object with 'bands'")
    if data.get("version", 1) != 1:
        raise fail(f"unsupported version {data.get('version')!r} (this server reads version 1)")
    max_drop = data.get("max_drop")
    if max_drop is not None and (isinstance(max_drop, bool) or not isinstance(max_drop, (int, float))
                                 or not 0 <= max_drop <= 1):
        raise fail(f"max_drop must be a number between 0 and 1 or null, got {max_drop!r}")
    raw_bands = data.get("bands")
    if not isinstance(raw_bands, list) or not raw_bands:
        raise fail("'bands' must be a non-empty list")
    bands = []
    for i, b in enumerate(raw_bands):
        where = f"bands[{i}]"
        if not isinstance(b, dict):
            raise fail(f"{where} must be an object")
        lo, hi = b.get("min_tokens", 0), b.get("max_tokens")
        if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
            raise fail(f"{where}.min_tokens must be an integer >= 0, got {lo!r}")
        if hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi <= lo):
            raise fail(f"{where}.max_tokens must be an integer above min_tokens ({lo}) or null, got {hi!r}")
        cands = []
        for j, c in enumerate(b.get("candidates") or []):
            cw = f"{where}.candidates[{j}]"
            if not isinstance(c, dict) or not isinstance(c.get("pattern"), str):
                raise fail(f"{cw} must be an object with a 'pattern' string")
            try:
                spec = parse_pattern(c["pattern"], param=f"{cw}.pattern")
            except InvalidSparsePattern as e:
                raise fail(f"{cw}.pattern {c['pattern']!r}: {e.message}") from None
            drop, margin = c.get("predicted_drop"), c.get("margin", 0.0)
            for name, v in (("predicted_drop", drop), ("margin", margin)):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise fail(f"{cw}.{name} must be a number, got {v!r}")
            if margin is None or margin < 0:
                raise fail(f"{cw}.margin must be >= 0, got {margin!r}")
            cands.append(Candidate(c["pattern"], spec, None if drop is None else float(drop), float(margin)))
        bands.append(Band(lo, hi, tuple(cands)))
    ordered = sorted(bands, key=lambda b: b.min_tokens)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.max_tokens is None or a.max_tokens > b.min_tokens:
            raise fail(f"bands {a.label()} and {b.label()} overlap")
    return SparsePolicy(tuple(ordered), None if max_drop is None else float(max_drop), source)


def load_policy(path: str | Path) -> SparsePolicy:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolicyError(f"sparse policy {p}: cannot read it: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise PolicyError(f"sparse policy {p}: not JSON: {e}") from None
    return policy_from_dict(data, str(p))


# The built-in policy: conservative, and unmeasured (predicted_drop null), so an explicit auto:<max_drop>
# under it always gets dense. Thresholds follow the paper's finding that sparsity costs least on long inputs.
DEFAULT_POLICY_DOC: dict[str, Any] = {
    "version": 1,
    "max_drop": None,
    "bands": [
        {"min_tokens": 0, "max_tokens": 4096, "candidates": []},
        {"min_tokens": 4096, "max_tokens": 16384, "candidates": [{"pattern": "vertical_slash:2+quest:4"}]},
        {"min_tokens": 16384, "max_tokens": 65536, "candidates": [{"pattern": "vertical_slash:4+quest:8"}]},
        {"min_tokens": 65536, "max_tokens": None, "candidates": [{"pattern": "vertical_slash:8+quest:16"}]},
    ],
}
DEFAULT_POLICY = policy_from_dict(DEFAULT_POLICY_DOC, "built-in default")
