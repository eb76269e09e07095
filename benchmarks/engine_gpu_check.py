"""The native engine on a GPU: its CUDA path (Triton kernels) against its PyTorch path, same model and prompts.

A random-weight Llama of modest size (timing and agreement do not need real weights) serves each pattern once
through each path; the script reports whether the greedy tokens agree, the largest logprob difference, and
TTFT / decode speed of each path. On a CPU it runs a tiny shape under ``TRITON_INTERPRET=1`` (a smoke test).

    python benchmarks/engine_gpu_check.py --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import torch

from attention_backends import parse_pattern
from attention_backends.prefill_cost import PROFILE_ENV, PROFILE_OFF
from server.contract.engine import GenerationRequest, SamplingParams
from server.engine.engine import EngineOptions, NativeEngine
from server.engine.llama import LlamaModel
from server.engine.model_config import ModelConfig

PATTERNS = ["dense", "quest:4", "snapkv:4", "ada_snapkv:4", "vertical_slash:4", "block_sparse:4", "flexprefill:4"]


class IdTokenizer:
    """Token ids as text: the engine needs a tokenizer only to detokenize."""

    eos_token_id = None
    stop_token_ids: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def random_model(cuda: bool) -> LlamaModel:
    if cuda:
        cfg = ModelConfig(num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64, hidden_size=1024,
                          intermediate_size=2816, vocab_size=4096, max_position_embeddings=32768, name="random")
    else:
        cfg = ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64,
                          intermediate_size=128, vocab_size=256, max_position_embeddings=4096, name="random")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = LlamaModel(cfg, device="cuda" if cuda else "cpu", dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = 1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else \
                torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 2
            p.copy_(w.to(p.dtype))
    return model


async def serve(model, use_triton: bool, pattern: str, prompt: list[int], tokens: int):
    engine = NativeEngine(model, IdTokenizer(), EngineOptions(kv_cache_memory=2 << 30 if model.device.type == "cuda"
                                                              else 64 << 20), "random")
    engine.runner.use_triton = use_triton
    await engine.start()
    try:
        req = GenerationRequest(pattern, prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                                                logprobs=0), parse_pattern(pattern))
        t0 = time.monotonic()
        ids, lps = [], []
        async for out in engine.generate(req):
            ids += out.token_ids
            lps += [lp.logprob for lp in out.logprobs or []]
            final = out
        tm = final.timings
        return {"tokens": ids, "logprobs": lps, "ttft_s": tm.first_token - t0,
                "decode_tok_s": (len(ids) - 1) / max(tm.finished - tm.first_token, 1e-9),
                "prefill_ratio": final.cost.prefill.achieved_compression_ratio,
                "decode_ratio": final.cost.decode.achieved_compression_ratio, "error": final.error}
    finally:
        await engine.shutdown(timeout=5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default 8192 on CUDA, 300 on CPU")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", help="write JSON results here")
    args = ap.parse_args()
    # the CUDA path's methods against the PyTorch path's: the dense-fallback rule (CUDA only) stays off
    os.environ[PROFILE_ENV] = PROFILE_OFF
    cuda = torch.cuda.is_available()
    n = args.prompt_tokens or (8192 if cuda else 300)
    model = random_model(cuda)
    prompt = [(i * 7919) % model.config.vocab_size for i in range(n)]
    rows = []
    for pattern in PATTERNS:
        torch_path = asyncio.run(serve(model, False, pattern, prompt, args.tokens))
        triton_path = asyncio.run(serve(model, cuda or True, pattern, prompt, args.tokens))
        same = sum(a == b for a, b in zip(torch_path["tokens"], triton_path["tokens"], strict=False))
        first = next((i for i, (a, b) in enumerate(zip(torch_path["tokens"], triton_path["tokens"], strict=False))
                      if a != b), len(torch_path["tokens"]))
        lp_diff = max((abs(a - b) for a, b in zip(torch_path["logprobs"][:first], triton_path["logprobs"][:first],
                                                  strict=False)), default=0.0)
        rows.append({"pattern": pattern, "agree_prefix": first, "agree": same, "tokens": len(torch_path["tokens"]),
                     "max_logprob_diff_before_divergence": lp_diff, "torch": torch_path, "triton": triton_path})
        print(f"{pattern:<18} agree {first:>3}/{len(torch_path['tokens'])}  dlogp {lp_diff:.3g}  "
              f"TTFT torch {torch_path['ttft_s'] * 1e3:8.1f} ms triton {triton_path['ttft_s'] * 1e3:8.1f} ms  "
              f"decode torch {torch_path['decode_tok_s']:7.1f} triton {triton_path['decode_tok_s']:7.1f} tok/s  "
              f"ratio p {triton_path['prefill_ratio']:.2f} d {triton_path['decode_ratio']:.2f}  "
              f"err {torch_path['error'] or triton_path['error'] or '-'}", flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if cuda else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device, "prompt_tokens": n, "generated": args.tokens,
                       "config": vars(model.config) | {"dtype": str(model.dtype)}, "rows": rows}, f, indent=1,
                      default=str)


if __name__ == "__main__":
    main()
