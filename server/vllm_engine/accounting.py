"""Per-request cost accounting of the vLLM path, and the side channel that carries it to the front end.

vLLM gives attention no request ids and returns nothing from a worker but tokens, so the sparse backend
(in the worker process) adds up each sparse request's per-layer reports in a :class:`CostAccount` and
writes it, once per step it ran in, to ``<cost dir>/<request key>.json`` (atomic rename). The step's file is
written from the no-op logits processor, i.e. after the step's forward and before its tokens are sampled,
so the file for the step that produced a request's last token exists before the front end sees that token.
The front end (:class:`~server.vllm_engine.engine.VllmEngine`) reads the file on the final output, turns
it into a :class:`~server.engine.types.RequestCost` and deletes it. Dense requests never touch the disk:
the front end computes their cost analytically with the same formulas.

No vLLM import here: both sides use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from attention_backends.cost import ModelShape, decode_token_flops, prefill_flops
from attention_backends.reports import DecodeReport
from attention_backends.spec import SparseSpec
from server.engine.request_state import CostTotals
from server.engine.types import RequestCost

COST_DIR_ENV = "SPARSE_SERVE_VLLM_COST_DIR"


@dataclass
class CostAccount(CostTotals):
    """Running sums for one request, summed over layers (and decode steps): the native engine's
    :class:`~server.engine.request_state.CostTotals` (same fields, same ``add_prefill``/``add_decode``), so both
    engines report the same numbers for the same work, plus what the vLLM path needs to carry the request's
    cost across the process boundary (prompt length, metadata bytes, decode model FLOPs, KV cache tokens)."""

    prompt_len: int = 0
    metadata_bytes: float = 0.0
    kv_cache_tokens: int = 0
    decode_model_flops: float = 0.0
    dense_decode_model_flops: float = 0.0
    # this step's per-layer sums, folded into the decode model FLOPs by end_decode_step
    _step_read: int = 0
    _step_dense: int = 0

    # -- worker side ----------------------------------------------------------------------------------
    def add_decode(self, r: DecodeReport, generated_dense: int = 0) -> None:
        """One layer of one decode step. ``generated_dense``: generated tokens a dense step reads in this
        layer (summed over KV heads)."""
        super().add_decode(r)
        self.dense_generated_tokens_read += generated_dense
        self.metadata_bytes += r.metadata_bytes_read
        self._step_read += r.kv_tokens_read + r.generated_tokens_read
        self._step_dense += r.dense_kv_tokens_read + generated_dense

    def end_decode_step(self, shape: ModelShape, kv_cache_tokens: int) -> None:
        if not self._step_dense:
            return
        flops = decode_token_flops(shape, self._step_read, self._step_dense)
        self.decode_model_flops += flops.total_actual
        self.dense_decode_model_flops += flops.total_dense
        self.decode_steps += 1
        self.kv_cache_tokens = kv_cache_tokens
        self._step_read = self._step_dense = 0

    # -- the side file --------------------------------------------------------------------------------
    def write(self, directory: str | Path, key: str) -> None:
        directory = Path(directory)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, directory / f"{key}.json")

    @classmethod
    def read(cls, directory: str | Path, key: str, remove: bool = True) -> CostAccount | None:
        path = Path(directory) / f"{key}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if remove:
            path.unlink(missing_ok=True)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    # -- front end ------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, shape: ModelShape, prompt_len: int, completion_tokens: int, element_bytes: int) -> CostAccount:
        """What a dense request costs (prefill of the whole prompt, ``completion_tokens - 1`` decode steps)."""
        from attention_backends.cost import causal_cells, flops_per_cell

        acc = cls(prompt_len=prompt_len)
        cells = causal_cells(prompt_len) * shape.num_heads * shape.num_layers
        acc.computed_cells = acc.dense_cells = cells
        acc.prefill_attention_flops = acc.prefill_dense_attention_flops = float(cells * flops_per_cell(shape.head_dim))
        per_layer = shape.num_kv_heads * shape.num_layers
        for generated in range(1, completion_tokens):
            prompt_read, gen_read = prompt_len * per_layer, generated * per_layer
            acc.prompt_tokens_read += prompt_read
            acc.dense_prompt_tokens_read += prompt_read
            acc.generated_tokens_read += gen_read
            acc.dense_generated_tokens_read += gen_read
            acc._step_read = acc._step_dense = prompt_read + gen_read
            acc.end_decode_step(shape, (prompt_len + generated) * per_layer)
        return acc

    def to_request_cost(self, spec: SparseSpec, shape: ModelShape, element_bytes: int) -> RequestCost:
        cost = RequestCost()
        cost.prefill, cost.decode = self.phase_costs(spec, 2 * shape.head_dim * element_bytes,
                                                     float(self.metadata_bytes), int(self.kv_cache_tokens))
        if self.dense_cells:
            flops = prefill_flops(shape, self.prompt_len, computed_cells=self.computed_cells,
                                  indexing_flops=self.prefill_indexing_flops)
            cost.prefill_model_flops, cost.dense_prefill_model_flops = flops.total_actual, flops.total_dense
        cost.decode_model_flops, cost.dense_decode_model_flops = self.decode_model_flops, self.dense_decode_model_flops
        cost.model_flops = cost.prefill_model_flops + cost.decode_model_flops
        cost.dense_model_flops = cost.dense_prefill_model_flops + cost.dense_decode_model_flops
        return cost
