"""The log-linear law of "The Sparse Frontier", fitted to evaluation records by least squares:

    score ~ a_task + b * log(compression) + c * log(length) [+ e * log(model_size)]

Points are the mean scores of (model, task, length, method, compression) groups of sparse records (dense
records, compression 1, are left out unless asked for). `compression` is the target ratio by default, or the
achieved one (`compression="achieved"`: the achieved ratio of the phase(s) at the target). The model-size term
enters when records carry at least two distinct model sizes (`model_size` in the record, or a name -> size
mapping). Natural logarithms.

Quality: R^2 on the points, and extrapolation error per axis: refit without the points at the largest value
of that axis (compression, length, model size) and report the mean absolute error predicting them. This needs
at least three distinct values on the axis (two left to fit a slope).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

AXES = ("compression", "length", "model_size")
COEF_NAMES = {"compression": "b", "length": "c", "model_size": "e"}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)


def parse_param_count(text: str | float | int) -> float:
    """`135M`, `1.7B`, `7e9`, `360m` -> parameters."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a parameter count: {text!r} (examples: 135M, 1.7B, 7e9)")
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1)) * mult


def parse_model_sizes(items: Sequence[str] | str | None) -> dict[str, float]:
    """`["SmolLM2-135M=135M", "Qwen=7B"]` or `"a=1B,b=7B"` -> {name: params}."""
    if not items:
        return {}
    if isinstance(items, str):
        items = items.split(",")
    out = {}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            name, sep, size = part.rpartition("=")
            if not sep or not name:
                raise ValueError(f"--model-sizes wants NAME=PARAMS, got {part!r}")
            out[name.strip()] = parse_param_count(size)
    return out


@dataclass
class Point:
    task: str
    model: str
    method: str
    compression: float
    length: float
    model_size: float | None
    score: float
    n: int


@dataclass
class HeldOut:
    axis: str
    value: float | None
    n_points: int
    mae: float | None
    note: str = ""


@dataclass
class FitResult:
    method: str
    n_points: int
    n_records: int
    task_intercepts: dict[str, float]
    coefficients: dict[str, float]  # b (log compression), c (log length), e (log model size) when fitted
    r2: float
    rmse: float
    axes: list[str]
    heldout: list[HeldOut] = field(default_factory=list)

    def predict(self, task: str, compression: float, length: float, model_size: float | None = None) -> float:
        y = self.task_intercepts[task] + self.coefficients["b"] * math.log(compression) \
            + self.coefficients["c"] * math.log(length)
        if "e" in self.coefficients and model_size:
            y += self.coefficients["e"] * math.log(model_size)
        return y

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "n_points": self.n_points, "n_records": self.n_records,
            "task_intercepts": self.task_intercepts, "coefficients": self.coefficients, "r2": self.r2,
            "rmse": self.rmse, "axes": self.axes,
            "heldout": [h.__dict__ for h in self.heldout],
        }


def _compression(r: Mapping[str, Any], which: str) -> float | None:
    from .patterns import nominal_ratio

    ratio = r.get("ratio")
    if ratio is None:
        ratio = nominal_ratio(str(r.get("pattern", "dense")), None)
    if ratio is None:
        return None
    if which == "target":
        return float(ratio)
    vals = []
    for phase in ("prefill", "decode"):
        m, t, a = r.get(f"{phase}_method"), r.get(f"target_{phase}_ratio"), r.get(f"achieved_{phase}_ratio")
        if m and m != "dense" and t is not None and a is not None and abs(float(t) - float(ratio)) < 1e-9:
            vals.append(float(a))
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float(ratio)


