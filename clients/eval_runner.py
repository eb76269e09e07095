"""Evaluation runner: the nine tasks x lengths x sparse patterns against a server, one JSONL record per sample.

    cfg = EvalConfig(url="http://127.0.0.1:8000", tasks=["ruler_niah"], lengths=[4096],
                     patterns=expand_patterns(["dense", "quest"], [5, 10]), samples=20, out_dir="runs/a")
    summary = run_eval(cfg)

Each sample `(task, length, seed, index)` is built once (prompt fitted to [0.95 L, L] tokens with the server's
/tokenize, or a local tokenizer) and sent, greedy (temperature 0) as one user turn of the chat endpoint, once
per pattern. Every finished request is appended at once to `<out>/results.jsonl` (flushed), keyed by
`(task, length, pattern, seed, index)`. Rerunning the same command resumes: finished keys are skipped, a
truncated last line (a run killed mid-write) is cut off, and nothing finished is redone or lost. Failed
requests are not recorded as results (they are retried by the next run); they go to `<out>/errors.jsonl`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .client import APIError, CompletionResult, HttpTokenCounter, SparseClient, SparseReport
from .patterns import method_label, nominal_ratio, parse_parts

RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"
RUN_FILE = "run.json"

Key = tuple[str, int, str, int, int]  # (task, length, pattern, seed, index)


def record_key(rec: Mapping[str, Any]) -> Key:
    return (str(rec["task"]), int(rec["length"]), str(rec["pattern"]), int(rec["seed"]), int(rec["index"]))


# ============================================================================================ result store
class ResultStore:
    """Append-only JSONL of records with crash-safe resume.

    Opening repairs the file: a last line without its newline (the writer was killed mid-line) is cut off;
    any other line that is not valid JSON is skipped with a warning. Records are keyed by `record_key`; the
    first record of a key wins. `append` writes one line and flushes it, under a lock (thread-safe)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.records: dict[Key, dict[str, Any]] = {}
        self.bad_lines = 0
        self.truncated_bytes = 0
        self._lock = threading.Lock()
        self._load()
        self._fh = None

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # partial last line: cut it off so the next append starts on a fresh line
            self.truncated_bytes = len(data) - end
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
            data = data[:end]
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = record_key(rec)
            except (ValueError, KeyError, TypeError):
                self.bad_lines += 1
                continue
            self.records.setdefault(key, rec)

    def __contains__(self, key: Key) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n"
        with self._lock:
            key = record_key(rec)
            if key in self.records:
                return
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            self._fh.write(line)
            self._fh.flush()
            self.records[key] = rec

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def load_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a results file (or of `<dir>/results.jsonl`), tolerating a truncated last line; read-only.
    A file may hold several models' records (concatenated runs): duplicates are dropped per (model, key)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.exists():
        raise FileNotFoundError(f"no results file at {p}")
    out: dict[tuple, dict[str, Any]] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.setdefault((str(rec.get("model") or ""), *record_key(rec)), rec)
        except (ValueError, KeyError, TypeError):
            continue
    return list(out.values())


# ================================================================================================= config
@dataclass
class EvalConfig:
    url: str
    tasks: Sequence[str]
    lengths: Sequence[int]
    patterns: Sequence[str]  # concrete pattern strings (see clients.patterns.expand_patterns)
    samples: int
    out_dir: str
    max_tokens: int = 1024
    seed: int = 0
    concurrency: int = 1
    api_key: str | None = None
    qa_data: str | None = None
    max_doc_tokens: int = 8192
    tokenizer: str | None = None  # local tokenizer (HF dir, or a .gguf file); default: the server's /tokenize
    model: str | None = None  # model name sent; default: the server's first model
    model_size: float | None = None  # parameters, stored in records for the scaling fit
    system_prompt: str | None = None
    timeout: float = 600.0
    max_retries: int = 4
    extra: dict[str, Any] = field(default_factory=dict)  # extra body fields for every request
    scoring: str = "strict"  # which score is the record's `score` (both are stored)


@dataclass
class RunSummary:
    total: int  # keys the run covers
    skipped: int  # already finished before this run
    completed: int  # finished by this run
    errors: int
    elapsed: float
    out_dir: str
    model: str


# ================================================================================================ records
# results.jsonl's cost columns: column -> (phase of the sparse report, or None for its top level; field)
_COST_COLUMNS: dict[str, tuple[str | None, str]] = {
    "prefill_method": ("prefill", "method"), "decode_method": ("decode", "method"),
    "target_prefill_ratio": ("prefill", "target_compression_ratio"),
    "target_decode_ratio": ("decode", "target_compression_ratio"),
    "achieved_prefill_ratio": ("prefill", "achieved_compression_ratio"),
    "achieved_decode_ratio": ("decode", "achieved_compression_ratio"),
    **{name: ("prefill", name) for name in ("attention_flops", "dense_attention_flops", "indexing_flops")},
    **{name: ("decode", name) for name in ("kv_bytes_read", "dense_kv_bytes_read", "metadata_bytes_read",
                                           "kv_cache_tokens")},
    **{name: (None, name) for name in ("model_flops", "dense_model_flops")},
}


