"""`sparse-eval`: run the nine tasks against a server, summarise and plot a run, fit the scaling law.

    sparse-eval run --url http://127.0.0.1:8000 --tasks all --lengths 4096,8192 \\
        --patterns dense,vertical_slash,quest --ratios 2,5,10,20 --samples 20 --out runs/smollm2
    sparse-eval report runs/smollm2
    sparse-eval fit runs/smollm2 [--results FILE] [--model-sizes NAME=PARAMS ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_help import HelpFormatter
from .patterns import expand_patterns, parse_ratios, split_patterns


def _ints(text: str) -> list[int]:
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        if not x:
            continue
        mult = 1
        if x.endswith("k"):
            x, mult = x[:-1], 1024
        out.append(int(float(x) * mult))
    if not out or any(v <= 0 for v in out):
        raise argparse.ArgumentTypeError(f"expected positive integers like 4096,8192 or 4k,8k, got {text!r}")
    return out


class AllTasks(list):
    """``--tasks all``: every task, less the QA ones when no QA data is given."""


def _tasks(text: str) -> list[str]:
    from .tasks import EXTRA_TASK_NAMES, TASK_NAMES

    if text.strip().lower() == "all":
        return AllTasks(TASK_NAMES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = TASK_NAMES + EXTRA_TASK_NAMES
    unknown = [t for t in names if t not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparse-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) an evaluation; writes DIR/results.jsonl",
                       formatter_class=HelpFormatter)
    r.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    r.add_argument("--tasks", type=_tasks, default="all", help="'all' or a comma list of task names")
    r.add_argument("--lengths", type=_ints, default=[4096], help="target prompt lengths in tokens (4096,8k,...)")
    r.add_argument("--patterns", default="dense",
                   help="comma list of sparse patterns (METHOD[:R] or PREFILL[:R]+DECODE[:R]); one without a "
                   "ratio is crossed with every --ratios value, dense runs once, explicit ratios run as given")
    r.add_argument("--ratios", default="", help="compression ratios to cross ratio-less patterns with, e.g. 2,5,10")
    r.add_argument("--samples", type=int, default=10, help="samples per (task, length)")
    r.add_argument("--scoring", choices=["strict", "lenient"], default="strict",
                   help="which score is the record's `score`: the <answer> format (strict) or the answer found "
                   "in free text (lenient); both are stored either way")
    r.add_argument("--max-tokens", type=int, default=1024, help="generation budget per request")
    r.add_argument("--out", required=True, help="run directory (created; rerun the same command to resume)")
    r.add_argument("--api-key", default=None, help="bearer token (default: $SPARSE_SERVE_API_KEY)")
    r.add_argument("--qa-data", default=None,
                   help="directory with dev-v2.0.json, quality.jsonl, toefl.jsonl (default: "
                   "$SPARSE_SERVE_QA_DATA_DIR)")
    r.add_argument("--seed", type=int, default=0, help="sample seed")
    r.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    r.add_argument("--tokenizer", default=None,
                   help="local tokenizer (HF directory or .gguf file) for length fitting instead of /tokenize")
    r.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    r.add_argument("--model-size", default=None, help="parameter count to store in records, e.g. 135M, 7B")
    r.add_argument("--max-doc-tokens", type=int, default=8192, help="QA: largest own-document size")
    r.add_argument("--system-prompt", default=None, help="system message before the user turn")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    r.add_argument("--max-retries", type=int, default=4, help="retries on 429/503 and refused connections")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    rep = sub.add_parser("report", help="summary table, summary.csv and plots/<task>.png of a run directory")
    rep.add_argument("dir", help="run directory")
    rep.add_argument("--results", default=None, help="results file (default: DIR/results.jsonl)")
    rep.add_argument("--no-plots", action="store_true")
    rep.add_argument("--by-length", action="store_true", help="also print one table per length")
    rep.add_argument("--scoring", choices=["run", "strict", "lenient"], default="run",
                     help="which score to summarise: the run's choice (`score`), or the strict / lenient one")

    f = sub.add_parser("fit", help="fit score ~ a_task + b log(compression) + c log(length) [+ e log(size)]")
    f.add_argument("dir", nargs="?", default=None, help="run directory (fit.json is written there)")
    f.add_argument("--results", default=None, help="results file (default: DIR/results.jsonl)")
    f.add_argument("--model-sizes", nargs="*", default=None, metavar="NAME=PARAMS",
                   help="model sizes, e.g. SmolLM2-135M-Instruct=135M Qwen2.5-7B-Instruct=7.6B")
    f.add_argument("--compression", choices=["target", "achieved"], default="target")
    f.add_argument("--method", default=None, help="fit one method only (e.g. vertical_slash)")
    f.add_argument("--include-dense", action="store_true", help="include dense records (compression 1)")
    f.add_argument("--weighted", action="store_true", help="weight points by their sample count")
    f.add_argument("--json", action="store_true", help="print the fits as JSON")
    f.add_argument("--write-policy", default=None, metavar="POLICY.json",
                   help="also write a serving policy for sparse_pattern 'auto' (sparse-serve --sparse-policy): per "
                   "length band, candidates with their predicted drop and margin, cheapest first")
    f.add_argument("--max-drop", type=float, default=0.05,
                   help="the policy's accuracy budget for plain 'auto' (0.05 = 5 points below dense)")
    return p


def _tasks_with_data(tasks: list[str], qa_data: str | None) -> list[str]:
    """``tasks``, or [] after saying why: QA tasks need local data (never downloaded); ``all`` skips them
    without it, naming them explicitly is an error."""
    from .tasks import QA_TASKS
    from .tasks.qa import DEFAULT_FILES, QA_DATA_DIR_ENV

    qa = [t for t in tasks if t in QA_TASKS]
    if not qa or qa_data or os.environ.get(QA_DATA_DIR_ENV):
        return tasks
    how = f"--qa-data DIR (or ${QA_DATA_DIR_ENV}), a directory holding " + ", ".join(DEFAULT_FILES[t] for t in qa)
    if isinstance(tasks, AllTasks):
        print(f"sparse-eval: skipping {', '.join(qa)}: they need {how}", file=sys.stderr)
        return [t for t in tasks if t not in QA_TASKS]
    print(f"sparse-eval: {', '.join(qa)} need {how}", file=sys.stderr)
    return []


def cmd_run(a: argparse.Namespace) -> int:
    from .client import APIError
    from .eval_runner import EvalConfig, run_eval
    from .scaling_fit import parse_param_count

    try:
        patterns = expand_patterns(split_patterns(a.patterns), parse_ratios(a.ratios))
    except ValueError as e:
        print(f"sparse-eval: {e}", file=sys.stderr)
        return 2
    tasks = a.tasks if isinstance(a.tasks, list) else _tasks(a.tasks)
    tasks = _tasks_with_data(tasks, a.qa_data)
    if not tasks:
        return 2
    api_key = a.api_key or os.environ.get("SPARSE_SERVE_API_KEY")
    cfg = EvalConfig(url=a.url, tasks=tasks, lengths=a.lengths, patterns=patterns, samples=a.samples,
                     out_dir=a.out, max_tokens=a.max_tokens, seed=a.seed, concurrency=a.concurrency,
                     api_key=api_key, qa_data=a.qa_data, max_doc_tokens=a.max_doc_tokens, tokenizer=a.tokenizer,
                     model=a.model, model_size=parse_param_count(a.model_size) if a.model_size else None,
                     system_prompt=a.system_prompt, timeout=a.timeout, max_retries=a.max_retries,
                     scoring=a.scoring)
    n = len(tasks) * len(a.lengths) * a.samples * len(patterns)
    print(f"sparse-eval: {len(tasks)} tasks x {len(a.lengths)} lengths x {a.samples} samples x "
          f"{len(patterns)} patterns = {n} requests -> {a.out}", file=sys.stderr)
    print(f"patterns: {', '.join(patterns)}", file=sys.stderr)
    try:
        s = run_eval(cfg, progress=not a.no_progress, log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        return 130
    except FileNotFoundError as e:
        print(f"sparse-eval: {e}", file=sys.stderr)
        return 2
    except APIError as e:
        print(f"sparse-eval: the server at {a.url} failed: {e}", file=sys.stderr)
        return 2
    print(f"done: {s.completed} new, {s.skipped} already finished, {s.errors} errors, of {s.total} "
          f"(model {s.model}, {s.elapsed:.1f} s); results in {Path(s.out_dir) / 'results.jsonl'}", file=sys.stderr)
    if s.errors:
        print(f"errors are in {Path(s.out_dir) / 'errors.jsonl'}; rerun the same command to retry them",
              file=sys.stderr)
    return 1 if s.errors else 0


def cmd_report(a: argparse.Namespace) -> int:
    from .eval_report import report

    try:
        text, rows, files = report(a.dir, results=a.results, plots=not a.no_plots, by_length_table=a.by_length,
                                   scoring=a.scoring)
    except (FileNotFoundError, ValueError) as e:
        print(f"sparse-eval: {e}", file=sys.stderr)
        return 2
    print(text)
    print("\nwrote: " + ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3
                                                                 else ""))
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    from .eval_runner import load_records
    from .scaling_fit import fit_records, format_fit, parse_model_sizes

    if not a.dir and not a.results:
        print("sparse-eval fit: give a run directory or --results FILE", file=sys.stderr)
        return 2
    try:
        records = load_records(a.results or a.dir)
        fits = fit_records(records, compression=a.compression, include_dense=a.include_dense,
                           model_sizes=parse_model_sizes(a.model_sizes), method=a.method, weighted=a.weighted)
    except (FileNotFoundError, ValueError) as e:
        print(f"sparse-eval: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps([f.to_dict() for f in fits], indent=2))
    else:
        print("\n\n".join(format_fit(f) for f in fits))
    if a.dir and Path(a.dir).is_dir():
        (Path(a.dir) / "fit.json").write_text(json.dumps([f.to_dict() for f in fits], indent=2))
    if a.write_policy:
        from .policy_fit import build_policy, format_policy

        try:
            doc = build_policy(records, max_drop=a.max_drop, source=f"sparse-eval fit {a.results or a.dir}")
        except ValueError as e:
            print(f"sparse-eval: cannot write a policy: {e}", file=sys.stderr)
            return 2
        Path(a.write_policy).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print("\n" + format_policy(doc) + f"\nwrote {a.write_policy}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return {"run": cmd_run, "report": cmd_report, "fit": cmd_fit}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
