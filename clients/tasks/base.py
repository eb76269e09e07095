"""Shared pieces of the evaluation tasks: samples, seeding, token counting, prompt assembly, length fitting.

A task builds a `Sample` from `(length, seed, index)` and a `TokenCounter`. Everything random is drawn from
`random.Random` instances seeded with `stable_seed(...)` (SHA-256 of the parts, never Python's salted
`hash()`), so a sample is identical across processes and machines for the same tokenizer.

Length fitting: each generator exposes "the prompt with n filler units" as a function `build(n)` whose token
count grows with n. `fit_length` searches n so that the templated prompt has between `ceil(0.95 L)` and `L`
tokens. Counting is the expensive step (an HTTP round trip to the server), so the search first guesses n
from a characters-per-token ratio (building text is cheap), refines that ratio with every count, falls back
to bisection whenever a guess does not halve the bracket, and caches every count: in practice 2-4 counts,
at worst about 2*log2(n_max) + 2.
"""

from __future__ import annotations

import hashlib
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .scoring import ScoreResult

DEFAULT_MAX_NEW_TOKENS = 1024
LOW_FRACTION = 0.95


# ----------------------------------------------------------------------------------------------- seeding
def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' string forms; identical in every process (unlike `hash()`)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def make_rng(*parts: object) -> random.Random:
    return random.Random(stable_seed(*parts))


# ------------------------------------------------------------------------------------------ token counting
@runtime_checkable
class TokenCounter(Protocol):
    """Counts the tokens of a prompt as the served model sees it: the text sent as ONE user turn, after the
    model's chat template with the generation prompt appended (add_generation_prompt=True).

    The HTTP client implements this with `POST /tokenize` and body
    `{"model": ..., "messages": [{"role": "user", "content": prompt}], "add_generation_prompt": true}`,
    returning the response's `count`. `LocalTokenCounter` does the same with a local tokenizer.
    """

    def count(self, prompt: str) -> int: ...