def _cost_columns(sp: SparseReport | None) -> dict[str, Any]:
    """The record's cost columns from the response's sparse report (all None when the server sent none)."""
    return {column: None if sp is None else getattr(getattr(sp, phase) if phase else sp, name)
            for column, (phase, name) in _COST_COLUMNS.items()}


def build_record(sample: Any, pattern: str, result: CompletionResult, strict: Any, lenient: Any, *, model: str,
                 model_size: float | None, max_tokens: int, scoring: str = "strict") -> dict[str, Any]:
    """One results.jsonl line. `score` / `parsable` / `prediction` are those of the run's `scoring` mode; both
    modes' scores and parsable flags are kept."""
    score = lenient if scoring == "lenient" else strict
    sp = result.sparse
    u = result.usage
    sparse_ratios = [r for m, r in parse_parts(pattern) if m != "dense"]
    if sp is not None:
        targets = [r for m, r in ((sp.prefill.method, sp.prefill.target_compression_ratio),
                                  (sp.decode.method, sp.decode.target_compression_ratio)) if m != "dense"]
        ratio = max(targets) if targets else 1.0
    else:
        ratio = nominal_ratio(pattern) or 1.0
    label = method_label(pattern)
    if len({r for r in sparse_ratios}) > 1:  # phases at different ratios: a method of its own
        label = pattern
    rec: dict[str, Any] = {
        "task": sample.task, "length": sample.length, "seed": sample.seed, "index": sample.index,
        "pattern": pattern, "method": label, "ratio": ratio,
        "model": model or result.model, "model_size": model_size,
        "prompt_tokens": sample.prompt_tokens,
        "server_prompt_tokens": u.prompt_tokens if u else None,
        "completion_tokens": u.completion_tokens if u else None,
        "max_tokens": max_tokens, "finish_reason": result.finish_reason,
        **_cost_columns(sp),
        "scoring": scoring, "score": float(score.score), "parsable": bool(score.parsable),
        "prediction": score.prediction,
        "score_strict": float(strict.score), "parsable_strict": bool(strict.parsable),
        "score_lenient": float(lenient.score), "parsable_lenient": bool(lenient.parsable),
        "gold": sample.gold, "completion": result.text,
        "latency_s": round(result.latency, 4), "attempts": result.attempts, "time": round(time.time(), 3),
    }
    return rec


# ================================================================================================= runner
class _SampleCache:
    """Builds each sample once, shares it between the pattern jobs that use it, forgets it after the last."""

    def __init__(self, build: Callable[[tuple[str, int, int]], Any]):
        self._build = build
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int, int], dict[str, Any]] = {}

    def expect(self, key: tuple[str, int, int], uses: int) -> None:
        self._entries[key] = {"lock": threading.Lock(), "uses": uses, "value": None, "error": None}

    def get(self, key: tuple[str, int, int]) -> Any:
        e = self._entries[key]
        with e["lock"]:
            if e["value"] is None and e["error"] is None:
                try:
                    e["value"] = self._build(key)
                except Exception as ex:  # noqa: BLE001 - every job of this sample reports it
                    e["error"] = ex
            value, error = e["value"], e["error"]
        with self._lock:
            e["uses"] -= 1
            if e["uses"] <= 0:
                self._entries.pop(key, None)
        if error is not None:
            raise error
        return value


def _make_counter(cfg: EvalConfig, client: SparseClient) -> Any:
    if not cfg.tokenizer:
        return HttpTokenCounter(client, system_prompt=cfg.system_prompt)
    from .tasks import LocalTokenCounter

    p = Path(cfg.tokenizer)
    if p.suffix == ".gguf":
        return LocalTokenCounter.from_pretrained(str(p.parent), gguf_file=p.name, system_prompt=cfg.system_prompt)
    return LocalTokenCounter.from_pretrained(str(p), system_prompt=cfg.system_prompt)


def _preflight(tasks: Mapping[str, Any]) -> None:
    """Fail before any request when a QA data file is missing (the error names the file)."""
    from .tasks import QA_TASKS

    for name, task in tasks.items():
        if name in QA_TASKS:
            task.dataset()


def _write_run_info(cfg: EvalConfig, model: str) -> None:
    p = Path(cfg.out_dir) / RUN_FILE
    info: dict[str, Any] = {}
    if p.exists():
        try:
            info = json.loads(p.read_text())
        except ValueError:
            info = {}
    runs = info.get("runs", [])
    cfg_d = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    runs.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": model, "config": cfg_d})
    info.update({"model": model, "runs": runs})
    p.write_text(json.dumps(info, indent=2, default=str))


