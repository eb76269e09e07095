"""Prompts and chat messages -> token ids, cheap checks first.

Everything that can refuse a request for little work (shapes, counts, characters against the context, lone
surrogates; see :mod:`.limits`) runs on the event loop before anything is tokenized. Rendering the chat
template and tokenizing, the expensive part, run in the context's bounded worker pool (the tokenizers
release the GIL), so ``/health`` and running streams keep going while a large request is prepared. A
request whose texts are short is tokenized in place: the hop to the pool would cost more.
"""

from __future__ import annotations

from typing import Any

from .context import ServerContext
from .errors import bad_request
from .limits import check_choices, check_text

INLINE_CHARS = 4096  # requests with fewer characters (or token ids) in all are prepared on the event loop
CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}

Prompt = tuple[list[int], str | None]  # token ids, and the text they came from (None for token ids given)


async def _run(ctx: ServerContext, chars: int, fn, *args):
    return fn(*args) if chars < INLINE_CHARS else await ctx.offload(fn, *args)


def _prompt_items(prompt: Any, n: int, max_choices: int) -> list[str | list[int]]:
    """The prompts of a ``prompt`` field, told apart by their first element; token ids are checked later,
    off the event loop, with the rest of the preparation (a list can hold millions)."""
    shape_error = bad_request(
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
        param="prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise shape_error
    first = prompt[0]
    if isinstance(first, int) and not isinstance(first, bool):
        return [prompt]
    check_choices(len(prompt), n, max_choices)
    if isinstance(first, str) and all(isinstance(x, str) for x in prompt):
        return list(prompt)
    if isinstance(first, list):
        for i, x in enumerate(prompt):
            if not isinstance(x, list) or not x:
                raise bad_request("each token-id list must be a non-empty list of integers", param=f"prompt[{i}]")
        return list(prompt)
    raise shape_error


async def completion_prompts(ctx: ServerContext, prompt: Any, n: int, add_special_tokens: bool) -> list[Prompt]:
    """(token ids, text or None) per prompt of a completions request."""
    items = _prompt_items(prompt, n, ctx.settings.max_choices)
    check_choices(len(items), n, ctx.settings.max_choices)
    params = ["prompt" if len(items) == 1 else f"prompt[{i}]" for i in range(len(items))]
    work = 0  # characters to tokenize and token ids to check
    for item, param in zip(items, params, strict=True):
        if isinstance(item, str):
            check_text(item, param, ctx.max_prompt_chars)
        elif len(item) > ctx.engine.max_model_len:
            raise bad_request(f"{param} has {len(item)} tokens, more than this model's context of "
                              f"{ctx.engine.max_model_len}", param=param, code="context_length_exceeded")
        work += len(item)

    def tokenize() -> list[Prompt]:
        out: list[Prompt] = []
        for item, param in zip(items, params, strict=True):
            if isinstance(item, str):
                ids, text = ctx.engine.tokenizer.encode(item, add_special_tokens=add_special_tokens), item
            else:
                ctx.check_token_ids(item, param)
                ids, text = item, None
            if not ids:
                raise bad_request("the prompt must contain at least one token", param=param)
            out.append((ids, text))
        return out

    return await _run(ctx, work, tokenize)


async def encode_text(ctx: ServerContext, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
    check_text(text, param, ctx.max_prompt_chars)
    return await _run(ctx, len(text), ctx.engine.tokenizer.encode, text, add_special_tokens)


def _message_dicts(ctx: ServerContext, messages: list[Any]) -> tuple[list[dict[str, Any]], int]:
    """The messages as the chat template takes them, and their characters in all."""
    if len(messages) > ctx.engine.max_model_len:  # every message renders to at least one token
        raise bad_request(f"{len(messages)} messages cannot fit this model's context of {ctx.engine.max_model_len} "
                          "tokens", param="messages", code="context_length_exceeded")
    out: list[dict[str, Any]] = []
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request("each message must be an object with a role and content", param=f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad_request("a message needs a string role", param=f"messages[{i}].role")
        if role not in CHAT_ROLES:
            raise bad_request(f"unknown role {role!r}; expected one of {', '.join(sorted(CHAT_ROLES))}",
                              param=f"messages[{i}].role")
        content = m.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            check_text(content, f"messages[{i}].content")
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                param = f"messages[{i}].content[{j}]"
                if not isinstance(part, dict):
                    raise bad_request("content parts must be objects", param=param)
                kind = part.get("type")
                if kind in ("text", "input_text") and isinstance(part.get("text"), str):
                    check_text(part["text"], f"{param}.text")
                    parts.append(part["text"])
                elif kind in ("text", "input_text"):
                    raise bad_request("a text part needs a string 'text'", param=f"{param}.text")
                else:
                    raise bad_request(f"content part type {kind!r} is not supported (text only)",
                                      param=f"{param}.type", code="unsupported_parameter")
            text = "\n".join(parts)
        else:
            raise bad_request("content must be a string or a list of text parts", param=f"messages[{i}].content")
        chars += len(text)
        d: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise bad_request("a message's name must be a string", param=f"messages[{i}].name")
            check_text(name, f"messages[{i}].name")
            d["name"] = name
        out.append(d)
    if chars > ctx.max_prompt_chars:  # the texts together, as the context holds them together
        raise bad_request(f"the messages have {chars} characters, more than any prompt that fits this model's "
                          f"context can have ({ctx.max_prompt_chars})", param="messages",
                          code="context_length_exceeded")
    return out, chars


async def chat_prompt(ctx: ServerContext, messages: list[Any], add_generation_prompt: bool) -> list[int]:
    """Token ids of the messages rendered with the model's chat template."""
    dicts, chars = _message_dicts(ctx, messages)
    tok = ctx.engine.tokenizer

    def render_and_tokenize() -> list[int]:
        try:
            text = tok.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - template errors are the client's messages' fault
            raise bad_request(f"the messages cannot be rendered with the model's chat template: {e}",
                              param="messages") from None
        return tok.encode(text, add_special_tokens=False)

    ids = await _run(ctx, chars + 100 * len(dicts), render_and_tokenize)  # rendering costs per message too
    if not ids:
        raise bad_request("the rendered chat prompt is empty", param="messages")
    return ids
