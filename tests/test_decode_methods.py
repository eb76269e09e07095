"""The plain-PyTorch references of the sparse decode methods: snapkv, ada_snapkv, quest."""

from __future__ import annotations

import math

import pytest
import torch

from attention_backends.api import prepare_decode, sparse_decode
from attention_backends.decode.ada_snapkv import per_head_floor
from attention_backends.decode.quest import page_upper_bounds
from attention_backends.decode.window_scores import avg_pool_same, max_pool_same, token_importance
from attention_backends.spec import parse_pattern

METHODS = ("snapkv", "ada_snapkv", "quest")


def spec_for(method: str, ratio: float, **params):
    if not params:
        return parse_pattern(f"{method}:{ratio:g}")
    return parse_pattern({"decode": {"method": method, "compression_ratio": ratio, "params": params}})


def random_qkv(h: int, h_kv: int, n: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(heads, n, d, generator=gen) for heads in (h, h_kv, h_kv))


def decode_steps(h: int, h_kv: int, d: int, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(h, d, generator=gen), torch.randn(h_kv, d, generator=gen),
             torch.randn(h_kv, d, generator=gen)) for _ in range(steps)]


def dense_attention(q_t, keys, values):
    """q_t [h, d] over keys/values [h_kv, L, d] (GQA), float32."""
    group = q_t.shape[0] // keys.shape[0]
    k = keys.repeat_interleave(group, dim=0)
    v = values.repeat_interleave(group, dim=0)
    probs = torch.softmax((q_t[:, None] @ k.transpose(1, 2)).squeeze(1) / math.sqrt(q_t.shape[-1]), dim=-1)
    return (probs[:, None] @ v).squeeze(1), probs


# -- ratio 1 is dense ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("h,h_kv", [(2, 2), (8, 2), (14, 2)])  # GQA groups 1, 4, 7
def test_ratio_one_equals_dense(method, h, h_kv):
    n, d = 70, 16  # n not a multiple of the page size
    q, k, v = random_qkv(h, h_kv, n, d)
    dense = prepare_decode(q, k, v, parse_pattern("dense"))
    sparse = prepare_decode(q, k, v, spec_for(method, 1))
    for q_t, k_t, v_t in decode_steps(h, h_kv, d, steps=40):  # crosses several page boundaries
        want, _ = sparse_decode(q_t, k_t, v_t, dense)
        got, report = sparse_decode(q_t, k_t, v_t, sparse)
        assert (got - want).abs().max().item() < 1e-5
        assert report.achieved_compression_ratio == pytest.approx(1.0)


# -- achieved compression tracks the target ------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_prompt():
    return random_qkv(8, 2, 4096, 64, seed=3)


@pytest.mark.parametrize("method", METHODS)
def test_achieved_ratio_within_15_percent(method, long_prompt):
    q, k, v = long_prompt
    (q_t, k_t, v_t), = decode_steps(8, 2, 64, steps=1)
    for r in (2, 5, 10, 20):
        state = prepare_decode(q, k, v, spec_for(method, r))
        _, report = sparse_decode(q_t, k_t, v_t, state)
        achieved = report.achieved_compression_ratio
        assert abs(achieved - r) / r < 0.15, (method, r, achieved)


