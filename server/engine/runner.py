"""Runs the model for the scheduler: one request's prefill, or one decode step for a batch.

The model delegates attention to a callback (``AttentionFn``); the callbacks here are where the paged KV
cache and each request's sparse methods meet:

* prefill (one chunk of one request's prompt, ``T = c1 - c0``; the whole prompt when it is one chunk): the
  request's prefill method computes the chunk's attention over the layer's keys so far (the earlier chunks'
  read back from its pages) and reports its cost; the chunk's keys/values are appended to the layer's pages;
  after the last chunk SnapKV/Ada-SnapKV keep only their chosen tokens and the evicted pages go straight
  back to the pool.
* decode (``T = B``, one token per request): :mod:`.decode_step` (the new key/value goes into each (layer,
  KV head)'s last page, then one batched paged attention reads, per row, either the whole per-head page
  table (dense, SnapKV, Ada-SnapKV) or the pages Quest selects from the page key min/max), replayed as a
  CUDA graph on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attention_backends import PrefillCallReport, decode_keep, engine_impl, sparse_prefill
from attention_backends.cost import ModelShape, causal_cells
from attention_backends.decode.quest import budget_pages
from attention_backends.prefill.dense import sdpa
from attention_backends.prefill_cost import fallback_report, prompt_fallback
from attention_backends.spec import DECODE_METHODS
from server.contract.engine import TokenLogprob

from .decode_step import DecodeStepper, TritonDecodeKernels, bucket_sizes, triton_paged_decode
from .page_pool import PagePool
from .request_state import EngineRequest
from .sampler import token_logprobs
from .sequence_kv import SequenceKV

# Prompt logprobs compute float32 logits this many bytes at a time, never all [n, vocab] of a long prompt.
PROMPT_LOGITS_CHUNK_BYTES = 64 << 20


def dense_prefill_attention(q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> tuple[Tensor, PrefillCallReport]:
    """Dense causal attention through SDPA (the fast path; same result as the dense reference)."""
    h, _, d = q.shape
    return sdpa(q, k, v, q_offset), PrefillCallReport.dense(causal_cells(k.shape[1], q_offset) * h, d)


def prompt_logprobs(model, hidden: Tensor, ids: Tensor, k: int, start: int = 0) -> list[TokenLogprob | None]:
    """Logprob (and top ``k``) of each prompt token given the ones before it; the first token has none.

    ``hidden [m, hidden_size]`` are the prefill's last-layer states of positions ``[start, start + m)`` (a
    chunk; ``ids`` is the whole prompt); position i scores token i + 1.
    """
    rows = max(1, PROMPT_LOGITS_CHUNK_BYTES // (4 * model.config.vocab_size))
    out: list[TokenLogprob | None] = [None] if start == 0 else []
    # the prompt's last position predicts the first generated token, not a prompt token
    scored = min(start + hidden.shape[0], ids.numel() - 1)
    for first in range(start, scored, rows):
        end = min(first + rows, scored)
        logits = model.compute_logits(hidden[first - start : end - start])
        logits -= torch.logsumexp(logits, dim=-1, keepdim=True)  # log-softmax in place: one chunk in memory
        out += token_logprobs(logits, ids[first + 1 : end + 1], k)
    return out


def _snapshot(t: Tensor) -> Tensor:
    """A copy of ``t`` on the host that the next step cannot overwrite: on CUDA a non-blocking copy into pinned
    memory (valid once the step's event has completed), elsewhere a plain copy."""
    if t.device.type != "cuda":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class PendingDecode:
    """A decode step the device is working on.

    :meth:`logits` waits for it. A step launched ``greedy`` (every row takes its argmax) also keeps its tokens on
    the device, where the next step can take them as inputs before the host has seen them (the engine launches
    that step first, then reads this one), and copies them and Quest's counts back without blocking: :meth:`tokens`
    waits for this step only. :meth:`settle` accounts the costs of the rows still running (once)."""

    def __init__(self, logits: Tensor, account: Callable[[Tensor | None, list[int] | None], None],
                 quest_read: Tensor | None, greedy: bool, sampling_rows: list[int]):
        self._logits, self._account, self._quest = logits, account, quest_read
        self.sampling_rows = sampling_rows  # rows whose logits give a new token (the others recompute one)
        self.next_ids: Tensor | None = None
        self._tokens: Tensor | None = None
        self._done = None
        if greedy:  # before the next step can overwrite a captured graph's logits and counters
            self.next_ids = logits.argmax(dim=-1)  # [B] (the sampler's greedy rule)
            self._tokens = _snapshot(self.next_ids)
            self._quest = None if quest_read is None else _snapshot(quest_read)
            if logits.device.type == "cuda":
                self._done = torch.cuda.Event()
                self._done.record()

    def logits(self) -> Tensor:
        self.settle()
        return self._logits

    def tokens(self) -> list[int]:
        """A greedy step's tokens, one per row."""
        assert self._tokens is not None, "not a greedy step"
        if self._done is not None:
            self._done.synchronize()
        return self._tokens.tolist()

    def settle(self, rows: list[int] | None = None) -> None:
        """Account the step's decode costs for ``rows`` (default: every row); later calls do nothing."""
        if self._account is None:
            return
        account, self._account = self._account, None
        quest = self._quest
        if quest is not None:
            if self._done is not None:
                self._done.synchronize()
            quest = quest.cpu()
        account(quest, rows)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: PagePool, shape: ModelShape):
        self.model = model
        self.pool = pool
        self.shape = shape
        self.device = pool.device
        # On CUDA the Triton kernels run prefill methods and paged decode; elsewhere the PyTorch paths do.
        self.use_triton = engine_impl(pool.device) == "triton" and triton_paged_decode is not None
        self.stepper = DecodeStepper(model, pool, shape.num_layers, shape.num_kv_heads, use_triton=self.use_triton)

    @property
    def impl(self) -> str:
        """What runs the methods' kernels: ``"triton"`` or ``"reference"``."""
        return "triton" if self.use_triton else "reference"

    def use_triton_kernels(self) -> None:
        """Run the methods and the decode steps with the Triton kernels (CUDA's path) on any device: on the CPU,
        under ``TRITON_INTERPRET=1``, for tests of that path."""
        self.use_triton = True
        self.stepper.kernels = TritonDecodeKernels(self.pool)

    def synchronize(self) -> None:
        """Wait for the device's queued work (timing a prefill chunk); nothing to wait for on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def new_sequence(self) -> SequenceKV:
        return SequenceKV(self.pool, self.shape.num_layers, self.shape.num_kv_heads)

    # -- prefill ----------------------------------------------------------------------------------------
    def prefill_runs_dense(self, req: EngineRequest, chunk_starts: tuple[int, ...]) -> bool:
        """Whether the request's prefill computes dense attention: a dense pattern, or a sparse one whose chunks
        (starting at ``chunk_starts``) the fallback rule does not predict faster than a whole dense prompt
        (:func:`prompt_fallback`); then it is scheduled like a dense one (alone, it prefills whole)."""
        phase, s = req.request.spec.prefill, self.shape
        if phase.is_dense:
            return True
        return prompt_fallback(phase, (s.num_heads, req.prompt_len, s.head_dim), self.device, self.impl,
                               chunk_starts) is not None

    @torch.inference_mode()
    def prefill(self, req: EngineRequest, end: int | None = None) -> Tensor | None:
        """Prefill one request's prompt from ``req.prefill_pos`` up to ``end`` (default: the whole rest) -- one
        chunk. Returns the logits of the last prompt position ``[1, V]`` after the last chunk, else ``None``."""
        spec = req.request.spec
        kv = req.kv
        assert kv is not None
        cost = req.cost
        n, c0 = req.prompt_len, req.prefill_pos
        c1 = n if end is None else end
        last_chunk = c1 == n
        evicts = DECODE_METHODS[spec.decode.method].evicts
        impl = self.impl

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if c0:  # the chunk attends to the earlier chunks' keys too
                k_prev, v_prev = kv.prompt_kv(layer)
                kh = torch.cat([k_prev, kh.to(k_prev.dtype)], dim=1)
                vh = torch.cat([v_prev, vh.to(v_prev.dtype)], dim=1)
            if spec.prefill.is_dense:
                out, report = dense_prefill_attention(qh, kh, vh, c0)
            elif req.prefill_dense:  # the fallback rule runs the whole prompt dense (prefill_runs_dense)
                out, report = sdpa(qh, kh, vh, c0), fallback_report(spec.prefill, (qh.shape[0], *kh.shape[1:]), c0)
            else:
                out, report = sparse_prefill(qh, kh, vh, spec, impl=impl, q_offset=c0, defer=True)
            cost.add_prefill(report)
            kv.append_prompt(layer, kh[:, c0:], vh[:, c0:])
            if last_chunk and evicts:  # the keep step sees the whole prompt's keys; its window is the last chunk's
                kv.keep_only(layer, decode_keep(qh, kh, spec.decode, impl=impl))
            return out.transpose(0, 1)

        prompt = torch.tensor(req.request.prompt_token_ids, dtype=torch.long, device=self.device)
        ids = prompt[c0:c1]
        positions = torch.arange(c0, c1, device=self.device)
        k = req.request.sampling.prompt_logprobs
        if k is None or req.output_ids:  # a preempted request resuming sent its prompt logprobs already
            tail = torch.tensor([c1 - c0 - 1], device=self.device)
            logits = self.model(ids, positions, attention, logits_indices=tail).float().cpu()
        else:
            # the same (sparse) prefill's hidden states score the prompt: what the pattern costs is what is measured
            hidden = self.model.hidden_states(ids, positions, attention)
            scored = prompt_logprobs(self.model, hidden, prompt, k, c0)
            req.prompt_logprobs = scored if c0 == 0 else (req.prompt_logprobs or []) + scored
            logits = self.model.compute_logits(hidden[-1:]).cpu()
        req.prefill_pos = c1
        if not last_chunk:
            return None
        cost.end_prefill(self.shape, req.prompt_len)
        return logits

    # -- decode -----------------------------------------------------------------------------------------
    def enable_cuda_graphs(self, max_rows: int, max_model_len: int, capture: bool = True) -> None:
        """Replay decode steps as CUDA graphs (batches up to ``max_rows``, contexts up to ``max_model_len``).
        ``capture=False``: the same padded static buffers, run eagerly (the CUDA layout, testable on the CPU)."""
        pages = -(-(max_model_len + 1) // self.pool.page_size)
        self.stepper = DecodeStepper(self.model, self.pool, self.shape.num_layers, self.shape.num_kv_heads,
                                     use_triton=self.use_triton, buckets=bucket_sizes(max_rows), max_pages=pages,
                                     capture=capture)

    @torch.inference_mode()
    def launch_decode(self, batch: list[EngineRequest], spare_pages: int = 0, *, greedy: bool = False,
                      after: PendingDecode | None = None) -> PendingDecode:
        """Start one decode step for every request of ``batch`` (the device works on it when this returns);
        :meth:`PendingDecode.logits` finishes it. ``spare_pages``: free pages the sequences may take ahead of
        need (:meth:`SequenceKV.prepare_append`). ``greedy``: every row takes its argmax (kept on the device for
        a step launched ``after`` this one). ``after``: a greedy step of the same batch not read yet; this step
        feeds its tokens (on the device) and must be read after it."""
        seqs = [r.kv for r in batch]
        for r in batch:
            # KV appends left: every output but the last is appended, this step's input included
            horizon = r.request.sampling.max_tokens - 1 - r.cached_outputs
            spare_pages -= r.kv.prepare_append(horizon, spare_pages)  # type: ignore[union-attr]
        lengths = torch.stack([s.lengths for s in seqs]) + 1  # [B, layers, h_kv] after this step's append
        prompt_kept = torch.stack([s.prompt_kept for s in seqs])
        budgets = [self._quest_budget(r) for r in batch]
        ids = after.next_ids if after is not None else [r.next_input for r in batch]
        sampling_rows = [i for i, r in enumerate(batch) if after is not None or r.samples_next]
        logits, quest_read = self.stepper.run(seqs, ids, [r.next_position for r in batch],  # type: ignore[arg-type]
                                              budgets, lengths, prompt_kept)
        for r in batch:
            r.kv.commit_append()  # type: ignore[union-attr]
            r.cached_outputs += 1

        generated = [r.cached_outputs for r in batch]  # tokens generated so far, this step's input included

        def account(quest: Tensor | None, rows: list[int] | None) -> None:
            self._account_decode(batch, lengths, prompt_kept, budgets, generated, quest, rows)

        return PendingDecode(logits, account, quest_read if any(budgets) else None, greedy, sampling_rows)

    @staticmethod
    def _quest_budget(req: EngineRequest) -> int:
        """Pages per KV head the request's Quest reads this step; 0 (its whole tables) for other methods, and
        for Quest at ratio 1 (every page: dense)."""
        decode = req.request.spec.decode
        if not DECODE_METHODS[decode.method].selects_pages:
            return 0
        return budget_pages(req.prompt_len, decode) or 0

    def _account_decode(self, batch: list[EngineRequest], lengths: Tensor, prompt_kept: Tensor,
                        budgets: list[int], generated: list[int], quest_read: Tensor | None,
                        rows: list[int] | None = None) -> None:
        shape = self.shape
        per_step_dense = shape.num_layers * shape.num_kv_heads
        element_bytes = self.pool.keys.element_size()
        token_bytes = 2 * shape.head_dim * element_bytes  # K and V of one token of one KV head
        lengths_sum = lengths.sum(dim=(1, 2)).tolist()
        kept_sum = prompt_kept.sum(dim=(1, 2)).tolist()
        quest_prompt, quest_total = quest_read.tolist() if quest_read is not None else ([], [])
        for row in range(len(batch)) if rows is None else rows:
            req = batch[row]
            metadata_bytes = 0
            if budgets[row]:
                prompt_read, total_read = int(quest_prompt[row]), int(quest_total[row])
                pages = -(-lengths[row] // self.pool.page_size)
                metadata_bytes = int(2 * shape.head_dim * pages.sum()) * element_bytes  # each page's key min/max
            else:
                prompt_read, total_read = int(kept_sum[row]), int(lengths_sum[row])
            dense_prompt = req.prompt_len * per_step_dense
            dense_total = (req.prompt_len + generated[row]) * per_step_dense
            req.cost.add_decode(prompt_read, dense_prompt, float(total_read * token_bytes),
                                float(dense_total * token_bytes), float(metadata_bytes))
            req.cost.end_decode_step(shape, total_read, dense_total)