def run_eval(cfg: EvalConfig, *, client: SparseClient | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> RunSummary:
    """Run (or resume) the evaluation `cfg` describes. Returns counts; records are in cfg.out_dir."""
    from tqdm import tqdm

    from .tasks import get_task

    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own_client = client is None
    if client is None:
        client = SparseClient(cfg.url, api_key=cfg.api_key, model=cfg.model, timeout=cfg.timeout,
                              max_retries=cfg.max_retries)
    say = log or (lambda m: tqdm.write(m))
    store = ResultStore(out / RESULTS_FILE)
    if store.truncated_bytes:
        say(f"resume: cut a truncated last line ({store.truncated_bytes} bytes) from {store.path}")
    try:
        model = cfg.model or ""
        max_model_len: int | None = None
        if not model:
            models = client.models()
            if models:
                model = str(models[0].get("id", ""))
                max_model_len = models[0].get("max_model_len")
        _write_run_info(cfg, model)
        counter = _make_counter(cfg, client)
        tasks = {name: get_task(name, qa_data_dir=cfg.qa_data, max_doc_tokens=cfg.max_doc_tokens)
                 for name in cfg.tasks}
        _preflight(tasks)
        build_locks = {name: threading.Lock() for name in tasks}

        def build(key: tuple[str, int, int]) -> Any:
            name, length, index = key
            with build_locks[name]:
                return tasks[name].build(length, cfg.seed, index, counter)

        cache = _SampleCache(build)
        jobs: list[tuple[tuple[str, int, int], str]] = []
        total = skipped = 0
        for name in cfg.tasks:
            for length in cfg.lengths:
                for index in range(cfg.samples):
                    pending = []
                    for pattern in cfg.patterns:
                        total += 1
                        if (name, int(length), pattern, cfg.seed, index) in store:
                            skipped += 1
                        else:
                            pending.append(pattern)
                    if pending:
                        cache.expect((name, int(length), index), len(pending))
                        jobs.extend(((name, int(length), index), p) for p in pending)
        if skipped:
            say(f"resume: {skipped} of {total} samples already finished in {store.path}; running {len(jobs)}")

        errors = 0
        err_lock = threading.Lock()
        err_path = out / ERRORS_FILE

        def run_one(skey: tuple[str, int, int], pattern: str) -> dict[str, Any]:
            sample = cache.get(skey)
            limit = getattr(counter, "max_model_len", None) or max_model_len
            max_tokens = cfg.max_tokens
            if limit and sample.prompt_tokens:
                max_tokens = max(1, min(max_tokens, int(limit) - int(sample.prompt_tokens)))
            messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
                {"role": "user", "content": sample.prompt}]
            result = client.chat(messages, max_tokens=max_tokens, temperature=0, sparse_pattern=pattern,
                                 **cfg.extra)
            task = tasks[skey[0]]
            rec = build_record(sample, pattern, result, task.score(sample, result.text, "strict"),
                               task.score(sample, result.text, "lenient"), model=model,
                               model_size=cfg.model_size, max_tokens=max_tokens, scoring=cfg.scoring)
            store.append(rec)
            return rec

        def record_error(skey: tuple[str, int, int], pattern: str, e: BaseException) -> None:
            nonlocal errors
            err = {"task": skey[0], "length": skey[1], "index": skey[2], "seed": cfg.seed, "pattern": pattern,
                   "error": str(e), "type": type(e).__name__, "time": round(time.time(), 3)}
            if isinstance(e, APIError):
                err.update(status=e.status, param=e.param, code=e.code)
            with err_lock:
                errors += 1
                with open(err_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(err, default=str) + "\n")
                if errors <= 5:
                    say(f"error: {skey[0]} L={skey[1]} #{skey[2]} {pattern}: {e}")
                elif errors == 6:
                    say(f"more errors: see {err_path}")

        bar = tqdm(total=len(jobs), disable=not progress, desc="sparse-eval", unit="req", dynamic_ncols=True)
        completed = 0
        score_sum = 0.0
        it = iter(jobs)
        pool = ThreadPoolExecutor(max_workers=max(1, cfg.concurrency), thread_name_prefix="sparse-eval")
        running: dict[Future, tuple[tuple[str, int, int], str]] = {}

        def refill() -> None:
            while len(running) < max(1, cfg.concurrency):
                job = next(it, None)
                if job is None:
                    return
                running[pool.submit(run_one, *job)] = job

        try:
            refill()
            while running:
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    try:
                        rec = fut.result()
                        completed += 1
                        score_sum += rec["score"]
                        bar.set_postfix(mean_score=f"{score_sum / completed:.3f}", errors=errors, refresh=False)
                    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                        record_error(*job, e)
                    bar.update(1)
                refill()
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()
            say(f"interrupted: {completed} new records kept in {store.path}; rerun the same command to resume")
            raise
        pool.shutdown(wait=True)
        bar.close()
        return RunSummary(total, skipped, completed, errors, time.perf_counter() - t_start, str(out), model)
    finally:
        store.close()
        if own_client:
            client.close()


def iter_grid(tasks: Iterable[str], lengths: Iterable[int], patterns: Iterable[str], samples: int,
              seed: int) -> list[Key]:
    """Every key a run covers (for checking a results file)."""
    return [(t, int(n), p, seed, i) for t in tasks for n in lengths for i in range(samples) for p in patterns]
