"""Host time of a decode step's bookkeeping, without the model: what the engine does on the CPU before each
step's launch (each sequence's page decisions, the step buffers' inputs and page-table updates) for a batch of
Qwen2.5-7B-shaped sequences (28 layers x 4 KV heads, pages of 16 tokens). Ada-SnapKV-like sequences hold a
different number of tokens in every head, so some head crosses a page boundary nearly every step; SnapKV- and
dense-like ones hold the same number in every head.

A step's inputs depend on the previous step's token, so unless the engine launches the step ahead from the
device's argmax (greedy batches, ``NativeEngine._complete``) this work runs while the device waits: on the H200
(2026-11-30) ada_snapkv:10 at batch 8 took 6.9 ms a step against 5.0 ms of GPU work. Runs on any machine (the
buffers live on the CPU here; page-table edits are host work either way).

    python benchmarks/decode_host.py --batch 8,32 --steps 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine.decode_step import StepBuffers  # noqa: E402
from server.engine.page_pool import PagePool  # noqa: E402
from server.engine.sequence_kv import SequenceKV  # noqa: E402

LAYERS, KV_HEADS, PAGE, MAX_PAGES = 28, 4, 16, 2200


def sequences(batch: int, kind: str, pool: PagePool, seed: int = 0) -> list[SequenceKV]:
    """Sequences as a 32K prompt leaves them after prefill: every head's kept tokens on their pages."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(batch):
        s = SequenceKV(pool, LAYERS, KV_HEADS)
        if kind == "ada":  # heads keep between 1% and 25% of the prompt: every residue mod the page size
            kept = torch.randint(328, 8192, (LAYERS, KV_HEADS), generator=g)
        else:
            kept = torch.full((LAYERS, KV_HEADS), 32768 // (10 if kind == "snapkv" else 1))
        pages = -(-kept // PAGE)
        s._grow(int(pages.max()))
        ids = pool.allocate(int(pages.sum())).int()
        at = 0
        for layer in range(LAYERS):
            for head in range(KV_HEADS):
                n = int(pages[layer, head])
                s.tables[layer, head, :n] = ids[at : at + n]
                at += n
        s.lengths[:] = kept
        s.prompt_kept[:] = kept
        s.pages_held[:] = pages
        s._tables_changed()
        seqs.append(s)
    return seqs


def host_step(seqs: list[SequenceKV], buf: StepBuffers, step: int, spare: int) -> int:
    """What :meth:`Runner.launch_decode` does on the host before the graph replays, and after it. Returns how many
    sequences took pages (each a page-table edit the step buffers then apply): the work that varies by kind."""
    edits = 0
    for s in seqs:
        before = len(s.grown)
        spare -= s.prepare_append(2048 - step, spare)
        edits += len(s.grown) > before
    lengths = torch.stack([s.lengths for s in seqs]) + 1
    prompt_kept = torch.stack([s.prompt_kept for s in seqs])
    b = len(seqs)
    buf.load(seqs, [1] * b, [32768 + step] * b, [0] * b, lengths, prompt_kept, b, 0)
    for s in seqs:
        s.commit_append()
    return edits


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="8,32")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--kinds", default="dense,snapkv,ada")
    p.add_argument("--ahead", type=int, default=1, help="1: heads take pages ahead of need (the engine's rule, "
                   "given spare pages); 0: only when needed (the rule before 2026-11-30's third session)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"host work per decode step (us), {args.steps} steps, torch {torch.__version__}")
    for batch in map(int, args.batch.split(",")):
        for kind in args.kinds.split(","):
            pages = batch * LAYERS * KV_HEADS * ((MAX_PAGES + 2) if kind == "dense" else 600)
            pool = PagePool(pages, PAGE, 1, torch.float16, "cpu")  # head dim 1: page contents are not touched
            seqs = sequences(batch, kind, pool)
            buf = StepBuffers(batch, LAYERS, KV_HEADS, MAX_PAGES + 64, torch.device("cpu"))
            spare = pool.free_pages if args.ahead else 0
            for step in range(3):  # first loads copy whole tables
                host_step(seqs, buf, step, spare)
            t0, edits = time.perf_counter(), 0
            for step in range(args.steps):
                edits += host_step(seqs, buf, step, spare)
            us = (time.perf_counter() - t0) / args.steps * 1e6
            print(f"batch {batch:3d} {kind:7s} {us:8.0f} us/step  {us / batch:6.0f} us/sequence  "
                  f"{edits / args.steps / batch:5.3f} table edits/sequence/step", flush=True)


if __name__ == "__main__":
    main()