# -- a planted needle survives at r = 20 ------------------------------------------------------------------------
def needle_problem(h=8, h_kv=2, n=4096, d=64, start=1000, length=32, seed=5):
    """Random keys of norm ~4; a run of ``length`` keys along one direction u (norm 10) that the last prompt
    queries and the decode query (10 u + noise) attend to almost exclusively."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    q = torch.randn(h, n, d, generator=gen) * 0.5
    k = torch.randn(h_kv, n, d, generator=gen) * 0.5
    v = torch.randn(h_kv, n, d, generator=gen)
    k[:, start : start + length] = 10 * u + 0.1 * torch.randn(h_kv, length, d, generator=gen)
    q[:, -256:] += 10 * u
    q_t = 10 * u + 0.5 * torch.randn(h, d, generator=gen)
    k_t, v_t = torch.randn(h_kv, d, generator=gen) * 0.5, torch.randn(h_kv, d, generator=gen)
    return q, k, v, (q_t, k_t, v_t), range(start, start + length)


@pytest.fixture(scope="module")
def needle():
    return needle_problem()


def test_needle_holds_the_attention_mass(needle):
    q, k, v, (q_t, k_t, v_t), span = needle
    idx = torch.tensor(list(span))
    # last prompt queries (window of 256, causal corner)
    probs = torch.stack([torch.softmax(
        (q[i, -256:] @ k[i // 4].T / 8).masked_fill(
            torch.arange(4096)[None] > torch.arange(4096 - 256, 4096)[:, None], float("-inf")), dim=-1)
        for i in range(8)])
    assert probs[..., idx].sum(-1).min().item() > 0.95
    # the decode query over prompt + its own token
    _, p = dense_attention(q_t, torch.cat([k, k_t[:, None]], 1), torch.cat([v, v_t[:, None]], 1))
    assert p[:, idx].sum(-1).min().item() > 0.95


@pytest.mark.parametrize("method", METHODS)
def test_needle_kept_at_r20(method, needle):
    q, k, v, (q_t, k_t, v_t), span = needle
    dense = prepare_decode(q, k, v, parse_pattern("dense"))
    state = prepare_decode(q, k, v, spec_for(method, 20))
    want, _ = sparse_decode(q_t, k_t, v_t, dense)
    got, report = sparse_decode(q_t, k_t, v_t, state)
    assert report.achieved_compression_ratio > 17
    if method == "quest":
        chosen = state.select(q_t)  # the selection the step just made (no append since)
        held = [set(c.tolist()) for c in chosen]
    else:
        held = [set(p.tolist()) for p in state.kept_positions]
    for head in held:
        assert set(span) <= head
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.05


# -- snapkv / ada_snapkv keep sets -----------------------------------------------------------------------------
def focused_and_diffuse(n=1024, d=32, seed=7):
    """KV head 0's group looks at a few tokens; KV head 1's group attends almost uniformly."""
    gen = torch.Generator().manual_seed(seed)
    h, h_kv = 4, 2
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    q = torch.randn(h, n, d, generator=gen) * 0.05
    k = torch.randn(h_kv, n, d, generator=gen)
    v = torch.randn(h_kv, n, d, generator=gen)
    k[0, 300:310] = 8 * u
    q[:2, -64:] += 8 * u
    return q, k, v


@pytest.mark.parametrize("method", ["snapkv", "ada_snapkv"])
def test_sinks_and_local_window_kept(method):
    q, k, v = focused_and_diffuse()
    n = k.shape[1]
    for params in ({}, {"sink_tokens": 8, "local_window": 40, "window": 64}):
        state = prepare_decode(q, k, v, spec_for(method, 4, **params))
        sinks, local = params.get("sink_tokens", 4), params.get("local_window", 128)
        for kept in state.kept_positions:
            held = set(kept.tolist())
            assert set(range(sinks)) <= held and set(range(n - local, n)) <= held
            assert len(held) == kept.numel()  # no duplicates


def test_snapkv_protected_priority_when_capacity_is_small():
    q, k, v = focused_and_diffuse()
    state = prepare_decode(q, k, v, spec_for("snapkv", 1, capacity=10, sink_tokens=4, local_window=32))
    for kept in state.kept_positions:
        assert kept.tolist() == [0, 1, 2, 3] + list(range(1018, 1024))


def test_snapkv_every_head_keeps_capacity():
    q, k, v = focused_and_diffuse()
    state = prepare_decode(q, k, v, spec_for("snapkv", 8, local_window=16))
    assert state.details["capacity"] == 128
    assert [p.numel() for p in state.kept_positions] == [128, 128]
    assert set(range(295, 315)) <= set(state.kept_positions[0].tolist())  # focused head keeps its peak


def test_ada_snapkv_adaptive_budget():
    q, k, v = focused_and_diffuse()
    n, h_kv = k.shape[1], k.shape[0]
    state = prepare_decode(q, k, v, spec_for("ada_snapkv", 8, local_window=16, window=64))
    capacity = state.details["capacity"]
    lengths = [p.numel() for p in state.kept_positions]
    floor = per_head_floor(capacity, 0.2, 4 + 16)
    assert capacity == math.ceil(n / 8) and floor == 26
    assert sum(lengths) == capacity * h_kv == sum(state.details["per_head"])
    assert min(lengths) >= floor
    assert lengths[1] > lengths[0] + 20  # the diffuse head gets more of the budget than the focused one
    assert set(range(300, 310)) <= set(state.kept_positions[0].tolist())
    _, report = sparse_decode(*decode_steps(4, 2, 32, 1)[0], state)
    assert report.achieved_compression_ratio == pytest.approx(n * h_kv / sum(lengths))


def test_ada_snapkv_floor_capped_at_capacity():
    q, k, v = focused_and_diffuse()
    state = prepare_decode(q, k, v, spec_for("ada_snapkv", 20))  # C = 52 < 4 sinks + 128 local
    assert [p.numel() for p in state.kept_positions] == [52, 52]


def test_window_scores_reductions_and_pools():
    h, h_kv, n, d = 4, 2, 12, 8
    q, k, _ = random_qkv(h, h_kv, n, d, seed=11)
    w = 5
    probs = []
    for i in range(h):
        logits = q[i, -w:] @ k[i // 2].T / math.sqrt(d)
        for r in range(w):
            logits[r, n - w + r + 1 :] = float("-inf")
        probs.append(torch.softmax(logits, -1))
    probs = torch.stack(probs).view(h_kv, 2, w, n)
    assert torch.allclose(token_importance(q, k, w, "sum_of_group_mean"), probs.mean(1).sum(1), atol=1e-6)
    assert torch.allclose(token_importance(q, k, w, "max"), probs.amax(dim=(1, 2)), atol=1e-6)
    x = torch.arange(1.0, 8.0)[None]
    want = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 13 / 3]])  # zero padding counted at both ends
    assert torch.allclose(avg_pool_same(x, 3), want)
    assert max_pool_same(x, 3).tolist() == [[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.0]]
    assert avg_pool_same(x, 4).shape == x.shape


# -- quest -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [2, 8, 14])
def test_quest_upper_bound_matches_definition(h):
    gen = torch.Generator().manual_seed(2)
    q_t, lo, hi = torch.randn(h, 16, generator=gen), torch.randn(2, 5, 16, generator=gen), None
    hi = lo + torch.rand(2, 5, 16, generator=gen)
    want = torch.stack([torch.maximum(q_t[i] * lo[i // (h // 2)], q_t[i] * hi[i // (h // 2)]).sum(-1)
                        for i in range(h)])
    assert torch.allclose(page_upper_bounds(q_t, lo, hi), want, atol=1e-5)


def test_quest_pages_track_appends_and_last_page_is_read():
    h, h_kv, n, d, page = 8, 2, 40, 16, 16
    q, k, v = random_qkv(h, h_kv, n, d, seed=4)
    state = prepare_decode(q, k, v, spec_for("quest", 4, page_size=page))  # 10 tokens -> 1 page
    assert state.details["budget"] == 16
    for step, (q_t, k_t, v_t) in enumerate(decode_steps(h, h_kv, d, steps=30), start=1):
        _, report = sparse_decode(q_t, k_t, v_t, state)
        for j in range(h_kv):
            keys = state.keys[j]
            assert keys.shape[0] == n + step
            pages = keys.split(page)
            assert torch.equal(state.page_min[j], torch.stack([p.amin(0) for p in pages]))
            assert torch.equal(state.page_max[j], torch.stack([p.amax(0) for p in pages]))
        num_pages = math.ceil((n + step) / page)
        assert report.metadata_bytes_read == 2 * d * num_pages * h_kv * 4
        assert report.details["pages_selected"] == 1
        chosen = state.select(q_t)
        last_page = set(range((num_pages - 1) * page, n + step))
        for idx in chosen:
            assert set(idx.tolist()) == last_page  # budget of one page: only the current page


def test_quest_selects_top_pages_by_score():
    h, h_kv, n, d, page = 4, 2, 128, 16, 16
    q, k, v = random_qkv(h, h_kv, n, d, seed=8)
    state = prepare_decode(q, k, v, spec_for("quest", 1, budget=48, page_size=page))  # 3 pages
    (q_t, k_t, v_t), = decode_steps(h, h_kv, d, 1)
    _, report = sparse_decode(q_t, k_t, v_t, state)
    chosen = state.select(q_t)
    for j in range(h_kv):
        pages = state.keys[j].split(page)
        ub = torch.stack([torch.stack([torch.maximum(q_t[i] * p.amin(0), q_t[i] * p.amax(0)).sum()
                                       for p in pages]) for i in range(2 * j, 2 * j + 2)]).sum(0)
        best = ub[:-1].topk(2).indices.tolist()
        want = sorted(t for p in best for t in range(p * page, (p + 1) * page)) + [n]
        assert chosen[j].tolist() == want
    assert report.kv_tokens_read == 2 * 32 and report.generated_tokens_read == 2


# -- generated tokens are never evicted --------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_generated_tokens_appended_never_evicted(method):
    h, h_kv, n, d = 8, 2, 256, 16
    q, k, v = random_qkv(h, h_kv, n, d, seed=9)
    state = prepare_decode(q, k, v, spec_for(method, 8, local_window=16) if method != "quest"
                           else spec_for(method, 8))
    start = [key.shape[0] for key in state.keys]
    cache = state.cache_tokens
    steps = decode_steps(h, h_kv, d, steps=20)
    for t, (q_t, k_t, v_t) in enumerate(steps, start=1):
        _, report = sparse_decode(q_t, k_t, v_t, state)
        assert report.kv_cache_tokens == cache + t * h_kv
        for j in range(h_kv):
            assert state.keys[j].shape[0] == start[j] + t
            appended = torch.stack([s[1][j] for s in steps[:t]])
            assert torch.equal(state.keys[j][start[j]:], appended)
        if method != "quest":
            assert report.generated_tokens_read == t * h_kv


@pytest.mark.parametrize("method", ["snapkv", "ada_snapkv"])
@pytest.mark.parametrize("h", [2, 8, 14])
def test_gqa_group_scores_pick_their_own_kv_head(method, h):
    """A needle planted in KV head 1 and looked at only by its group is kept by head 1, whatever g."""
    h_kv, n, d = 2, 512, 32
    gen = torch.Generator().manual_seed(h)
    q, k, v = random_qkv(h, h_kv, n, d, seed=h)
    q *= 0.1
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    k[1, 200:208] = 12 * u
    g = h // h_kv
    q[g:, -32:] += 12 * u
    state = prepare_decode(q, k, v, spec_for(method, 8, local_window=16, window=32))
    assert set(range(200, 208)) <= set(state.kept_positions[1].tolist())
    out, report = sparse_decode(*decode_steps(h, h_kv, d, 1)[0], state)
    assert out.shape == (h, d) and report.achieved_compression_ratio == pytest.approx(8, rel=0.05)


# -- capabilities: what the table tells an engine matches what the method does -------------------------------
@pytest.mark.parametrize("method", ("dense", *METHODS))
@pytest.mark.parametrize("impl", ("reference", "triton"))
def test_capabilities_match_behaviour(method, impl):
    from attention_backends.spec import DECODE_METHODS

    h, h_kv, n, d = 4, 2, 256, 16
    q, k, v = random_qkv(h, h_kv, n, d)
    state = prepare_decode(q, k, v, spec_for(method, 8), impl=impl)
    (q_t, k_t, v_t), = decode_steps(h, h_kv, d, steps=1)
    _, report = sparse_decode(q_t, k_t, v_t, state)
    info = DECODE_METHODS[method]
    # evicts: the prompt's KV is cut after prefill, so an engine may free those pages
    assert info.evicts == (sum(state.prompt_kept) < n * h_kv)
    # selects pages: every token stays, a step reads a subset chosen from the page key bounds
    assert info.selects_pages == (report.kv_cache_tokens == (n + 1) * h_kv and report.metadata_bytes_read > 0)
    assert not (info.selects_pages and "page_size" not in state.phase.params)


@pytest.mark.parametrize("method", ("dense", *METHODS))
def test_table_entry_names_the_methods_keep_and_plan_steps(method):
    # A decode method is its table entry plus its module: the entry names the module's keep / plan step, and the
    # engine's eviction runs the named keep (decode_keep) -- the same keep-sets the public state holds.
    import importlib

    from attention_backends.api import decode_keep, method_step
    from attention_backends.spec import DECODE_METHODS

    info = DECODE_METHODS[method]
    module = importlib.import_module(f"attention_backends.decode.{method}")
    assert (method_step(info.keep) is module.keep) if info.keep else not hasattr(module, "keep")
    assert (method_step(info.plan) is module.plan) if info.plan else not hasattr(module, "plan")
    q, k, v = random_qkv(4, 2, 96, 16, seed=5)
    spec = spec_for(method, 4, **({"window": 32, "local_window": 8} if info.keep else {}))
    if info.keep:
        kept = decode_keep(q[:, -40:], k, spec.decode)  # the window's queries suffice
        assert [p.tolist() for p in kept] == [p.tolist() for p in prepare_decode(q, k, v, spec).kept_positions]
        assert [p.tolist() for p in kept] != [p.tolist() for p in decode_keep(q[:, -16:], k, spec.decode)]
    else:
        with pytest.raises(ValueError):
            decode_keep(q, k, spec.decode)


def test_every_method_of_the_table_has_both_implementations():
    from attention_backends.api import implementations
    from attention_backends.spec import DECODE_METHODS, PREFILL_METHODS

    for impl in ("reference", "triton"):
        prefill, decode = implementations(impl)
        assert set(prefill) == set(PREFILL_METHODS) and set(decode) == set(DECODE_METHODS), impl
