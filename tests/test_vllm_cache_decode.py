"""Quest rows over vLLM's own paged cache (``server/vllm_engine/cache_decode.py``, the CUDA backend's decode path),
against the per-request reference decode state, on a cache in vLLM's FlashAttention layout. No vLLM needed: the
module is plain PyTorch and Triton (the interpreter on the CPU)."""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attention_backends import parse_pattern, prepare_decode, sparse_decode  # noqa: E402
from attention_backends.kernels.paged_decode import shared_pages_from_contiguous  # noqa: E402
from server.vllm_engine import cache_decode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4 if DEV == "cpu" else 4e-3  # (CUDA: tl.dot's float32 is TF32; H200, 2026-12-02: 8.3e-4)


REPORT_FIELDS = ("kv_tokens_read", "generated_tokens_read", "dense_kv_tokens_read", "kv_bytes_read",
                 "dense_kv_bytes_read")


def check_rows(out, q, tokens, rows, seqs, layer, k_all, v_all, refs, ref_reports, step):
    """Each row's output (``out``, on the CPU) equals its reference state's step, which appends the row's fresh key
    and value; the reference reports are collected for the step's report check."""
    for i, r in enumerate(rows):
        t = seqs[r] - 1
        expect, report = sparse_decode(q[tokens[i]], k_all[layer, r, :, t], v_all[layer, r, :, t], refs[layer][r])
        ref_reports[r].append(report)
        err = float((out[tokens[i]].double() - expect.double()).norm() / expect.double().norm())
        assert err < TOL, (step, layer, r, err)


def assert_sums(got, reports, tag) -> None:
    """A step's report sums its layers' reports."""
    for name in REPORT_FIELDS:
        assert getattr(got, name) == sum(getattr(x, name) for x in reports), (*tag, name)


@contextlib.contextmanager
def no_host_sync():
    """On CUDA, an operation that waits for the device raises here (torch's sync debug mode): a step's builder runs
    while vLLM's previous step computes, and a wait there idles the GPU while the step is launched."""
    if DEV != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def launched_without_sync(check: bool):
    """A decode step's rows (plan and every layer) launch without waiting for the device: vLLM's next step is
    planned and launched while this one computes (two steps in flight), so a wait idles the GPU."""
    return no_host_sync() if check else contextlib.nullcontext()


class Req:  # what cache_decode reads of the backend's RequestState
    def __init__(self, spec, prompt_len):
        self.spec, self.prompt_len = spec, prompt_len
        self.budget = cache_decode.request_budget(spec, prompt_len)


@pytest.mark.parametrize("heads,graphs,batch", [((4, 2), False, 3), ((4, 2), True, 3), ((3, 1), True, 3),
                                                ((4, 2), True, 1), ((4, 2), False, 1)])
