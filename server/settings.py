"""Server settings shared by the ``sparse-serve`` CLI, the engines and the HTTP app factory.

:class:`EngineSettings` are what every engine takes (the CLI's model-and-engine flags); each engine's options
extend them (:class:`server.engine.engine.EngineOptions`, :class:`server.vllm_engine.engine.VllmOptions`) and
are made from the CLI's with :meth:`EngineSettings.from_settings`. :class:`ServerSettings` adds the engine
choice and the HTTP side (auth, limits, default pattern); the CLI fills it from its flags (and
``SPARSE_SERVE_API_KEY``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from attention_backends import InvalidSparsePattern, parse_pattern

API_KEY_ENV = "SPARSE_SERVE_API_KEY"
# Chunked prefill: a chunk starts at a multiple of the prefill kernels' query blocks (64) and of every
# block_sparse block size (<= 128), so each chunk's blocks are the whole prompt's. The default, 4096 tokens,
# keeps a chunk's GEMMs thousands of rows tall (full GPU efficiency; every chunk also re-reads the prompt's
# earlier K/V) while a running decode waits for one chunk instead of a whole prompt: a 128K prompt becomes 32
# steps. A smaller chunk shortens the longest inter-token gap (it grows with the context a chunk attends to)
# at the cost of prefill time.
PREFILL_CHUNK_ALIGN = 128
DEFAULT_PREFILL_CHUNK = 4096
# Sparse prefill methods pay their index once per chunk and layer, so longer chunks amortise it (H200, Qwen2.5-7B-
# shaped: block_sparse:10/b64 at 128K 4.99 s in 4096-token chunks, 4.05 s in 16384 (2026-12-01); vertical_slash:10
# at 128K 6.73 s in 16384, 5.88 s in 32768, 5.10 s in 65536, 4.87 s whole, dense 9.02 s (2026-12-02/03)). 32768
# takes most of that gain while a chunk, computing about a tenth of its cells, holds running decodes up about twice
# as long as a dense chunk of 4096 (a 64K chunk: four times); a 32K prompt is then one chunk (docs/performance.md).
DEFAULT_SPARSE_PREFILL_CHUNK = 32768
# While requests decode, a dense chunk may be sized to take at most this multiple of a decode step (server/engine/
# chunk_pacer.py). Off by default: on the H200 (2026-12-02, Qwen2.5-7B-shaped) 0.75 cut the p99 inter-token latency
# of 8 decodes during a 128K prefill from 79x to 8.9x steady, but chunks at the 128-token floor prefill so slowly that
# the long prompt's TTFT went from 15 s to 69 s and a burst of 8 32K prompts took 77 s instead of about 10 s
# (benchmarks/results/e2e-NVIDIA-H200-2026-12-02-parts/lease3/README.md).
DEFAULT_DECODE_STALL = 0.0

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """A byte size: ``4GiB``, ``512MB``, ``1.5G``, ``1048576`` (SI and binary suffixes; ``G`` = GiB)."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text <= 0:
            raise ValueError(f"size must be a positive number of bytes, got {text!r}")
        return int(text)
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 2GiB, 512MB, 1073741824)")
    value, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = "kmgt".find(unit) + 1 if unit else 0
    # A bare letter (``4G``) or an ``i`` (``4GiB``) means powers of 1024; ``4GB`` means powers of 1000.
    base = 1024 if (binary or not text.strip().lower().endswith("b")) else 1000
    size = int(value * base**power)
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


