"""The decoder's fused Triton ops (server/engine/fused_ops.py) against the PyTorch expressions they replace,
under TRITON_INTERPRET=1 (float32 and float16: bfloat16 is wrong in the interpreter), and the model with
them against the model without."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from server.engine import fused_ops  # noqa: E402
from server.engine.decode_step import DecodeKernels  # noqa: E402
from server.engine.page_pool import PagePool  # noqa: E402
from server.engine.rope import RotaryEmbedding, apply_rotary  # noqa: E402
from tests.engine_helpers import tiny_model  # noqa: E402

DTYPES = [torch.float32, torch.float16]


def _randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rounds_like_transformers(dtype):
    x, w = _randn(5, 96, dtype=dtype, seed=1), _randn(96, dtype=dtype, seed=2)
    expect = w * F.rms_norm(x.float(), (96,), None, 1e-6).to(dtype)
    got = fused_ops.rms_norm(x, w, 1e-6)
    assert got.dtype == dtype and torch.allclose(got.float(), expect.float(), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_the_eager_rotation(dtype):
    rope = RotaryEmbedding(16, 10000.0)
    positions = torch.tensor([0, 7, 300])
    cos, sin = rope.cos_sin(positions, dtype)
    qkv = _randn(3, 7 * 16 + 2 * 16, dtype=dtype, seed=3)  # the rotated part is a view of a wider row
    x = qkv[:, : 6 * 16].view(3, 6, 16)
    got = fused_ops.apply_rotary(x, cos, sin)
    assert torch.allclose(got.float(), apply_rotary(x, cos, sin).float(), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_the_eager_gate(dtype):
    gate_up = _randn(4, 2 * 1100, dtype=dtype, seed=4)  # not a multiple of the kernel's block
    expect = F.silu(gate_up[:, :1100]) * gate_up[:, 1100:]
    assert torch.allclose(fused_ops.silu_mul(gate_up).float(), expect.float(), **_tol(dtype))


def test_append_writes_the_token_and_folds_it_into_the_page_summary():
    def pool_and_step(seed):
        pool = PagePool(12, 4, 16, torch.float32, "cpu")
        pool.keys.copy_(_randn(12, 4, 16, dtype=torch.float32, seed=seed))
        pool.values.copy_(_randn(12, 4, 16, dtype=torch.float32, seed=seed + 1))
        pool.key_min.copy_(pool.keys.amin(1))
        pool.key_max.copy_(pool.keys.amax(1))
        return pool

    qkv = _randn(3, 5, 16, dtype=torch.float32, seed=7)  # k/v are strided views, as the model passes them
    k, v = qkv[:, 1:3], qkv[:, 3:5]
    page = torch.tensor([[2, 9], [4, 0], [11, 6]])
    slot = torch.tensor([[0, 3], [1, 2], [3, 3]])
    ref, fast = pool_and_step(5), pool_and_step(5)
    DecodeKernels(ref).append(k, v, page, slot)
    fused_ops.append_token(k, v, fast.keys, fast.values, fast.key_min, fast.key_max, page, slot)
    for name in ("keys", "values", "key_min", "key_max"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    assert torch.equal(fast.keys[4, 1], k[1, 0])
    # page 2 gets its first token (slot 0): its summary is that token, whatever the page's last owner left
    assert torch.equal(fast.key_min[2], k[0, 0]) and torch.equal(fast.key_max[2], k[0, 0])


def test_the_model_with_fused_ops_gives_the_eager_logits():
    model = tiny_model()
    ids, positions = torch.tensor([3, 50, 7, 91]), torch.tensor([0, 1, 2, 3])

    def attention(layer, q, k, v):  # causal self-attention over the four tokens
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(g, 0),
                                              v.transpose(0, 1).repeat_interleave(g, 0), is_causal=True
                                              ).transpose(0, 1)

    eager = model(ids, positions, attention)
    model.fused = True
    fused = model(ids, positions, attention)
    assert torch.allclose(fused, eager, rtol=1e-4, atol=1e-4) and not torch.equal(eager, torch.zeros_like(eager))
