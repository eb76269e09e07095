"""The HTTP layer over a real uvicorn server, with a fake engine (fast, deterministic, no model).

Covers the error contract (status + ``param``), SSE framing, disconnect -> abort, the queue limit, auth,
request ids, access logs, body limits, metrics labels, and a schema-driven fuzz run that must find no 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_fuzz import (
    SchemaStrategies,
    hostile_fragments,
    operations,
    pattern_objects,
    pattern_strings,
    surrogate_text,
    with_fragment,
)
from server_harness import FakeEngine, ThreadedServer, metric_samples, parse_sse, wait_until

from server.api import create_app
from server.metrics import METRIC_DEFS
from server.settings import ServerSettings

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv():
    engine = FakeEngine(max_model_len=256, max_num_seqs=4, max_queue=4, token_delay=0.002)
    app = create_app(engine, ServerSettings(api_key=KEY, default_sparse_pattern="snapkv:2", max_body_bytes=64_000,
                                            max_prompt_logprobs_tokens=64))
    with ThreadedServer(app) as s:
        s.engine = engine
        yield s


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
        yield c


def post(http, path, body=None, **kw):
    return http.post(path, json=body, **kw)


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def test_completion_and_usage(http):
    r = post(http, "/v1/completions", {"prompt": "hello", "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "fake-model"
    assert body["choices"][0]["text"] == "hellohe" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    # server default pattern (snapkv:2) applies when nothing is chosen
    assert body["sparse"]["decode"]["method"] == "snapkv" and body["sparse"]["decode"]["target_compression_ratio"] == 2


def test_prompt_forms_echo_stop(http):
    r = post(http, "/v1/completions", {"prompt": [[104, 105], [106]], "max_tokens": 2, "temperature": 0, "echo": True})
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == ["efef", "ggg"]  # ids are bytes + 3; echo + 2 generated
    r = post(http, "/v1/completions", {"prompt": ["abcabc"], "max_tokens": 6, "temperature": 0, "stop": "ca"})
    c = r.json()["choices"][0]
    assert (c["text"], c["finish_reason"]) == ("ab", "stop")


def test_echo_with_logprobs_scores_the_prompt(http):
    """vLLM's shape: the prompt's tokens lead tokens/token_logprobs/top_logprobs (the first null), text_offset
    runs over the echoed text, and the sparse report says the prompt logprobs are this prefill's."""
    body = {"prompt": "abc", "max_tokens": 2, "temperature": 0, "logprobs": 1, "echo": True}
    r = post(http, "/v1/completions", body)
    c = r.json()["choices"][0]
    lp = c["logprobs"]
    assert c["text"] == "abcab" and lp["tokens"] == list("abcab")
    assert lp["token_logprobs"][:3] == [None, -0.1, -0.2] and lp["top_logprobs"][0] is None
    assert lp["top_logprobs"][1] == {"b": -0.1} and len(lp["top_logprobs"][3]) == 1
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert r.json()["sparse"]["prefill"]["prompt_logprobs"] is True
    # max_tokens 0: the prompt alone, nothing generated
    r = post(http, "/v1/completions", {**body, "max_tokens": 0, "logprobs": 2})
    c = r.json()["choices"][0]
    assert (c["text"], c["finish_reason"]) == ("abc", "length") and r.json()["usage"]["completion_tokens"] == 0
    assert c["logprobs"]["tokens"] == list("abc") and c["logprobs"]["top_logprobs"][2] == {"c": -0.2, " ": -5.0}
    # streamed: the same text and logprobs, the echo arriving with its logprobs
    r = post(http, "/v1/completions", {**body, "stream": True})
    chunks = [e["choices"][0] for e in parse_sse(r.text)[:-1] if e["choices"]]
    assert "".join(ch["text"] for ch in chunks) == "abcab"
    assert sum((ch["logprobs"]["tokens"] for ch in chunks if ch["logprobs"]), []) == list("abcab")
    assert chunks[0]["logprobs"]["token_logprobs"][0] is None
    # echo without logprobs and plain logprobs do not carry the marker
    r = post(http, "/v1/completions", {**body, "logprobs": None})
    assert r.json()["choices"][0]["text"] == "abcab" and "prompt_logprobs" not in r.json()["sparse"]["prefill"]


