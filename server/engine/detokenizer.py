"""Incremental detokenization with stop strings.

Tokenizers merge bytes and spaces across tokens, so decoding token by token would be wrong, and decoding all
generated ids at every token costs O(n) per token (O(n^2) per request: a host cost every decode step pays,
per request). So each token decodes a short window: the ids from ``prefix`` (a few tokens before the last
emitted text) to the end, against the same window without the new tokens; the difference is the new text.
A window ending in an incomplete UTF-8 sequence (U+FFFD) waits for the next token. A suffix that could still
become a stop string is held back until it is decided; the stop string itself is never returned.
"""

from __future__ import annotations

from server.contract.engine import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.text = ""  # the decoded text so far
        self._prefix = 0  # ids[_prefix:_read] decode to the end of ``text``: the window's context
        self._read = 0  # ids before it are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _extend_text(self, final: bool = False) -> None:
        """Move the window's new text into ``text`` (``final``: even an incomplete character)."""
        before = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(before) and (final or not window.endswith("\ufffd")):
            self.text += window[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (new text, stopped). After ``stopped`` no more tokens should be added."""
        self.ids.append(token_id)
        self._extend_text()
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                cut = min(i for i, _ in hits)
                delta = self.text[self.emitted : cut]
                self.emitted = max(self.emitted, cut)
                return delta, True
        safe = len(self.text)
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        delta = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self) -> str:
        """Text held back so far (the request ended without a stop string), an incomplete character included."""
        if self._read < len(self.ids):  # tokens still waiting for the rest of a character
            self._extend_text(final=True)
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
