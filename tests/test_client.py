"""Unit tests of the client library, the eval runner's pieces and the load tester's pieces (no server:
httpx.MockTransport stands in for HTTP)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time

import httpx
import pytest

from clients.client import (
    APIConnectionError,
    AsyncSparseClient,
    BadRequestError,
    HttpTokenCounter,
    RateLimitError,
    ServiceUnavailableError,
    SparseClient,
    SSEDecoder,
    StreamError,
    parse_retry_after,
)
from clients.eval_runner import ResultStore, load_records
from clients.loadtest import Distribution, PatternPicker, parse_mix
from clients.patterns import expand_patterns, method_label, nominal_ratio, split_patterns

SPARSE = {
    "prefill": {"method": "vertical_slash", "target_compression_ratio": 2.0, "achieved_compression_ratio": 1.8,
                "attention_flops": 50.0, "dense_attention_flops": 90.0, "indexing_flops": 3.0},
    "decode": {"method": "quest", "target_compression_ratio": 2.0, "achieved_compression_ratio": 1.9,
               "kv_bytes_read": 10.0, "dense_kv_bytes_read": 19.0, "metadata_bytes_read": 1.0,
               "kv_cache_tokens": 40},
    "model_flops": 1000.0, "dense_model_flops": 1100.0,
}
CHAT = {"id": "c1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "<answer>4</answer>"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}, "sparse": SPARSE}


def _sse(events: list) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


STREAM_EVENTS = [
    {"id": "s1", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"id": "s1", "model": "m", "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"id": "s1", "model": "m", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "length"}]},
    {"id": "s1", "model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                        "total_tokens": 5}, "sparse": SPARSE},
    "[DONE]",
]


class Script:
    """A MockTransport handler answering from a list of (status, headers, body) and recording requests."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, headers, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        ctype = "text/event-stream" if isinstance(body, bytes) else "application/json"
        return httpx.Response(status, headers={"content-type": ctype, **headers}, content=content)


def busy(retry_after: str | None = "2", status: int = 429):
    h = {"retry-after": retry_after} if retry_after is not None else {}
    return (status, h, {"error": {"message": "queue full", "type": "rate_limit_error", "param": None,
                                  "code": "queue_full"}})


def make(script: Script, **kw) -> tuple[SparseClient, list[float]]:
    sleeps: list[float] = []
    c = SparseClient("http://test", transport=httpx.MockTransport(script), sleep=sleeps.append, **kw)
    return c, sleeps


# ================================================================================================ retries
def test_429_retry_after_is_honoured():
    script = Script(busy("2"), busy("3"), (200, {}, CHAT))
    c, sleeps = make(script, max_retries=4)
    r = c.chat("2+2?", max_tokens=8)
    assert sleeps == [2.0, 3.0] and len(script.requests) == 3 and r.attempts == 3
    assert r.text == "<answer>4</answer>"


def test_retry_after_http_date_and_cap():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 <= parse_retry_after(when) <= 31
    assert parse_retry_after("garbage") is None and parse_retry_after(None) is None
    assert parse_retry_after("-5") == 0.0
    script = Script(busy("1000"), (200, {}, CHAT))
    c, sleeps = make(script, max_retry_after=7.0)
    c.chat("x")
    assert sleeps == [7.0]


def test_retries_are_bounded_and_raise_with_details():
    script = Script(busy("1"))
    c, sleeps = make(script, max_retries=2)
    with pytest.raises(RateLimitError) as ei:
        c.completions("x", max_tokens=4)
    assert len(script.requests) == 3 and sleeps == [1.0, 1.0]
    e = ei.value
    assert e.status == 429 and e.code == "queue_full" and e.retry_after == 1.0 and "queue full" in str(e)


def test_503_without_retry_after_backs_off_exponentially():
    script = Script(busy(None, 503), busy(None, 503), busy(None, 503), (200, {}, CHAT))
    c, sleeps = make(script, backoff_base=0.5)
    c.chat("x")
    assert len(sleeps) == 3
    for k, s in enumerate(sleeps):
        assert 0.5 * 2**k <= s <= 0.5 * 2**k * 1.1
    script = Script(busy(None, 503))
    c, _ = make(script, max_retries=0)
    with pytest.raises(ServiceUnavailableError):
        c.chat("x")
    assert len(script.requests) == 1