def test_n_and_seeds(http):
    def texts(**kw):
        r = post(http, "/v1/completions", {"prompt": "x", "max_tokens": 12, "n": 3, **kw})
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    seeded = texts(temperature=1.0, seed=7)
    assert len(set(seeded)) == 3 and seeded == texts(temperature=1.0, seed=7)
    assert len(set(texts(temperature=0))) == 1


def test_logprobs_shapes(http):
    r = post(http, "/v1/completions", {"prompt": "ab", "max_tokens": 3, "temperature": 0, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert lp["text_offset"] == [0, 1, 2]
    r = post(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                            "logprobs": True, "top_logprobs": 1})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and len(content[0]["top_logprobs"]) == 1 and "bytes" in content[0]


def test_sparse_choice_precedence(http):
    hdr = {**AUTH, "X-Sparse-Pattern": "quest:4"}
    r = post(http, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers=hdr)
    assert r.json()["sparse"]["decode"]["method"] == "quest"
    r = post(http, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "sparse_pattern": "vertical_slash:8"},
             headers=hdr)
    s = r.json()["sparse"]
    assert s["prefill"]["method"] == "vertical_slash" and s["decode"]["method"] == "dense"
    r = post(http, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "vllm_xargs": {"sparse_pattern": "quest",
                                                                                      "compression_ratio": 6}})
    assert r.json()["sparse"]["decode"]["target_compression_ratio"] == 6


CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "path, body, headers, status, param, code",
    [
        ("/v1/completions", {"prompt": "a", "sparse_pattern": "warp_drive"}, {}, 400, "sparse_pattern", None),
        ("/v1/completions", {"prompt": "a", "sparse_pattern": {"prefill": {"method": "quest"}}}, {}, 400,
         "sparse_pattern.prefill.method", None),
        ("/v1/chat/completions", {"messages": CHAT, "sparse_pattern": "snapkv+quest"}, {}, 400, "sparse_pattern", None),
        ("/v1/completions", {"prompt": "a", "sparse_pattern": "quest", "compression_ratio": 0}, {}, 400,
         "compression_ratio", None),
        ("/v1/completions", {"prompt": "a", "compression_ratio": -1}, {}, 400, "compression_ratio", None),
        ("/v1/completions", {"prompt": "a", "compression_ratio": "abc"}, {}, 400, "compression_ratio", None),
        ("/v1/completions", {"prompt": "a", "sparse_pattern": "quest:NaN"}, {}, 400, "sparse_pattern", None),
        ("/v1/completions", {"prompt": "a"}, {"X-Compression-Ratio": "0"}, 400, "X-Compression-Ratio", None),
        ("/v1/completions", {"prompt": "a"}, {"X-Compression-Ratio": "NaN"}, 400, "X-Compression-Ratio", None),
        ("/v1/completions", {"prompt": "a"}, {"X-Sparse-Pattern": "quest:-1"}, 400, "X-Sparse-Pattern", None),
        ("/v1/completions", {"prompt": "a", "sparse_pattern": {"decode": {"method": "quest", "params": {"pages": 2}}}},
         {}, 400, "sparse_pattern.decode.params.pages", None),
        ("/v1/completions", {"prompt": "a", "vllm_xargs": {"sparse_pattern": "bogus"}}, {}, 400,
         "vllm_xargs.sparse_pattern", None),
        ("/v1/completions", {"prompt": "a" * 250, "max_tokens": 10}, {}, 400, "max_tokens", "context_length_exceeded"),
        ("/v1/completions", {"prompt": "a" * 300, "max_tokens": 1}, {}, 400, "prompt", "context_length_exceeded"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 300}]}, {}, 400, "messages",
         "context_length_exceeded"),
        ("/v1/completions", {"prompt": "a", "stream": "yes"}, {}, 400, "stream", None),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": "true"}, {}, 400, "logprobs", None),
        ("/v1/completions", {"prompt": "a", "sparse_pattern": "quest:1_0"}, {}, 400, "sparse_pattern", None),
        ("/v1/completions", {"prompt": "a"}, {"X-Compression-Ratio": "1_0"}, 400, "X-Compression-Ratio", None),
        ("/v1/completions", {"prompt": "a", "n": 0}, {}, 400, "n", None),
        ("/v1/completions", {"prompt": "a", "n": 17}, {}, 400, "n", None),
        ("/v1/completions", {"prompt": "a", "logprobs": 6}, {}, 400, "logprobs", None),
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 6}, {}, 400, "top_logprobs",
         None),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, {}, 400, "max_tokens", None),
        ("/v1/completions", {"prompt": "a", "temperature": -1}, {}, 400, "temperature", None),
        ("/v1/completions", {"prompt": "a", "presence_penalty": 1}, {}, 400, "presence_penalty", None),
        ("/v1/completions", {"prompt": "a" * 65, "logprobs": 1, "echo": True}, {}, 400, "prompt",
         "prompt_logprobs_too_long"),
        ("/v1/completions", {"prompt": ["a", "a" * 65], "logprobs": 0, "echo": True, "max_tokens": 0}, {}, 400,
         "prompt[1]", "prompt_logprobs_too_long"),
        ("/v1/completions", {"prompt": [1, 2, 99999]}, {}, 400, "prompt", None),
        ("/v1/completions", {"prompt": []}, {}, 400, "prompt", None),
        ("/v1/completions", {"prompt": ""}, {}, 400, "prompt", None),
        ("/v1/completions", {}, {}, 400, "prompt", None),
        ("/v1/chat/completions", {"messages": []}, {}, 400, "messages", None),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "messages[0].role", None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {}, 400,
         "messages[0].content[0].type", None),
        ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, {}, 404, "model", "model_not_found"),
        ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-4"}, {}, 404, "model", "model_not_found"),
        ("/tokenize", {"prompt": "a", "model": "gpt-4"}, {}, 404, "model", None),
        ("/detokenize", {"tokens": [5, 100000]}, {}, 400, "tokens", None),
        ("/v1/nothing", {}, {}, 404, None, None),
    ],
)
def test_invalid_requests(http, path, body, headers, status, param, code):
    r = post(http, path, body, headers={**AUTH, **headers})
    assert_error(r, status, param, code)


