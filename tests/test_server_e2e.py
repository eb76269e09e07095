"""End to end on the embedded SmolLM2 (float32, CPU): the official openai SDK, greedy equality with the
engine, concurrency with mixed patterns, disconnect -> KV pages freed, metrics, and a fuzz run on the real
engine. One server (uvicorn in a thread, real NativeEngine) for the whole module.

``tests/test_vllm_http.py`` runs these same test functions against ``--engine vllm`` by overriding the ``srv``
fixture (built with :func:`serve_engine`); the few assertions that need engine facts vLLM cannot provide are
guarded by the server's capability flags (``srv.kv_stats``, ``srv.quest_page_size_fixed``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from engine_helpers import collect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_fuzz import pattern_objects, pattern_strings
from server_harness import ThreadedServer, metric_samples, parse_sse, wait_until
from test_deploy import used_metric_names

from attention_backends.prefill_cost import PROFILE_ENV
from server.api import create_app
from server.cli import build_engine
from server.contract.engine import GenerationRequest, SamplingParams
from server.metrics import METRIC_DEFS, base_metric_name
from server.settings import ServerSettings, parse_size

pytestmark = pytest.mark.slow

PATTERNS = ["dense", "quest:4", "snapkv:2", "ada_snapkv:2", "vertical_slash:2", "block_sparse:2", "flexprefill",
            "vertical_slash:4+quest:4"]
LONG_PROMPT = ("The history of the city is long and full of small events that nobody wrote down. " * 12
               + "\nQuestion: what is the capital of France?\nAnswer:")


# block_sparse with 32-token blocks never pays under it (no other test asks for that block size); every other
# method has no entry, so it runs as asked
FALLBACK_PROFILE = Path(__file__).parent / "fixtures" / "prefill-profile-test.json"

# The engine-side settings of the e2e server (the vLLM variant adds engine="vllm" and an HF model directory).
E2E_SETTINGS = dict(device="cpu", dtype="float32", max_model_len=640, kv_cache_memory=192 << 20, max_num_seqs=16,
                    max_queue=64, max_prompt_logprobs_tokens=320,
                    sparse_policy=str(Path(__file__).parent / "fixtures" / "auto-policy.json"))


@contextlib.contextmanager
def serve_engine(settings_: ServerSettings, *, kv_stats: bool = True,
                 quest_page_size_fixed: bool = True) -> Iterator[ThreadedServer]:
    """A real server (uvicorn in a thread) on the engine ``settings_`` asks for; ``srv.engine`` is that engine.
    Capability flags for assertions that only some engines can support:
    ``kv_stats``: ``stats()`` reports KV usage and free/total pages;
    ``quest_page_size_fixed``: Quest must use the engine's KV page size (other ``page_size`` values get 400).
    The server runs under the dense-fallback profile :data:`FALLBACK_PROFILE`."""
    with pytest.MonkeyPatch.context() as mp:
        # before the engine starts: vLLM's engine core process inherits it
        mp.setenv(PROFILE_ENV, str(FALLBACK_PROFILE))
        engine = build_engine(settings_)
        with ThreadedServer(create_app(engine, settings_)) as s:
            s.engine = engine
            s.kv_stats = kv_stats
            s.quest_page_size_fixed = quest_page_size_fixed
            yield s


@pytest.fixture(scope="module")
def srv():
    with serve_engine(ServerSettings(**E2E_SETTINGS)) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


IDLE = {"sparse_serve_num_requests_running": 0.0, "sparse_serve_num_requests_waiting": 0.0,
        "sparse_serve_kv_cache_usage_ratio": 0.0, "sparse_serve_kv_cache_used_pages": 0.0}


def gauges(http) -> dict[str, float]:
    m = metric_samples(http.get("/metrics").text)
    return {name: v for (name, _), v in m.items() if name in IDLE}


def check_sparse(sparse: dict, prefill: str, decode: str) -> None:
    p, d = sparse["prefill"], sparse["decode"]
    assert (p["method"], d["method"]) == (prefill, decode)
    assert p["achieved_compression_ratio"] >= 1 and d["achieved_compression_ratio"] >= 1
    assert 0 < p["attention_flops"] <= p["dense_attention_flops"]
    assert 0 < d["kv_bytes_read"] <= d["dense_kv_bytes_read"]  # callers ask for >= 2 tokens (ignore_eos)
    assert sparse["model_flops"] > 0 and sparse["dense_model_flops"] > 0


def test_openai_sdk_completions(sdk, srv):
    model = sdk.models.list().data[0].id
    r = sdk.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=6, temperature=0,
                               extra_body={"sparse_pattern": "vertical_slash:4+quest:4", "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    sparse = r.model_extra["sparse"]
    check_sparse(sparse, "vertical_slash", "quest")
    assert sparse["prefill"]["achieved_compression_ratio"] > 1.2
    assert sparse["prefill"]["target_compression_ratio"] == 4 and sparse["decode"]["target_compression_ratio"] == 4

    chunks = list(sdk.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                                         extra_headers={"X-Sparse-Pattern": "quest:4"}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    check_sparse(chunks[-1].model_extra["sparse"], "dense", "quest")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text  # same greedy tokens


def test_openai_sdk_chat(sdk):
    messages = [{"role": "user", "content": "Name one colour."}]
    r = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=5, temperature=0,
                                    extra_headers={"X-Sparse-Pattern": "snapkv:2"}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    check_sparse(r.model_extra["sparse"], "dense", "snapkv")
    stream = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=5,
                                         temperature=0, stream=True, stream_options={"include_usage": True},
                                         extra_body={"sparse_pattern": "snapkv:2", "ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    check_sparse(chunks[-1].model_extra["sparse"], "dense", "snapkv")


def test_small_kv_pool_serves_chat_without_max_tokens():
    """The openai SDK omits max_tokens: on a 64 MB pool (too small for a whole 8192-token context) such a chat
    request is served, not refused as kv_cache_too_small."""
    settings_ = ServerSettings(device="cpu", dtype="float32", kv_cache_memory=parse_size("64MB"))
    with serve_engine(settings_) as s:
        sdk = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0,
                                        messages=[{"role": "user", "content": "What is 2+2? Answer with one number."}])
    assert r.choices[0].finish_reason == "stop" and "4" in r.choices[0].message.content


@pytest.mark.parametrize("pattern", ["dense", "vertical_slash:3+snapkv:2"])
def test_greedy_http_equals_engine(srv, http, pattern):
    prompt = LONG_PROMPT if pattern != "dense" else "Once upon a time"
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0,
                                           "sparse_pattern": pattern, "logprobs": 0}).json()
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    from attention_backends import parse_pattern

    req = GenerationRequest("direct-" + pattern, ids, SamplingParams(max_tokens=10, temperature=0),
                            parse_pattern(pattern))
    direct = srv.call(collect(srv.engine, req))
    assert r["choices"][0]["text"] == direct.text
    assert r["usage"]["completion_tokens"] == len(direct.token_ids)
    http_tokens = r["choices"][0]["logprobs"]["tokens"]
    assert http_tokens == [srv.engine.tokenizer.decode([t], skip_special_tokens=False) for t in direct.token_ids]


def test_prefill_fallback_runs_dense_and_says_so(http):
    """A method that cannot pay at the prompt's length runs as dense attention: the report says fallback dense
    with achieved ratio 1, the tokens are dense's, the metric counts it; "fallback": "never" runs the method."""
    def run(pattern):
        r = http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 8, "temperature": 0,
                                               "ignore_eos": True, "sparse_pattern": pattern})
        assert r.status_code == 200, r.text
        return r.json()

    def fallbacks():
        return sum(value for (name, labels), value in metric_samples(http.get("/metrics").text).items()
                   if name == "sparse_serve_prefill_fallbacks_total" and ("prefill_method", "block_sparse") in labels)

    block32 = {"method": "block_sparse", "compression_ratio": 2, "params": {"block_size": 32}}
    before = fallbacks()
    dense, auto, never = run("dense"), run({"prefill": block32}), run({"prefill": {**block32, "fallback": "never"}})
    p = auto["sparse"]["prefill"]
    assert (p["method"], p["target_compression_ratio"], p["fallback"]) == ("block_sparse", 2, "dense")
    assert p["achieved_compression_ratio"] == 1 and p["attention_flops"] == p["dense_attention_flops"]
    assert auto["choices"][0]["text"] == dense["choices"][0]["text"]
    assert fallbacks() == before + 1
    p = never["sparse"]["prefill"]
    assert p["fallback"] is None and p["achieved_compression_ratio"] > 1.2
    e = http.post("/v1/completions", json={"prompt": "x", "sparse_pattern": {"prefill": {**block32, "fallback": 1}}})
    assert e.status_code == 400 and e.json()["error"]["param"] == "sparse_pattern.prefill.fallback"


