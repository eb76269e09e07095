"""The contract between the engines and the rest of the server.

Both engines (:mod:`server.engine`, the native one, and :mod:`server.vllm_engine`) implement :class:`Engine`
and report each request's :class:`RequestCost`; the HTTP layer (:mod:`server.api`) and the metrics use only
what is here, never an engine's internals. The settings every engine takes are
:class:`server.settings.EngineSettings`.
"""

from .cost import PhaseCost, RequestCost, achieved_ratio
from .engine import (
    Engine,
    EngineOverloaded,
    EngineStats,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    RequestRejected,
    RequestTimings,
    SamplingParams,
    Tokenizer,
    TokenLogprob,
    wait_drained,
)

__all__ = [
    "Engine", "EngineOverloaded", "EngineStats", "FinishReason", "GenerationOutput", "GenerationRequest",
    "PhaseCost", "RequestCost", "RequestRejected", "RequestTimings", "SamplingParams", "TokenLogprob", "Tokenizer",
    "achieved_ratio", "wait_drained",
]
