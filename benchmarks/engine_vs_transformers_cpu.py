"""Dense greedy decode speed: the native engine vs transformers' ``generate``, same model, same prompt.

Runs both side by side in one process (SmolLM2-135M-Instruct from the embedded GGUF, float32, CPU by
default), alternating them ``--repeats`` times, and reports decode tokens/s (tokens after the first,
divided by the time after the first token) and TTFT. The performance bar (docs/performance.md,
"On the CPU") is native >= 1.0x transformers.

    .venv/bin/python benchmarks/engine_vs_transformers_cpu.py --tokens 64 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from server.contract.engine import GenerationRequest, SamplingParams
from server.engine.default_model import default_model_path
from server.engine.engine import EngineOptions, NativeEngine
from server.engine.model_loader import load_model


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def time_hf(model, ids: list[int], tokens: int) -> tuple[float, float, list[int]]:
    inp = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(inp, max_new_tokens=1, do_sample=False, min_new_tokens=1)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(inp, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - t0
    return ttft, (tokens - 1) / (total - ttft), out[0, len(ids):].tolist()


async def time_native(engine: NativeEngine, ids: list[int], tokens: int, tag: str) -> tuple[float, float, list[int]]:
    request = GenerationRequest(tag, ids, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    t0 = time.monotonic()
    out_ids: list[int] = []
    async for out in engine.generate(request):
        out_ids += out.token_ids
        tm = out.timings
    ttft = tm.first_token - t0
    return ttft, (len(out_ids) - 1) / (tm.finished - tm.first_token), out_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate per run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians are reported")
    ap.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    path = default_model_path()
    model, tokenizer = load_model(None, "cpu", torch.float32)
    engine = NativeEngine(model, tokenizer, EngineOptions(device="cpu", dtype="float32"), "smollm2")
    reference = hf_model(path)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]),
                           add_special_tokens=False)

    async def run():
        await engine.start()
        rows = {"native": [], "transformers": []}
        for i in range(args.repeats):
            rows["native"].append(await time_native(engine, ids, args.tokens, f"bench{i}"))
            rows["transformers"].append(time_hf(reference, ids, args.tokens))
        await engine.shutdown()
        return rows

    rows = asyncio.run(run())
    summary = {name: {"ttft_s": statistics.median(r[0] for r in runs),
                      "decode_tokens_per_s": statistics.median(r[1] for r in runs)} for name, runs in rows.items()}
    same = rows["native"][0][2] == rows["transformers"][0][2]
    ratio = summary["native"]["decode_tokens_per_s"] / summary["transformers"]["decode_tokens_per_s"]
    result = {
        "benchmark": "dense greedy decode, native engine vs transformers generate",
        "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantised to float32)",
        "device": "cpu", "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "prompt_tokens": len(ids), "generated_tokens": args.tokens, "repeats": args.repeats,
        "results": summary, "native_over_transformers_decode": ratio, "same_tokens": same,
    }
    print(f"{'engine':<14}{'TTFT ms':>10}{'decode tok/s':>14}")
    for name, s in summary.items():
        print(f"{name:<14}{s['ttft_s'] * 1e3:>10.1f}{s['decode_tokens_per_s']:>14.1f}")
    print(f"native / transformers decode: {ratio:.2f}x   identical tokens: {same}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