def test_echo_logprobs_are_the_engines_prompt_logprobs(srv, http):
    """echo + logprobs over HTTP: the prompt's tokens and logprobs are the engine's prefill's, dense and sparse;
    the sparse report says so; a prompt over --max-prompt-logprobs-tokens gets a 400, not an out-of-memory."""
    from attention_backends import parse_pattern

    ids = http.post("/tokenize", json={"prompt": LONG_PROMPT}).json()["tokens"]
    scored = {}
    for pattern in ("dense", "vertical_slash:4"):
        r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2,
                                               "sparse_pattern": pattern}).json()
        c = r["choices"][0]
        lp = c["logprobs"]
        assert c["text"] == srv.engine.tokenizer.decode(ids) and c["finish_reason"] == "length"
        assert r["usage"]["completion_tokens"] == 0 and len(lp["token_logprobs"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(2 <= len(top) <= 3 and top[tok] == v
                   for tok, v, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:],
                                          strict=True))
        assert r["sparse"]["prefill"]["method"] == parse_pattern(pattern).prefill.method
        assert r["sparse"]["prefill"]["prompt_logprobs"] is True
        req = GenerationRequest(f"score-{pattern}", ids, SamplingParams(max_tokens=0, prompt_logprobs=2),
                                parse_pattern(pattern))
        direct = srv.call(collect(srv.engine, req))
        assert lp["token_logprobs"][1:] == pytest.approx([x.logprob for x in direct.prompt_logprobs[1:]], abs=1e-5)
        scored[pattern] = lp["token_logprobs"][1:]
    assert scored["dense"] != pytest.approx(scored["vertical_slash:4"], abs=1e-3)
    # with a generated token (what lm-eval sends: max_tokens 1) the prompt's part is the same, then the token's
    r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0,
                                           "temperature": 0}).json()
    assert r["choices"][0]["logprobs"]["token_logprobs"][1:-1] == pytest.approx(scored["dense"], abs=1e-5)
    r = http.post("/v1/completions", json={"prompt": ids * 2, "max_tokens": 1, "echo": True, "logprobs": 0})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_logprobs_too_long", r.text
    assert "320" in r.json()["error"]["message"]