def points_from_records(records: Sequence[Mapping[str, Any]], *, method: str | None = None,
                        include_dense: bool = False, compression: str = "target",
                        model_sizes: Mapping[str, float] | None = None) -> tuple[list[Point], int]:
    """Group means (model, task, length, method, compression) -> Points; also the number of records used."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    sizes: dict[tuple, float | None] = {}
    used = 0
    for r in records:
        m = str(r.get("method") or "")
        if not m:
            from .patterns import method_label

            m = method_label(str(r.get("pattern", "dense")))
        if m == "dense" and not include_dense:
            continue
        if method is not None and m != method and m != "dense":
            continue
        x = _compression(r, compression)
        if x is None or x <= 0:
            continue
        model = str(r.get("model") or "")
        size = (model_sizes or {}).get(model, r.get("model_size"))
        key = (model, str(r["task"]), float(r["length"]), m, x)
        groups[key].append(float(r["score"]))
        sizes[key] = float(size) if size else None
        used += 1
    pts = [Point(k[1], k[0], k[3], k[4], k[2], sizes[k], sum(v) / len(v), len(v)) for k, v in groups.items()]
    return pts, used


def _design(pts: Sequence[Point], tasks: Sequence[str], axes: Sequence[str]) -> np.ndarray:
    cols = []
    for t in tasks:
        cols.append([1.0 if p.task == t else 0.0 for p in pts])
    for axis in axes:
        cols.append([math.log(getattr(p, axis)) for p in pts])
    return np.array(cols, dtype=float).T.reshape(len(pts), len(cols))


def _solve(pts: Sequence[Point], axes: Sequence[str], weighted: bool) -> tuple[list[str], np.ndarray]:
    tasks = sorted({p.task for p in pts})
    X = _design(pts, tasks, axes)
    y = np.array([p.score for p in pts])
    if weighted:
        w = np.sqrt(np.array([p.n for p in pts], dtype=float))
        X, y = X * w[:, None], y * w
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    return tasks, beta


def _predict(pts: Sequence[Point], tasks: Sequence[str], axes: Sequence[str], beta: np.ndarray) -> np.ndarray:
    return _design(pts, tasks, axes) @ beta


def fit_law(points: Sequence[Point], *, method: str = "all", n_records: int = 0, weighted: bool = False,
            heldout: bool = True) -> FitResult:
    """Least-squares fit of the law to `points`, with held-out extrapolation errors per axis."""
    if not points:
        raise ValueError("no points to fit (no sparse records? use include_dense, or check --method)")
    axes = ["compression", "length"]
    if len({p.model_size for p in points if p.model_size}) >= 2 and all(p.model_size for p in points):
        axes.append("model_size")
    for axis in ("compression", "length"):
        if len({getattr(p, axis) for p in points}) < 2:
            axes.remove(axis)  # a constant axis has no slope; it folds into the intercepts
    tasks, beta = _solve(points, axes, weighted)
    pred = _predict(points, tasks, axes, beta)
    y = np.array([p.score for p in points])
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    coefs = {COEF_NAMES[a]: float(beta[len(tasks) + i]) for i, a in enumerate(axes)}
    coefs.setdefault("b", 0.0)
    coefs.setdefault("c", 0.0)
    res = FitResult(method, len(points), n_records, {t: float(beta[i]) for i, t in enumerate(tasks)}, coefs, r2,
                    math.sqrt(ss_res / len(points)), axes)
    if heldout:
        for axis in AXES:
            if axis == "model_size" and "model_size" not in axes:
                continue
            res.heldout.append(_held_out(points, axis, axes, weighted))
    return res


def _held_out(points: Sequence[Point], axis: str, axes: Sequence[str], weighted: bool) -> HeldOut:
    values = sorted({getattr(p, axis) for p in points if getattr(p, axis) is not None})
    if len(values) < 3:
        return HeldOut(axis, values[-1] if values else None, 0, None,
                       f"needs >= 3 distinct {axis} values, have {len(values)}")
    top = values[-1]
    train = [p for p in points if getattr(p, axis) != top]
    test = [p for p in points if getattr(p, axis) == top]
    train_tasks = {p.task for p in train}
    test = [p for p in test if p.task in train_tasks]
    if not test:
        return HeldOut(axis, top, 0, None, "no held-out point of a task seen in training")
    tasks, beta = _solve(train, axes, weighted)
    pred = _predict(test, tasks, axes, beta)
    mae = float(np.abs(np.array([p.score for p in test]) - pred).mean())
    return HeldOut(axis, top, len(test), mae)


def fit_records(records: Sequence[Mapping[str, Any]], *, per_method: bool = True, compression: str = "target",
                include_dense: bool = False, model_sizes: Mapping[str, float] | None = None,
                method: str | None = None, weighted: bool = False) -> list[FitResult]:
    """The pooled fit over all sparse methods (or `method` only), then one fit per method when several."""
    out = []
    pts, used = points_from_records(records, method=method, include_dense=include_dense, compression=compression,
                                    model_sizes=model_sizes)
    out.append(fit_law(pts, method=method or "all", n_records=used, weighted=weighted))
    methods = sorted({p.method for p in pts if p.method != "dense"})
    if per_method and method is None and len(methods) > 1:
        for m in methods:
            mp, mused = points_from_records(records, method=m, include_dense=include_dense, compression=compression,
                                            model_sizes=model_sizes)
            try:
                out.append(fit_law(mp, method=m, n_records=mused, weighted=weighted))
            except (ValueError, np.linalg.LinAlgError):
                continue
    return out


def format_fit(f: FitResult) -> str:
    lines = [f"method: {f.method}   points: {f.n_points} (from {f.n_records} records)   axes: {', '.join(f.axes)}"]
    lines.append("  score ~ a_task + b*log(compression) + c*log(length)"
                 + (" + e*log(model_size)" if "e" in f.coefficients else ""))
    for name in ("b", "c", "e"):
        if name in f.coefficients:
            axis = {v: k for k, v in COEF_NAMES.items()}[name]
            value = f"{f.coefficients[name]:+.5f}" if axis in f.axes else f"n/a (one {axis} value only: no slope)"
            lines.append(f"  {name} ({axis}) = {value}")
    for t, a in sorted(f.task_intercepts.items()):
        lines.append(f"  a[{t}] = {a:+.5f}")
    lines.append(f"  R^2 = {f.r2:.4f}   RMSE = {f.rmse:.4f}")
    for h in f.heldout:
        if h.mae is None:
            lines.append(f"  held-out largest {h.axis}: n/a ({h.note})")
        else:
            lines.append(f"  held-out largest {h.axis} = {h.value:g}: MAE = {h.mae:.4f} over {h.n_points} points")
    return "\n".join(lines)
