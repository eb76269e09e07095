"""The HTTP end-to-end tests of ``tests/test_server_e2e.py``, unchanged, against ``--engine vllm``.

The test functions are imported from ``test_server_e2e`` and collected here; only the ``srv`` fixture differs:
a server whose engine is a :class:`~server.vllm_engine.engine.VllmEngine` (same settings as the native run).
The model is the embedded SmolLM2-135M-Instruct itself, exported offline to a Hugging Face directory (its GGUF
dequantised by the native engine's reader, its tokenizer and chat template saved with ``save_pretrained``), so
the assertions written for SmolLM2 hold as they are. Assertions that need engine facts vLLM cannot provide are
skipped through the server's capability flags (see ``test_server_e2e.serve_engine``):

* ``kv_stats=False``: ``AsyncLLM`` exposes no KV usage or page counts (``stats()`` reads 0), so the disconnect
  test does not check the usage gauge or that every page is free; ``test_disconnect_aborts_in_vllm`` checks
  instead that vLLM itself dropped the request.
* ``quest_page_size_fixed=False``: vLLM's Quest keeps its own page bounds, so any ``page_size`` is valid.

Runs only where vLLM is importable (``.venv-vllm``); marked ``vllm`` and ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (run under .venv-vllm)")

from server_harness import wait_until  # noqa: E402
from test_server_e2e import (  # noqa: E402, F401 - the imported tests and fixtures are collected here
    E2E_SETTINGS,
    LONG_PROMPT,
    gauges,
    http,
    sdk,
    serve_engine,
    test_32_concurrent_streams_mixed_patterns,
    test_auto_chooses_by_prompt_length,
    test_disconnect_frees_kv_pages,
    test_echo_logprobs_are_the_engines_prompt_logprobs,
    test_fuzz_real_engine_no_500,
    test_greedy_http_equals_engine,
    test_invalid_inputs_on_real_engine,
    test_metrics_after_traffic,
    test_openai_sdk_chat,
    test_openai_sdk_completions,
    test_prefill_fallback_runs_dense_and_says_so,
    test_responses_match_the_documented_schema,
)

from server.engine.default_model import DEFAULT_MODEL_NAME  # noqa: E402
from server.settings import ServerSettings  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]


def export_default_model(path: Path) -> Path:
    """The embedded SmolLM2 GGUF as a Hugging Face directory (float32 safetensors, config, tokenizer with its
    chat template), offline. The weights are the native engine's dequantised ones, so both engines run the
    same model."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from server.engine.default_model import default_model_path
    from server.engine.weights import load_gguf_checkpoint
    from server.tokenizer import load_gguf_tokenizer

    gguf = default_model_path()
    ckpt = load_gguf_checkpoint(gguf)
    c = ckpt.config
    assert c.model_type == "llama" and c.rope_scaling is None and ckpt.rope_freq_factors is None
    path.mkdir(parents=True, exist_ok=True)
    load_gguf_tokenizer(gguf, ckpt.chat_template, c.eos_token_ids).hf_tokenizer.save_pretrained(str(path))
    LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
                eos_token_id=c.eos_token_id, torch_dtype="float32",
                architectures=["LlamaForCausalLM"]).save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in ckpt.state_dict.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    ckpt.release()
    return path


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    model = export_default_model(tmp_path_factory.mktemp("vllm-http") / DEFAULT_MODEL_NAME)
    settings_ = ServerSettings(**E2E_SETTINGS, engine="vllm", model=str(model))
    with serve_engine(settings_, kv_stats=False, quest_page_size_fixed=False) as s:
        yield s


def test_disconnect_aborts_in_vllm(srv):
    """What vLLM can tell instead of free pages: after a client disconnect, AsyncLLM holds no request."""
    llm = srv.engine._llm
    with httpx.Client(base_url=srv.url, timeout=120) as c, httpx.Client(base_url=srv.url, timeout=120) as other:
        with c.stream("POST", "/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 400, "stream": True,
                                                       "ignore_eos": True, "sparse_pattern": "quest:4"}) as r:
            lines = r.iter_lines()  # keep a reference: a collected iterator closes the response (a disconnect)
            first = next(lines)
            assert first.startswith("data: ") and "error" not in first, first
            assert llm.output_processor.get_num_unfinished_requests() == 1, (first, srv.engine._requests)
        assert wait_until(lambda: llm.output_processor.get_num_unfinished_requests() == 0, 15)
        assert gauges(other)["sparse_serve_num_requests_running"] == 0