def test_400_is_not_retried_and_names_the_param():
    err = {"error": {"message": "unknown method 'foo'", "type": "invalid_request_error", "param": "sparse_pattern",
                     "code": None}}
    script = Script((400, {}, err))
    c, sleeps = make(script)
    with pytest.raises(BadRequestError) as ei:
        c.chat("x", sparse_pattern="foo")
    assert ei.value.status == 400 and ei.value.param == "sparse_pattern" and sleeps == []
    assert len(script.requests) == 1


def test_real_sleep_waits_retry_after():
    script = Script(busy("0.3"), (200, {}, CHAT))
    c = SparseClient("http://test", transport=httpx.MockTransport(script))
    t0 = time.perf_counter()
    c.chat("x")
    assert time.perf_counter() - t0 >= 0.3


def test_connection_refused_is_retried_then_raised():
    calls = []

    def refuse(request):
        calls.append(request)
        raise httpx.ConnectError("refused", request=request)

    sleeps: list[float] = []
    c = SparseClient("http://test", transport=httpx.MockTransport(refuse), sleep=sleeps.append, max_retries=2)
    with pytest.raises(APIConnectionError):
        c.tokenize("x")
    assert len(calls) == 3 and len(sleeps) == 2


# ============================================================================================ body, auth
def test_auth_header_and_body_fields():
    script = Script((200, {}, CHAT))
    c, _ = make(script, api_key="sekret", model="m")
    r = c.chat([{"role": "user", "content": "hi"}], max_tokens=8, temperature=0,
               sparse_pattern="vertical_slash:2+quest:2", compression_ratio=4)
    req = script.requests[0]
    assert req.headers["authorization"] == "Bearer sekret"
    assert req.url.path == "/v1/chat/completions"
    body = json.loads(req.content)
    assert body == {"messages": [{"role": "user", "content": "hi"}], "model": "m", "max_tokens": 8,
                    "temperature": 0, "sparse_pattern": "vertical_slash:2+quest:2", "compression_ratio": 4}
    assert r.usage.prompt_tokens == 12 and r.finish_reason == "stop"
    assert r.sparse.prefill.achieved_compression_ratio == 1.8 and r.sparse.decode.kv_cache_tokens == 40
    assert r.sparse.pattern == "vertical_slash:2+quest:2" and r.sparse.dense_model_flops == 1100.0
    # no key: no header; a /v1 suffix on the URL is tolerated
    script = Script((200, {}, CHAT))
    c = SparseClient("http://test/v1/", transport=httpx.MockTransport(script))
    c.completions("x")
    assert "authorization" not in script.requests[0].headers
    assert script.requests[0].url.path == "/v1/completions"


def test_tokenize_detokenize_and_counter_cache():
    script = Script((200, {}, {"tokens": [1, 2, 3], "count": 3, "max_model_len": 8192}))
    c, _ = make(script)
    counter = HttpTokenCounter(c)
    assert counter.count("hello") == 3 and counter.count("hello") == 3
    assert len(script.requests) == 1 and counter.max_model_len == 8192
    body = json.loads(script.requests[0].content)
    assert body == {"messages": [{"role": "user", "content": "hello"}], "add_generation_prompt": True}
    counter.count("other")
    assert len(script.requests) == 2
    script2 = Script((200, {}, {"prompt": "hi there"}))
    c2, _ = make(script2)
    assert c2.detokenize([5, 6]) == "hi there"
    assert json.loads(script2.requests[0].content) == {"tokens": [5, 6]}


# ============================================================================================== streaming
def test_sse_decoder_rules():
    d = SSEDecoder()
    lines = [": comment", "event: message", "data: {\"a\":", "data:1}", "", "", "data: [DONE]"]
    assert list(d.iter_events(lines)) == ['{"a":\n1}', "[DONE]"]


def test_chat_stream_parse_and_collect():
    body = _sse(STREAM_EVENTS)
    script = Script((200, {}, body))
    c, _ = make(script)
    chunks = list(c.chat_stream("hi", max_tokens=2))
    assert "".join(ch.text for ch in chunks) == "Hello"
    assert chunks[-1].usage.completion_tokens == 2 and chunks[-1].sparse.decode.method == "quest"
    sent = json.loads(script.requests[0].content)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    res = c.collect(c.chat_stream("hi"))
    assert res.text == "Hello" and res.finish_reason == "length" and res.usage.total_tokens == 5
    assert res.sparse.prefill.method == "vertical_slash" and res.ttft is not None


