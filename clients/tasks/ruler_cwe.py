"""ruler_cwe: common words extraction. A numbered list of words in which 10 words appear 30 times each and
every other word 3 times; name the 10 common words. As in RULER, targets below 4096 tokens use 6 and 1
repeats instead (300 list entries alone are about 1.6K tokens). The number of rare words is the filler.

Words come from the `wonderwords` package's bundled noun, adjective and verb lists (read from the installed
package, never downloaded): lowercase alphabetic words of 3-12 letters, profanities removed.

Answer format: `<answer>word1, word2, ..., word10</answer>`.
"""

from __future__ import annotations

import functools
from importlib import resources

from .base import Sample, Task, TokenCounter, assemble_prompt, fit_length, make_rng, require_window


@functools.cache
def word_pool() -> tuple[str, ...]:
    """Sorted, de-duplicated words from wonderwords' bundled lists."""
    try:
        from wonderwords import Defaults
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("ruler_cwe needs the `wonderwords` package (pip install wonderwords)") from e
    assets = resources.files("wonderwords.assets")

    def read(d: Defaults) -> set[str]:
        return {w.strip() for w in assets.joinpath(d.value).read_text(encoding="utf-8").splitlines()}

    words = read(Defaults.NOUNS) | read(Defaults.ADJECTIVES) | read(Defaults.VERBS)
    bad = {w.lower() for w in read(Defaults.PROFANITIES)}
    return tuple(sorted(w for w in words if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 12
                        and w not in bad))


class RulerCwe(Task):
    name = "ruler_cwe"
    kind = "synthetic"

    def __init__(self, num_common: int = 10, freq_common: int = 30, freq_rare: int = 3,
                 short_below: int = 4096, short_freqs: tuple[int, int] = (6, 1)):
        self.num_common = num_common
        self.freq_common, self.freq_rare = freq_common, freq_rare
        self.short_below, self.short_freqs = short_below, short_freqs

    def frequencies(self, length: int) -> tuple[int, int]:
        return self.short_freqs if length < self.short_below else (self.freq_common, self.freq_rare)

    def build(self, length: int, seed: int, index: int, counter: TokenCounter) -> Sample:
        base = (self.name, length, seed, index)
        rng = make_rng(*base)
        pool = word_pool()
        fc, fr = self.frequencies(length)
        k = self.num_common
        n_max = min(len(pool) - k, length // (2 * fr) + 10)
        words = rng.sample(pool, k + n_max)
        common, rare = words[:k], words[k:]

        intro = (
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often."
        )
        question = f"Question: What are the {k} most common words in the list?"
        fmt = "<answer>" + ", ".join(f"word{i + 1}" for i in range(k)) + "</answer>\nnaming the " + \
            f"{k} most common words, separated by commas."

        def build(n: int) -> str:
            items = [w for w in common for _ in range(fc)] + [w for w in rare[:n] for _ in range(fr)]
            make_rng(*base, "order", n).shuffle(items)
            context = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
            return assemble_prompt(intro, question, context, fmt)

        res = fit_length(counter, length, build, n_max)
        require_window(res, self.name, length)
        return Sample(
            task=self.name, length=length, seed=seed, index=index, prompt=res.text, gold=sorted(common),
            metadata={"freq_common": fc, "freq_rare": fr, "rare_words": res.n, "count_calls": res.calls},
            prompt_tokens=res.tokens,
        )
