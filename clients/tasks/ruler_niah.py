"""ruler_niah: four queried keys hidden among distractor key-value sentences.

Every line of the context reads "The value for key K is: V." with K and V random strings of four groups of
eight lowercase letters ("abcdefgh-ijklmnop-qrstuvwx-yzabcdef"). One such sentence is about 55 tokens, more
than 5% of a 1K-token prompt, so when the distractor count alone cannot land in the length window a few
plain prose sentences (filler.py) are added among the lines to close the gap.

Answer format: one line per queried key, in the order asked: "1. The answer for K is V."

ruler_niah_single is RULER's single needle: ONE key-value sentence hidden in plain prose (no distractor keys),
key and value two groups of eight letters each, one question. It exists for models too small for the four
needles among distractors above (SmolLM2-135M retrieves part of a single needle at 1-2K tokens and none of
the four-needle task); it is not part of `--tasks all`. Answer format: `<answer>VALUE</answer>`.
"""

from __future__ import annotations

import random
import string

from .base import (
    Sample,
    Task,
    TokenCounter,
    assemble_prompt,
    fit_length,
    fit_length_2d,
    make_rng,
    require_window,
)
from .filler import prose_sentences

_FINE_MAX = 12  # prose sentences available to the fine stage


def random_key(rng: random.Random, groups: int = 4) -> str:
    return "-".join("".join(rng.choice(string.ascii_lowercase) for _ in range(8)) for _ in range(groups))


def kv_sentence(key: str, value: str) -> str:
    return f"The value for key {key} is: {value}."


class RulerNiah(Task):
    name = "ruler_niah"
    kind = "synthetic"

    def __init__(self, num_queries: int = 4):
        self.num_queries = num_queries

    def build(self, length: int, seed: int, index: int, counter: TokenCounter) -> Sample:
        rng = make_rng(self.name, length, seed, index)
        q = self.num_queries
        n_max = length // 30 + 8
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < q + n_max:
            k = random_key(rng)
            if k not in seen:
                seen.add(k)
                keys.append(k)
        values = [random_key(rng) for _ in keys]
        needle_pos = [rng.random() for _ in range(q)]
        prose = prose_sentences(rng, _FINE_MAX)
        prose_pos = [rng.random() for _ in range(_FINE_MAX)]
        asked = list(range(q))
        rng.shuffle(asked)  # question order differs from the order in the text
        qkeys = [keys[i] for i in asked]
        gold = [values[i] for i in asked]

        question = "Question: What are the values for the following keys?\n" + "\n".join(
            f"{i + 1}. {k}" for i, k in enumerate(qkeys)
        )
        intro = (
            "Below is a text in which each line states the value for one key. "
            "Find the values of the keys asked in the question; each key appears exactly once."
        )
        fmt = "<answer>\n" + "\n".join(f"{i + 1}. The answer for {k} is <value>." for i, k in enumerate(qkeys))
        fmt += "\n</answer>\nwhere each <value> is the value given for that key in the text."

        def build(c: int, d: int) -> str:
            entries = [(j + 1.0, kv_sentence(keys[q + j], values[q + j])) for j in range(c)]
            entries += [(u * (c + 1), kv_sentence(keys[i], values[i])) for i, u in enumerate(needle_pos)]
            entries += [(prose_pos[j] * (c + 1), prose[j]) for j in range(d)]
            entries.sort(key=lambda e: e[0])
            context = "Text:\n" + "\n".join(line for _, line in entries)
            return assemble_prompt(intro, question, context, fmt)

        c, d, res = fit_length_2d(counter, length, build, n_max, _FINE_MAX)
        require_window(res, self.name, length)
        return Sample(
            task=self.name, length=length, seed=seed, index=index, prompt=res.text, gold=gold,
            metadata={"keys": qkeys, "distractors": c, "prose_sentences": d, "count_calls": res.calls},
            prompt_tokens=res.tokens,
        )


class RulerNiahSingle(Task):
    name = "ruler_niah_single"
    kind = "synthetic"

    def build(self, length: int, seed: int, index: int, counter: TokenCounter) -> Sample:
        rng = make_rng(self.name, length, seed, index)
        key, value = random_key(rng, 2), random_key(rng, 2)
        n_max = length // 8 + 8  # a prose sentence is well over 8 tokens
        prose = prose_sentences(rng, n_max)
        depth = rng.random()  # where the needle sits, as a fraction of the haystack
        question = f"Question: What is the value for key {key}?"
        intro = "Below is a text. Somewhere in it, one sentence states the value for a key."
        fmt = "<answer>VALUE</answer>\nwhere VALUE is the value given for that key in the text."

        def build(n: int) -> str:
            at = round(depth * n)
            lines = prose[:at] + [kv_sentence(key, value)] + prose[at:n]
            return assemble_prompt(intro, question, "Text:\n" + " ".join(lines), fmt)

        res = fit_length(counter, length, build, n_max)
        require_window(res, self.name, length)
        return Sample(
            task=self.name, length=length, seed=seed, index=index, prompt=res.text, gold=[value],
            metadata={"keys": [key], "depth": depth, "prose_sentences": res.n, "count_calls": res.calls},
            prompt_tokens=res.tokens,
        )