class EngineSettings(BaseModel):
    """What every engine is told. Defaults are the CLI's defaults."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(None, description="HF model directory or GGUF file; None = embedded SmolLM2")
    device: str = Field("auto", description="auto = cuda if available, else cpu")
    dtype: str = Field("auto", description="auto = bfloat16 on cuda, float32 on cpu")
    max_model_len: int | None = Field(None, ge=1)
    kv_cache_memory: int | None = Field(None, ge=1, description="bytes for the KV page pool; None = engine default")
    max_num_seqs: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=0, description="requests allowed to wait; beyond it new ones get 429")
    page_size: int | None = Field(None, ge=1, description="tokens per KV-cache page (vLLM: block); None = the "
                                  "engine's default (native 16, vLLM its own)")
    served_model_name: str | None = Field(None, description="the name clients use; None = the model's")
    enforce_eager: bool | None = Field(None, description="True: no CUDA graphs; None = graphs on CUDA (native: "
                                       "decode steps; vLLM: its own), eager on the CPU")
    max_prefill_chunk: int = Field(
        DEFAULT_PREFILL_CHUNK, ge=0, multiple_of=PREFILL_CHUNK_ALIGN,
        description="native engine: longest prompt piece prefilled in one engine step, between decode steps of "
                    "the running requests; 0 = whole prompts (docs/deployment.md)")
    max_decode_stall: float = Field(
        DEFAULT_DECODE_STALL, ge=0, allow_inf_nan=False,
        description="native engine: while requests decode, a dense prompt's chunk is sized (from measured times) to "
                    "hold a decode step up by at most this multiple of the step's own time, between "
                    f"{PREFILL_CHUNK_ALIGN} tokens and max_prefill_chunk (a burst of prompts gets more: the budget "
                    "grows by the ratio of prefilling to decoding requests); 0 = chunks of max_prefill_chunk tokens")
    max_sparse_prefill_chunk: int = Field(
        DEFAULT_SPARSE_PREFILL_CHUNK, ge=0, multiple_of=PREFILL_CHUNK_ALIGN,
        description="native engine: the chunk of a prompt whose prefill method is sparse, always (a sparse "
                    "method is defined per chunk, so its answer does not depend on load); 0 = whole prompts")

    @classmethod
    def from_settings(cls, settings: EngineSettings, **own: Any) -> Self:
        """These options from ``settings``' engine settings (e.g. the CLI's) and the engine's ``own`` ones."""
        return cls(**{name: getattr(settings, name) for name in EngineSettings.model_fields}, **own)


class ServerSettings(EngineSettings):
    """Everything ``sparse-serve`` can be told: the engine's settings, which engine, and the HTTP side."""

    engine: Literal["native", "vllm"] = "native"

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    default_sparse_pattern: str = "dense"
    sparse_policy: str | None = Field(None, description="policy JSON for sparse_pattern 'auto'; None = built-in")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_choices: int = Field(256, ge=1, description="largest prompts x n in one request")
    max_prompt_logprobs_tokens: int = Field(
        4096, ge=1, description="longest prompt scored by echo with logprobs (docs/evaluation.md: memory)")
    overload_status: Literal[429, 503] = 429
    shutdown_timeout: float = Field(30.0, ge=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = True

    @field_validator("default_sparse_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        from server.sparse_policy import parse_auto

        try:
            parse_auto(value, "--default-sparse-pattern") or parse_pattern(value, param="--default-sparse-pattern")
        except InvalidSparsePattern as e:
            raise ValueError(f"--default-sparse-pattern: {e.message}") from None
        return value

    _policy: Any = PrivateAttr(None)

    @field_validator("sparse_policy")
    @classmethod
    def _check_policy(cls, value: str | None) -> str | None:
        from server.sparse_policy import PolicyError, load_policy

        if value:
            try:
                load_policy(value)  # an invalid policy stops the server at start-up, not at the first request
            except PolicyError as e:
                raise ValueError(str(e)) from None
        return value or None

    def policy(self):  # -> server.sparse_policy.SparsePolicy
        """The policy `auto` requests use: --sparse-policy's file (loaded once), else the built-in default."""
        from server.sparse_policy import DEFAULT_POLICY, load_policy

        if self._policy is None:
            self._policy = load_policy(self.sparse_policy) if self.sparse_policy else DEFAULT_POLICY
        return self._policy

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: str | None) -> str | None:
        return value or None

    def default_spec(self):  # -> SparseSpec | server.sparse_policy.AutoRequest
        from server.sparse_policy import parse_auto

        param = "--default-sparse-pattern"
        return parse_auto(self.default_sparse_pattern, param) or parse_pattern(self.default_sparse_pattern, param=param)
