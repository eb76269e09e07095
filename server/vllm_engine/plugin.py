"""The vLLM plugin: backend registration (``vllm.general_plugins`` entry point) and the side channel.

``register()`` runs in every vLLM process (front end and workers) and is idempotent:

* CPU: vLLM always uses ``CPU_ATTN`` there, so that member is overridden with
  :class:`~server.vllm_engine.backend.SparseCPUAttentionBackend`;
* CUDA: vLLM's slot for a third-party backend, ``CUSTOM``, names
  :class:`~server.vllm_engine.backend_cuda.SparseFlashAttentionBackend`, selected with
  ``attention_config={"backend": "CUSTOM"}`` (vLLM looks a backend up by ``get_name()`` in its enum, so a new
  name of our own is not an option).

The side channel is a no-op logits processor (it never changes logits) that sees every request enter and
leave the batch, keeps the slot -> spec table of :mod:`.worker_state`, and once per step (in ``apply``, after
the forward, before sampling) writes the cost side files. There is one class per model runner:
:class:`SparseSideChannelV1` (the V1 runner: CPU) and :class:`SparseSideChannelV2` (the V2 runner: CUDA
default in 0.33). Pass the right one with ``logits_processors=[...]``; both validate the spec at admission
(``validate_params``: a bad spec fails the request with a 400 before it is queued). vLLM 0.25's V2 runner takes
no logits processors, so there :data:`SparseSideChannelV2` is None and vLLM runs the V1 runner (:mod:`.compat`).
"""

from __future__ import annotations

import logging

from .compat import v2_logits_processor_base
from .graphs import keep_sparse_steps_out_of_full_graphs

log = logging.getLogger("sparse_serve.vllm_engine")

CUDA_BACKEND_NAME = "CUSTOM"
CPU_BACKEND_PATH = "server.vllm_engine.backend.SparseCPUAttentionBackend"
CUDA_BACKEND_PATH = "server.vllm_engine.backend_cuda.SparseFlashAttentionBackend"
V1_PROCESSOR = "server.vllm_engine.plugin:SparseSideChannelV1"
V2_PROCESSOR = "server.vllm_engine.plugin:SparseSideChannelV2"


def register() -> None:
    """The ``vllm.general_plugins`` entry point."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_PATH)
    else:
        register_backend(AttentionBackendEnum[CUDA_BACKEND_NAME], CUDA_BACKEND_PATH)
        keep_sparse_steps_out_of_full_graphs()


def _model_shape(vllm_config):
    from attention_backends.cost import ModelShape

    try:
        cfg = vllm_config.model_config.hf_text_config.to_dict()
        shape = ModelShape.from_hf_config(cfg)
    except Exception:  # cost accounting is best effort; attention does not depend on it
        log.exception("could not read the model shape for cost accounting")
        return None
    return shape


def _setup_worker(vllm_config) -> None:
    from . import worker_state as ws

    shape = _model_shape(vllm_config)
    if shape is not None:
        ws.set_model_shape(shape)
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        ws.WRITES_COST = get_tensor_model_parallel_rank() == 0
    except Exception:
        ws.WRITES_COST = True


def _load_v1_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class SparseSideChannelV1(_load_v1_base()):  # type: ignore[misc]
    """V1 runner: attention row r is persistent-batch row r."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        from .worker_state import validate_sampling_params

        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        _setup_worker(vllm_config)

    def is_argmax_invariant(self) -> bool:
        return False  # so that apply() runs every step, greedy batches included (it never changes logits)

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        from . import worker_state as ws

        for index in batch_update.removed:
            ws.remove(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            ws.add(index, params, len(prompt_ids or []), resumed=bool(output_ids))
        for src, dst, direction in batch_update.moved:
            ws.move(src, dst, swap=direction == MoveDirectionality.SWAP)

    def apply(self, logits):
        from . import step_profile
        from . import worker_state as ws

        step_profile.step_ended()
        if ws.SLOTS:
            ws.end_step()
        return logits


class _SparseSideChannelV2:
    """V2 runner: attention rows carry their request-table slot in ``CommonAttentionMetadata.req_idx``.
    Defined as :data:`SparseSideChannelV2` only where this vLLM's V2 runner takes logits processors."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        from .worker_state import validate_sampling_params

        validate_sampling_params(sampling_params)

    def __init__(self, vllm_config, req_states) -> None:
        _setup_worker(vllm_config)
        self.req_states = req_states

    def add_request(self, req_idx: int, sampling_params) -> bool:
        from . import worker_state as ws

        try:
            prompt_len = int(self.req_states.prompt_len.np[req_idx])
        except Exception:
            prompt_len = int(self.req_states.prompt_len.cpu[req_idx]) if hasattr(
                self.req_states.prompt_len, "cpu") else 0
        ws.add(req_idx, sampling_params, prompt_len, resumed=False)
        return False  # never modifies logits

    def apply(self, logits, ctx):
        from . import step_profile
        from . import worker_state as ws

        step_profile.step_ended()
        if ws.SLOTS:
            ws.end_step([int(s) for s in ctx.idx_mapping_np])
        return logits


_V2_BASE = v2_logits_processor_base()
SparseSideChannelV2 = (type("SparseSideChannelV2", (_SparseSideChannelV2, _V2_BASE), {})
                       if _V2_BASE is not None else None)
