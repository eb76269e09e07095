"""The vLLM worker's side of the cost channel, without vLLM: what the worker process writes for the front end."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from attention_backends import parse_pattern
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
    writes their time per step and the operators that took it; nothing before, nothing after."""
    from server.vllm_engine import step_profile

    out = tmp_path / "profile.txt"
    monkeypatch.setenv(step_profile.PROFILE_ENV, f"{out}:2:3")
    # a fresh read of the variable for this test alone (the module keeps the first one)
    monkeypatch.setattr(step_profile, "requested", functools.cache(step_profile.requested.__wrapped__))
    state = ws.RequestState(key="", spec=parse_pattern("quest:4"), prompt_len=8, cost=RequestCost())
    monkeypatch.setitem(ws.SLOTS, 0, state)
    x = torch.randn(64, 64)
    for step in range(7):
        x = torch.mm(x, x).tanh()  # this step's work
        ws.end_step()
        assert out.exists() == (step >= 5)  # written at the end of the fifth step's successor
    text = out.read_text()
    assert text.startswith("3 steps after 2:") and "ms a step" in text
    assert "aten::mm" in text and "aten::tanh" in text
    with pytest.raises(ValueError):
        step_profile.StepProfile("x.txt:-1")
