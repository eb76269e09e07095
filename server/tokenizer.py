"""The tokenizer and chat template of a model, from the same source as its weights (HF directory or GGUF file).

Implements :class:`server.contract.engine.Tokenizer`. The tokenizer itself is transformers' (for GGUF it is rebuilt
from the file's ``tokenizer.ggml.*`` metadata by ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``); the
chat template is the source's own (``tokenizer_config.json`` / ``chat_template.jinja``, or GGUF
``tokenizer.chat_template``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Special tokens that end an assistant turn in common chat formats; added to the stop ids when the vocabulary
# has them as special tokens.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end|>", "<end_of_turn>", "</s>")

# Used only for models without a chat template (base models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class HFTokenizer:
    """A transformers tokenizer plus the model's chat template and stop token ids."""

    def __init__(self, hf_tokenizer: Any, chat_template: str | None = None, eos_token_ids: list[int] | None = None):
        self.hf_tokenizer = hf_tokenizer
        if chat_template:
            hf_tokenizer.chat_template = chat_template
        self.has_chat_template = bool(getattr(hf_tokenizer, "chat_template", None))
        stop: list[int] = []
        if hf_tokenizer.eos_token_id is not None:
            stop.append(int(hf_tokenizer.eos_token_id))
        stop += [int(i) for i in eos_token_ids or []]
        special = set(hf_tokenizer.all_special_tokens) | {
            t.content for t in getattr(hf_tokenizer, "added_tokens_decoder", {}).values() if t.special
        }
        for tok in CHAT_END_TOKENS:
            if tok in special:
                tid = hf_tokenizer.convert_tokens_to_ids(tok)
                if isinstance(tid, int):
                    stop.append(tid)
        self.stop_token_ids: list[int] = list(dict.fromkeys(stop))
        self.eos_token_id: int | None = self.stop_token_ids[0] if self.stop_token_ids else None
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.vocab_size: int = len(hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        kwargs: dict[str, Any] = {}
        if not self.has_chat_template:
            kwargs["chat_template"] = FALLBACK_CHAT_TEMPLATE
        text = self.hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        assert isinstance(text, str)
        return text

    def chat_prompt_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered chat prompt (the template already contains any BOS it wants)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def load_hf_tokenizer(model_dir: str | os.PathLike[str], eos_token_ids: list[int] | None = None) -> HFTokenizer:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model_dir = Path(model_dir)
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_class = json.loads(tok_config_path.read_text()).get("tokenizer_class") if tok_config_path.exists() else None
    if tok_class in ("TokenizersBackend", "PreTrainedTokenizerFast") and (model_dir / "tokenizer.json").exists():
        # a plain tokenizer.json; AutoTokenizer (transformers 5) would rebuild the model type's own class instead
        tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return HFTokenizer(tok, eos_token_ids=eos_token_ids)


def load_gguf_tokenizer(
    gguf_path: str | os.PathLike[str], chat_template: str | None = None, eos_token_ids: list[int] | None = None
) -> HFTokenizer:
    # PreTrainedTokenizerFast rather than AutoTokenizer: the latter also parses the whole file again for a
    # model config (seconds for a 49k-token vocabulary); the tokenizer built is the same.
    from transformers import PreTrainedTokenizerFast

    gguf_path = Path(gguf_path)
    tok = PreTrainedTokenizerFast.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    return HFTokenizer(tok, chat_template=chat_template, eos_token_ids=eos_token_ids)
