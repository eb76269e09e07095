"""The vLLM path's side of cost accounting: the side channel that carries a sparse request's cost from the
worker to the front end, and the analytic cost of a dense one.

vLLM gives attention no request ids and returns nothing from a worker but tokens, so the sparse backend
(in the worker process) feeds each sparse request's per-layer reports into its
:class:`~server.contract.cost.RequestCost` (the same account the native engine feeds) and writes it, once per step
it ran in, to ``<cost dir>/<request key>.json`` (atomic rename). The step's file is written from the no-op
logits processor, i.e. after the step's forward and before its tokens are sampled, so the file for the step
that produced a request's last token exists before the front end sees that token. The front end
(:class:`~server.vllm_engine.engine.VllmEngine`) reads the file on the final output and deletes it. Dense
requests never touch the disk: the front end computes their cost with :func:`dense_cost`.

No vLLM import here: both sides use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from attention_backends import PrefillCallReport, SparseSpec
from attention_backends.cost import ModelShape, causal_cells
from server.contract.cost import PhaseCost, RequestCost

COST_DIR_ENV = "SPARSE_SERVE_VLLM_COST_DIR"


def cost_dir() -> Path:
    """A fresh directory for one engine's side files: in memory (``/dev/shm``) where the machine has it. A write per
    sparse request and step costs about 45 us there, against 350-900 us on an ext4 /tmp (the rename is journaled):
    at a batch of 32, 12-29 ms of host time a step (this machine, 2026-12-03; an H200 step at that batch is ~20 ms).
    With each step's reports, ``end_step`` takes about 2 ms a step at a batch of 32 (``step_profile`` shows it)."""
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="sparse-serve-vllm-cost-", dir=root))


_PHASE_FIELDS = tuple(f.name for f in fields(PhaseCost))


def _fields(phase: PhaseCost) -> dict:
    """A phase's fields (numbers, a method name): ``dataclasses.asdict`` deep-copies each, 4x the time."""
    return {name: getattr(phase, name) for name in _PHASE_FIELDS}


def write_cost(directory: str | Path, key: str, cost: RequestCost, decode_steps: int = 0,
               counted_on_device: bool = False) -> None:
    """Replace ``<key>.json`` atomically. One writer per key (the worker that runs the request), so the temporary
    file's name is fixed: no unique name to make each step. ``decode_steps``: the decode steps the account holds;
    ``counted_on_device``: its steps are folded after they ran (:mod:`.count_reader`), so the front end waits for
    the last one."""
    tmp = os.path.join(directory, f".{key}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps({"prefill": _fields(cost.prefill), "decode": _fields(cost.decode),
                                 "decode_steps": decode_steps, "counted_on_device": counted_on_device}).encode())
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(directory, f"{key}.json"))


@dataclass
class CostFile:
    cost: RequestCost
    decode_steps: int
    counted_on_device: bool

    def complete(self, completion_tokens: int) -> bool:
        """Whether the account holds every decode step of a request that produced ``completion_tokens`` (the first
        comes from its prefill). Only an account folded after its steps ran can lag."""
        return not self.counted_on_device or self.decode_steps >= completion_tokens - 1


def load_cost(directory: str | Path, key: str) -> CostFile | None:
    """The request's side file as last written (None: none, or unreadable)."""
    try:
        data = json.loads((Path(directory) / f"{key}.json").read_text())
        cost = RequestCost(PhaseCost(**data["prefill"]), PhaseCost(**data["decode"]))
        return CostFile(cost, int(data.get("decode_steps", 0)), bool(data.get("counted_on_device", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_cost(directory: str | Path, key: str, remove: bool = True) -> RequestCost | None:
    loaded = load_cost(directory, key)
    if loaded is None:
        return None
    if remove:
        (Path(directory) / f"{key}.json").unlink(missing_ok=True)
    return loaded.cost


def dense_cost(spec: SparseSpec, shape: ModelShape, prompt_len: int, completion_tokens: int,
               element_bytes: int) -> RequestCost:
    """What dense attention costs a request: the whole prompt's prefill and ``completion_tokens - 1`` decode
    steps that each read every cached token (the prefill's whole-model FLOPs are the caller's
    :meth:`~server.contract.cost.RequestCost.end_prefill`, as for a measured cost)."""
    cost = RequestCost.for_spec(spec)
    cost.add_prefill(PrefillCallReport.dense(causal_cells(prompt_len) * shape.num_heads * shape.num_layers,
                                             shape.head_dim))
    per_step = shape.num_kv_heads * shape.num_layers  # one token in every layer's KV heads
    token_bytes = 2 * shape.head_dim * element_bytes
    for generated in range(1, completion_tokens):
        prompt_read, read = prompt_len * per_step, (prompt_len + generated) * per_step
        cost.add_decode(prompt_read, prompt_read, float(read * token_bytes), float(read * token_bytes))
        cost.end_decode_step(shape, read, read)
        cost.decode.kv_cache_tokens = read
    return cost
