"""The deployment checked against the real thing: a real Prometheus (Debian's ``prometheus`` binary) scrapes a
live sparse-serve (embedded SmolLM2, real NativeEngine, started from ``sparse-serve`` flags) using the project's
own ``deploy/prometheus/`` configuration, rewritten only in its target addresses and its intervals (1 s instead
of 5 s / 15 s, so that the test takes seconds, not minutes). After a mixed load, every PromQL query of the
Grafana dashboards (each panel target, with the variables at "All" and at real values) and of the rules is
evaluated through Prometheus's HTTP API.

The load and what it is designed to do (the server runs with small limits: 2 running, 2 waiting, a KV pool
that holds exactly one long request):

* every prefill and decode method, streamed and not, completions and chat, short prompts;
* server errors, spread over several scrapes: an injected prefill fault (requests with ``seed=FAULT_SEED``)
  answers 500 with ``status="error"``            -> ``SparseServeHighErrorRate`` pending;
* overload: bursts of concurrent requests beyond running + waiting -> 429 -> ``SparseServeQueueSaturated``;
* KV pressure: a 305-token prompt holds 20 of the pool's 21 pages per KV head (usage 0.952)
  -> ``SparseServeKVCacheNearlyFull``;
* a slow first token: a 320-token request runs while two ``flexprefill`` requests whose prompts need nearly
  the whole pool wait behind it (their time to first token includes the wait, over 2 s)
  -> ``SparseServeTTFTSLOBreached``;
* ``SparseServeDown`` must stay inactive (the server stays up).

(TTFT is designed to breach rather than to stay low: on a loaded two-core machine running Triton's
interpreter, short requests alone can come near the 2 s SLO, so "inactive" could not be promised.)

Alerts have ``for:`` of minutes, so "reached" means ``pending`` (Prometheus's ``ALERTS`` series).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from server_harness import free_port, wait_until
from test_deploy import PROMETHEUS_DIR, alert_rules, dashboards, iter_panels, require
from test_server_e2e import serve_engine

from attention_backends import DECODE_METHODS, PREFILL_METHODS
from server.cli import build_parser, settings_from_args

pytestmark = pytest.mark.slow

INTERVAL_S = 1  # the test's scrape and rule-evaluation interval
# Only these keys of prometheus.yml may differ in the test's copy (besides the target addresses).
REWRITABLE_KEYS = {"scrape_interval", "evaluation_interval", "scrape_timeout", "targets"}

# KV pressure. SmolLM2-135M: 30 layers x 3 KV heads, head_dim 64, float32, 16-token pages, so a page (K, V and
# Quest's key min/max) takes (2*16 + 2) * 64 * 4 bytes. The pool is 30*3*(ceil(320/16) + 1) = 1890 pages: a
# 305-token prompt needs all of them to be admitted (its 20 pages per KV head and one for its next token), so it
# runs alone, and holds 30*3*20 = 1800 from its prefill to its 15th token: 1800/1890 = 0.952 > 0.95.
HEADS_TOTAL, PAGE_SIZE = 30 * 3, 16
HOG_PROMPT, HOG_NEW = 305, 15
WAITER_PROMPT = 300  # a prompt that needs 30*3*(19 + 1) = 1800 pages: admitted only when nothing else runs
POOL_PAGES = HEADS_TOTAL * (-(-(HOG_PROMPT + HOG_NEW) // PAGE_SIZE) + 1)
KV_BYTES = POOL_PAGES * (2 * PAGE_SIZE + 2) * 64 * 4
SERVER_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-num-seqs", "2", "--max-queue", "2",
                "--kv-cache-memory", str(KV_BYTES), "--no-access-log", "--log-level", "warning",
                # auto serves the real pattern (below), so the dashboard's auto panel has data at the real values
                "--sparse-policy", str(Path(__file__).parent / "fixtures" / "auto-policy-live.json")]

FAULT_SEED = 424242  # requests with this seed fail in prefill (injected): the server's status="error" path
REAL_PATTERN = "vertical_slash:2+quest:2"
PATTERNS = ["dense", "vertical_slash:2", "flexprefill", "block_sparse:2", "snapkv:2", "ada_snapkv:2", "quest:2",
            REAL_PATTERN, "auto"]
# Dashboard variables at real values (besides the model): a pair the load sends together, with errors and
# rejections; and a pair with traffic but no failures, where the single-number panels must still show a number.
REAL_METHODS = {"prefill_method": "vertical_slash", "decode_method": "quest"}
QUIET_METHODS = {"prefill_method": "block_sparse", "decode_method": "dense"}
SINGLE_NUMBER_PANELS = {"stat", "gauge"}

DESIGNED_TO_FIRE = {"SparseServeHighErrorRate", "SparseServeQueueSaturated", "SparseServeKVCacheNearlyFull",
                    "SparseServeTTFTSLOBreached"}
SLOW_METHOD = "flexprefill"  # the prefill method of the requests that wait behind a long one
TTFT_SLO_S = 2.0


# ---------------------------------------------------------------- Prometheus config and process

def rewrite_config(config: dict, targets: dict[str, str], interval: str) -> dict:
    """The deploy config with its targets mapped through ``targets`` and every interval set to ``interval``."""
    out = copy.deepcopy(config)
    for key in ("scrape_interval", "evaluation_interval"):
        out["global"][key] = interval
    for job in out["scrape_configs"]:
        job["scrape_interval"] = interval
        if "scrape_timeout" in job:
            job["scrape_timeout"] = interval
        for static in job.get("static_configs", []):
            static["targets"] = [targets[t] for t in static["targets"]]
    return out


def changed_paths(a, b, path: tuple = ()) -> set[tuple]:
    """Paths of the leaves (or lists) in which two parsed YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set().union(*(changed_paths(a.get(k), b.get(k), (*path, k)) for k in a.keys() | b.keys()))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and path[-1:] != ("targets",):
        return set().union(set(), *(changed_paths(x, y, (*path, i)) for i, (x, y) in enumerate(zip(a, b, strict=True))))
    return set() if a == b else {path}


