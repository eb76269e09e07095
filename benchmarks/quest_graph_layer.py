"""One layer of Quest's work inside vLLM's full decode graph, at the e2e decode bar's shapes (GPU, one call).

    PYTHONUNBUFFERED=1 python benchmarks/quest_graph_layer.py --out DIR [--baseline PACKAGE]
    TRITON_INTERPRET=1 python benchmarks/quest_graph_layer.py --smoke      # the CPU: tiny shapes, checks only

What a decode graph replays per layer for every batch row (``server/vllm_engine/cache_decode.quest_layer``): the
current block's key bounds, the page scores, the selection and the paged attention over the selected blocks. Rows sit
in vLLM's block table, as wide as the model's context (133120 tokens = 8320 blocks in ``benchmarks/e2e.py``'s model),
and hold 32K tokens (2048 blocks). Timed under CUDA-graph replay, at batch 1, 8 and 32:

* ``quest``: every row selects quest:10's budget (205 of 2048 blocks);
* ``dense rows``: no row has a budget (a dense step through the plugin pays this in every layer);
* ``dense attention``: :func:`paged_decode` over each row's 32K tokens, the attention Quest replaces (a yardstick);
* the selection alone at several chunk sizes and warp counts;
* SnapKV's layer inside the graph (``keep_slots.py``): keep rows, and rows without keep-sets.

``--baseline PACKAGE[,PACKAGE...]``: copies of ``attention_backends/kernels`` from other commits, importable as
PACKAGE (e.g. ``mkdir oldk && git archive f1b7261 attention_backends/kernels | tar -x --strip-components=2 -C oldk``),
timed the same way on the same inputs, each one's selection and output checked against this tree's first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_bench as kernels_bench  # noqa: E402  (benchmarks/kernel_bench.py: the same timing rules)

H, HKV, D, PAGE = 28, 4, 128, 16
TABLE = 8320  # blocks per row of vLLM's block table (max_model_len 133120)
CONTEXT = 32768
BUDGET = 205  # quest:10 at 32K: a tenth of 2048 blocks
WIDTH = 1024  # the widest budget the graph selects (server/vllm_engine/quest_slots.py, GRAPH_PAGES)
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def inputs(B: int, dev: str):
    torch.manual_seed(B)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32  # (bfloat16 is wrong in Triton's interpreter)
    npg = CONTEXT // PAGE
    blocks = B * npg + 8  # (+ spare blocks no row holds)
    cache = torch.randn(blocks, 2, PAGE, HKV, D, device=dev, dtype=dt)
    table = torch.zeros(B, TABLE, dtype=torch.int32, device=dev)
    table[:, :npg] = torch.randperm(blocks - 8, device=dev)[: B * npg].view(B, npg).to(torch.int32)
    lo = torch.empty(blocks, HKV, D, device=dev, dtype=dt)
    hi = torch.empty_like(lo)
    q = torch.randn(B, H, D, device=dev, dtype=dt)
    return dict(q=q, cache=cache, table=table, bounds=(lo, hi), npg=npg)


def layer_fn(mod, x: dict, quest: bool):
    """The kernels of one layer (quest_layer's sequence) from kernel package ``mod``, over fixed buffers."""
    B, dev = x["q"].shape[0], x["q"].device
    i32 = dict(dtype=torch.int32, device=dev)
    k_cache, v_cache = x["cache"].unbind(1)
    tokens = CONTEXT if quest else 0
    lengths = torch.full((B, HKV), tokens, **i32)
    budgets = torch.full((B,), BUDGET if quest else 0, **i32)
    prompt = torch.full((B, HKV), max(tokens - 16, 0), **i32)
    touched = x["table"][:, x["npg"] - 1].contiguous()
    fill = torch.full((B,), PAGE if quest else 0, **i32)
    counts = torch.zeros(2, B, dtype=torch.int64, device=dev)
    table = x["table"][:, None, :].expand(B, HKV, TABLE)
    out = torch.zeros_like(x["q"])
    qs = importlib.import_module(f"{mod}.quest_select")  # (a baseline copy: its own Triton kernels)
    pd = importlib.import_module(f"{mod}.paged_decode")
    lo, hi = x["bounds"]
    for b in range(B):  # every block's bounds, as at the prompt's end
        qs.cache_page_bounds(k_cache, x["table"][b, : x["npg"]].contiguous(), torch.full((x["npg"],), PAGE, **i32),
                             lo, hi)

    def run():
        qs.cache_page_bounds(k_cache, touched, fill, lo, hi)
        prompt_read = torch.empty(B, HKV, **i32)
        sel, sel_len = qs.quest_select(x["q"], lo, hi, table, lengths, budgets, PAGE, width=WIDTH,
                                       prompt_kept=prompt, prompt_read=prompt_read, read_counts=counts)
        pd.paged_decode(x["q"], k_cache, v_cache, sel, sel_len, max_len=sel.shape[2] * PAGE, out=out,
                        skip_empty=True)
        return sel, sel_len, out

    return run


def keep_layer(x: dict, B: int, dev: str, row) -> None:
    """SnapKV's layer inside the graph (``server/vllm_engine/keep_slots.py``): every row keeps a tenth of its prompt per
    KV head (sorted random positions) and reads them plus 16 generated tokens through the pointer to its own stack;
    then the same launch over rows without keep-sets (what a dense step pays with the switch on)."""
    from server.vllm_engine import cache_decode
    from server.vllm_engine.keep_slots import KeepSlots

    kept = CONTEXT // 10
    states, rows = [], []
    for b in range(B):
        sets = [torch.randperm(CONTEXT - 16, device=dev)[:kept].sort().values for _ in range(HKV)]
        st = SimpleNamespace(keep={"l0": cache_decode.keep_set(sets)}, keep_stack=None)
        states.append(st)  # (the stacks live as long as the rows that point to them)
        rows.append((b, cache_decode.stacked_keep(st, ["l0"]), CONTEXT, CONTEXT - 16))
    slots = KeepSlots(B, 1, HKV, torch.device(dev))
    out = torch.zeros_like(x["q"])
    slots.fill(B, rows)
    row(case="keep layer (snapkv:10 rows, pointers to their stacks)", B=B,
        ms=kernels_bench.bench(lambda: slots.forward(0, B, x["q"], x["cache"], x["table"], out), graph=True))
    slots.fill(B, [])
    row(case="keep layer, rows without keep-sets", B=B,
        ms=kernels_bench.bench(lambda: slots.forward(0, B, x["q"], x["cache"], x["table"], out), graph=True))


def measure(B: int, dev: str, mods: list[str], smoke: bool, row) -> None:
    """Every case at batch ``B``: the layer per kernel package (each checked against the first), the dense
    yardstick, the scores and the selection's settings."""
    from attention_backends.kernels.paged_decode import paged_decode
    from attention_backends.kernels.quest_select import quest_page_scores, quest_select

    x = inputs(B, dev)
    ref = None
    for mod in mods:
        run = layer_fn(mod, x, quest=True)
        sel, sel_len, out = (t.clone() for t in run())
        if ref is None:
            ref = (sel, sel_len, out)
        else:  # the baseline selects the same blocks and attends alike
            same = bool(torch.equal(sel_len, ref[1]) and torch.equal(sel, ref[0])
                        and torch.allclose(out.float(), ref[2].float(), atol=2e-2, rtol=2e-2))
            row(case="same selection and output as this tree", B=B, kernels=mod, same=same)
        row(case="quest layer", B=B, kernels=mod, ms=kernels_bench.bench(run, graph=True))
        row(case="dense rows (no budget)", B=B, kernels=mod,
            ms=kernels_bench.bench(layer_fn(mod, x, quest=False), graph=True))
    q, (lo, hi) = x["q"], x["bounds"]
    k_cache, v_cache = x["cache"].unbind(1)
    lens = torch.full((B, HKV), CONTEXT, dtype=torch.int32, device=dev)
    table = x["table"][:, None, :].expand(B, HKV, TABLE)
    row(case="dense attention (paged_decode, 32K)", B=B,
        ms=kernels_bench.bench(lambda: paged_decode(q, k_cache, v_cache, table, lens, max_len=TABLE * PAGE),
                               graph=True))
    keep_layer(x, B, dev, row)
    budgets = torch.full((B,), BUDGET, dtype=torch.int32, device=dev)

    def scores_fn():
        return quest_page_scores(q, lo, hi, table, lens, PAGE, budget_pages=budgets, width=WIDTH)

    scores = scores_fn()
    row(case="scores alone", B=B, ms=kernels_bench.bench(scores_fn, graph=True))
    base, _ = quest_select(q, lo, hi, table, lens, budgets, PAGE, width=WIDTH, scores=scores)
    for chunk in ((4, 16) if smoke else (512, 1024, 2048, 4096)):
        for warps in ((4,) if smoke else (4, 8, 16)):
            def select_fn(chunk=chunk, warps=warps):
                return quest_select(q, lo, hi, table, lens, budgets, PAGE, width=WIDTH, scores=scores, chunk=chunk,
                                    num_warps=warps)

            row(case="select alone", B=B, chunk=chunk, warps=warps, same=bool(torch.equal(select_fn()[0], base)),
                ms=kernels_bench.bench(select_fn, graph=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--baseline", default="", help="kernel packages to time beside this tree's, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="the CPU (TRITON_INTERPRET=1): tiny shapes, nothing timed")
    a = ap.parse_args()
    global H, HKV, D, TABLE, CONTEXT, BUDGET, WIDTH
    dev = "cuda"
    if a.smoke:
        dev, H, HKV, D, TABLE, CONTEXT, BUDGET, WIDTH = "cpu", 4, 2, 16, 40, 256, 3, 8
        kernels_bench.bench = lambda fn, graph=False: (fn(), float("nan"))[1]
    rows = []

    def row(**kw):
        rows.append(kw)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()))

    mods = ["attention_backends.kernels"] + [m for m in a.baseline.split(",") if m]
    card = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    log(card, torch.__version__)
    for B in ((1, 3) if a.smoke else (1, 8, 32)):
        measure(B, dev, mods, a.smoke, row)
        if dev == "cuda":
            torch.cuda.empty_cache()
    bad = [r for r in rows if r.get("same") is False]
    with open(os.path.join(a.out, "quest-graph-layer.json"), "w") as f:
        json.dump({"card": card, "torch": torch.__version__, "rows": rows}, f, indent=1)
    if bad:
        raise SystemExit(f"{len(bad)} variants disagree with this tree's selection: {bad}")


if __name__ == "__main__":
    main()
