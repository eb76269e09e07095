"""``load_model``: a model and its tokenizer from a Hugging Face directory, a GGUF file, or the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from server.tokenizer import HFTokenizer, load_gguf_tokenizer, load_hf_tokenizer

from .default_model import DEFAULT_MODEL_NAME, default_model_path
from .llama import LlamaModel
from .weights import Checkpoint, load_gguf_checkpoint, load_hf_checkpoint


def resolve_model_path(path: str | os.PathLike[str] | None) -> Path:
    """The GGUF file or HF directory ``path`` names (None = the embedded default GGUF)."""
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p} is not a .gguf file; pass a GGUF file or a Hugging Face model directory")
        return p
    if p.is_dir():
        if (p / "config.json").exists():
            return p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            raise ValueError(f"{p} holds several GGUF files; name one: {[g.name for g in ggufs]}")
        raise FileNotFoundError(f"{p} has neither config.json nor a .gguf file")
    raise FileNotFoundError(f"model path {p} does not exist")


def load_checkpoint(path: str | os.PathLike[str] | None, dtype: torch.dtype = torch.float32) -> tuple[Checkpoint, Path]:
    resolved = resolve_model_path(path)
    if resolved.is_file():
        ckpt = load_gguf_checkpoint(resolved, dtype=dtype)
        if path is None:
            ckpt.config.name = DEFAULT_MODEL_NAME
    else:
        ckpt = load_hf_checkpoint(resolved)
    return ckpt, resolved


def load_model(
    path: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaModel, HFTokenizer]:
    """Load a Llama-family model and its tokenizer (``path=None``: the embedded SmolLM2-135M-Instruct GGUF)."""
    ckpt, resolved = load_checkpoint(path, dtype=dtype)
    model = LlamaModel.from_state_dict(
        ckpt.config, ckpt.state_dict, device=device, dtype=dtype, rope_freq_factors=ckpt.rope_freq_factors
    )
    ckpt.release()
    if resolved.is_file():
        tokenizer = load_gguf_tokenizer(resolved, ckpt.chat_template, ckpt.config.eos_token_ids)
    else:
        tokenizer = load_hf_tokenizer(resolved, ckpt.config.eos_token_ids)
    if ckpt.config.eos_token_ids == [] and tokenizer.eos_token_id is not None:
        ckpt.config.eos_token_ids = [tokenizer.eos_token_id]
    return model, tokenizer
