"""Cheap limits, checked before anything expensive: a request that cannot be served is refused in
microseconds to milliseconds, whatever its size, so it cannot hold the event loop.

* :func:`body_shape_error` - on the raw body, before it is parsed: parsing JSON (and building pydantic models
  from it) holds the GIL, so no thread can take that work off the event loop; the number of containers,
  values and strings a body can hold is bounded instead. The counts are upper bounds taken in C over the
  body's structural characters (those inside strings count too), and the budgets are what the largest
  request that fits the context needs, with room to spare.
* :func:`check_text` - a prompt or message text: valid Unicode (a lone surrogate cannot be tokenized) and no
  more characters than a prompt that fits the context can have.
* :func:`check_choices` - prompts x n against ``--max-choices``, before any prompt is tokenized.
"""

from __future__ import annotations

from .errors import APIError, bad_request

_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b'{[",')


def body_shape_error(raw: bytes, max_model_len: int, max_choices: int) -> APIError | None:
    """413 for a body with more JSON containers, values or strings than any servable request needs."""
    if len(raw) < 65_536:  # parses in well under a millisecond whatever its shape
        return None
    skeleton = raw.translate(None, _NOT_STRUCTURAL)  # one pass; what is left is short for ordinary text
    containers = skeleton.count(b"{") + skeleton.count(b"[")
    strings = skeleton.count(b'"') // 2
    values = skeleton.count(b",") + containers + 1
    budgets = (
        # prompts (lists of token ids), messages and their content parts (every message is >= 1 token)
        ("containers (objects and arrays)", containers, max_choices + 2 * max_model_len + 1024),
        # prompt strings, and each message's keys and strings
        ("strings", strings, max_choices + 8 * max_model_len + 4096),
        # token ids: 64 prompts of a full context (the ids of a body are parsed on the event loop)
        ("values", values, 72 * max_model_len + 4096),
    )
    for what, count, budget in budgets:
        if count > budget:
            return APIError(413, f"the request body has too many JSON {what} (up to {count}; this server takes "
                            f"at most {budget} for its context of {max_model_len} tokens)",
                            code="request_too_complex")
    return None


def check_text(text: str, param: str, max_chars: int | None = None) -> None:
    """400 naming ``param`` for text that is not valid Unicode or has more than ``max_chars`` characters."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"{param} contains a lone surrogate (U+{ord(text[e.start]):04X} at character "
                              f"{e.start}); text must be valid Unicode", param=param, code="invalid_unicode") from None
    if max_chars is not None and len(text) > max_chars:
        raise bad_request(f"{param} has {len(text)} characters, more than any prompt that fits this model's "
                          f"context can have ({max_chars})", param=param, code="context_length_exceeded")


def check_choices(prompts: int, n: int, max_choices: int) -> None:
    if prompts * n > max_choices:
        raise bad_request(f"prompts x n = {prompts * n} exceeds this server's limit of {max_choices}",
                          param="n" if prompts == 1 else "prompt")
