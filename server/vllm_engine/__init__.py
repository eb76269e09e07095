"""The vLLM engine path: :class:`VllmEngine` over ``AsyncLLM`` plus this project's vLLM plugin.

Only this package imports vLLM (lazily: importing it does not import vLLM). ``create_engine(settings)`` is
what ``sparse-serve --engine vllm`` calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import VllmEngine


def create_engine(settings) -> VllmEngine:
    """A :class:`VllmEngine` for the CLI's :class:`~server.settings.ServerSettings` (not started yet)."""
    from .engine import VllmEngine, VllmOptions

    return VllmEngine(VllmOptions.from_settings(settings))


__all__ = ["create_engine"]
