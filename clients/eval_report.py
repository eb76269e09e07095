"""Summaries of an evaluation run: a table (task x method x ratio), a CSV, and score-vs-compression plots.

Rows group records by (task, length, method, ratio), where `method` is the pattern without its ratios
(`vertical_slash+quest`) and `ratio` the target compression the server reported (1 for dense). Each row has
the mean score (the run's `score`, or with `scoring="strict"` / `"lenient"` that mode's score and parsable
flag), its standard error and Wilson 95% interval, n, the number and share of unparsable answers (scored 0,
never dropped), the mean achieved prefill and decode
compression, and what was saved against dense: attention FLOPs (prefill), KV bytes read (decode) and whole
model FLOPs, each as 1 - sum(actual) / sum(dense-equivalent). Rows with length "all" pool the lengths; rows
with task "all" average the task means (each task weighs the same).

Plots (one PNG per task, like the paper's per-task figure): mean score against compression ratio (log axis),
one line per method with Wilson 95% bars, dense as a horizontal reference line with its interval shaded; one
panel per length. Every point is labelled with its n and unparsable share; a cell where no answer was
parsable is not a measured 0: it is drawn as a hollow grey marker below the axis ("nothing parsable") and
left out of its method's line, and a dense reference with nothing parsable is drawn dotted grey.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .eval_runner import load_records
from .tasks import TASK_NAMES, aggregate, wilson_interval

ALL = "all"


@dataclass
class SummaryRow:
    task: str
    length: int | str
    method: str
    ratio: float
    n: int
    mean: float
    stderr: float
    unparsable: int
    unparsable_share: float
    ci_low: float  # Wilson 95% interval of the mean
    ci_high: float
    achieved_prefill_ratio: float | None
    achieved_decode_ratio: float | None
    attention_flops_saved: float | None
    kv_bytes_saved: float | None
    model_flops_saved: float | None
    mean_latency_s: float | None
    model: str = ""


def _mean(xs: Iterable[Any]) -> float | None:
    vals = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(float(x))]
    return sum(vals) / len(vals) if vals else None


def _saved(recs: Sequence[dict[str, Any]], actual: str, dense: str) -> float | None:
    a = sum(float(r.get(actual) or 0) for r in recs)
    d = sum(float(r.get(dense) or 0) for r in recs)
    return 1.0 - a / d if d > 0 else None


def _scored(r: dict[str, Any], scoring: str) -> tuple[float, bool]:
    """(score, parsable) of a record under `scoring`: "run" (the record's own `score`), "strict" or "lenient"."""
    if scoring == "run" or (scoring == r.get("scoring", "strict") and f"score_{scoring}" not in r):
        return float(r["score"]), bool(r.get("parsable", True))
    if f"score_{scoring}" not in r:
        raise ValueError(f"records of {r.get('task')} have no {scoring} score (recorded before lenient scoring "
                         f"existed); rerun them, or report with --scoring run")
    return float(r[f"score_{scoring}"]), bool(r[f"parsable_{scoring}"])


def _unparsable_share(unparsable: int, n: int) -> float:
    return unparsable / n if n else float("nan")


def _row(task: str, length: int | str, method: str, ratio: float, recs: Sequence[dict[str, Any]],
         model: str, scoring: str) -> SummaryRow:
    from .tasks import ScoreResult

    agg = aggregate(ScoreResult(*_scored(r, scoring), "") for r in recs)
    return SummaryRow(
        task, length, method, ratio, agg.n, agg.mean, agg.stderr, agg.unparsable,
        _unparsable_share(agg.unparsable, agg.n), *wilson_interval(agg.mean, agg.n),
        _mean(r.get("achieved_prefill_ratio") for r in recs), _mean(r.get("achieved_decode_ratio") for r in recs),
        _saved(recs, "attention_flops", "dense_attention_flops"), _saved(recs, "kv_bytes_read", "dense_kv_bytes_read"),
        _saved(recs, "model_flops", "dense_model_flops"), _mean(r.get("latency_s") for r in recs), model,
    )


def _method_ratio(r: dict[str, Any]) -> tuple[str, float]:
    from .patterns import method_label, nominal_ratio

    method = r.get("method") or method_label(r["pattern"])
    ratio = r.get("ratio")
    if ratio is None:
        ratio = nominal_ratio(r["pattern"], 1.0)
    return str(method), float(ratio)


def _task_order(tasks: Iterable[str]) -> list[str]:
    known = [t for t in TASK_NAMES if t in set(tasks)]
    return known + sorted(set(tasks) - set(known))


def summarize(records: Sequence[dict[str, Any]], *, by_length: bool = True, scoring: str = "run") -> list[SummaryRow]:
    """Summary rows: per (model, task, length, method, ratio) when by_length, plus pooled-length rows
    (length "all") and the average over tasks (task "all")."""
    groups: dict[tuple[str, str, Any, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        method, ratio = _method_ratio(r)
        model = str(r.get("model") or "")
        if by_length:
            groups[(model, r["task"], int(r["length"]), method, ratio)].append(r)
        groups[(model, r["task"], ALL, method, ratio)].append(r)
    order = {t: i for i, t in enumerate(_task_order({k[1] for k in groups}))}

    def sort_key(k: tuple[str, str, Any, str, float]) -> tuple:
        model, task, length, method, ratio = k
        return (model, order.get(task, 99), length == ALL, length if length != ALL else 0,
                method != "dense", method, ratio)

    rows = [_row(k[1], k[2], k[3], k[4], groups[k], k[0], scoring) for k in sorted(groups, key=sort_key)]
    # the average over tasks, per (model, length, method, ratio), of the task means
    by_cfg: dict[tuple[str, Any, str, float], list[SummaryRow]] = defaultdict(list)
    for row in rows:
        by_cfg[(row.model, row.length, row.method, row.ratio)].append(row)
    for (model, length, method, ratio), rs in sorted(by_cfg.items(), key=lambda kv: (
            kv[0][0], kv[0][1] == ALL, kv[0][1] if kv[0][1] != ALL else 0, kv[0][2] != "dense", kv[0][2],
            kv[0][3])):
        if len(rs) < 2:
            continue
        k = len(rs)
        means = [r.mean for r in rs]
        stderr = math.sqrt(sum(r.stderr ** 2 for r in rs)) / k
        n, unparsable, mean = sum(r.n for r in rs), sum(r.unparsable for r in rs), sum(means) / k
        rows.append(SummaryRow(
            ALL, length, method, ratio, n, mean, stderr, unparsable, _unparsable_share(unparsable, n),
            *wilson_interval(mean, n),
            _mean(r.achieved_prefill_ratio for r in rs), _mean(r.achieved_decode_ratio for r in rs),
            _mean(r.attention_flops_saved for r in rs), _mean(r.kv_bytes_saved for r in rs),
            _mean(r.model_flops_saved for r in rs), _mean(r.mean_latency_s for r in rs), model))
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def format_table(rows: Sequence[SummaryRow], *, length: Any = ALL) -> str:
    """A fixed-width table of the rows at `length` (default: lengths pooled)."""
    header = ["task", "method", "ratio", "mean", "95% CI", "n", "unparsable", "ach_prefill", "ach_decode",
              "attn_FLOPs_saved", "KV_read_saved", "model_FLOPs_saved"]
    models = {r.model for r in rows}
    if len(models) > 1:
        header.insert(0, "model")
    lines = []
    for r in rows:
        if r.length != length:
            continue
        ci = "-" if math.isnan(r.ci_low) else f"{r.ci_low:.2f}-{r.ci_high:.2f}"
        cells = [r.task, r.method, f"{r.ratio:g}", _num(r.mean, "{:.3f}"), ci, str(r.n),
                 f"{r.unparsable} ({_pct(r.unparsable_share)})", _num(r.achieved_prefill_ratio),
                 _num(r.achieved_decode_ratio),
                 _pct(r.attention_flops_saved), _pct(r.kv_bytes_saved), _pct(r.model_flops_saved)]
        if len(models) > 1:
            cells.insert(0, r.model)
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) if i < 2 + (len(models) > 1) else h.rjust(w)
                     for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    out.append("  ".join("-" * w for w in widths))
    prev_task = None
    for cells in lines:
        task = cells[0 + (len(models) > 1)]
        if prev_task is not None and task != prev_task and task == ALL:
            out.append("  ".join("-" * w for w in widths))
        prev_task = task
        out.append("  ".join(c.ljust(w) if i < 2 + (len(models) > 1) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True))))
    return "\n".join(out)


