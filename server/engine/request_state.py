"""A request inside the native engine: its cache, sampler, detokenizer, cost and timings."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.contract.cost import RequestCost
from server.contract.engine import GenerationOutput, GenerationRequest, RequestTimings, TokenLogprob

from .detokenizer import IncrementalDetokenizer
from .sampler import SamplerState
from .sequence_kv import SequenceKV


@dataclass
class EngineRequest:
    request: GenerationRequest
    emit: Callable[[GenerationOutput], None]
    sampler: SamplerState
    detok: IncrementalDetokenizer
    kv: SequenceKV | None = None
    output_ids: list[int] = field(default_factory=list)
    timings: RequestTimings = field(default_factory=lambda: RequestTimings(arrival=time.monotonic()))
    cost: RequestCost = field(init=False)  # fed by the runner as the request runs
    aborted: bool = False
    arrival: int = 0  # arrival order, set by the scheduler (preemption takes the youngest)
    prefilled: bool = False  # the cache holds the prompt (set after each prefill, cleared by preemption)
    prefill_pos: int = 0  # prompt tokens in the cache so far (chunked prefill), cleared by preemption
    prefill_dense: bool = False  # its prefill computes dense attention (a dense pattern, or the fallback rule's)
    cached_outputs: int = 0  # generated tokens whose keys/values are in the cache
    _cost_at_preemption: RequestCost | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # set by the first prefill when requested

    def __post_init__(self) -> None:
        self.cost = RequestCost.for_spec(self.request.spec)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def next_input(self) -> int:
        """The token the next decode step feeds: the last sampled one, or one being recomputed after a resume."""
        if self.cached_outputs >= len(self.output_ids):  # a launched step's token never accepted (a bug): say so
            raise RuntimeError(f"request {self.request_id}: its cache holds {self.cached_outputs} generated tokens "
                               f"but only {len(self.output_ids)} were accepted; no token to feed")
        return self.output_ids[self.cached_outputs]

    @property
    def next_position(self) -> int:
        return self.prompt_len + self.cached_outputs

    @property
    def samples_next(self) -> bool:
        """Whether the next decode step's logits give a new token (not a token recomputed after a resume)."""
        return self.cached_outputs == len(self.output_ids) - 1

    def preempt(self) -> None:
        """Give the cache back to the pool; the request resumes by recomputing it (prefill of the prompt with its
        own methods and eviction, then its generated tokens through decode steps, as they first ran, so the
        resumed request continues exactly as it would have). Its cost report keeps describing one uninterrupted
        run: the recomputation is the engine's overhead, not the request's."""
        if self.kv is not None:
            self.kv.release()
            self.kv = None
        self.prefilled = False
        self.prefill_pos = 0
        self.cached_outputs = 0
        if self.output_ids and self._cost_at_preemption is None:
            self._cost_at_preemption = copy.deepcopy(self.cost)
        elif not self.output_ids:  # preempted between prefill chunks: its prefill starts over, and so does its cost
            self.cost = RequestCost.for_spec(self.request.spec)

    def rewind_decode(self, steps: int) -> None:
        """Undo the last ``steps`` launched decode steps, none of whose tokens was accepted (a step that failed
        after its launch, and the step launched after it), so the request can decode again from its last token.
        Costs a failed step accounted stay: the device did that work."""
        self.cached_outputs -= steps
        self.kv.uncommit_appends(steps)  # type: ignore[union-attr]

    def catch_up(self) -> None:
        """After a prefill or decode step: once a resumed request's cache is whole again, restore its cost."""
        if self._cost_at_preemption is not None and self.samples_next:
            self.cost = self._cost_at_preemption
            self._cost_at_preemption = None