def test_stream_split_across_network_chunks():
    body = _sse(STREAM_EVENTS)

    def handler(request):
        pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(pieces))

    c = SparseClient("http://test", transport=httpx.MockTransport(handler))
    assert c.collect(c.chat_stream("hi")).text == "Hello"


def test_stream_error_event_and_retry_before_start():
    events = STREAM_EVENTS[:2] + [{"error": {"message": "boom", "type": "server_error", "param": None,
                                             "code": None}}, "[DONE]"]
    script = Script(busy("1.5"), (200, {}, _sse(events)))
    c, sleeps = make(script)
    got = []
    with pytest.raises(StreamError) as ei:
        for ch in c.chat_stream("hi"):
            got.append(ch.text)
    assert sleeps == [1.5] and "boom" in str(ei.value) and got == ["", "Hel"]


@pytest.mark.parametrize("tail", [b"data: {not json\n\ndata: [DONE]\n\n", b"data: {not json"],
                         ids=["mid-stream", "last-event-without-blank-line"])
def test_malformed_stream_event_is_stream_error_in_both_clients(tail):
    body = _sse(STREAM_EVENTS[:2]) + tail

    def sync() -> list[str]:
        c, _ = make(Script((200, {}, body)))
        return [ch.text for ch in c.chat_stream("hi")]

    async def collect_async() -> list[str]:
        async with AsyncSparseClient("http://test", transport=httpx.MockTransport(Script((200, {}, body)))) as c:
            return [ch.text async for ch in c.chat_stream("hi")]

    for run in (sync, lambda: asyncio.run(collect_async())):
        with pytest.raises(StreamError, match="malformed stream event"):
            run()


def test_completions_stream_text_field():
    events = [{"id": "x", "choices": [{"index": 0, "text": "ab", "finish_reason": None}]},
              {"id": "x", "choices": [{"index": 0, "text": "c", "finish_reason": "stop"}]}, "[DONE]"]
    c, _ = make(Script((200, {}, _sse(events))))
    assert c.collect(c.completions_stream("p", include_usage=False)).text == "abc"


def test_async_client_stream_retry_and_auth():
    script = Script(busy("0.5"), (200, {}, _sse(STREAM_EVENTS)))
    sleeps: list[float] = []

    async def fake_sleep(s):
        sleeps.append(s)

    async def go():
        async with AsyncSparseClient("http://test", api_key="k", transport=httpx.MockTransport(script),
                                     sleep=fake_sleep) as c:
            res = await c.collect(c.chat_stream("hi", max_tokens=2))
            script.answers = [busy("2"), (200, {}, CHAT)]
            r2 = await c.chat("hi")
            return res, r2

    res, r2 = asyncio.run(go())
    assert res.text == "Hello" and res.usage.completion_tokens == 2 and sleeps == [0.5, 2.0]
    assert r2.sparse.prefill.attention_flops == 50.0
    assert all(r.headers["authorization"] == "Bearer k" for r in script.requests)


# =============================================================================================== patterns
def test_pattern_expansion():
    pats = expand_patterns(split_patterns("dense, vertical_slash,quest,vertical_slash:2+quest:2,dense+snapkv"),
                           [2, 5])
    assert pats == ["dense", "vertical_slash:2", "vertical_slash:5", "quest:2", "quest:5", "vertical_slash:2+quest:2",
                    "dense+snapkv:2", "dense+snapkv:5"]
    assert expand_patterns(["vertical_slash+quest"], [10]) == ["vertical_slash:10+quest:10"]
    assert expand_patterns(["quest"], []) == ["quest"]
    assert expand_patterns(["dense", "auto", "auto:0.05"], [2, 4]) == ["dense", "auto", "auto:0.05"]  # never crossed
    assert method_label("vertical_slash:8+quest:8") == "vertical_slash+quest" and method_label("dense") == "dense"
    assert method_label("dense+quest:4") == "quest"
    assert nominal_ratio("vertical_slash:8+quest:20") == 20 and nominal_ratio("dense") == 1.0