def test_auto_chooses_by_prompt_length(http):
    """The fixture policy: dense below 64 tokens, vertical_slash:3+snapkv:2 from 64 on; `auto` runs exactly what
    naming that pattern runs."""
    def complete(prompt, pattern):
        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                               "sparse_pattern": pattern})
        assert r.status_code == 200, r.text
        return r.json()

    short = complete("Once upon a time", "auto")
    assert short["sparse"]["auto"]["chosen"] == "dense" and short["sparse"]["decode"]["method"] == "dense"
    long = complete(LONG_PROMPT, "auto")
    auto = long["sparse"]["auto"]
    assert auto["chosen"] == "vertical_slash:3+snapkv:2" and auto["band"]["min_tokens"] == 64
    assert (long["sparse"]["prefill"]["method"], long["sparse"]["decode"]["method"]) == ("vertical_slash", "snapkv")
    assert long["choices"][0]["text"] == complete(LONG_PROMPT, "vertical_slash:3+snapkv:2")["choices"][0]["text"]
    assert complete(LONG_PROMPT, "auto:0.001")["sparse"]["auto"]["chosen"] == "dense"  # tight budget


def first_difference(a, b, path: str = "$") -> str | None:
    """Where two JSON values first differ (a key one of them lacks, or a different value), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            found = f"{path}.{k}" if k not in a or k not in b else first_difference(a[k], b[k], f"{path}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        found_in = (first_difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
        return next((d for d in found_in if d), None)
    return None if a == b else path


def assert_schema(model, data: dict) -> None:
    """``data`` is exactly what ``model`` (a response model of the OpenAPI document) describes: it validates, and
    no field is one the model does not name (validation drops those, so the round trip would differ)."""
    diff = first_difference(model.model_validate(data).model_dump(exclude_unset=True), data)
    assert diff is None, f"{model.__name__} does not describe {diff}"


def test_responses_match_the_documented_schema(http):
    """Real responses against the pydantic response models (server/api/schemas.py): completions with n = 2
    (a sparse report per choice), echo with logprobs, `auto`, chat with logprobs, and a stream's usage chunk."""
    from server.api.schemas import ChatCompletionResponse, CompletionResponse, SparseReport

    def post(path, body):
        r = http.post(path, json={"max_tokens": 3, "temperature": 0, "ignore_eos": True, **body})
        assert r.status_code == 200, r.text
        return r

    r = post("/v1/completions", {"prompt": LONG_PROMPT, "n": 2, "logprobs": 1, "echo": True,
                                 "sparse_pattern": "vertical_slash:2+quest:4"}).json()
    assert r["sparse"]["prefill"]["prompt_logprobs"] is True and "sparse" in r["choices"][1]
    assert_schema(CompletionResponse, r)
    r = post("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}], "logprobs": True,
                                      "top_logprobs": 2, "sparse_pattern": "auto"}).json()
    assert r["sparse"]["auto"]["chosen"] == "vertical_slash:3+snapkv:2"
    assert_schema(ChatCompletionResponse, r)
    events = parse_sse(post("/v1/completions", {"prompt": LONG_PROMPT, "stream": True, "sparse_pattern": "snapkv:2",
                                                "stream_options": {"include_usage": True}}).text)
    assert events[-1] == "[DONE]"
    assert_schema(SparseReport, events[-2]["sparse"])