@contextlib.contextmanager
def prometheus_process(binary: str, workdir: Path, port: int) -> Iterator[str]:
    """``prometheus`` on 127.0.0.1:``port`` with ``workdir/prometheus.yml`` and its own storage; yields its URL."""
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: proc.poll() is not None or _answers(url + "/-/ready"), timeout=60, interval=0.1)
            assert proc.poll() is None and _answers(url + "/-/ready"), log_path.read_text()
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Prometheus:
    """Prometheus's HTTP API; ``series`` evaluates over the load's time range, as a dashboard panel does."""

    url: str
    start: float = 0.0

    def api(self, path: str, **params) -> dict | list:
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def series(self, expr: str) -> list[dict]:
        """The series of a range query with at least one finite value (what a panel draws), as
        ``{"metric": labels, "values": [finite values]}``; NaN (e.g. a quantile of no observations) is no data."""
        data = self.api("query_range", query=expr, start=self.start, end=time.time(), step=INTERVAL_S)
        out = []
        for s in data["result"]:
            values = [float(v) for _, v in s["values"] if math.isfinite(float(v))]
            if values:
                out.append({"metric": s["metric"], "values": values})
        return out


# ---------------------------------------------------------------- the queries: dashboards and rules

# Grafana's $__rate_interval: max($__interval + scrape interval, 4 * scrape interval), with the test's scrapes.
RATE_INTERVAL = f"{4 * INTERVAL_S}s"
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def panel_targets() -> list[tuple[dict, dict, dict]]:
    """(dashboard, panel, target) for every query of every dashboard panel."""
    return [(board, p, t) for board in dashboards().values() for p in iter_panels(board["panels"])
            for t in p.get("targets", [])]


def variable_settings(board: dict, model: str, panel_type: str = "timeseries") -> dict[str, dict[str, str]]:
    """The dashboard's variables as Grafana substitutes them into a regex matcher: "All" (each variable's
    allValue), real values (the served model and a method pair the load sends), one real method (prefill; decode
    at All: each phase must follow its own variable) and, for single-number panels, a pair that had no errors
    (0 is a number; "No data" would hide whether anything was measured)."""
    every = {v["name"]: v["allValue"] for v in board["templating"]["list"]}
    settings = {"All": every, "real values": {"model": model, **REAL_METHODS},
                "one method": {**every, "model": model, "prefill_method": REAL_METHODS["prefill_method"]}}
    if panel_type in SINGLE_NUMBER_PANELS:
        settings["no failures"] = {"model": model, **QUIET_METHODS}
    return settings


