"""`sparse-eval fit --write-policy`: a serving policy for `sparse_pattern: "auto"` from an evaluation run.

One length band per evaluated length L: prompts below 0.95 L1 (the shortest length's window) get dense
(nothing was measured there); the bands above meet at the geometric means of neighbouring lengths, and the
last one is open-ended (longer inputs tolerate more sparsity, so extending the longest measurement upward errs
on the safe side).

In each band every sparse pattern the run measured at L is a candidate:
- predicted drop against dense = -b log(ratio), b fitted by the law of `scaling_fit` on that method's records
  and the dense ones at L (dense as compression 1), the task intercepts absorbing the tasks' levels;
- margin = the larger of the law's held-out error (MAE predicting its largest compression from the others;
  its in-sample RMSE when fewer than three compressions were run) and the sampling error of the measured
  difference, 1.96 * sqrt(se_dense^2 + se_pattern^2) (each se at least the Agresti-Coull one of a success
  rate, so ten samples that all scored 1 still carry their uncertainty): a run too small to tell patterns
  apart yields dense;
- cost = the mean of 1/achieved prefill and 1/achieved decode compression (the share of each phase's
  attention work kept); candidates are written cheapest first.

The server (`server/sparse_policy.py` reads the format) then takes, per band, the first candidate whose
predicted drop + margin is within the budget: the policy's `max_drop`, or the request's `auto:<max_drop>`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .scaling_fit import fit_law, points_from_records
from .tasks import aggregate

DEFAULT_MAX_DROP = 0.05
LOW_FRACTION = 0.95  # prompts of length L are built within [0.95 L, L] tokens (clients.tasks.base)


def _method(r: Mapping[str, Any]) -> str:
    from .patterns import method_label

    return str(r.get("method") or method_label(str(r.get("pattern", "dense"))))


def _cost(recs: Sequence[Mapping[str, Any]]) -> float:
    """Mean share of attention work kept, over both phases (1 = dense)."""
    kept = []
    for r in recs:
        for phase in ("prefill", "decode"):
            a = r.get(f"achieved_{phase}_ratio") or r.get(f"target_{phase}_ratio") or 1.0
            kept.append(1.0 / max(float(a), 1.0))
    return sum(kept) / len(kept) if kept else 1.0


def _stderr(recs: Sequence[Mapping[str, Any]]) -> float:
    """The sample's standard error, at least the Agresti-Coull one of a success rate: a few samples that all
    scored the same are not a certainty."""
    agg = aggregate(float(r["score"]) for r in recs)
    p = (agg.mean * agg.n + 2) / (agg.n + 4)
    return max(agg.stderr, math.sqrt(p * (1 - p) / (agg.n + 4)))


def band_candidates(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Candidates (cheapest first) from the records of ONE length."""
    dense = [r for r in records if _method(r) == "dense"]
    if not dense:
        raise ValueError("no dense records at this length: the predicted drop is measured against dense")
    by_pattern: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        if _method(r) != "dense":
            by_pattern[str(r["pattern"])].append(r)
    fits = {}
    out = []
    for pattern, recs in by_pattern.items():
        method = _method(recs[0])
        if method not in fits:
            pts, used = points_from_records(records, method=method, include_dense=True)
            fits[method] = fit_law(pts, method=method, n_records=used)
        fit = fits[method]
        ratio = float(recs[0].get("ratio") or 1.0)
        held = [h.mae for h in fit.heldout if h.axis == "compression" and h.mae is not None]
        law_error = held[0] if held else fit.rmse
        sampling = 1.96 * math.sqrt(_stderr(dense) ** 2 + _stderr(recs) ** 2)
        out.append({"pattern": pattern, "predicted_drop": round(-fit.coefficients["b"] * math.log(ratio), 4),
                    "margin": round(max(law_error, sampling), 4), "cost": round(_cost(recs), 4),
                    "n": len(recs), "n_dense": len(dense)})
    out.sort(key=lambda c: (c["cost"], c["pattern"]))
    return out


def build_policy(records: Sequence[Mapping[str, Any]], *, max_drop: float = DEFAULT_MAX_DROP,
                 source: str = "") -> dict[str, Any]:
    """The policy document (version 1) for `records` (one run, one model)."""
    if not 0 <= max_drop <= 1:
        raise ValueError(f"--max-drop must be between 0 and 1 (0.05 = 5 points), got {max_drop}")
    models = {str(r.get("model") or "") for r in records}
    if len(models) > 1:
        raise ValueError(f"records of several models ({', '.join(sorted(models))}): write a policy per model")
    lengths = sorted({int(r["length"]) for r in records})
    if not lengths:
        raise ValueError("no records")
    starts = [math.ceil(LOW_FRACTION * lengths[0])]
    starts += [round(math.sqrt(a * b)) for a, b in zip(lengths, lengths[1:], strict=False)]
    bands: list[dict[str, Any]] = [{"min_tokens": 0, "max_tokens": starts[0], "candidates": [],
                                    "note": "shorter than anything evaluated: dense"}]
    for i, length in enumerate(lengths):
        at = [r for r in records if int(r["length"]) == length]
        bands.append({"min_tokens": starts[i], "max_tokens": starts[i + 1] if i + 1 < len(lengths) else None,
                      "evaluated_length": length, "candidates": band_candidates(at)})
    return {"version": 1, "max_drop": max_drop, "source": source or "sparse-eval fit --write-policy",
            "model": next(iter(models)), "bands": bands}


def format_policy(doc: Mapping[str, Any]) -> str:
    """Per band: what plain `auto` chooses at the policy's budget, and each candidate's numbers."""
    budget = doc["max_drop"]
    lines = [f"policy for {doc.get('model') or 'the model'}: max_drop {budget:g}"]
    for b in doc["bands"]:
        hi = b["max_tokens"] if b["max_tokens"] is not None else "inf"
        chosen = next((c["pattern"] for c in b["candidates"]
                       if c["predicted_drop"] + c["margin"] <= budget), "dense")
        lines.append(f"  [{b['min_tokens']}, {hi}) tokens -> {chosen}")
        for c in b["candidates"]:
            lines.append(f"      {c['pattern']:<28} drop {c['predicted_drop']:+.3f} +- {c['margin']:.3f}  "
                         f"cost {c['cost']:.3f}  n {c['n']}")
    return "\n".join(lines)
