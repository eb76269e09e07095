"""The Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral, SmolLM2) without a KV cache of its own.

Attention is delegated to a callback so the engine's paged cache and the sparse methods plug in::

    attention(layer_idx, q [T, num_heads, head_dim], k [T, num_kv_heads, head_dim], v [T, num_kv_heads, head_dim])
        -> out [T, num_heads, head_dim]

``T`` is a flat token dimension (the engine may pack several sequences; the callback knows the layout). q and k
are passed after RoPE; the callback applies the softmax scale (``head_dim ** -0.5``), masking and GQA. q, k, v are
views into per-layer buffers (the last dim is contiguous, the token dim may be strided): store or copy them, do not
write into them.

Weights are kept fused (q|k|v and gate|up) in Hugging Face's un-permuted layout; see :meth:`LlamaModel.from_state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .model_config import ModelConfig
from .rope import RotaryEmbedding, apply_rotary

try:  # Triton is a dependency, but a broken install must not take the CPU path down with it
    from . import fused_ops
except Exception:  # pragma: no cover
    fused_ops = None

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _param(shape: tuple[int, ...], device: torch.device | str | None, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


def _residual_linear(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``residual + x @ weight.T (+ bias)``; one GEMM with the add folded in when there is no bias."""
    if bias is None:
        return torch.addmm(residual, x, weight.t())
    return residual + F.linear(x, weight, bias)


class DecoderLayer(nn.Module):
    """One layer's weights; the computation lives in :meth:`LlamaModel.forward` (one loop, no per-module calls)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None, dtype: torch.dtype):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        qkv = cfg.q_size + 2 * cfg.kv_size
        self.input_norm = _param((h,), device, dtype)
        self.qkv_weight = _param((qkv, h), device, dtype)
        self.qkv_bias = _param((qkv,), device, dtype) if cfg.attention_bias else None
        self.o_weight = _param((h, cfg.q_size), device, dtype)
        self.o_bias = _param((h,), device, dtype) if cfg.attention_out_bias else None
        self.post_norm = _param((h,), device, dtype)
        self.gate_up_weight = _param((2 * i, h), device, dtype)
        self.gate_up_bias = _param((2 * i,), device, dtype) if cfg.mlp_bias else None
        self.down_weight = _param((h, i), device, dtype)
        self.down_bias = _param((h,), device, dtype) if cfg.mlp_bias else None


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        rope_freq_factors: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = _param((c.vocab_size, c.hidden_size), device, dtype)
        self.layers = nn.ModuleList(DecoderLayer(c, device, dtype) for _ in range(c.num_layers))
        self.norm = _param((c.hidden_size,), device, dtype)
        self.lm_head = (
            self.embed_tokens if c.tie_word_embeddings else _param((c.vocab_size, c.hidden_size), device, dtype)
        )
        self.rotary = RotaryEmbedding(
            c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings, rope_freq_factors
        )
        if device is not None and torch.device(device).type != "meta":
            self.rotary.to(device)
        # The small ops as fused Triton kernels (:mod:`.fused_ops`): None = on CUDA; True also runs them on the
        # CPU (Triton's interpreter, for tests)
        self.fused: bool | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    # ------------------------------------------------------------------ forward
    def _use_fused(self, x: torch.Tensor) -> bool:
        return fused_ops is not None and (x.is_cuda if self.fused is None else self.fused)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        if self._use_fused(x):
            return fused_ops.rms_norm(x, weight, eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        # like transformers: normalise in float32, round, then scale in the model dtype
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[len(logits_indices) or T, vocab]`` in float32 for flat ``input_ids``/``positions`` ``[T]``."""
        hidden = self.hidden_states(input_ids, positions, attention)
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        return self.compute_logits(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[rows, vocab]`` of last-layer hidden states (:meth:`hidden_states` rows)."""
        return F.linear(self._rms_norm(hidden, self.norm), self.lm_head).float()

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """The last layer's output ``[T, hidden]`` (before the final norm) for every token."""
        c = self.config
        nq, nkv, d = c.num_heads, c.num_kv_heads, c.head_dim
        q_size, kv_size, inter = c.q_size, c.kv_size, c.intermediate_size
        t = input_ids.shape[0]
        hidden = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        fused = self._use_fused(hidden)
        rotate = fused_ops.apply_rotary if fused else apply_rotary
        for idx, layer in enumerate(self.layers):
            x = self._rms_norm(hidden, layer.input_norm)
            qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias)
            qk = rotate(qkv[:, : q_size + kv_size].view(t, nq + nkv, d), cos, sin)
            q, k = qk[:, :nq], qk[:, nq:]
            v = qkv[:, q_size + kv_size :].view(t, nkv, d)
            out = attention(idx, q, k, v)
            hidden = _residual_linear(hidden, out.reshape(t, q_size), layer.o_weight, layer.o_bias)
            x = self._rms_norm(hidden, layer.post_norm)
            gate_up = F.linear(x, layer.gate_up_weight, layer.gate_up_bias)
            x = fused_ops.silu_mul(gate_up) if fused else F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            hidden = _residual_linear(hidden, x, layer.down_weight, layer.down_bias)
        return hidden

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        state_dict: Mapping[str, torch.Tensor],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        rope_freq_factors: torch.Tensor | None = None,
    ) -> LlamaModel:
        """Build from a Hugging Face-named state dict (``model.layers.N.self_attn.q_proj.weight``, ...).

        Tensors are fused and moved one layer at a time, so peak extra memory is about one layer.
        """
        model = cls(config, device="meta", dtype=dtype, rope_freq_factors=rope_freq_factors)
        model.rotary.to(device)

        def get(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise KeyError(f"checkpoint lacks tensor {name!r}")
            return state_dict[name]

        def put(owner: nn.Module, attr: str, *tensors: torch.Tensor) -> None:
            t = tensors[0] if len(tensors) == 1 else torch.cat([x.to(dtype) for x in tensors], dim=0)
            expected = getattr(owner, attr).shape
            if t.shape != expected:
                raise ValueError(f"{attr}: checkpoint shape {tuple(t.shape)} != expected {tuple(expected)}")
            setattr(owner, attr, nn.Parameter(t.to(device=device, dtype=dtype).contiguous(), requires_grad=False))

        put(model, "embed_tokens", get("model.embed_tokens.weight"))
        put(model, "norm", get("model.norm.weight"))
        if config.tie_word_embeddings:
            model.lm_head = model.embed_tokens
        else:
            put(model, "lm_head", get("lm_head.weight"))
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            put(layer, "input_norm", get(p + "input_layernorm.weight"))
            put(layer, "post_norm", get(p + "post_attention_layernorm.weight"))
            put(layer, "qkv_weight", get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight"))
            if config.attention_bias:
                put(layer, "qkv_bias", get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias"))
            put(layer, "o_weight", get(a + "o_proj.weight"))
            if config.attention_out_bias:
                put(layer, "o_bias", get(a + "o_proj.bias"))
            put(layer, "gate_up_weight", get(m + "gate_proj.weight"), get(m + "up_proj.weight"))
            put(layer, "down_weight", get(m + "down_proj.weight"))
            if config.mlp_bias:
                put(layer, "gate_up_bias", get(m + "gate_proj.bias"), get(m + "up_proj.bias"))
                put(layer, "down_bias", get(m + "down_proj.bias"))
        model.eval()
        return model