def test_malformed_json_and_non_object(http):
    for content in (b"{not json", b"[1, 2]", b'"prompt"', b""):
        r = http.post("/v1/completions", content=content, headers={**AUTH, "content-type": "application/json"})
        assert_error(r, 400)
    r = http.post("/v1/completions", content=b'{"prompt": "a", "compression_ratio": NaN}',
                  headers={**AUTH, "content-type": "application/json"})
    assert_error(r, 400, "compression_ratio")


def test_auth(srv):
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        assert_error(c.post("/v1/completions", json={"prompt": "a"}), 401)
        assert_error(c.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Basic dGVzdA=="}), 401)
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200


def test_body_limit(http):
    r = post(http, "/v1/completions", {"prompt": "a" * 70_000})
    assert_error(r, 413, code="request_too_large")

    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 10_000
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert_error(r, 413)
    assert http.get("/health").status_code == 200


def test_request_id_and_access_log(http):
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("sparse_serve.access")
    handler = Capture()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        r = post(http, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, headers={**AUTH, "X-Request-Id": "abc-1"})
        assert r.headers["x-request-id"] == "abc-1"
        generated = post(http, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).headers["x-request-id"]
        assert generated and generated != "abc-1"
        assert wait_until(lambda: len(records) >= 2, 5)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    line = json.loads(next(r for r in records if '"abc-1"' in r))
    assert line["request_id"] == "abc-1" and line["status"] == 200 and line["path"] == "/v1/completions"
    assert line["completion_tokens"] == 2 and line["sparse_pattern"] == "snapkv:2" and line["duration_ms"] > 0


def test_stream_completion_with_usage(http):
    r = post(http, "/v1/completions", {"prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True,
                                       "stream_options": {"include_usage": True}, "sparse_pattern": "quest:8"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5 and last["usage"]["prompt_tokens"] == 3
    assert last["sparse"]["decode"]["method"] == "quest"
    text = "".join(c["text"] for e in events[:-2] for c in e["choices"])
    assert text == "abcab"
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_chat_stream_starts_with_role(http):
    r = post(http, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "stream": True, "n": 2})
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    firsts = {}
    for e in events[:-1]:
        for c in e["choices"]:
            firsts.setdefault(c["index"], c["delta"])
    assert firsts == {0: {"role": "assistant", "content": ""}, 1: {"role": "assistant", "content": ""}}
    assert all("usage" not in e for e in events[:-1])  # no include_usage
    finals = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert len(finals) == 2


def test_error_after_stream_start(http):
    r = post(http, "/v1/completions", {"prompt": "FAIL_MIDSTREAM", "max_tokens": 10, "stream": True})
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and "error" in events[-2] and events[-2]["error"]["type"] == "server_error"
    assert "error" not in events[0]


def test_engine_fault_is_500_and_server_keeps_serving(http):
    assert_error(post(http, "/v1/completions", {"prompt": "FAIL_ADMIT"}), 500)
    assert_error(post(http, "/v1/completions", {"prompt": "FAIL_MIDSTREAM", "max_tokens": 10}), 500)
    assert post(http, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_each_generation_request_is_counted_once(http):
    """requests_total counts a request once, by what happened to it: refused before the engine (400), failed
    by the engine at admission or mid-generation (error), failed before the engine (tokenizer fault), done."""
    def by_status() -> dict[str, float]:
        out: dict[str, float] = {}
        for (name, labels), v in metric_samples(http.get("/metrics").text).items():
            if name == "sparse_serve_requests_total":
                out[dict(labels)["status"]] = out.get(dict(labels)["status"], 0) + v
        return out

    before = by_status()
    assert post(http, "/v1/completions", {"prompt": "x", "sparse_pattern": "nope"}).status_code == 400
    for prompt in ("FAIL_ADMIT", "FAIL_MIDSTREAM", "BOOM_TOKENIZER"):
        assert post(http, "/v1/completions", {"prompt": prompt, "max_tokens": 10}).status_code == 500
    assert post(http, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200
    after = by_status()
    grown = {s: after[s] - before.get(s, 0) for s in after if after[s] != before.get(s, 0)}
    assert grown == {"invalid": 1, "error": 3, "ok": 1}


def test_unexpected_fault_is_500_with_request_id(http):
    r = post(http, "/v1/completions", {"prompt": "BOOM_TOKENIZER"}, headers={**AUTH, "X-Request-Id": "boom-1"})
    assert_error(r, 500)
    assert r.json()["error"]["type"] == "server_error" and r.headers["x-request-id"] == "boom-1"
    assert post(http, "/v1/completions", {"prompt": "fine", "max_tokens": 1}).status_code == 200


def _running(srv) -> int:
    return len(srv.engine.running) + len(srv.engine.waiting)


def test_stream_disconnect_aborts(srv, http):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "abc", "max_tokens": 200, "stream": True}) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(3)]
            assert got[0].startswith("data: ")
            assert _running(srv) == 1
    assert wait_until(lambda: _running(srv) == 0, 5)
    m = metric_samples(http.get("/metrics").text)
    assert any(k[0] == "sparse_serve_requests_total" and ("status", "abort") in k[1] and v >= 1 for k, v in m.items())


def test_nonstream_disconnect_aborts(srv):
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 200})
    assert wait_until(lambda: _running(srv) == 0, 5)


