"""Incremental detokenization (server/engine/detokenizer.py) on the embedded SmolLM2 tokenizer: the streamed
text is the text of the whole sequence, and each token costs a short decode, not one of everything so far."""

from __future__ import annotations

import random

import pytest

from server.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from server.engine.default_model import default_model_path
    from server.tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(default_model_path())


class CountingTokenizer:
    """Records the length of every decode call."""

    def __init__(self, inner):
        self.inner = inner
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


TEXTS = ["Hello world, this is a test of incremental detokenization.",
         "Zürich, Кириллица, 日本語のテキスト, emoji 🎉🚀 and    spaces\n\nnew lines.",
         " leading space and trailing space "]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_is_the_whole_decode_and_each_token_decodes_a_window(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False) * 20  # 20 repetitions: a long generation
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    streamed = "".join(detok.add(t)[0] for t in ids) + detok.flush()
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(counting.lengths) <= 16  # a window, not all the ids so far


def test_random_ids_stream_the_whole_decode_with_stop_strings(tokenizer):
    rng = random.Random(0)
    ids = [rng.randrange(49152) for _ in range(300)]  # SmolLM2's vocabulary
    full = tokenizer.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(t)[0] for t in ids) + detok.flush() == full
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a stop string met halfway
    detok = IncrementalDetokenizer(tokenizer, [stop])
    out, stopped = "", False
    for t in ids:
        delta, stopped = detok.add(t)
        out += delta
        if stopped:
            break
    assert stopped and out == full[: full.find(stop)]
