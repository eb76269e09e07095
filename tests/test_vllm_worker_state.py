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