def test_quest_rows_over_vllms_cache_match_the_reference_state_step_after_step(heads, graphs, batch):
    # graphs: the rows padded to a bucket and run over RowGraphs' static buffers (captured on CUDA; on the CPU the
    # capture fails and the same static path runs eagerly). batch 1: size-1 dimensions may carry any stride
    h, h_kv = heads
    d, block, layers = 16, 16, 2
    # partial last blocks; budgets of 1, 2 and 1 pages at ratio 8 (the last below its pages)
    prompts = [75, 135, 40][:batch]
    spec = parse_pattern("quest:8")
    assert cache_decode.reads_cache(spec, block) and not cache_decode.reads_cache(spec, 32)
    steps = 10  # crosses a block boundary in every row
    g = torch.Generator().manual_seed(h)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    B, cap = len(prompts), max(prompts) + steps
    # each layer's whole sequence (prompt, then the generated tokens), written into one cache per layer
    k_all, v_all = rand(layers, B, h_kv, cap, d), rand(layers, B, h_kv, cap, d)
    caches, tables = [], None
    for layer in range(layers):
        gl = torch.Generator().manual_seed(100)  # the same block tables in every layer, as vLLM's
        cache, tables = shared_pages_from_contiguous(k_all[layer], v_all[layer], block, generator=gl)
        caches.append(cache.to(DEV))
    tables = tables.to(DEV)
    # reference: the per-request Quest state, built from the prompt, fed one token a step
    refs = [[prepare_decode(rand(h, n, d), k_all[layer, b, :, :n], v_all[layer, b, :, :n], spec)
             for b, n in enumerate(prompts)] for layer in range(layers)]
    reqs = [Req(spec, n) for n in prompts]
    assert [r.budget for r in reqs] == [1, 2, 1][:batch]
    layout = cache_decode.CacheLayout(block, caches[0].shape[0], h_kv, d, torch.float32, torch.device(DEV))
    bounds = layout.bounds(layers)
    for layer in range(layers):  # the prompts' bounds, written when their prefill ended
        for b, n in enumerate(prompts):
            cache_decode.prompt_bounds(caches[layer], tables[b], n, bounds.of(f"layer{layer}"))
    row_graphs = cache_decode.RowGraphs() if graphs else None
    for step in range(steps):
        seqs = [n + step + 1 for n in prompts]
        # tokens 5, 0 and 9 of the step's flattened batch: rows in another order than the block table's
        tokens, rows = ([5, 0, 9], [2, 0, 1]) if B == 3 else ([5], [0])
        batch_table = tables[rows]  # the step's block table holds the rows in its own order
        q = rand(10, h, d)
        spec_rows = [(tokens[i], i, seqs[rows[i]], prompts[rows[i]], reqs[rows[i]].budget) for i in range(B)]
        batch_table, q_dev = batch_table.to(DEV), q.to(DEV)
        outs = [torch.full((10, h, d), float("nan"), device=DEV) for _ in range(layers)]
        with launched_without_sync(graphs and step >= 2):  # (once the shapes' graphs are captured)
            qr = cache_decode.build_quest_rows([reqs[r] for r in rows], spec_rows, batch_table, h_kv, block,
                                               pad_to=row_graphs.bucket(B) if row_graphs else None)
            for layer in range(layers):
                cache_decode.quest_rows_forward(qr, f"layer{layer}", q_dev, caches[layer], bounds.of(f"layer{layer}"),
                                                outs[layer], row_graphs)
        ref_reports = {r: [] for r in rows}
        for layer in range(layers):
            out = outs[layer].cpu()
            check_rows(out, q, tokens, rows, seqs, layer, k_all, v_all, refs, ref_reports, step)
            assert not torch.isnan(out[tokens]).any()
            assert torch.isnan(out[[t for t in range(10) if t not in tokens]]).all()  # no other token written
        for (req, got, gen_dense), r in zip(cache_decode.step_reports(qr), rows, strict=True):
            # the step's report sums the layers' as the reference counts them (which pages held prompt tokens)
            assert req is reqs[r]
            assert_sums(got, ref_reports[r], (step, r))
            assert gen_dense == (seqs[r] - prompts[r]) * h_kv * layers
            assert got.kv_cache_tokens == seqs[r] * h_kv * layers
    if row_graphs is not None and DEV == "cuda":  # the later steps replayed captured graphs
        assert row_graphs.broken is None and len(row_graphs.graphs) >= layers