def test_invalid_inputs_on_real_engine(srv, http):
    def err(body, status=400):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == status, r.text
        return r.json()["error"]

    e = err({"prompt": LONG_PROMPT, "max_tokens": 600})
    assert (e["param"], e["code"]) == ("max_tokens", "context_length_exceeded")
    assert err({"prompt": "x", "sparse_pattern": "quest:0"})["param"] == "sparse_pattern"
    assert err({"prompt": "x", "model": "nope"}, 404)["param"] == "model"
    if srv.quest_page_size_fixed:  # vLLM: Quest keeps its own page bounds, so any page_size is valid there
        e = err({"prompt": "x", "sparse_pattern": {"decode": {"method": "quest", "params": {"page_size": 32}}}})
        assert e["param"].startswith("sparse_pattern.decode.params")


def test_disconnect_frees_kv_pages(srv, http):
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 400, "stream": True,
                                                       "ignore_eos": True, "sparse_pattern": "quest:4"}) as r:
            it = r.iter_lines()
            assert next(it).startswith("data: ")
            if srv.kv_stats:  # vLLM: AsyncLLM does not expose KV usage (the gauge reads 0)
                g = gauges(http)
                assert g["sparse_serve_kv_cache_usage_ratio"] > 0 and g["sparse_serve_kv_cache_used_pages"] > 0
    assert wait_until(lambda: gauges(http) == IDLE, 15), gauges(http)
    stats = srv.engine.stats()
    if srv.kv_stats:  # vLLM: AsyncLLM exposes no page counts (test_vllm_http checks vLLM dropped the request)
        assert stats.free_pages == stats.total_pages


def test_32_concurrent_streams_mixed_patterns(srv, http):
    prompts = [f"Story {i}: " + "the quick brown fox jumps over the lazy dog. " * (4 + i % 5) for i in range(32)]
    counts = [http.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts]

    async def one(c: httpx.AsyncClient, i: int):
        body = {"prompt": prompts[i], "max_tokens": 5, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}, "sparse_pattern": PATTERNS[i % len(PATTERNS)]}
        r = await c.post("/v1/completions", json=body)
        return r.status_code, parse_sse(r.text)

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(main())
    for i, (status, events) in enumerate(results):
        assert status == 200 and events[-1] == "[DONE]"
        assert not any("error" in e for e in events[:-1] if isinstance(e, dict)), events
        last = events[-2]
        assert last["usage"] == {"prompt_tokens": counts[i], "completion_tokens": 5, "total_tokens": counts[i] + 5}
        pattern = PATTERNS[i % len(PATTERNS)]
        methods = {last["sparse"]["prefill"]["method"], last["sparse"]["decode"]["method"]}
        assert all(part.split(":")[0] in methods for part in pattern.split("+"))
    # every request finished normally: nothing runs and every KV page is back in the pool
    assert wait_until(lambda: gauges(http) == IDLE, 10), gauges(http)


