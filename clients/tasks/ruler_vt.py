"""ruler_vt: variable tracking. 8 chains of 4 hops, e.g. `VAR QWERT = 12345.`, `VAR ASDFG = VAR QWERT.`, ...
(5 variables per chain), hidden among prose filler sentences. Statements of all chains are interleaved at
random positions; each chain keeps its own order (as in RULER). Variable names are 5 capital letters, values
distinct 5-digit numbers. The question names chain 0's value; the answer is chain 0's variables.

Answer format: `<answer>NAME1, NAME2, ...</answer>`.
"""

from __future__ import annotations

import string

from .base import Sample, Task, TokenCounter, assemble_prompt, fit_length, make_rng, require_window
from .filler import prose_sentences


class RulerVt(Task):
    name = "ruler_vt"
    kind = "synthetic"

    def __init__(self, num_chains: int = 8, num_hops: int = 4):
        self.num_chains = num_chains
        self.num_hops = num_hops

    def build(self, length: int, seed: int, index: int, counter: TokenCounter) -> Sample:
        rng = make_rng(self.name, length, seed, index)
        per_chain = self.num_hops + 1
        names: list[str] = []
        while len(names) < self.num_chains * per_chain:
            v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if v not in names and v not in {"VALUE", "ABOVE", "BELOW"}:
                names.append(v)
        values = rng.sample(range(10000, 100000), self.num_chains)
        statements: list[tuple[float, str]] = []
        for c in range(self.num_chains):
            chain = names[c * per_chain : (c + 1) * per_chain]
            positions = sorted(rng.random() for _ in chain)
            statements.append((positions[0], f"VAR {chain[0]} = {values[c]}."))
            for h in range(1, per_chain):
                statements.append((positions[h], f"VAR {chain[h]} = VAR {chain[h - 1]}."))
        n_max = length // 8 + 10
        prose = prose_sentences(rng, n_max)
        gold = sorted(names[:per_chain])

        intro = (
            "Memorize and track the chains of variable assignments hidden in the following text. "
            "A statement VAR B = VAR A gives B the value of A."
        )
        question = f"Question: Find all variables that are assigned the value {values[0]} in the text."
        fmt = "<answer>NAME1, NAME2, ...</answer>\nlisting the names of all such variables, separated by commas."

        def build(n: int) -> str:
            entries = [(j + 1.0, prose[j]) for j in range(n)] + [(u * (n + 1), s) for u, s in statements]
            entries.sort(key=lambda e: e[0])
            context = "Text:\n" + " ".join(s for _, s in entries)
            return assemble_prompt(intro, question, context, fmt)

        res = fit_length(counter, length, build, n_max)
        require_window(res, self.name, length)
        return Sample(
            task=self.name, length=length, seed=seed, index=index, prompt=res.text, gold=gold,
            metadata={"value": values[0], "filler_sentences": res.n, "count_calls": res.calls},
            prompt_tokens=res.tokens,
        )