def write_csv(rows: Sequence[SummaryRow], path: str | os.PathLike[str]) -> None:
    fields = list(asdict(rows[0]).keys()) if rows else [f for f in SummaryRow.__dataclass_fields__]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


NOTHING_PARSABLE_Y = -0.12  # where cells without any parsable answer are drawn: below the score axis


def _cell_note(r: SummaryRow) -> str:
    return f"n={r.n}, unpars {100 * r.unparsable_share:.0f}%"


def plot_tasks(rows: Sequence[SummaryRow], out_dir: str | os.PathLike[str]) -> list[Path]:
    """One PNG per task (plus `all.png` for the task average when present): score vs compression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    models = sorted({r.model for r in rows})
    tasks = _task_order({r.task for r in rows if r.task != ALL})
    if any(r.task == ALL for r in rows):
        tasks.append(ALL)
    for task in tasks:
        trows = [r for r in rows if r.task == task]
        lengths = sorted({r.length for r in trows if r.length != ALL})
        if not lengths:
            lengths = [ALL]
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths) + 0.6, 3.8), squeeze=False,
                                 sharey=True)
        for ax, length in zip(axes[0], lengths, strict=True):
            lrows = [r for r in trows if r.length == length]
            methods = sorted({(r.model, r.method) for r in lrows if r.method != "dense"})
            xs_all = sorted({r.ratio for r in lrows if r.method != "dense"}) or [1.0]
            color_cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            for mi, model in enumerate(models):
                for d in (r for r in lrows if r.method == "dense" and r.model == model):
                    label = "dense" + (f" ({model})" if len(models) > 1 else "") + f" {_cell_note(d)}"
                    if d.unparsable == d.n:  # nothing parsable: not a measured 0
                        ax.axhline(0, color="grey", linestyle=":", linewidth=1.2,
                                   label=label + ", nothing parsable")
                        continue
                    ax.axhline(d.mean, color="black", linestyle=("--", ":", "-.")[mi % 3], linewidth=1.2,
                               label=label)
                    ax.axhspan(d.ci_low, d.ci_high, color="black", alpha=0.07)
            for i, (model, method) in enumerate(methods):
                color = color_cycle[i % len(color_cycle)]
                cells = sorted((r for r in lrows if r.method == method and r.model == model), key=lambda r: r.ratio)
                pts = [r for r in cells if r.unparsable < r.n]
                label = method + (f" ({model})" if len(models) > 1 else "")
                ax.errorbar([r.ratio for r in pts], [r.mean for r in pts],
                            yerr=[[r.mean - r.ci_low for r in pts], [r.ci_high - r.mean for r in pts]],
                            marker="o", markersize=4, capsize=3, linewidth=1.5, color=color, label=label)
                for r in pts:
                    ax.annotate(_cell_note(r), (r.ratio, r.mean), textcoords="offset points", xytext=(3, 3),
                                fontsize=6, color=color)
                for r in cells:
                    if r.unparsable == r.n:
                        ax.plot([r.ratio], [NOTHING_PARSABLE_Y], marker="o", markersize=6, linestyle="none",
                                markerfacecolor="none", markeredgecolor=color)
                        ax.annotate(f"n={r.n}", (r.ratio, NOTHING_PARSABLE_Y), textcoords="offset points",
                                    xytext=(3, -2), fontsize=6, color="grey")
            if any(r.unparsable == r.n for r in lrows if r.method != "dense"):
                ax.axhspan(NOTHING_PARSABLE_Y - 0.04, NOTHING_PARSABLE_Y + 0.04, color="grey", alpha=0.12,
                           label="nothing parsable (hollow)")
            ax.set_xscale("log")
            if xs_all:
                ax.set_xticks(xs_all)
                ax.set_xticklabels([f"{x:g}x" for x in xs_all])
                ax.minorticks_off()
            ax.set_xlabel("compression ratio")
            ax.set_title(f"{task} @ {length} tokens" if length != ALL else task, fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.set_ylim(NOTHING_PARSABLE_Y - 0.06, 1.05)
        axes[0][0].set_ylabel("score (bars: Wilson 95%)")
        seen: dict[str, Any] = {}
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(lab, h)
        if seen:
            axes[0][-1].legend(list(seen.values()), list(seen.keys()), fontsize=8, loc="best")
        fig.tight_layout()
        path = out / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report(run_dir: str | os.PathLike[str], *, results: str | None = None, plots: bool = True,
           by_length_table: bool = False, scoring: str = "run") -> tuple[str, list[SummaryRow], list[Path]]:
    """Summarise a run directory: returns (table text, rows, files written: summary.csv and plots/*.png)."""
    run_dir = Path(run_dir)
    records = load_records(results or run_dir)
    if not records:
        raise ValueError(f"no records in {results or run_dir}")
    rows = summarize(records, scoring=scoring)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path = run_dir / "summary.csv"
    write_csv(rows, csv_path)
    files = [csv_path]
    text = format_table(rows, length=ALL)
    if by_length_table:
        for length in sorted({r.length for r in rows if r.length != ALL}):
            text += f"\n\nlength {length}:\n" + format_table(rows, length=length)
    (run_dir / "summary.txt").write_text(text + "\n", encoding="utf-8")
    files.append(run_dir / "summary.txt")
    if plots:
        files += plot_tasks([r for r in rows if r.length != ALL] or rows, run_dir / "plots")
    return text, rows, files