def test_full_queue_gets_429_with_retry_after(srv, http):
    async def burst():
        async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=30) as c:
            reqs = [c.post("/v1/completions", json={"prompt": "q", "max_tokens": 40, "stream": i % 2 == 0})
                    for i in range(16)]
            return await asyncio.gather(*reqs)

    rs = asyncio.run(burst())
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 8 and codes.count(429) >= 1, codes
    streamed = [r for i, r in enumerate(rs) if i % 2 == 0]
    assert all(r.headers["content-type"].startswith("text/event-stream") for r in streamed if r.status_code == 200)
    assert all(r.headers["content-type"] == "application/json" for r in rs if r.status_code == 429)
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
    assert post(http, "/v1/completions", {"prompt": "after", "max_tokens": 2}).status_code == 200


def test_aux_endpoints(http):
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "fake-model"
    assert http.get("/v1/models/fake-model").status_code == 200
    assert_error(http.get("/v1/models/other"), 404, "model")
    t = post(http, "/tokenize", {"prompt": "hey"}).json()
    assert t == {"tokens": [107, 104, 124], "count": 3, "max_model_len": 256}
    t = post(http, "/tokenize", {"messages": CHAT, "add_generation_prompt": True}).json()
    assert t["count"] == len("<user>hi\n<assistant>")
    assert post(http, "/detokenize", {"tokens": [107, 104, 124]}).json() == {"prompt": "hey"}
    pats = http.get("/v1/sparse/patterns").json()
    assert {m["name"] for m in pats["prefill"]} == {"dense", "vertical_slash", "flexprefill", "block_sparse"}
    assert {m["name"] for m in pats["decode"]} == {"dense", "snapkv", "ada_snapkv", "quest"}
    assert pats["default"] == "snapkv:2"
    assert http.get("/health").json() == {"status": "ok"}
    assert "/v1/completions" in http.get("/openapi.json").json()["paths"]


