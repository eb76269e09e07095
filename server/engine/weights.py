"""Checkpoint readers: a Hugging Face model directory (config.json + safetensors, sharded or not) and a GGUF file.

Both produce a :class:`Checkpoint`: a :class:`ModelConfig` and a state dict with Hugging Face tensor names and
layouts. GGUF tensors are dequantised on load (``gguf.quants.dequantize``) and llama.cpp's q/k row permutation
(applied by ``convert_hf_to_gguf.py`` to ``llama``-architecture models so that its interleaved RoPE works) is
undone, so one model implementation (HF "rotate half" RoPE) serves both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model_config import ModelConfig

# GGUF architectures we read, and whether llama.cpp permuted their q/k weights.
GGUF_ARCHITECTURES = {"llama": True, "qwen2": False}


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: Mapping[str, torch.Tensor]  # Hugging Face names and layouts
    rope_freq_factors: torch.Tensor | None = None
    chat_template: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def release(self) -> None:
        """Drop the tensors (after the model has copied them)."""
        close = getattr(self.state_dict, "close", None)
        if close is not None:
            close()
        elif isinstance(self.state_dict, dict):
            self.state_dict.clear()


# ---------------------------------------------------------------------------------------------- HF directory
def load_hf_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    gen_path = model_dir / "generation_config.json"
    config = ModelConfig.from_hf_dict(cfg, name=model_dir.name)
    if gen_path.exists():  # instruct models list their chat stop tokens here (e.g. Qwen2.5: im_end, endoftext)
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        extra = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        config.eos_token_ids += [int(e) for e in extra if int(e) not in config.eos_token_ids]
    return config


def _hf_weight_files(model_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [model_dir / f for f in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        files = sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or pytorch_model*.bin) weights in {model_dir}")
    return files


class LazyStateDict(Mapping[str, torch.Tensor]):
    """Tensors of safetensors files (sharded or not), read from the memory map only when asked for.

    Keeps peak memory at about the model plus one tensor while :meth:`LlamaModel.from_state_dict` copies them.
    ``pytorch_model*.bin`` files are memory-mapped by ``torch.load`` instead.
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles: list[Any] = []
        self._where: dict[str, Any] = {}
        self._eager: dict[str, torch.Tensor] = {}
        for path in files:
            if path.suffix == ".safetensors":
                handle = safe_open(str(path), framework="pt", device="cpu")
                self._handles.append(handle)
                for name in handle.keys():
                    self._where[name] = handle
            else:
                self._eager.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._eager:
            return self._eager[name]
        return self._where[name].get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self._eager

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from self._eager

    def __len__(self) -> int:
        return len(self._where) + len(self._eager)

    def close(self) -> None:
        self._where.clear()
        self._eager.clear()
        self._handles.clear()


def load_hf_checkpoint(model_dir: str | os.PathLike[str]) -> Checkpoint:
    config = load_hf_config(model_dir)
    state_dict = LazyStateDict(_hf_weight_files(Path(model_dir)))
    if "lm_head.weight" not in state_dict and not config.tie_word_embeddings:
        config.tie_word_embeddings = True  # some exports drop lm_head when it equals the embedding
    return Checkpoint(config=config, state_dict=state_dict)


# ---------------------------------------------------------------------------------------------- GGUF
def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def undo_llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``convert_hf_to_gguf.LlamaModel.permute``: rows grouped per head as (pairs, 2) -> (2, half)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_config(reader: Any, tensor_names: set[str], name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(GGUF_ARCHITECTURES)}")

    def a(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(a("embedding_length"))
    num_heads = int(a("attention.head_count"))
    num_kv_heads = a("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer list in some files
        num_kv_heads = num_kv_heads[0]
    head_dim = int(a("attention.key_length", hidden // num_heads))
    rope_dim = a("rope.dimension_count", head_dim)
    if int(rope_dim) != head_dim:
        raise ValueError(f"partial rotary embeddings are not supported (rope dims {rope_dim} != head_dim {head_dim})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = a("vocab_size") or (len(tokens) if tokens is not None else None)
    context = int(a("context_length", 4096))
    rope_scaling: dict[str, Any] | None = None
    scaling_type = a("rope.scaling.type", "none")
    factor = a("rope.scaling.factor")
    if scaling_type == "linear" and factor:
        rope_scaling = {"rope_type": "linear", "factor": float(factor)}
    elif scaling_type == "yarn":
        rope_scaling = {
            "rope_type": "yarn",
            "factor": float(factor) if factor else None,
            "original_max_position_embeddings": int(a("rope.scaling.original_context_length", context)),
        }
        for src, dst in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if a(f"rope.scaling.{src}") is not None:
                rope_scaling[dst] = float(a(f"rope.scaling.{src}"))
    elif scaling_type not in ("none", None, "linear"):
        raise ValueError(f"unsupported GGUF rope scaling {scaling_type!r}")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [int(x) for x in (eos, eot) if x is not None]
    return ModelConfig(
        num_layers=int(a("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(num_kv_heads),
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")),
        vocab_size=int(vocab),
        max_position_embeddings=context,
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_down.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        model_type=arch,
        name=name,
    )


def load_gguf_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Read a GGUF file, dequantising every tensor to ``dtype`` (one tensor at a time)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    reader = GGUFReader(str(path))
    tensor_names = {t.name for t in reader.tensors}
    config = _gguf_config(reader, tensor_names, name=_field(reader, "general.name") or path.stem)
    permuted = GGUF_ARCHITECTURES[config.model_type]
    state_dict: dict[str, torch.Tensor] = {}
    freq_factors = None
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)  # numpy, shape = reversed GGUF dims = HF [out, in]
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not arr.flags.writeable:  # unquantised tensors come back as views of the read-only memory map
            arr = arr.copy()
        tensor = torch.from_numpy(arr)
        if t.name == "rope_freqs.weight":
            freq_factors = tensor
            continue
        if t.name in _GGUF_GLOBAL_NAMES:
            state_dict[_GGUF_GLOBAL_NAMES[t.name]] = tensor.to(dtype)
            continue
        parts = t.name.split(".", 2)
        if parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        suffix = parts[2]
        if permuted and suffix.startswith("attn_q."):
            tensor = undo_llama_cpp_permute(tensor, config.num_heads)
        elif permuted and suffix.startswith("attn_k."):
            tensor = undo_llama_cpp_permute(tensor, config.num_kv_heads)
        state_dict[f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[suffix]}"] = tensor.to(dtype)
    metadata = {
        k: _field(reader, k) for k in reader.fields if not k.startswith("tokenizer.ggml.") and not k.startswith("GGUF.")
    }
    return Checkpoint(
        config=config,
        state_dict=state_dict,
        rope_freq_factors=freq_factors,
        chat_template=_field(reader, "tokenizer.chat_template"),
        metadata=metadata,
    )