def grafana_expr(expr: str, values: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


_PHASE_VARIABLE = {"prefill": "prefill_method", "decode": "decode_method"}


def outside_selection(labels: dict[str, str], values: dict[str, str]) -> bool:
    """Whether a series has a method the dashboard's variables do not select (``method`` follows the variable
    of its ``phase``)."""
    checks = [("prefill_method", "prefill_method"), ("decode_method", "decode_method"),
              ("method", _PHASE_VARIABLE.get(labels.get("phase", "")))]
    return any(var and label in labels and not re.fullmatch(values[var], labels[label]) for label, var in checks)


def check_panel(prom: Prometheus, board: dict, panel: dict, target: dict,
                model: str) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """({variable setting: the series the target draws}, {variable setting: what is wrong}). Wrong: no data, a
    legend label the series lack (the legend would show it empty), a series outside the selection."""
    results, gaps = {}, {}
    legend_labels = set(_LEGEND_LABEL.findall(target.get("legendFormat", "")))
    for setting, values in variable_settings(board, model, panel["type"]).items():
        got = results[setting] = prom.series(grafana_expr(target["expr"], values))
        if not got:
            gaps[setting] = "no data"
        for s in got:
            if missing := legend_labels - s["metric"].keys():
                gaps[setting] = f"legend labels {missing} missing from {s['metric']}"
            elif outside_selection(s["metric"], values):
                gaps[setting] = f"{s['metric']} is outside the selection {values}"
    return results, gaps


def summary(series: list[dict]) -> str:
    """E.g. ``4 series, max 0.25`` (for the test's report)."""
    if not series:
        return "no data"
    return f"{len(series)} series, max {max(max(s['values']) for s in series):.4g}"


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[(){}\[\]]|\bor\b')
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)\s*(?=[-+]?\d)")


def condition_parts(expr: str) -> list[str]:
    """The alternatives of an alert condition (split at top-level ``or``), each with ``bool`` added to its
    comparisons with a number: then every input series gives a 0/1 series, so an empty result means that
    the query names something the server does not export, not that the condition is false."""
    parts, depth, start = [], 0, 0
    for m in _TOKEN.finditer(expr):
        token = m.group()
        if token in ("(", "{", "["):
            depth += 1
        elif token in (")", "}", "]"):
            depth -= 1
        elif token == "or" and depth == 0:
            parts.append(expr[start:m.start()])
            start = m.end()
    parts.append(expr[start:])
    return [_COMPARISON.sub(r"\1 bool ", p.strip()) for p in parts]


def test_condition_parts():
    expr = 'sum by (m) (rate(x{s="a or b"}[5m])) > 0\nor\nhistogram_quantile(0.95, sum(rate(y[5m]))) > 5'
    assert condition_parts(expr) == ['sum by (m) (rate(x{s="a or b"}[5m])) > bool 0',
                                     "histogram_quantile(0.95, sum(rate(y[5m]))) > bool 5"]
    assert condition_parts('up{job="j"} == 0') == ['up{job="j"} == bool 0']


def test_config_rewrite_changes_only_targets_and_intervals():
    original = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {"server:8000": "127.0.0.1:1", "localhost:9090": "127.0.0.1:2"}
    changed = changed_paths(original, rewrite_config(original, targets, "1s"))
    assert changed and all(set(path) & REWRITABLE_KEYS for path in changed), changed
    assert changed_paths(original, {**original, "rule_files": ["x.yml"]}) == {("rule_files", 0)}


# ---------------------------------------------------------------- the load

INJECTED = "injected prefill fault (test_deploy_live)"


def inject_prefill_fault(engine) -> None:
    """Requests with ``seed=FAULT_SEED`` fail in prefill, as a real engine fault would (HTTP 500)."""
    prefill = engine.runner.prefill

    def faulty(req, end=None):
        if req.request.sampling.seed == FAULT_SEED:
            raise RuntimeError(INJECTED)
        return prefill(req, end)

    engine.runner.prefill = faulty


def not_injected(record: logging.LogRecord) -> bool:
    """A log filter that drops the engine's tracebacks of the injected faults (and keeps any other)."""
    return not (record.exc_info and str(record.exc_info[1]) == INJECTED)