def _flops(samples, name, **labels):
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_metrics_after_traffic(http):
    before = metric_samples(http.get("/metrics").text)
    r = http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 4, "ignore_eos": True,
                                           "sparse_pattern": "vertical_slash:2+quest:2"}).json()
    after = metric_samples(http.get("/metrics").text)
    s = r["sparse"]

    def grew(name, **labels):
        return _flops(after, name, **labels) - _flops(before, name, **labels)

    m = "sparse_serve_attention_flops_total"
    assert grew(m, phase="prefill", method="vertical_slash", kind="actual") == pytest.approx(
        s["prefill"]["attention_flops"])
    assert grew(m, phase="prefill", method="vertical_slash", kind="dense_equivalent") == pytest.approx(
        s["prefill"]["dense_attention_flops"])
    assert grew(m, phase="prefill", method="vertical_slash", kind="indexing") == pytest.approx(
        s["prefill"]["indexing_flops"])
    k = "sparse_serve_kv_bytes_read_total"
    assert grew(k, method="quest", kind="actual") == pytest.approx(s["decode"]["kv_bytes_read"])
    assert grew(k, method="quest", kind="dense_equivalent") == pytest.approx(s["decode"]["dense_kv_bytes_read"])
    assert grew(k, method="quest", kind="metadata") == pytest.approx(s["decode"]["metadata_bytes_read"])
    assert grew("sparse_serve_model_flops_total", kind="actual") == pytest.approx(s["model_flops"])
    assert grew("sparse_serve_model_flops_total", kind="dense_equivalent") == pytest.approx(s["dense_model_flops"])
    assert grew("sparse_serve_prompt_tokens_total", prefill_method="vertical_slash") == r["usage"]["prompt_tokens"]
    assert grew("sparse_serve_generation_tokens_total", decode_method="quest") == 4
    assert grew("sparse_serve_requests_total", status="ok", prefill_method="vertical_slash",
                decode_method="quest") == 1
    for d in METRIC_DEFS:
        name = "sparse_serve_" + d.name + ("_count" if d.kind == "histogram" else "")
        labelsets = [dict(ls) for (n, ls) in after if n == name]
        assert labelsets, name
        assert all(set(ls) == {"model", *d.labels} for ls in labelsets), (name, labelsets)
    # Every series the Grafana dashboards and the alert rules query is exported by this live server.
    scraped = {base_metric_name(n) for (n, _) in after}
    for metric, places in used_metric_names().items():
        assert metric in scraped, f"{metric} is used by {sorted(places)} but the live server does not export it"


def test_fuzz_real_engine_no_500(srv):
    bodies = st.fixed_dictionaries(
        {"max_tokens": st.integers(1, 3)},
        optional={
            "sparse_pattern": st.one_of(pattern_strings, pattern_objects),
            "compression_ratio": st.one_of(st.floats(0.5, 40, allow_nan=False), st.sampled_from(["7", "x"])),
            "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 60000),
            "seed": st.integers(-(2**63), 2**64 - 1), "n": st.integers(1, 2), "stop": st.text(max_size=3),
            "stream": st.booleans(),
        },
    )
    prompts = st.one_of(st.text(min_size=1, max_size=60), st.lists(st.integers(0, 49151), min_size=1, max_size=40))
    started = time.monotonic()
    with httpx.Client(base_url=srv.url, timeout=120) as c:

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(body=bodies, prompt=prompts, chat=st.booleans())
        def run(body, prompt, chat):
            if chat:
                text = prompt if isinstance(prompt, str) else "hi"
                r = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": text}]})
            else:
                r = c.post("/v1/completions", json={**body, "prompt": prompt})
            assert r.status_code < 500, (body, prompt, r.text)
            if r.status_code == 200 and body.get("stream"):
                events = parse_sse(r.text)
                assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events

        run()
    assert time.monotonic() - started < 120
