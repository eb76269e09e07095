"""The vLLM worker's side of the cost channel, without vLLM: what the worker process writes for the front end."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from attention_backends import parse_pattern
from attention_backends.cost import ModelShape
from server.contract.cost import RequestCost
from server.vllm_engine import worker_state as ws
from server.vllm_engine.accounting import COST_DIR_ENV


def test_cost_file_goes_to_the_directory_set_after_import(tmp_path, monkeypatch):
    """vLLM forks its engine core on CUDA from a front end that imported this module before VllmEngine.start()
    set the variable: the worker must still write where the front end reads (seen on an H200: no cost file, and
    the start-up self-test refused to serve)."""
    monkeypatch.setenv(COST_DIR_ENV, str(tmp_path))
    state = ws.RequestState(key="req-1", spec=parse_pattern("quest:4"), prompt_len=8,
                            cost=RequestCost(), dirty=True)
    monkeypatch.setitem(ws.SLOTS, 0, state)
    ws.end_step()
    written = json.loads((tmp_path / "req-1.json").read_text())
    assert isinstance(written, dict) and written
    assert not state.dirty


def test_each_step_replaces_the_cost_file_and_leaves_nothing_else():
    """The worker rewrites a request's file every step it runs in: the front end reads the last step's account
    (never a half-written file), and after the read the engine's directory is empty again."""
    from server.vllm_engine.accounting import cost_dir, read_cost, write_cost

    directory = cost_dir()
    try:
        cost = RequestCost.for_spec(parse_pattern("snapkv:10"))
        for step in range(1, 4):
            cost.decode.kv_bytes_read = 1000.0 * step
            write_cost(directory, "req-2", cost)
            assert sorted(p.name for p in directory.iterdir()) == ["req-2.json"]
        got = read_cost(directory, "req-2")
        assert got is not None and got.decode.kv_bytes_read == 3000.0 and got.decode.method == "snapkv"
        assert list(directory.iterdir()) == []
    finally:
        directory.rmdir()


def test_step_profile_covers_the_steps_asked_for(tmp_path, monkeypatch):
    """SPARSE_SERVE_VLLM_PROFILE=FILE:SKIP:STEPS: the worker's end of step profiles steps SKIP+1 .. SKIP+STEPS and
    writes their time per step and the operators that took it; nothing before, nothing after. With ``:decode`` only
    uniform decode steps count towards SKIP (a large batch's prefills stay out of the window)."""
    from server.vllm_engine import step_profile

    for setting, kinds, written_after in ((":2:3", [True] * 7, 5), (":2:3:decode", [False, True, False, True, True,
                                                                                  False, True, True, True], 7)):
        out = tmp_path / f"profile{len(kinds)}.txt"
        monkeypatch.setenv(step_profile.PROFILE_ENV, f"{out}{setting}")
        # a fresh read of the variable for this case alone (the module keeps the first one)
        monkeypatch.setattr(step_profile, "requested", functools.cache(step_profile.requested.__wrapped__))
        x = torch.randn(64, 64)
        for step, uniform_decode in enumerate(kinds):
            step_profile.step_built(uniform_decode)
            x = torch.mm(x, x).tanh()  # this step's work
            step_profile.step_ended()  # (the logits processor's call, every step)
            assert out.exists() == (step >= written_after), (setting, step)
        text = out.read_text()
        assert text.startswith("3 steps after 2:") and "ms a step" in text
        assert "aten::mm" in text and "aten::tanh" in text
    # two windows of one run: after 1 and after 4 steps, the second to FILE-2 before the extension
    out = tmp_path / "two.txt"
    monkeypatch.setenv(step_profile.PROFILE_ENV, f"{out}:1,4:2")
    monkeypatch.setattr(step_profile, "requested", functools.cache(step_profile.requested.__wrapped__))
    for step in range(8):
        step_profile.step_built(True)
        torch.mm(x, x)
        step_profile.step_ended()
        assert out.exists() == (step >= 3) and (tmp_path / "two-2.txt").exists() == (step >= 6), step
    assert (tmp_path / "two-2.txt").read_text().startswith("2 steps after 4:")
    for bad in ("x.txt:-1", "x.txt:1:2:prefill", "x.txt:1:2:decode:3", "x.txt:4,1:2", "x.txt:a:2"):
        with pytest.raises(ValueError):
            step_profile.StepProfile(bad)


def quest_step(states, seqs, layers=2, block=16, h_kv=2, head_dim=8):
    """One step's Quest rows over vLLM's cache as the builder makes them, with the device counts the layers' kernels
    would have added up (no kernel runs: this is about what happens to the counts after the step)."""
    from server.vllm_engine import cache_decode

    table = torch.arange(len(states) * 64, dtype=torch.int32).view(len(states), 64)
    spec_rows = [(i, i, seq, st.prompt_len, st.budget)
                 for i, (st, seq) in enumerate(zip(states, seqs, strict=True))]
    rows = cache_decode.build_quest_rows(states, spec_rows, table, h_kv, block)
    rows.layers, rows.head_dim = layers, head_dim
    for i, (st, seq) in enumerate(zip(states, seqs, strict=True)):
        total = layers * h_kv * min(st.budget * block, seq)  # (an upper bound is enough here)
        rows.counts[0, i], rows.counts[1, i] = total - layers * h_kv * (seq - st.prompt_len), total
    return rows