# ============================================================================================ result store
def test_result_store_repairs_truncated_tail(tmp_path):
    path = tmp_path / "results.jsonl"
    recs = [{"task": "t", "length": 1024, "pattern": "dense", "seed": 0, "index": i, "score": 1.0} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"task": "t", "length": 10')
    store = ResultStore(path)
    assert len(store) == 3 and store.truncated_bytes > 0
    store.append(dict(recs[0], index=3))
    store.append(dict(recs[0], index=3))  # duplicate key: ignored
    store.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    assert [r["index"] for r in load_records(tmp_path)] == [0, 1, 2, 3]


# ======================================================================================= scaling-law fit
def _synthetic_law(path, *, sizes=None, noise=0.0, seed=0):
    rng = random.Random(seed)
    a = {"ruler_niah": 0.95, "qa_squad": 0.70, "story_multihop": 0.55}
    b, c, e = -0.06, -0.04, 0.05
    models = sizes or {"m": None}
    with open(path, "w") as fh:
        for model, size in models.items():
            for task, at in a.items():
                for length in (1024, 2048, 4096, 8192, 16384):
                    for method in ("vertical_slash", "quest"):
                        for ratio in (2, 5, 10, 20, 40):
                            for i in range(3):
                                s = at + b * math.log(ratio) + c * math.log(length) + rng.gauss(0, noise)
                                if size:
                                    s += e * math.log(size)
                                fh.write(json.dumps({
                                    "task": task, "length": length, "seed": 0, "index": i,
                                    "pattern": f"{method}:{ratio}", "method": method, "ratio": float(ratio),
                                    "model": model, "model_size": size, "score": s, "parsable": True}) + "\n")
            for task in a:  # dense references (left out of the fit by default)
                fh.write(json.dumps({"task": task, "length": 1024, "seed": 0, "index": 0, "pattern": "dense",
                                     "method": "dense", "ratio": 1.0, "model": model, "score": 1.0}) + "\n")
    return a, b, c, e


def test_fit_recovers_known_law(tmp_path, capsys):
    from clients.eval_cli import main

    path = tmp_path / "results.jsonl"
    a, b, c, _ = _synthetic_law(path, noise=0.01)
    assert main(["fit", str(tmp_path), "--json"]) == 0
    fits = json.loads(capsys.readouterr().out)
    pooled = fits[0]
    assert pooled["method"] == "all" and {f["method"] for f in fits} == {"all", "vertical_slash", "quest"}
    assert abs(pooled["coefficients"]["b"] - b) <= 0.05 * abs(b)
    assert abs(pooled["coefficients"]["c"] - c) <= 0.05 * abs(c)
    for t, at in a.items():
        assert abs(pooled["task_intercepts"][t] - at) <= 0.05 * abs(at)
    assert pooled["r2"] > 0.9
    held = {h["axis"]: h for h in pooled["heldout"]}
    assert set(held) == {"compression", "length"} and all(h["mae"] < 0.02 for h in held.values())
    assert (tmp_path / "fit.json").exists()


def test_fit_with_model_sizes(tmp_path, capsys):
    from clients.eval_cli import main

    path = tmp_path / "r.jsonl"
    _, b, c, e = _synthetic_law(path, sizes={"small": None, "mid": None, "big": None})
    # sizes given on the command line (the records carry none)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    true = {"small": 135e6, "mid": 360e6, "big": 1.7e9}
    with open(path, "w") as fh:
        for r in lines:
            if r["method"] != "dense":
                r["score"] += e * math.log(true[r["model"]])
            fh.write(json.dumps(r) + "\n")
    assert main(["fit", "--results", str(path), "--model-sizes", "small=135M", "mid=360M", "big=1.7B",
                 "--method", "quest"]) == 0
    out = capsys.readouterr().out
    coef = {ln.split()[0]: float(ln.split("=")[1]) for ln in out.splitlines()
            if ln.strip()[:2] in ("b ", "c ", "e ")}
    assert abs(coef["b"] - b) < 0.05 * abs(b) and abs(coef["c"] - c) < 0.05 * abs(c)
    assert abs(coef["e"] - e) < 0.05 * abs(e)
    assert "held-out largest model_size" in out


def test_fit_says_n_a_for_a_coefficient_it_cannot_determine(tmp_path, capsys):
    from clients.eval_cli import main

    path = tmp_path / "results.jsonl"
    _synthetic_law(path)
    one_length = [r for r in map(json.loads, path.read_text().splitlines()) if r["length"] == 4096]
    path.write_text("".join(json.dumps(r) + "\n" for r in one_length))
    assert main(["fit", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "c (length) = n/a" in out and "+0.00000" not in out
    assert float(next(ln for ln in out.splitlines() if "b (compression)" in ln).split("=")[1]) < 0


def test_eval_tasks_all_runs_without_qa_data_and_named_qa_tasks_name_the_flag(tmp_path, monkeypatch, capsys):
    from clients.eval_cli import _tasks, _tasks_with_data, main
    from clients.tasks import QA_TASKS, TASK_NAMES

    monkeypatch.delenv("SPARSE_SERVE_QA_DATA_DIR", raising=False)
    assert _tasks_with_data(_tasks("all"), None) == [t for t in TASK_NAMES if t not in QA_TASKS]
    assert "skipping qa_squad, qa_quality, qa_toefl" in capsys.readouterr().err
    assert _tasks_with_data(_tasks("all"), "data/qa") == list(TASK_NAMES)
    # named explicitly: an error before anything is sent, naming the flag
    assert main(["run", "--url", "http://127.0.0.1:9", "--tasks", "qa_squad,ruler_niah", "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--qa-data" in err and "dev-v2.0.json" in err and "qa_data_dir" not in err


@pytest.mark.parametrize("prog", ["sparse-serve", "sparse-loadtest", "sparse-eval run"])
def test_help_shows_defaults_once_and_no_secret(prog, monkeypatch, capsys):
    import server.cli
    from clients import eval_cli, loadtest

    monkeypatch.setenv("SPARSE_SERVE_API_KEY", "s3cret-key")
    parser = {"sparse-serve": server.cli.build_parser, "sparse-loadtest": loadtest.build_parser,
              "sparse-eval run": eval_cli.build_parser}[prog]()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"] if prog == "sparse-eval run" else ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "s3cret-key" not in text
    assert "(default: 600.0)" in text if prog != "sparse-serve" else "(default: 30.0)" in text
    for option_help in text.split(" --")[1:]:
        assert option_help.count("(default") <= 1, option_help


# ================================================================================================ loadtest
def test_pattern_mix_and_picker_exact_counts():
    mix = parse_mix("dense=0.5, vertical_slash:10+quest:20=0.25,quest:4")
    assert mix == [("dense", 0.5), ("vertical_slash:10+quest:20", 0.25), ("quest:4", 1.0)]
    picker = PatternPicker(parse_mix("dense=0.5,vertical_slash:10+quest:20=0.5"))
    picks = [picker.next() for _ in range(101)]
    assert abs(picks.count("dense") - picks.count("vertical_slash:10+quest:20")) <= 1
    picker = PatternPicker([("a", 3), ("b", 1)])
    picks = [picker.next() for _ in range(40)]
    assert picks.count("a") == 30 and picks[:4].count("a") == 3
    with pytest.raises(ValueError):
        parse_mix("dense=x")


def test_size_distributions():
    rng = random.Random(0)
    assert Distribution.parse("128").sample(rng) == 128
    u = Distribution.parse("uniform:100:300")
    xs = [u.sample(rng) for _ in range(500)]
    assert 100 <= min(xs) and max(xs) <= 300 and 180 < sum(xs) / len(xs) < 220
    n = Distribution.parse("normal:200:20")
    assert 190 < sum(n.sample(rng) for _ in range(500)) / 500 < 210
    assert str(u) == "uniform:100:300"
    for bad in ("uniform:3:1", "foo:1", "-4", "normal:1"):
        with pytest.raises(ValueError):
            Distribution.parse(bad)


# ======================================================================== runner and report (mock server)
class FakeServer:
    """/v1/models, /tokenize (4 characters per token) and a chat endpoint that answers '<answer>A</answer>' with
    dense and something unparsable otherwise, with a sparse report that echoes the decode pattern."""

    def __init__(self):
        self.chats = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 4096}]})
        if path == "/tokenize":
            text = "".join(m["content"] for m in body["messages"]) if "messages" in body else body["prompt"]
            n = len(text) // 4 + 8
            return httpx.Response(200, json={"tokens": [0] * n, "count": n, "max_model_len": 4096})
        if path == "/v1/chat/completions":
            self.chats += 1
            pat = body.get("sparse_pattern", "dense")
            ratio = float(pat.split(":")[1]) if ":" in pat else 1.0
            method = pat.split(":")[0]
            sparse = {"prefill": {"method": "dense", "target_compression_ratio": 1.0,
                                  "achieved_compression_ratio": 1.0, "attention_flops": 10.0,
                                  "dense_attention_flops": 10.0, "indexing_flops": 0.0},
                      "decode": {"method": method, "target_compression_ratio": ratio,
                                 "achieved_compression_ratio": ratio * 0.9, "kv_bytes_read": 10.0 / ratio,
                                 "dense_kv_bytes_read": 10.0, "metadata_bytes_read": 0.0, "kv_cache_tokens": 5},
                      "model_flops": 100.0, "dense_model_flops": 110.0}
            answer = "<answer>A</answer>" if method == "dense" else "no idea"
            return httpx.Response(200, json={
                "id": "c", "model": "fake", "choices": [{"index": 0, "message": {"content": answer},
                                                         "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 3, "total_tokens": 1003}, "sparse": sparse})
        return httpx.Response(404, json={"error": {"message": "no route", "type": "not_found_error"}})


def test_runner_resume_and_report_with_mock_server(tmp_path):
    from pathlib import Path

    from clients.eval_report import report
    from clients.eval_runner import EvalConfig, run_eval

    fake = FakeServer()
    client = SparseClient("http://test", transport=httpx.MockTransport(fake))
    qa = Path(__file__).parent / "fixtures" / "qa"
    cfg = EvalConfig(url="http://test", tasks=["ruler_niah", "qa_quality"], lengths=[1024], samples=2,
                     patterns=["dense", "quest:2", "quest:4"], out_dir=str(tmp_path), max_tokens=16, qa_data=str(qa),
                     concurrency=2)
    s = run_eval(cfg, client=client, progress=False, log=lambda m: None)
    assert (s.total, s.completed, s.skipped, s.errors) == (12, 12, 0, 0) and fake.chats == 12
    recs = load_records(tmp_path)
    assert len(recs) == 12
    r = next(x for x in recs if x["pattern"] == "quest:4")
    assert r["method"] == "quest" and r["ratio"] == 4 and r["achieved_decode_ratio"] == pytest.approx(3.6)
    assert r["model"] == "fake" and 972 <= r["prompt_tokens"] <= 1024 and r["max_tokens"] == 16
    assert r["kv_bytes_read"] == 2.5 and r["dense_model_flops"] == 110.0 and r["parsable"] is False
    # both scores and both parsable flags are kept, whichever the run reports as `score`
    d = next(x for x in recs if x["pattern"] == "dense" and x["task"] == "qa_quality")
    assert d["scoring"] == "strict" and {d["parsable_strict"], d["parsable_lenient"]} == {True}
    assert d["score"] == d["score_strict"] and "score_lenient" in d and r["parsable_lenient"] is False
    # drop two records and truncate the last line as a killed run would leave it: only those two are redone
    lines = (tmp_path / "results.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "results.jsonl").write_text("".join(lines[:10]) + lines[10][:25])
    s2 = run_eval(cfg, client=client, progress=False, log=lambda m: None)
    assert (s2.completed, s2.skipped) == (2, 10) and fake.chats == 14
    assert len(load_records(tmp_path)) == 12 and len((tmp_path / "results.jsonl").read_text().splitlines()) == 12

    text, rows, files = report(tmp_path)
    assert "ruler_niah" in text and "quest" in text and "KV_read_saved" in text
    assert (tmp_path / "summary.csv").exists()
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"ruler_niah.png", "qa_quality.png", "all.png"}
    row = next(x for x in rows if x.task == "ruler_niah" and x.method == "quest" and x.ratio == 4 and x.length == "all")
    assert row.n == 2 and row.kv_bytes_saved == pytest.approx(0.75) and row.unparsable == 2
    assert row.unparsable_share == 1.0 and "2 (100.0%)" in text
    dense = next(x for x in rows if x.task == "qa_quality" and x.method == "dense" and x.length == "all")
    # Wilson 95% for 0 of 2 correct... or 2 of 2: never the zero-width interval a stderr of 0 gives
    assert dense.unparsable == 0 and dense.ci_high - dense.ci_low > 0.3
    _, lenient_rows, _ = report(tmp_path, scoring="lenient", plots=False)
    assert all(x.n == y.n for x, y in zip(rows, lenient_rows, strict=True))
