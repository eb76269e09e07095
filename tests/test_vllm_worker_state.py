"""The vLLM worker's side of the cost channel, without vLLM: what the worker process writes for the front end."""

from __future__ import annotations

import json

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