def test_a_step_plan_batches_quest_rows_over_the_cache_and_leaves_the_rest_to_their_paths(monkeypatch):
    """The builder's plan: a Quest row becomes ``plan.quest`` (each step writes its current block's bounds; its
    prompt's were written when its prefill ended); quest:1 (every page) is left to vLLM's kernel with its report
    written on the host; a SnapKV row becomes ``plan.keep``, its report written on the host; Quest with pages other
    than vLLM's blocks keeps its per-row state. vLLM's kernel skips only the rows written here."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from attention_backends.cost import ModelShape
    from server.contract.cost import RequestCost
    from server.vllm_engine import worker_state as ws
    from server.vllm_engine.step_plan import make_plan, parent_metadata

    layers, h_kv, d, block = 2, 2, 16, 16
    monkeypatch.setattr(ws, "CACHE", cache_decode.CacheLayout(block, 40, h_kv, d, torch.float32, torch.device("cpu")))
    monkeypatch.setattr(ws, "_BOUNDS", None)
    monkeypatch.setattr(ws, "GRAPHS", None)
    monkeypatch.setattr(ws, "PENDING", [])
    monkeypatch.setattr(ws, "SLOTS", {})
    monkeypatch.setattr(ws, "_SHAPE", ModelShape(layers, 4, h_kv, d, 64, 128, 100))
    monkeypatch.setattr(ws, "LAYER_NAMES", {"l0": None, "l1": None})
    quest32 = '{"decode": {"method": "quest", "compression_ratio": 8, "params": {"page_size": 32}}}'
    for slot, (pattern, prompt) in enumerate([("quest:8", 75), ("quest:1", 40), ("snapkv:8", 60), (quest32, 30)]):
        params = SimpleNamespace(extra_args={ws.PATTERN_KEY: pattern, ws.REQUEST_KEY: f"r{slot}"})
        ws.add(slot, params, prompt, resumed=False)
        ws.SLOTS[slot].seen = prompt
        ws.SLOTS[slot].bounds_ready = True  # (Quest's prompt bounds: written when its prefill ended, backend.py)
    assert [st.cache_decode for st in ws.SLOTS.values()] == [True, True, True, False]
    snap = ws.SLOTS[2]  # its keep-sets, as its prefill's last chunk left them: 8 and 6 positions in l0, 7 and 7 in l1
    ar = lambda n: torch.arange(n, device=DEV)  # noqa: E731
    snap.keep = {"l0": cache_decode.keep_set([ar(8), ar(6)]), "l1": cache_decode.keep_set([ar(7), ar(7) + 50])}
    cache_decode.stacked_keep(snap, ["l0", "l1"])  # (its one read of the device, once per request: its first step)

    @dataclass
    class Common:  # the fields of vLLM's CommonAttentionMetadata that a plan reads
        num_reqs: int
        max_query_len: int
        query_start_loc_cpu: torch.Tensor
        seq_lens: torch.Tensor
        seq_lens_cpu_upper_bound: torch.Tensor
        block_table_tensor: torch.Tensor
        max_seq_len: int

    def step(seq_lens):  # (on CUDA: the step's tensors on the device, and no wait for it while planning)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        common = Common(4, 1, torch.arange(5, dtype=torch.int32), lens.to(DEV), lens,
                        torch.arange(4 * 10, dtype=torch.int32, device=DEV).view(4, 10), max(seq_lens))
        with no_host_sync():
            return common, make_plan(common)

    common, plan = step([76, 41, 61, 31])
    assert [r.row for r in plan.decode] == [3, 2, 0]  # (the per-row state, the keep rows, the Quest rows)
    assert plan.quest.states == [ws.SLOTS[0]] and plan.quest.tokens.tolist() == [0]
    assert plan.keep.tokens.tolist() == [2] and plan.keep.kept.tolist() == [[[8, 6], [7, 7]]]
    assert plan.keep.lengths.tolist() == [[[9, 7], [8, 8]]] and plan.keep.positions[0, 1, 1].tolist()[:2] == [50, 51]
    snap_cost = snap.cost.decode  # 28 prompt tokens of 60 x 2 heads x 2 layers, and the generated one in each
    assert (snap_cost.actual_units, snap_cost.dense_units) == (28, 60 * h_kv * layers)
    assert snap_cost.kv_bytes_read == (28 + 1 * h_kv * layers) * 2 * d * 4
    assert plan.quest.touched.tolist() == [4] and plan.quest.touched_fill.tolist() == [12]  # its current block
    with no_host_sync():
        parent = parent_metadata(common, plan)
    assert parent.seq_lens.tolist() == [1, 41, 1, 1] and parent.seq_lens_cpu_upper_bound.tolist() == [1, 41, 1, 1]
    quest1 = ws.SLOTS[1].cost.decode  # every page read: the report says ratio 1 without a device count
    assert quest1.actual_units == quest1.dense_units == 40 * h_kv * layers
    assert ws.PENDING == [plan.quest]
    common, plan = step([77, 42, 62, 32])
    assert plan.quest.touched.tolist() == [4] and plan.quest.touched_fill.tolist() == [13]

    # no room for the bounds: the Quest request runs dense (vLLM's kernel), the others are unchanged
    def no_room(self, layers):
        raise torch.OutOfMemoryError("test")

    monkeypatch.setattr(cache_decode.CacheLayout, "bounds", no_room)
    monkeypatch.setattr(ws, "_BOUNDS", None)
    common, plan = step([78, 43, 63, 33])
    assert plan.quest is None and ws.SLOTS[0].fallback is not None and ws.CACHE is None
    assert parent_metadata(common, plan).seq_lens.tolist() == [78, 43, 1, 1]
    assert isinstance(ws.SLOTS[0].cost, RequestCost)


@pytest.mark.parametrize("prompts", [[75, 130, 40], [75]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("method", ["snapkv", "ada_snapkv"])
def test_keep_rows_over_vllms_cache_match_the_reference_state_step_after_step(method, graphs, prompts):
    """SnapKV / Ada-SnapKV over vLLM's cache: the prompt's keys read back from the cache, the keep-sets fixed from
    them, then every step one paged kernel per layer over the kept and generated tokens: the outputs and the
    host-side reports equal the per-request reference state's."""
    from types import SimpleNamespace

    from attention_backends import decode_keep

    h, h_kv, d, block, layers = 4, 2, 16, 16, 2
    steps = 6  # (a batch of one: its size-1 dimensions may carry any stride, as vLLM's single decode row did)
    # a window of 32 queries: shorter than the prompts, longer than one prompt's first chunk
    spec = parse_pattern({"decode": {"method": method, "compression_ratio": 4, "params": {"window": 32}}})
    window = int(spec.decode.params["window"])
    g = torch.Generator().manual_seed(7)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    B, cap = len(prompts), max(prompts) + steps
    k_all, v_all = rand(layers, B, h_kv, cap, d), rand(layers, B, h_kv, cap, d)
    q_prompt = [rand(h, n, d) for n in prompts]
    caches = []
    for layer in range(layers):
        cache, tables = shared_pages_from_contiguous(k_all[layer], v_all[layer], block,
                                                     generator=torch.Generator().manual_seed(100))
        caches.append(cache.to(DEV))
    tables = tables.to(DEV)
    names = [f"layer{i}" for i in range(layers)]
    row_graphs = cache_decode.RowGraphs() if graphs else None
    states = [SimpleNamespace(spec=spec, keep={}, keep_stack=None) for _ in prompts]
    refs = []
    for layer, name in enumerate(names):
        refs.append([])
        for b, n in enumerate(prompts):
            keys = cache_decode.prompt_keys(caches[layer], tables[b], n)
            assert torch.equal(keys.cpu(), k_all[layer, b, :, :n])
            # the prompt prefilled in two chunks: the window follows them, the keep-sets come from the cache's keys
            qd = q_prompt[b].to(DEV)
            win = cache_decode.keep_window(None, qd[:, : n // 2], window)
            win = cache_decode.keep_window(win, qd[:, n // 2 :], window)
            assert torch.equal(win, qd[:, -window:]) and win.is_contiguous()
            states[b].keep[name] = cache_decode.fix_keep_set(win, caches[layer], tables[b], spec, n, "reference")
            expect = decode_keep(qd[:, -window:], k_all[layer, b, :, :n].to(DEV), spec.decode)
            assert [p[: int(c)].tolist() for p, c in zip(*states[b].keep[name], strict=True)] == \
                [e.tolist() for e in expect]
            refs[layer].append(prepare_decode(q_prompt[b], k_all[layer, b, :, :n], v_all[layer, b, :, :n], spec))
    for step in range(steps):
        seqs = [n + step + 1 for n in prompts]
        tokens, rows = ([4, 0, 7], [1, 2, 0]) if B == 3 else ([4], [0])  # the step's order is not the requests'
        q = rand(8, h, d)
        batch_table, q_dev = tables[rows].to(DEV), q.to(DEV)
        outs = [torch.full((8, h, d), float("nan"), device=DEV) for _ in names]
        with launched_without_sync(graphs and step >= 2):
            kr = cache_decode.build_keep_rows([states[r] for r in rows],
                                              [(tokens[i], i, seqs[r], prompts[r]) for i, r in enumerate(rows)],
                                              batch_table, names, block,
                                              pad_to=row_graphs.bucket(B) if row_graphs else None)
            for layer, name in enumerate(names):
                cache_decode.keep_rows_forward(kr, name, q_dev, caches[layer], outs[layer], row_graphs)
        ref_reports = {r: [] for r in rows}
        for layer in range(len(names)):
            out = outs[layer].cpu()
            check_rows(out, q, tokens, rows, seqs, layer, k_all, v_all, refs, ref_reports, step)
            assert torch.isnan(out[[t for t in range(8) if t not in tokens]]).all()
        for r in rows:
            got = cache_decode.host_step_report(spec, states[r].keep_stack[2], seqs[r], prompts[r], h_kv * layers, d, 4)
            assert_sums(got, ref_reports[r], (step, r))
    if row_graphs is not None and DEV == "cuda":
        assert row_graphs.broken is None and len(row_graphs.graphs) >= layers


def test_quest_rows_in_the_full_decode_graph_buffers_match_the_reference_and_leave_other_rows_alone():
    """Quest inside vLLM's full decode graph (``quest_slots``): the kernels run over every row of a uniform decode
    batch from persistent per-row buffers the builder writes each step. Captured once with no Quest row (as vLLM
    captures at start-up; on the CPU the same code runs eagerly each step), then replayed: the Quest rows equal the
    reference state step after step, a dense row and a padding row keep what vLLM's kernel wrote, vLLM's kernel gets
    the Quest rows cut to one key, and the device counts give the reference's reports. On CUDA, dense steps between
    them replay the same graph and leave every row alone."""
    from server.vllm_engine.quest_slots import QuestSlots, SlotStep

    h, h_kv, d, block, layers = 4, 2, 16, 16, 2
    prompts = [75, 50, 135, 0]  # rows 0 and 2 Quest, row 1 dense, row 3 padding (vLLM: length 0, block 0)
    quest_rows = [0, 2]
    spec = parse_pattern("quest:4")
    steps = 10
    g = torch.Generator().manual_seed(11)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    B, cap = len(prompts), max(prompts) + steps
    k_all, v_all = rand(layers, B, h_kv, cap, d), rand(layers, B, h_kv, cap, d)
    caches = []
    for layer in range(layers):
        cache, tables = shared_pages_from_contiguous(k_all[layer], v_all[layer], block,
                                                     generator=torch.Generator().manual_seed(100))
        caches.append(cache.to(DEV))
    tables[3] = 0
    tables = tables.to(DEV)
    refs = [[prepare_decode(rand(h, n, d), k_all[layer, b, :, :n], v_all[layer, b, :, :n], spec) if b in quest_rows
             else None for b, n in enumerate(prompts)] for layer in range(layers)]
    reqs = [Req(spec, n) for n in prompts]
    assert [reqs[b].budget for b in quest_rows] == [2, 3]
    layout = cache_decode.CacheLayout(block, caches[0].shape[0], h_kv, d, torch.float32, torch.device(DEV))
    bounds = layout.bounds(layers)
    for layer in range(layers):  # the prompts' bounds, written when their prefill ended
        for b in quest_rows:
            cache_decode.prompt_bounds(caches[layer], tables[b], prompts[b], bounds.of(f"layer{layer}"))
    slots = QuestSlots(8, h_kv, block, torch.device(DEV), width=4)
    q_in = torch.zeros(B, h, d, device=DEV)
    outs = [torch.zeros(B, h, d, device=DEV) for _ in range(layers)]
    step_of = lambda seqs: SlotStep(slots, B, tables, layers=layers, head_dim=d, element_bytes=4,  # noqa: E731
                                    block_size=block)

    def run(step):
        for layer in range(layers):
            slots.forward(step, q_in, caches[layer], bounds.of(f"layer{layer}"), outs[layer])

    graph = None
    if DEV == "cuda":  # vLLM's capture: a warm-up, then the capture, no Quest row in the batch
        slots.fill(torch.full((B,), 5, dtype=torch.int32, device=DEV), tables, [])
        run(step_of(None))
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(step_of(None))
    sentinel = 7.0
    for step in range(steps):
        seqs = [n + step + 1 if n else 0 for n in prompts]
        st = step_of(seqs)
        for b in quest_rows:
            st.states.append(reqs[b])
            st.index.append(b)
            st.host.append((seqs[b], prompts[b], reqs[b].budget))
        q = rand(B, h, d)
        q_in.copy_(q.to(DEV))
        for out in outs:
            out.fill_(sentinel)  # what vLLM's kernel wrote for every row
        seq_lens = torch.tensor(seqs, dtype=torch.int32).to(DEV)  # (vLLM's persistent buffer, written before)
        if graph is not None and step % 3 == 1:  # a dense step between Quest steps replays the same graph
            slots.fill(seq_lens, tables, [])
            graph.replay()
            assert all(bool((out == sentinel).all()) for out in outs) and not slots.counts.any()
        with launched_without_sync(step >= 1):
            slots.fill(seq_lens, tables, [(b, prompts[b], reqs[b].budget) for b in quest_rows])
            if graph is not None:
                graph.replay()
            else:
                run(st)
        assert slots.seq_cut[:B].tolist() == [1, seqs[1], 1, 0]
        ref_reports = {b: [] for b in quest_rows}
        for layer in range(layers):
            out = outs[layer].cpu()
            check_rows(out, q, quest_rows, quest_rows, seqs, layer, k_all, v_all, refs, ref_reports, step)
            assert (out[[1, 3]] == sentinel).all()
        for (req, got, gen_dense), b in zip(cache_decode.step_reports(st, slots.counts.tolist()), quest_rows,
                                            strict=True):
            assert req is reqs[b]
            assert_sums(got, ref_reports[b], (step, b))
            assert gen_dense == (seqs[b] - prompts[b]) * h_kv * layers


def test_a_uniform_decode_step_plans_its_quest_rows_into_the_full_graph_buffers(monkeypatch):
    """Where vLLM captures full decode graphs, every uniform decode step writes the graph's buffers (sparse rows or
    not: a replay reads them) and hands vLLM's kernel the buffer's lengths, Quest rows cut to one key, with vLLM's
    longest sequence kept. A step with a row the graph does not take (SnapKV here) plans per step as before, and
    the dispatcher keeps such steps, and prefilling sparse requests, out of the full graphs."""
    from dataclasses import dataclass
    from types import SimpleNamespace

    from attention_backends.cost import ModelShape
    from server.vllm_engine import worker_state as ws
    from server.vllm_engine.quest_slots import QuestSlots
    from server.vllm_engine.step_plan import make_plan, parent_metadata

    layers, h_kv, d, block = 2, 2, 16, 16
    monkeypatch.setattr(ws, "CACHE", cache_decode.CacheLayout(block, 40, h_kv, d, torch.float32, torch.device(DEV)))
    monkeypatch.setattr(ws, "_BOUNDS", None)
    monkeypatch.setattr(ws, "GRAPHS", cache_decode.RowGraphs())
    slots = QuestSlots(8, h_kv, block, torch.device(DEV))
    monkeypatch.setattr(ws, "QUEST_GRAPH", slots)
    monkeypatch.setattr(ws, "PENDING", [])
    monkeypatch.setattr(ws, "SLOTS", {})
    monkeypatch.setattr(ws, "_SHAPE", ModelShape(layers, 4, h_kv, d, 64, 128, 100))
    monkeypatch.setattr(ws, "LAYER_NAMES", {"l0": None, "l1": None})

    @dataclass
    class Common:
        num_reqs: int
        max_query_len: int
        query_start_loc_cpu: torch.Tensor
        seq_lens: torch.Tensor
        seq_lens_cpu_upper_bound: torch.Tensor
        block_table_tensor: torch.Tensor
        max_seq_len: int

    def step(seq_lens, max_seq_len=4096):
        n = len(seq_lens)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        common = Common(n, 1, torch.arange(n + 1, dtype=torch.int32), lens.to(DEV), lens,
                        torch.arange(n * 10, dtype=torch.int32, device=DEV).view(n, 10), max_seq_len)
        with no_host_sync():
            plan = make_plan(common)
            return plan, parent_metadata(common, plan) if plan is not None else common  # (as the builder does)

    plan, parent = step([76, 41, 61])  # no sparse request yet: the buffers still follow the step
    assert plan.slots is not None and plan.slots.index == [] and ws.PENDING == []
    assert parent.seq_lens.data_ptr() == slots.seq_cut.data_ptr() and parent.seq_lens.tolist() == [76, 41, 61]
    for slot, (pattern, prompt) in enumerate([("quest:8", 75), ("dense", 40), ("quest:1", 60)]):
        ws.add(slot, SimpleNamespace(extra_args={ws.PATTERN_KEY: pattern, ws.REQUEST_KEY: f"r{slot}"}), prompt,
               resumed=False)
    ws.SLOTS[2].seen = 60
    assert ws.full_graph_blocked()  # the Quest request still prefills (its chunk is not a uniform decode row)
    ws.SLOTS[0].seen = 75
    assert ws.full_graph_blocked()  # its prompt's bounds are not written yet (the end of its prefill writes them)
    ws.SLOTS[0].bounds_ready = True
    assert not ws.full_graph_blocked()
    plan, parent = step([76, 41, 61])
    assert plan.slots.index == [0] and plan.slots.host == [(76, 75, ws.SLOTS[0].budget)]
    assert ws.PENDING == [plan.slots]
    assert parent.seq_lens.data_ptr() == slots.seq_cut.data_ptr() and parent.seq_lens.tolist() == [1, 41, 61]
    assert parent.seq_lens_cpu_upper_bound.tolist() == [1, 41, 61] and parent.max_seq_len == 4096
    assert slots.budgets[:3].tolist() == [ws.SLOTS[0].budget, 0, 0]
    assert slots.touched[0] == 4 and slots.touched_fill[:3].tolist() == [12, 0, 0]  # (fill 0: no bounds written)
    quest1 = ws.SLOTS[2].cost.decode  # quest:1 reads every page: vLLM's kernel, its report written here
    assert quest1.actual_units == quest1.dense_units == 60 * h_kv * layers

    ws.add(3, SimpleNamespace(extra_args={ws.PATTERN_KEY: "snapkv:8", ws.REQUEST_KEY: "r3"}), 60, resumed=False)
    ws.SLOTS[3].seen = 60
    snap = ws.SLOTS[3]
    snap.keep = {name: cache_decode.keep_set([torch.arange(8, device=DEV)] * h_kv) for name in ("l0", "l1")}
    cache_decode.stacked_keep(snap, ["l0", "l1"])
    assert ws.full_graph_blocked()
    plan, parent = step([77, 42, 62, 61])
    assert plan.slots is None and plan.quest is not None and plan.keep is not None
    assert parent.seq_lens.tolist() == [1, 42, 62, 1]

    # where the graph holds keep rows too (the default; SPARSE_SERVE_VLLM_KEEP_GRAPH=0 leaves them out), the SnapKV
    # row joins the full graph: its per-row values go into the keep buffers, vLLM's kernel skips it, and its report
    # is written at planning
    from server.vllm_engine.keep_slots import KeepSlots

    keep_slots = KeepSlots(8, layers, h_kv, torch.device(DEV))
    monkeypatch.setattr(ws, "KEEP_GRAPH", keep_slots)
    assert not ws.full_graph_blocked()
    reads_before = snap.cost.decode.actual_units
    plan, parent = step([78, 43, 63, 62])
    assert plan.slots is not None and plan.keep is None and plan.quest is None
    assert plan.slots.index == [0] and sorted(plan.slots.cut) == [0, 3]
    assert parent.seq_lens.tolist() == [1, 43, 63, 1] and parent.seq_lens_cpu_upper_bound.tolist() == [1, 43, 63, 1]
    assert keep_slots.pointers[3] == snap.keep_stack[0].data_ptr() and keep_slots.widths[3] == 8
    assert keep_slots.kept[3].tolist() == [[8, 8], [8, 8]] and keep_slots.lengths[3].tolist() == [[10, 10], [10, 10]]
    assert keep_slots.lengths[:3].sum() == 0 and keep_slots.prompt_lens[3] == 60
    assert snap.cost.decode.actual_units == reads_before + 8 * h_kv * layers  # (its kept tokens, every layer)

    # graphs per set of sparse kernels (SPARSE_SERVE_VLLM_DENSE_GRAPHS=1, graph_sizes): at a size whose graph holds
    # only the keep launch (3), the SnapKV row joins it and the Quest row, whose kernels it lacks, keeps its length
    # (vLLM's kernel attends densely for it) and is reported as a dense step
    from server.vllm_engine.graph_sizes import KEEP, QUEST, GraphSizes

    monkeypatch.setattr(ws, "GRAPH_SIZES", GraphSizes((1, 2, 4, 8), ((frozenset({KEEP}), (3,)),
                                                                    (frozenset({QUEST, KEEP}), (5,)))))
    quest = ws.SLOTS[0].cost.decode
    quest_before = (quest.actual_units, quest.dense_units)
    plan, parent = step([79, 44, 64])
    assert plan.slots.kernels == {KEEP} and plan.slots.index == [] and plan.slots.cut == []
    assert all(pending is not plan.slots for pending in ws.PENDING)  # (no Quest counts to read)
    assert parent.seq_lens.tolist() == [79, 44, 64]
    # its whole prompt read in every layer and KV head (the generated tokens are counted apart)
    assert quest.actual_units - quest_before[0] == quest.dense_units - quest_before[1] == 75 * h_kv * layers
    # a base size (4) replays a graph without the sparse kernels: no buffer written, vLLM's kernel keeps every length
    for slot in (0, 3):
        ws.SLOTS[slot].disable("a dense step")
    seq_cut = slots.seq_cut.clone()
    plan, parent = step([80, 45, 65, 64])
    assert (plan is None or plan.slots is None) and torch.equal(slots.seq_cut, seq_cut)
    assert parent.seq_lens.tolist() == [80, 45, 65, 64]
    plan, parent = step([81, 46, 66, 65, 0])  # the family of both (5): planned into the buffers as above
    assert plan.slots is not None and plan.slots.kernels == {QUEST, KEEP}
    assert parent.seq_lens.data_ptr() == slots.seq_cut.data_ptr()


def test_keep_rows_in_the_full_decode_graph_buffers_match_the_per_step_rows_and_leave_other_rows_alone():
    """SnapKV / Ada-SnapKV inside vLLM's full decode graph (``keep_slots``): each layer's launch over every batch row
    reads a keep row's own stack through its pointer and gives the per-step path's output; a dense row and a padding
    row keep what vLLM's kernel wrote; a step without keep rows clears the buffers."""
    from types import SimpleNamespace

    from server.vllm_engine.keep_slots import KeepSlots

    h, h_kv, d, block, names = 4, 2, 16, 16, ["l0", "l1"]
    prompts, gen = [70, 40, 52], 3  # batch rows 0 and 2 keep; row 1 is dense; row 3 is padding
    g = torch.Generator().manual_seed(12)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    cap = max(prompts) + gen
    k_all, v_all = rand(len(names), 3, h_kv, cap, d), rand(len(names), 3, h_kv, cap, d)
    caches, tables = [], None
    for layer in range(len(names)):
        cache, tables = shared_pages_from_contiguous(k_all[layer], v_all[layer], block,
                                                     generator=torch.Generator().manual_seed(100))
        caches.append(cache.to(DEV))
    table4 = torch.cat([tables, torch.zeros_like(tables[:1])]).to(DEV)
    states = {}
    for b in (0, 2):  # per layer and head, its own sorted subset of the prompt (counts differ)
        keep = {}
        for name in names:
            sets = [torch.randperm(prompts[b], generator=g)[: 5 + 3 * j + b].sort().values.to(DEV) for j in range(h_kv)]
            keep[name] = cache_decode.keep_set(sets)
        states[b] = SimpleNamespace(keep=keep, keep_stack=None)
    seqs = [n + gen for n in prompts]
    q = rand(4, h, d).to(DEV)
    per_step = cache_decode.build_keep_rows([states[0], states[2]], [(0, 0, seqs[0], prompts[0]),
                                                                    (2, 2, seqs[2], prompts[2])], table4, names, block)
    slots = KeepSlots(8, len(names), h_kv, torch.device(DEV))
    slots.fill(4, [(b, cache_decode.stacked_keep(states[b], names), seqs[b], prompts[b]) for b in (0, 2)])
    for i, name in enumerate(names):
        ref = torch.full((4, h, d), float("nan"), device=DEV)
        cache_decode.keep_rows_forward(per_step, name, q, caches[i], ref)
        out = torch.full((4, h, d), 5.0, device=DEV)
        with no_host_sync():
            slots.forward(i, 4, q, caches[i], table4, out)
        assert torch.equal(out[[0, 2]], ref[[0, 2]]), name
        assert bool((out[[1, 3]] == 5.0).all()), name
    if DEV == "cuda":  # the same launches captured as vLLM captures them (no keep row), then replayed
        slots.fill(4, [])
        graph, outs = torch.cuda.CUDAGraph(), [torch.zeros(4, h, d, device=DEV) for _ in names]
        with torch.cuda.graph(graph):
            for i in range(len(names)):
                slots.forward(i, 4, q, caches[i], table4, outs[i])
        for keep_rows in ([0, 2], [], [0, 2]):  # a dense step between keep steps leaves every row alone
            for out in outs:
                out.fill_(5.0)
            slots.fill(4, [(b, cache_decode.stacked_keep(states[b], names), seqs[b], prompts[b]) for b in keep_rows])
            graph.replay()
            for i, name in enumerate(names):
                ref = torch.full((4, h, d), 5.0, device=DEV)
                if keep_rows:
                    cache_decode.keep_rows_forward(per_step, name, q, caches[i], ref)
                assert torch.equal(outs[i][[0, 2]], ref[[0, 2]]) and bool((outs[i][[1, 3]] == 5.0).all()), name
    slots.fill(2, [(0, cache_decode.stacked_keep(states[0], names), seqs[0], prompts[0])])  # a smaller batch
    assert slots.lengths[0].min() > 0 and slots.lengths[1:].sum() == 0  # (row 2's stale request is not read)
    slots.fill(4, [])
    assert slots.lengths.sum() == 0 and slots.pointers.sum() == 0 and slots.kept.sum() == 0
    out = torch.full((4, h, d), 5.0, device=DEV)
    slots.forward(1, 4, q, caches[1], table4, out)
    assert bool((out == 5.0).all())


def test_the_graph_buffers_forget_quest_rows_once_a_step_has_none():
    """A step without Quest rows writes only the lengths vLLM's kernel reads; the step after Quest rows clears every
    buffer row, so a later, larger batch replays no stale budget over a dense row's output."""
    from server.vllm_engine.quest_slots import QuestSlots

    slots = QuestSlots(8, 2, 16, torch.device(DEV))
    table = torch.arange(8 * 10, dtype=torch.int32, device=DEV).view(8, 10)
    seq = lambda *s: torch.tensor(s, dtype=torch.int32).to(DEV)  # noqa: E731
    slots.fill(seq(70, 40, 90, 33), table[:4], [(2, 80, 3)])
    assert slots.budgets[:4].tolist() == [0, 0, 3, 0] and slots.seq_cut[:4].tolist() == [70, 40, 1, 33]
    for lens in [(71, 41), (72, 42, 91, 34)]:  # two dense steps, the second wider than the first
        slots.fill(seq(*lens), table[: len(lens)], [])
        assert slots.seq_cut[: len(lens)].tolist() == list(lens)
        assert not slots.budgets.any() and not slots.lengths.any() and not slots.touched_fill.any()