def test_metrics_have_every_metric_and_label(http):
    post(http, "/v1/completions", {"prompt": "hello", "max_tokens": 3, "sparse_pattern": "vertical_slash:4+quest:4"})
    post(http, "/v1/completions", {"prompt": "hello", "max_tokens": 3, "sparse_pattern": "auto"})
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)
    for d in METRIC_DEFS:
        name = "sparse_serve_" + d.name
        if d.kind == "histogram":
            name += "_count"
        found = [labels for (n, labels) in samples if n == name]
        assert found, name
        assert any({k for k, _ in labels} == {"model", *d.labels} for labels in found), (name, found)


# -- schema-driven fuzzing --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_srv():
    engine = FakeEngine(max_model_len=96, max_num_seqs=8, max_queue=64, token_delay=0)
    with ThreadedServer(create_app(engine, ServerSettings(max_body_bytes=2_000_000))) as s:
        yield s


TEXT_BODIES = ['{"prompt": TEXT, "max_tokens": 2}', '{"prompt": ["ok", TEXT], "max_tokens": 2}',
               '{"messages": [{"role": "user", "content": TEXT}], "max_tokens": 2}', '{"prompt": TEXT}']


def test_fuzz_openapi_no_server_errors(fuzz_srv):
    with httpx.Client(base_url=fuzz_srv.url, timeout=30) as c:
        openapi = c.get("/openapi.json").json()
    ops = operations(openapi)
    assert {p for _, p, _ in ops} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    strategies = SchemaStrategies(openapi.get("components", {}), overrides={
        "sparse_pattern": st.one_of(st.none(), pattern_strings, pattern_objects),
        "max_tokens": st.one_of(st.none(), st.integers(-2, 40), st.just(10**12)),
    })
    op_bodies = st.one_of([
        st.tuples(st.just(m), st.just(p), strategies.body(s) if s else st.none()) for m, p, s in ops
    ])
    headers = st.fixed_dictionaries({}, optional={
        "X-Sparse-Pattern": pattern_strings.filter(lambda s: s.isascii()),
        "X-Compression-Ratio": st.sampled_from(["1", "8", "0", "-3", "nan", "inf", "x", ""]),
    })
    # Sometimes one field holds a lone surrogate, a huge array or deep nesting (spliced in as raw JSON), in a
    # drawn body or in the text of an otherwise valid one (so that it reaches the tokenizer).
    spliced = st.tuples(st.sampled_from(["prompt", "messages", "sparse_pattern", "stop", "tokens", "vllm_xargs", "x"]),
                        hostile_fragments).map(lambda t: lambda body: with_fragment(body, *t))
    in_text = st.tuples(st.sampled_from(TEXT_BODIES), st.one_of(surrogate_text.map(json.dumps), hostile_fragments))
    hostile = st.one_of(st.none(), st.none(), st.none(), spliced,
                        in_text.map(lambda t: lambda body: t[0].replace("TEXT", t[1]).encode()))
    seen: dict[int, int] = {}
    started = time.monotonic()

    with httpx.Client(base_url=fuzz_srv.url, timeout=30) as c:

        @settings(max_examples=600, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(op=op_bodies, hdrs=headers, bad=hostile)
        def run(op, hdrs, bad):
            method, path, body = op
            if method == "GET":
                r = c.get(path)
            else:  # encoded here: httpx's json= cannot encode a lone surrogate (JSON can, as an escape)
                content = bad(body) if bad is not None else json.dumps(body).encode()
                r = c.request(method, path, content=content, headers={**hdrs, "content-type": "application/json"})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500 or r.status_code == 503 and path == "/health", (path, body, hdrs, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        run()
    assert seen.get(200, 0) > 20 and seen.get(400, 0) > 20, seen
    assert time.monotonic() - started < 120
