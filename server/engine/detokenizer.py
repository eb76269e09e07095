"""Incremental detokenization with stop strings.

Text is produced by decoding all generated ids (tokenizers merge bytes and spaces across tokens, so
per-token decoding would be wrong). A suffix that could still become a stop string, or an incomplete UTF-8
sequence, is held back until it is decided; the stop string itself is never returned.
"""

from __future__ import annotations

from server.contract.engine import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.text = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (new text, stopped). After ``stopped`` no more tokens should be added."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                cut = min(i for i, _ in hits)
                delta = self.text[self.emitted : cut]
                self.emitted = max(self.emitted, cut)
                return delta, True
        safe = len(self.text)
        if self.text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe -= 1
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        delta = self.text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return delta, False

    def flush(self) -> str:
        """Text held back so far (the request ended without a stop string)."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