@dataclass
class Load:
    url: str
    model: str
    statuses: dict[str, list[int]] = field(default_factory=dict)
    first_token_s: list[float] = field(default_factory=list)
    hog_runs: int = 0

    def send(self, what: str, pattern: str = "dense", *, chat: bool = False, stream: bool = False,
             **body) -> int:
        body = {"model": self.model, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": stream,
                "sparse_pattern": pattern, **body}
        if chat:
            body.setdefault("messages", [{"role": "user", "content": "Name a colour."}])
        else:
            body.setdefault("prompt", "The capital of France is")
        path = "/v1/chat/completions" if chat else "/v1/completions"
        r = httpx.post(self.url + path, json=body, timeout=120)
        if r.status_code == 200 and stream:
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        self.statuses.setdefault(what, []).append(r.status_code)
        return r.status_code

    def mixed(self, chat: bool, stream: bool) -> None:
        """Every pattern once (two at a time: within --max-num-seqs, so none is refused)."""
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: self.send(f"{p} chat={chat} stream={stream}", p, chat=chat, stream=stream),
                          PATTERNS))

    def faults(self, count: int) -> None:
        for _ in range(count):
            self.send("injected fault", seed=FAULT_SEED)
        self.send("injected fault", REAL_PATTERN, seed=FAULT_SEED)
        self.send("unknown model", model="no-such-model")
        self.send("invalid pattern", "no_such_method:2")

    def burst(self, size: int = 8) -> None:
        """``size`` requests at once, twice --max-num-seqs + --max-queue: some get 429."""
        barrier = threading.Barrier(size)

        def one(_):
            barrier.wait()
            return self.send("burst", max_tokens=2)

        with ThreadPoolExecutor(size) as pool:
            list(pool.map(one, range(size)))

    def slow_first_tokens(self, waiting: int = 2) -> None:
        """A request of 5 prompt + 315 new tokens, and ``waiting`` ``SLOW_METHOD`` requests sent once it streams,
        whose prompts need nearly the whole pool (19 of its 21 pages per KV head, one more for their next token):
        they wait for it to finish. Their time to first token (to the first streamed chunk, here) goes to
        ``self.first_token_s``."""
        body = {"model": self.model, "prompt": [1000] * 5, "max_tokens": HOG_PROMPT + HOG_NEW - 5, "temperature": 0,
                "ignore_eos": True, "stream": True}

        def waiter(_):
            sent = time.monotonic()
            with httpx.stream("POST", self.url + "/v1/completions", timeout=120, json={
                    "model": self.model, "prompt": [1000] * WAITER_PROMPT, "max_tokens": 2, "temperature": 0,
                    "ignore_eos": True, "stream": True, "sparse_pattern": SLOW_METHOD}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                self.first_token_s.append(time.monotonic() - sent)
                for _ in lines:
                    pass

        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=300) as blocker:
            assert blocker.status_code == 200
            lines = blocker.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it runs (and holds the pool)
            with ThreadPoolExecutor(waiting) as pool:
                futures = [pool.submit(waiter, i) for i in range(waiting)]
                for _ in lines:
                    pass
                for f in futures:
                    f.result()

    def kv_pressure(self, prom: Prometheus, max_runs: int = 4, bursts_after: int = 5) -> None:
        """The long request, alone in the pool (the waiting queue is empty), until Prometheus has seen it; then
        bursts of short dense requests (these also keep its TTFT a small share of dense prefills)."""
        for _ in range(max_runs):
            r = httpx.post(self.url + "/v1/completions", timeout=120, json={
                "model": self.model, "prompt": [1000] * HOG_PROMPT, "max_tokens": HOG_NEW, "temperature": 0,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert (r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"]) == (HOG_PROMPT,
                                                                                                    HOG_NEW)
            self.hog_runs += 1
            for _ in range(bursts_after):
                self.burst()
            if prom.api("query", query='max_over_time(ALERTS{alertname="SparseServeKVCacheNearlyFull"}[5m])')[
                    "result"]:
                return


# ---------------------------------------------------------------- the stack

@dataclass
class Stack:
    prom: Prometheus
    load: Load
    config: dict
    original: dict
    workdir: Path
    wall_s: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    binary = shutil.which("prometheus")
    require(binary is not None, "prometheus not installed (Debian package 'prometheus'; .ci/run installs it)")
    t0 = time.monotonic()
    settings = settings_from_args(build_parser().parse_args(SERVER_FLAGS))
    engine_log = logging.getLogger("sparse_serve.engine")
    engine_log.addFilter(not_injected)
    with serve_engine(settings) as srv, contextlib.ExitStack() as cleanup:
        cleanup.callback(engine_log.removeFilter, not_injected)
        assert srv.engine.pool.num_pages == POOL_PAGES  # the KV arithmetic above holds for this model
        inject_prefill_fault(srv.engine)
        workdir = tmp_path_factory.mktemp("prometheus")
        port = free_port()
        original = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        targets = {"server:8000": f"127.0.0.1:{srv.port}", "localhost:9090": f"127.0.0.1:{port}"}
        config = rewrite_config(original, targets, f"{INTERVAL_S}s")
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        for rule_file in config["rule_files"]:
            shutil.copyfile(PROMETHEUS_DIR / rule_file, workdir / rule_file)
        with prometheus_process(binary, workdir, port) as url:
            prom = Prometheus(url, start=time.time())
            assert wait_until(lambda: [r["value"][1] for r in prom.api("query", query='up{job="sparse-serve"}')[
                "result"]] == ["1"], timeout=30, interval=0.2), "Prometheus never scraped the server"
            model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
            load = Load(srv.url, model)
            # Three rounds, seconds apart, so that errors and rejections grow over several scrapes (rate()
            # sees only increases after a series' first sample).
            for chat, stream in ((False, False), (True, True), (False, True)):
                load.mixed(chat, stream)
                load.faults(4)
                load.burst()
            load.slow_first_tokens()
            load.kv_pressure(prom)
            time.sleep(3 * INTERVAL_S)  # the last scrape and rule evaluation
            yield Stack(prom, load, config, original, workdir, time.monotonic() - t0)


# ---------------------------------------------------------------- the checks

def test_the_prometheus_config_is_the_deploy_one_but_for_targets_and_intervals(stack):
    changed = changed_paths(stack.original, stack.config)
    assert changed and all(set(path) & REWRITABLE_KEYS for path in changed), changed
    for rule_file in stack.config["rule_files"]:
        assert (stack.workdir / rule_file).read_text() == (PROMETHEUS_DIR / rule_file).read_text()
    targets = stack.prom.api("targets")["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {"sparse-serve": "up", "prometheus": "up"}


def test_the_load_was_what_it_was_designed_to_be(stack):
    statuses = stack.load.statuses
    assert all(set(codes) == {200} for what, codes in statuses.items() if "=" in what), statuses
    assert set(statuses["injected fault"]) == {500} and set(statuses["unknown model"]) == {404}
    assert set(statuses["invalid pattern"]) == {400}
    assert 429 in statuses["burst"] and set(statuses["burst"]) == {200, 429}
    # The waiting requests' first tokens came after the SLO (else the long request was too short on this machine).
    assert len(stack.load.first_token_s) == 2 and min(stack.load.first_token_s) > TTFT_SLO_S, stack.load.first_token_s
    assert stack.wall_s < 180, f"server start, load and scrapes took {stack.wall_s:.0f} s (CI time is short)"
    print({what: sorted(codes) for what, codes in statuses.items()}, "first tokens after", stack.load.first_token_s,
          "s; long-prompt runs", stack.load.hog_runs, f"; {stack.wall_s:.0f} s")


def test_every_dashboard_panel_target_returns_data(stack):
    problems = {}
    for board, panel, target in panel_targets():
        results, gaps = check_panel(stack.prom, board, panel, target, stack.load.model)
        where = f"{panel['title']} [{target['refId']}]"
        print(where, "|", "; ".join(f"{setting}: {summary(got)}" for setting, got in results.items()))
        if gaps:
            problems[where] = gaps
    assert not problems, problems


def test_dashboard_variables_list_the_served_model_and_every_method(stack):
    expected = {"model": {stack.load.model}, "prefill_method": set(PREFILL_METHODS),
                "decode_method": set(DECODE_METHODS)}
    for board in dashboards().values():
        for variable in board["templating"]["list"]:
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            selector = grafana_expr(m.group(1), variable_settings(board, stack.load.model)["real values"])
            values = stack.prom.api(f"label/{m.group(2)}/values", **{"match[]": selector}, start=stack.prom.start,
                                    end=time.time())
            assert expected[variable["name"]] <= set(values), (variable["name"], values)


def test_designed_alerts_reach_pending_and_the_others_stay_inactive(stack):
    groups = stack.prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} == {r.get("alert") or r.get("record") for r in alert_rules()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    states: dict[str, set[str]] = {}
    for s in stack.prom.series('ALERTS{alertstate=~"pending|firing"}'):
        states.setdefault(s["metric"]["alertname"], set()).add(s["metric"]["alertstate"])
    for rule in alert_rules():
        print(rule.get("alert") or rule.get("record"), "|", sorted(states.get(rule.get("alert"), {"inactive"})))
    reached = set(states)
    slow = stack.prom.series('ALERTS{alertname="SparseServeTTFTSLOBreached"}')
    assert SLOW_METHOD in {s["metric"]["prefill_method"] for s in slow}
    assert reached == DESIGNED_TO_FIRE, f"reached {reached}, designed {DESIGNED_TO_FIRE}"
    assert stack.load.hog_runs >= 1


def test_every_rule_expression_returns_data(stack):
    """Each alternative of each alert condition (with bool comparisons) and each recording rule returns data, so
    an alert that stayed inactive did so because its condition was false, not because it names nothing."""
    for rule in alert_rules():
        if "record" in rule:
            assert stack.prom.series(rule["record"]) and stack.prom.series(rule["expr"]), rule["record"]
            continue
        for part in condition_parts(rule["expr"]):
            got = stack.prom.series(part)
            print(rule["alert"], "|", part.replace("\n", " "), "|", summary(got))
            assert got, f"{rule['alert']}: no data for {part}"
            assert all(set(s["values"]) <= {0.0, 1.0} for s in got)


def test_a_query_naming_what_the_server_does_not_export_is_reported(stack):
    """The machinery above catches the mistakes it is for: a broken copy of a panel target and of an alert."""
    board, panel, target = next(t for t in panel_targets() if t[1]["title"].startswith("Time to first token"))

    def gaps(expr: str) -> dict[str, str]:
        return check_panel(stack.prom, board, panel, {**target, "expr": expr}, stack.load.model)[1]

    assert not gaps(target["expr"])
    broken = target["expr"].replace("prefill_method=~", "prefill_mode=~")
    assert broken != target["expr"]
    # prefill_mode=~".*" matches the series that lack the label, so only a real value shows the mistake.
    assert gaps(broken) == {"real values": "no data", "one method": "no data"}
    assert gaps(target["expr"].replace("time_to_first_token", "time_to_first_tokens")) == {
        "All": "no data", "real values": "no data", "one method": "no data"}
    assert "legend labels" in gaps(target["expr"].replace("by (le, prefill_method)", "by (le, prefill)"))["All"]

    # The dashboard's earlier forms, fixed after this test found them: a ratio without errors was "No data", and
    # method=~"$prefill_method|$decode_method" let either variable at "All" select every method of both phases.
    board, panel, ratio = next(t for t in panel_targets() if t[1]["title"] == "Server error ratio")
    assert " or vector(0))" in ratio["expr"]
    before = {**ratio, "expr": ratio["expr"].replace(" or vector(0))", "").replace("(sum(", "sum(", 1)}
    assert check_panel(stack.prom, board, panel, before, stack.load.model)[1] == {"no failures": "no data"}
    board, panel, flops = next(t for t in panel_targets() if t[1]["title"].startswith("Attention FLOPs saved"))
    before = {**flops, "expr": 'sum by (phase, method) (rate(sparse_serve_attention_flops_total{model=~"$model", '
              'method=~"$prefill_method|$decode_method", kind="actual"}[$__rate_interval]))'}
    assert "outside the selection" in check_panel(stack.prom, board, panel, before, stack.load.model)[1]["one method"]

    kv = next(r for r in alert_rules() if r.get("alert") == "SparseServeKVCacheNearlyFull")
    assert all(stack.prom.series(p) for p in condition_parts(kv["expr"]))
    broken_rule = kv["expr"].replace("kv_cache_usage_ratio", "kv_cache_usage_percent")
    assert not any(stack.prom.series(p) for p in condition_parts(broken_rule))

