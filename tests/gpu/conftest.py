"""GPU tests: collected everywhere, skipped without CUDA (README.md here says how to run them on the device)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: engine_helpers


@pytest.fixture(autouse=True)
def methods_run_as_asked(monkeypatch):
    """These tests check the methods themselves (ratios, agreement at short prompts): the dense-fallback rule,
    which would run them as dense on a card with a profile, is off."""
    from attention_backends.prefill_cost import PROFILE_ENV, PROFILE_OFF

    monkeypatch.setenv(PROFILE_ENV, PROFILE_OFF)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (tests/gpu/README.md)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(skip)
