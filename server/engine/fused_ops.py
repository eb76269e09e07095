"""The decoder's small ops fused in Triton, for CUDA: each replaces several PyTorch kernels per layer.

A decode step replayed as a CUDA graph spends its time in its GEMMs, its attention and the launch of every
node; measured on an H200 (Qwen2.5-7B shape, benchmarks/results/profile-native-graphs-*), the unfused small
ops were about 30 of the ~35 kernels per layer and 1-2 ms of a 6-13 ms step. Each kernel computes exactly the
PyTorch expression it replaces, with the same roundings to the model dtype (so bf16 results match the eager
ops, and transformers' double rounding in RMSNorm is kept); the expressions are the references in
tests/test_fused_ops.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(X, W, Y, sx, sy, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: a whole 128K prompt's rows pass 2**31 elements
    offs = tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(X + row * sx + offs, mask=live, other=0.0).to(tl.float32)
    normed = x / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    normed = normed.to(Y.dtype.element_ty).to(tl.float32)  # transformers: round, then scale in the model dtype
    w = tl.load(W + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + offs, (w * normed).to(Y.dtype.element_ty), mask=live)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * rms_norm(x.float()).to(x.dtype)`` for ``x [T, n]`` (rows contiguous)."""
    t, n = x.shape
    assert x.stride(-1) == 1
    y = torch.empty_like(x)
    _rms_norm_kernel[(t,)](x, weight, y, x.stride(0), y.stride(0), n, eps, BLOCK=triton.next_power_of_2(n),
                           num_warps=8 if n >= 2048 else 4)
    return y


@triton.jit
def _rotary_kernel(X, COS, SIN, Y, sx_t, sx_h, sc_t, heads, HALF: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = pid // heads
    h = pid % heads
    offs = tl.arange(0, 2 * HALF)
    partner = (offs + HALF) % (2 * HALF)  # roll by half: (i, i + d/2) pairs, HF layout
    x = tl.load(X + t * sx_t + h * sx_h + offs).to(tl.float32)
    xr = tl.load(X + t * sx_t + h * sx_h + partner).to(tl.float32)
    c = tl.load(COS + t * sc_t + offs).to(tl.float32)
    s = tl.load(SIN + t * sc_t + offs).to(tl.float32)
    dt = Y.dtype.element_ty
    out = (x * c).to(dt).to(tl.float32) + (xr * s).to(dt).to(tl.float32)  # each product rounded, as eager
    tl.store(Y + (t * heads + h) * (2 * HALF) + offs, out.to(dt))


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """:func:`server.engine.rope.apply_rotary` (``x * cos + roll(x, d/2) * signed_sin``) for ``x [T, heads, d]``
    with contiguous rows; returns a new contiguous tensor."""
    t, heads, d = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == signed_sin.stride()
    y = torch.empty(t, heads, d, dtype=x.dtype, device=x.device)
    _rotary_kernel[(t * heads,)](x, cos, signed_sin, y, x.stride(0), x.stride(1), cos.stride(0), heads,
                                 HALF=d // 2, num_warps=1)
    return y


@triton.jit
def _silu_mul_kernel(GU, Y, s_t, n, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # [T, 2n] at T = 128K, n = 18944 holds 5e9 elements
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    g = tl.load(GU + t * s_t + offs, mask=live, other=0.0).to(tl.float32)
    u = tl.load(GU + t * s_t + n + offs, mask=live, other=0.0).to(tl.float32)
    dt = Y.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(Y + t * n + offs, (act * u).to(dt), mask=live)


def silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate_up[:, :n]) * gate_up[:, n:]`` for ``gate_up [T, 2n]`` (rows contiguous)."""
    t, two_n = gate_up.shape
    n = two_n // 2
    assert gate_up.stride(-1) == 1
    y = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, y, gate_up.stride(0), n, BLOCK=block, num_warps=4)
    return y


@triton.jit
def _append_kernel(K, V, KP, VP, KMIN, KMAX, PAGE, SLOT, sk_b, sk_h, sv_b, sv_h, sp_b, heads, page_size,
                   HEAD_DIM: tl.constexpr):
    pid = tl.program_id(0)  # b * heads + head
    b = pid // heads
    h = pid % heads
    page = tl.load(PAGE + b * sp_b + h).to(tl.int64)
    slot = tl.load(SLOT + b * sp_b + h).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    dt = KP.dtype.element_ty
    k = tl.load(K + b * sk_b + h * sk_h + d).to(dt)
    v = tl.load(V + b * sv_b + h * sv_h + d).to(dt)
    token = (page * page_size + slot) * HEAD_DIM + d
    tl.store(KP + token, k)
    tl.store(VP + token, v)
    summary = page * HEAD_DIM + d
    first = slot == 0  # a page's first token sets its summary (a fresh page keeps its last owner's)
    tl.store(KMIN + summary, tl.where(first, k, tl.minimum(tl.load(KMIN + summary), k)))
    tl.store(KMAX + summary, tl.where(first, k, tl.maximum(tl.load(KMAX + summary), k)))


def append_token(k: Tensor, v: Tensor, keys: Tensor, values: Tensor, key_min: Tensor, key_max: Tensor,
                 page: Tensor, slot: Tensor) -> None:
    """Write one token per (row, KV head) -- ``k``/``v [B, h_kv, d]`` -- at slot ``slot`` of page ``page``
    (``[B, h_kv]``) of the pool ``keys``/``values [pages, page_size, d]``, and fold its key into the page's
    ``key_min``/``key_max [pages, d]`` (slot 0 sets them): the decode step's whole cache update in one launch."""
    b, heads, d = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and page.stride() == slot.stride() and page.stride(-1) == 1
    assert keys.is_contiguous() and values.is_contiguous() and key_min.is_contiguous() and key_max.is_contiguous()
    _append_kernel[(b * heads,)](k, v, keys, values, key_min, key_max, page, slot, k.stride(0), k.stride(1),
                                 v.stride(0), v.stride(1), page.stride(0), heads, keys.shape[1], HEAD_DIM=d,
                                 num_warps=1)