class LocalTokenCounter:
    """`TokenCounter` over a Hugging Face tokenizer that has a chat template."""

    def __init__(self, tokenizer: Any, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    @classmethod
    def from_pretrained(cls, path: str, gguf_file: str | None = None, **kwargs: Any) -> LocalTokenCounter:
        from transformers import AutoTokenizer

        kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        return cls(AutoTokenizer.from_pretrained(path, **kw), **kwargs)

    def messages(self, prompt: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": prompt}]

    def render(self, prompt: str) -> str:
        """The full templated text (what a completions request would send)."""
        return self.tokenizer.apply_chat_template(self.messages(prompt), add_generation_prompt=True, tokenize=False)

    def count(self, prompt: str) -> int:
        # The template already writes any BOS text, so no special tokens are added a second time.
        return len(self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------- sample
@dataclass
class Sample:
    """One prompt of one task. `gold` is task-specific and JSON-friendly (sets are stored as sorted lists):

    ruler_niah: list of values, in question order (keys in metadata["keys"]);
    ruler_vt: variable names resolving to the queried value; ruler_cwe: the common words;
    qa_squad: gold answer texts; qa_quality / qa_toefl: option letters (sorted);
    story_retrieval: one answer per question, in question order; story_multihop: [item];
    story_filtering: chapter numbers (sorted ints).
    """

    task: str
    length: int
    seed: int
    index: int
    prompt: str
    gold: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sample:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---------------------------------------------------------------------------------------------- prompts
ANSWER_INSTRUCTION = (
    "Reason briefly, then give your final answer inside <answer>...</answer> in exactly this format:\n{fmt}"
)


def assemble_prompt(intro: str, question: str, context: str, answer_format: str) -> str:
    """Task introduction; question(s) before the context; the context; question(s) again; answer instruction."""
    return "\n\n".join([intro, question, context, question, ANSWER_INSTRUCTION.format(fmt=answer_format)])


# ------------------------------------------------------------------------------------------ length fitting
class LengthFitError(ValueError):
    """The prompt cannot be brought within [0.95 L, L] tokens."""


@dataclass
class FitResult:
    n: int  # filler units chosen
    text: str  # the prompt
    tokens: int  # its templated token count
    calls: int  # TokenCounter.count calls made
    in_window: bool


def fit_length(
    counter: TokenCounter,
    target: int,
    build: Callable[[int], str],
    n_max: int,
    *,
    n_min: int = 0,
    known: Mapping[int, int] | None = None,
    low_fraction: float = LOW_FRACTION,
    chars_per_token: float = 4.0,
) -> FitResult:
    """Largest-enough n in [n_min, n_max] with tokens(build(n)) in [ceil(low_fraction*target), target].

    Stops at the first n inside the window; otherwise returns the largest n known to fit (in_window False).
    Raises LengthFitError when even `build(n_min)` is longer than `target`. `known` seeds counts (n -> tokens).
    """
    low = math.ceil(low_fraction * target)
    goal = (low + target) / 2
    texts: dict[int, str] = {}
    counts: dict[int, int] = dict(known or {})
    calls = 0

    def text(n: int) -> str:
        if n not in texts:
            texts[n] = build(n)
        return texts[n]

    def tokens(n: int) -> int:
        nonlocal calls
        if n not in counts:
            counts[n] = counter.count(text(n))
            calls += 1
        return counts[n]

    def by_chars(goal_chars: float, a: int, b: int) -> int:
        """Smallest n in [a, b] whose text has at least goal_chars characters (b if none)."""
        while a < b:
            m = (a + b) // 2
            if len(text(m)) >= goal_chars:
                b = m
            else:
                a = m + 1
        return a

    lo, hi = n_min - 1, n_max + 1  # lo: largest n known to fit; hi: smallest n known not to fit
    for n, t in counts.items():
        if t <= target:
            lo = max(lo, n)
        else:
            hi = min(hi, n)
    if lo >= n_min and counts[lo] >= low:
        return FitResult(lo, text(lo), counts[lo], 0, True)
    ratio = chars_per_token
    n = by_chars(goal * ratio, lo + 1, hi - 1) if hi - lo > 1 else lo
    prev_width = hi - lo
    bisect_next = False
    while hi - lo > 1:
        t = tokens(n)
        if t <= target:
            lo = n
            if t >= low:
                break
        else:
            hi = n
        width = hi - lo
        if width <= 1:
            break
        if bisect_next:
            n = (lo + hi) // 2
        else:
            ratio = len(text(n)) / max(t, 1)
            n = min(max(by_chars(goal * ratio, lo + 1, hi - 1), lo + 1), hi - 1)
        bisect_next = width * 2 > prev_width  # this step did not halve the bracket
        prev_width = width
    if lo < n_min:
        raise LengthFitError(
            f"the prompt without filler already has {tokens(n_min)} tokens, more than the target {target}"
        )
    t = tokens(lo)
    return FitResult(lo, text(lo), t, calls, t >= low)


def fit_length_2d(
    counter: TokenCounter,
    target: int,
    build: Callable[[int, int], str],
    c_max: int,
    d_max: int,
    *,
    c_min: int = 0,
    low_fraction: float = LOW_FRACTION,
) -> tuple[int, int, FitResult]:
    """Two-level fit: coarse units c (e.g. chapters) with d=0, then fine units d (e.g. sentences) at that c.

    Used where one coarse unit is longer than the 5% window. Returns (c, d, result).
    """
    r1 = fit_length(counter, target, lambda c: build(c, 0), c_max, n_min=c_min, low_fraction=low_fraction)
    if r1.in_window or d_max <= 0:
        return r1.n, 0, r1
    c = r1.n
    r2 = fit_length(
        counter, target, lambda d: build(c, d), d_max, known={0: r1.tokens}, low_fraction=low_fraction
    )
    r2.calls += r1.calls
    return c, r2.n, r2


def require_window(result: FitResult, task: str, target: int, why: str = "") -> None:
    if not result.in_window:
        raise LengthFitError(
            f"{task}: could not reach [{math.ceil(LOW_FRACTION * target)}, {target}] tokens "
            f"(best {result.tokens} tokens with {result.n} filler units){': ' + why if why else ''}"
        )


# --------------------------------------------------------------------------------------------------- task
class Task(ABC):
    """An evaluation task: builds reproducible samples at a target length and scores completions."""

    name: ClassVar[str]
    kind: ClassVar[str] = "synthetic"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @abstractmethod
    def build(self, length: int, seed: int, index: int, counter: TokenCounter) -> Sample:
        """The sample `(self.name, length, seed, index)`, its prompt within [0.95 length, length] tokens."""

    def score(self, sample: Sample, completion: str, mode: str = "strict") -> ScoreResult:
        from .scoring import score

        return score(self.name, sample, completion, mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
