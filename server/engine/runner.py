"""Runs the model for the scheduler: one request's prefill, or one decode step for a batch.

The model delegates attention to a callback (``AttentionFn``); the callbacks here are where the paged KV
cache and each request's sparse methods meet:

* prefill (one request, ``T = n``): the request's prefill method computes attention and reports its cost;
  the layer's keys/values go into fresh pages; SnapKV/Ada-SnapKV then keep only their chosen tokens and
  the evicted pages go straight back to the pool.
* decode (``T = B``, one token per request): the new key/value is written into each (layer, KV head)'s
  last page, then one batched paged attention reads, per row, either the whole per-head page table (dense,
  SnapKV, Ada-SnapKV) or the pages Quest selects from the page key min/max.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_backends import PrefillCallReport, engine_impl, prepare_decode, sparse_prefill
from attention_backends.cost import ModelShape, causal_cells, flops_per_cell
from attention_backends.decode.quest import budget_pages
from attention_backends.spec import DECODE_METHODS
from server.contract.engine import TokenLogprob

from .page_pool import PagePool
from .paged_attention import choose_quest_pages, page_fill, paged_decode_attention, selected_pages, token_mask
from .request_state import EngineRequest
from .sampler import token_logprobs

try:  # Triton is a dependency, but a broken install must not take the CPU path down with it
    from attention_backends.kernels.paged_decode import paged_decode as triton_paged_decode
except Exception:  # pragma: no cover
    triton_paged_decode = None
from .sequence_kv import SequenceKV

# Prompt logprobs compute float32 logits this many bytes at a time, never all [n, vocab] of a long prompt.
PROMPT_LOGITS_CHUNK_BYTES = 64 << 20


def dense_prefill_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, PrefillCallReport]:
    """Dense causal attention through SDPA (the fast path; same result as the dense reference)."""
    h, n, d = q.shape
    out = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True,
                                         enable_gqa=True)[0]
    cells = causal_cells(n) * h
    flops = float(cells * flops_per_cell(d))
    return out, PrefillCallReport("dense", 1.0, cells, cells, flops, flops)


def prompt_logprobs(model, hidden: Tensor, ids: Tensor, k: int) -> list[TokenLogprob | None]:
    """Logprob (and top ``k``) of each prompt token given the ones before it; the first token has none.

    ``hidden [n, hidden_size]`` are the prefill's last-layer states; position i scores token i + 1.
    """
    rows = max(1, PROMPT_LOGITS_CHUNK_BYTES // (4 * model.config.vocab_size))
    out: list[TokenLogprob | None] = [None]
    scored = ids.numel() - 1  # the last position predicts the first generated token, not a prompt token
    for start in range(0, scored, rows):
        end = min(start + rows, scored)
        logits = model.compute_logits(hidden[start:end])
        logits -= torch.logsumexp(logits, dim=-1, keepdim=True)  # log-softmax in place: one chunk in memory
        out += token_logprobs(logits, ids[start + 1 : end + 1], k)
    return out


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: PagePool, shape: ModelShape):
        self.model = model
        self.pool = pool
        self.shape = shape
        self.device = pool.device
        # On CUDA the Triton kernels run prefill methods and paged decode; elsewhere the PyTorch paths do.
        self.use_triton = engine_impl(pool.device) == "triton" and triton_paged_decode is not None

    def _attend_paged(self, q: Tensor, tables: Tensor, lengths: Tensor, valid: Tensor | None) -> Tensor:
        """Decode attention over each (row, KV head)'s first ``lengths`` tokens of the pages in ``tables``."""
        if self.use_triton:
            return triton_paged_decode(q, self.pool.keys, self.pool.values, tables.int(), lengths.int(),
                                       max_len=tables.shape[-1] * self.pool.page_size)
        fill = page_fill(lengths, tables.shape[-1], self.pool.page_size)
        return paged_decode_attention(q, self.pool.keys, self.pool.values, tables, fill, valid)

    def new_sequence(self) -> SequenceKV:
        return SequenceKV(self.pool, self.shape.num_layers, self.shape.num_kv_heads)

    # -- prefill ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, req: EngineRequest) -> Tensor:
        """Prefill one request; returns the logits of its last prompt position ``[1, V]``."""
        spec = req.request.spec
        kv = req.kv
        assert kv is not None
        cost = req.cost

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if spec.prefill.is_dense:
                out, report = dense_prefill_attention(qh, kh, vh)
            else:
                out, report = sparse_prefill(qh, kh, vh, spec, impl="triton" if self.use_triton else "reference")
            cost.add_prefill(report)
            kv.write_prompt(layer, kh, vh)
            if DECODE_METHODS[spec.decode.method].evicts:
                keep = prepare_decode(qh, kh, vh, spec).kept_positions
                kv.keep_only(layer, keep)
            return out.transpose(0, 1)

        ids = torch.tensor(req.request.prompt_token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(ids.numel(), device=self.device)
        k = req.request.sampling.prompt_logprobs
        if k is None or req.output_ids:  # a preempted request resuming sent its prompt logprobs already
            last = torch.tensor([ids.numel() - 1], device=self.device)
            logits = self.model(ids, positions, attention, logits_indices=last).float().cpu()
        else:
            # the same (sparse) prefill's hidden states score the prompt: what the pattern costs is what is measured
            hidden = self.model.hidden_states(ids, positions, attention)
            req.prompt_logprobs = prompt_logprobs(self.model, hidden, ids, k)
            logits = self.model.compute_logits(hidden[-1:]).cpu()
        cost.end_prefill(self.shape, req.prompt_len)
        return logits

    # -- decode -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, batch: list[EngineRequest]) -> Tensor:
        """One decode step for every request of ``batch``; returns logits ``[B, V]``."""
        ps = self.pool.page_size
        seqs = [r.kv for r in batch]
        appends = [s.prepare_append() for s in seqs]  # type: ignore[union-attr]
        pids = torch.stack([a[0] for a in appends])  # [B, layers, h_kv]
        slots = torch.stack([a[1] for a in appends])
        lengths = torch.stack([s.lengths for s in seqs]).to(self.device) + 1  # after this step's append
        prompt_kept = torch.stack([s.prompt_kept for s in seqs]).to(self.device)
        n_pages = int(-(-int(lengths.max()) // ps))
        tables = torch.stack([s.table_view(n_pages) for s in seqs])  # [B, layers, h_kv, P]
        quest_rows = [i for i, r in enumerate(batch) if DECODE_METHODS[r.request.spec.decode.method].selects_pages]
        full_rows = [i for i in range(len(batch)) if i not in set(quest_rows)]
        q_idx = torch.tensor(quest_rows, dtype=torch.long, device=self.device)
        f_idx = torch.tensor(full_rows, dtype=torch.long, device=self.device)
        budgets = torch.tensor(
            [budget_pages(batch[i].prompt_len, batch[i].request.spec.decode) or n_pages for i in quest_rows],
            dtype=torch.long, device=self.device)
        quest_prompt_read = torch.zeros(len(quest_rows), dtype=torch.long, device=self.device)
        quest_total_read = torch.zeros(len(quest_rows), dtype=torch.long, device=self.device)
        pool = self.pool
        attend = self._attend_paged
        valid_all = None if self.use_triton else token_mask(page_fill(lengths, n_pages, ps), ps)

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            p, s = pids[:, layer], slots[:, layer]
            pool.keys[p, s] = k.to(pool.dtype)
            pool.values[p, s] = v.to(pool.dtype)
            tbl, lens = tables[:, layer], lengths[:, layer]
            if not quest_rows:
                return attend(q, tbl, lens, None if valid_all is None else valid_all[:, layer])
            # Only Quest reads page summaries: keep them current for its rows' pages.
            pq, kq = p[q_idx], k[q_idx].to(pool.dtype)
            pool.key_min[pq] = torch.minimum(pool.key_min[pq], kq)
            pool.key_max[pq] = torch.maximum(pool.key_max[pq], kq)
            out = torch.empty_like(q)
            if full_rows:
                out[f_idx] = attend(q[f_idx], tbl[f_idx], lens[f_idx],
                                    None if valid_all is None else valid_all[f_idx, layer])
            qt, ql = tbl[q_idx], lens[q_idx]
            chosen, count = choose_quest_pages(q[q_idx], pool.key_min, pool.key_max, qt, ql, budgets, ps)
            sel_tables, sel_lengths = selected_pages(qt, ql, chosen, count, ps)
            out[q_idx] = attend(q[q_idx], sel_tables, sel_lengths, None)
            _, prompt_lengths = selected_pages(qt, prompt_kept[q_idx, layer], chosen, count, ps)
            quest_prompt_read.add_(prompt_lengths.sum(-1))
            quest_total_read.add_(sel_lengths.sum(-1))
            return out

        ids = torch.tensor([r.next_input for r in batch], dtype=torch.long, device=self.device)
        positions = torch.tensor([r.next_position for r in batch], dtype=torch.long, device=self.device)
        logits = self.model(ids, positions, attention).float().cpu()
        for r in batch:
            r.kv.commit_append()  # type: ignore[union-attr]
            r.cached_outputs += 1
        self._account_decode(batch, lengths, prompt_kept, quest_rows, quest_prompt_read, quest_total_read)
        return logits

    def _account_decode(self, batch: list[EngineRequest], lengths: Tensor, prompt_kept: Tensor,
                        quest_rows: list[int], quest_prompt: Tensor, quest_total: Tensor) -> None:
        shape = self.shape
        per_step_dense = shape.num_layers * shape.num_kv_heads
        element_bytes = self.pool.keys.element_size()
        token_bytes = 2 * shape.head_dim * element_bytes  # K and V of one token of one KV head
        quest_pos = {row: i for i, row in enumerate(quest_rows)}
        lengths_sum = lengths.sum(dim=(1, 2)).tolist()
        kept_sum = prompt_kept.sum(dim=(1, 2)).tolist()
        for row, req in enumerate(batch):
            metadata_bytes = 0
            if row in quest_pos:
                prompt_read = int(quest_prompt[quest_pos[row]])
                total_read = int(quest_total[quest_pos[row]])
                pages = -(-lengths[row] // self.pool.page_size)
                metadata_bytes = int(2 * shape.head_dim * pages.sum()) * element_bytes  # each page's key min/max
            else:
                prompt_read, total_read = int(kept_sum[row]), int(lengths_sum[row])
            generated = req.cached_outputs  # tokens generated so far, this step's input included
            dense_prompt, dense_total = req.prompt_len * per_step_dense, (req.prompt_len + generated) * per_step_dense
            req.cost.add_decode(prompt_read, dense_prompt, float(total_read * token_bytes),
                                float(dense_total * token_bytes), float(metadata_bytes))
            req.cost.end_decode_step(shape, total_read, dense_total)