def quest_state(key: str, prompt_len: int) -> ws.RequestState:
    from server.vllm_engine import cache_decode

    spec = parse_pattern("quest:8")
    state = ws.RequestState(key=key, spec=spec, prompt_len=prompt_len, cost=RequestCost.for_spec(spec),
                            cache_decode=True)
    state.budget = cache_decode.request_budget(spec, prompt_len)
    assert state.counted_on_device
    return state


def test_quest_counts_fold_off_the_step_and_the_file_says_how_many_steps_it_holds(tmp_path, monkeypatch):
    """On CUDA the step's end queues Quest's device counts and a reader thread folds them (no wait for the device in
    the step): the accounts and files it writes are the ones a read at the step's end gave, each file naming the
    decode steps it holds, so the front end can wait for the last."""
    from server.vllm_engine.accounting import load_cost
    from server.vllm_engine.count_reader import CountReader

    monkeypatch.setattr(ws, "_SHAPE", ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                                                 hidden_size=32, intermediate_size=64, vocab_size=100))
    accounts = {}
    for threaded in (False, True):
        directory = tmp_path / str(threaded)
        directory.mkdir()
        monkeypatch.setenv(COST_DIR_ENV, str(directory))
        monkeypatch.setattr(ws, "READER", CountReader(ws._fold_quest_counts, threaded=threaded))
        states = [quest_state("a", 200), quest_state("b", 90)]
        for step in range(1, 6):
            ws.PENDING.append(quest_step(states, [st.prompt_len + step for st in states]))
            ws.end_step()
        ws.READER.drain()
        assert ws.PENDING == []
        files = {st.key: load_cost(directory, st.key) for st in states}
        for st in states:
            got = files[st.key]
            assert got.decode_steps == st.decode_steps == 5 and got.counted_on_device
            assert got.complete(6) and not got.complete(7)  # 6 tokens: the prefill's, then 5 decode steps
            assert got.cost.decode.kv_bytes_read > 0 and got.cost.decode.model_flops > 0
        accounts[threaded] = {k: json.dumps(f.cost.decode.__dict__, sort_keys=True) for k, f in files.items()}
    assert accounts[True] == accounts[False]


def test_the_reader_folds_each_step_in_order_with_the_counts_it_was_given():
    """A step's counts are taken when the step is submitted (the next step reuses nothing of them), and steps fold in
    the order they ran, on the reader's thread."""
    import threading

    from server.vllm_engine.count_reader import CountReader

    seen = []
    reader = CountReader(lambda batches, counts: seen.append((threading.get_ident(), counts)), threaded=True)
    step = type("Rows", (), {})()
    for i in range(20):
        step.counts = torch.tensor([[i, 2 * i]])
        reader.submit([step])
        step.counts = torch.full((1, 2), -1)  # (the device buffer, rewritten later)
    reader.drain()
    assert [c for _, c in seen] == [[[[i, 2 * i]]] for i in range(20)]
    assert all(t != threading.get_ident() for t, _ in seen)
    reader.submit([])  # a step without Quest rows: nothing to fold
    reader.drain()
    assert len(seen) == 20


def test_the_front_end_waits_for_the_last_decode_step_of_a_quest_account(tmp_path, monkeypatch):
    """The worker may write a Quest request's last step just after its last token reached the front end: the front
    end waits for it (bounded), and takes any other account as it is."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from server.vllm_engine import engine
    from server.vllm_engine.accounting import write_cost

    front = SimpleNamespace(_cost_dir=tmp_path)
    cost = RequestCost.for_spec(parse_pattern("quest:8"))

    def write(steps, on_device=True):
        cost.decode.kv_bytes_read = 100.0 * steps
        write_cost(tmp_path, "q", cost, decode_steps=steps, counted_on_device=on_device)

    write(3)
    late = threading.Timer(0.05, write, args=(4,))
    late.start()
    got = asyncio.run(engine.VllmEngine._read_cost(front, "q", completion=5))
    assert got.decode.kv_bytes_read == 400.0  # the fourth decode step, written 50 ms after the read began
    write(2, on_device=False)  # an account written in the step itself (SnapKV, prefill): as it is
    assert asyncio.run(engine.VllmEngine._read_cost(front, "q", completion=9)).decode.kv_bytes_read == 200.0
    monkeypatch.setattr(engine, "COST_FILE_WAIT_S", 0.05)
    write(1)  # a step that never comes: the account so far, after the wait
    assert asyncio.run(engine.VllmEngine._read_cost(front, "q", completion=5)).decode.kv_bytes_read == 100.0
    assert asyncio.run(engine.VllmEngine._read_cost(front, "missing", completion=5)) is None
