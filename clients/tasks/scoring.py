"""Scoring of completions, and aggregation of scores per task.

Only the text inside the LAST `<answer>...</answer>` block of the completion is read (tags are matched
case-insensitively; a final `<answer>` that was never closed, e.g. cut by the token budget, runs to the end
of the text). A missing or empty block scores 0 with `parsable=False`; it is never excluded from the mean.

Metrics: ruler_niah fraction of queried keys given their exact value; ruler_niah_single the exact value;
ruler_vt, ruler_cwe, story_filtering IoU of sets; qa_squad SQuAD token F1 (standard normalisation) max over
gold answers; qa_quality, qa_toefl exact match of the set of option letters; story_retrieval fraction of
questions answered exactly (after SQuAD normalisation); story_multihop exact match (after SQuAD
normalisation).

Lenient scoring (`score(..., mode="lenient")`, `sparse-eval run --scoring lenient`) reads what a model wrote
when it ignores the format, as small models do: the text scored is the last `<answer>` block when there is
one, else the whole completion, and each task looks for its answer anywhere in that free text:

- ruler_niah / ruler_niah_single: the share of each queried value's eight-letter groups that appear as words in
  the text (no pairing with the keys needed), averaged over the values;
- ruler_vt: IoU of the five-capital-letter names found; ruler_cwe: fraction of the gold words that occur as
  words (a list of every word would score 1, so read it beside the strict score);
- qa_squad: 1 if a gold answer occurs (after SQuAD normalisation) in the text, else the best token F1;
- qa_quality / qa_toefl: the letter after "answer"/"option"/"choice" ("The answer is (B)"), else a lone
  option letter opening the text or a line ("B.", "(B)"); exact match of the set as in strict scoring;
- story_retrieval: fraction of gold names occurring (normalised) in the text; story_multihop: 1 if the gold
  item occurs; story_filtering: IoU of the numbers found.

A lenient answer is parsable when the text holds a candidate of the task's shape (an eight-letter group
other than the asked keys', a name, a word, an option letter, a number, any text for the QA/story free
answers); an empty completion never is. Every record keeps both scores (`score_strict`, `score_lenient`)
and both parsable flags.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .base import Sample, Task

_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE = re.compile(r"</answer>", re.IGNORECASE)


@dataclass(frozen=True)
class ScoreResult:
    score: float
    parsable: bool
    prediction: str  # the (stripped) text of the last answer block; "" when missing


def extract_answer(completion: str) -> str | None:
    """Text of the last <answer> block, stripped; None when there is none or it is empty."""
    opens = list(_OPEN.finditer(completion or ""))
    if not opens:
        return None
    start = opens[-1].end()
    close = _CLOSE.search(completion, start)
    body = completion[start : close.start() if close else len(completion)].strip()
    return body or None


# ---------------------------------------------------------------------------------------- normalisation
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def iou(pred: Iterable[Any], gold: Iterable[Any]) -> float:
    p, g = set(pred), set(gold)
    union = p | g
    return len(p & g) / len(union) if union else 1.0


# ------------------------------------------------------------------------------------------- per task
_KEY = r"[a-z]{8}(?:-[a-z]{8})+"
_KEY_RE = re.compile(_KEY)
_NIAH_PAIR = re.compile(rf"answer for\s+(?:key\s+)?({_KEY})\s+is:?\s*({_KEY})", re.IGNORECASE)
_VAR_RE = re.compile(r"\b[A-Z]{5}\b")
_NUMBERED = re.compile(r"^\s*(\d+)\s*[.):\-]\s*(.*?)\s*$")
_LETTER_TOKEN = re.compile(r"^[(\[]?([A-Z])[)\]]?[.):]?$")


def niah_predictions(answer: str, keys: list[str]) -> dict[str, str]:
    """key -> predicted value. "The answer for K is V." pairs first; else the first key-shaped string after
    K on a line that mentions K."""
    pred: dict[str, str] = {}
    for k, v in _NIAH_PAIR.findall(answer):
        pred.setdefault(k, v)
    for line in answer.splitlines():
        for k in keys:
            if k in pred or k not in line:
                continue
            after = [m for m in _KEY_RE.findall(line[line.index(k) + len(k) :]) if m != k]
            if after:
                pred[k] = after[0]
    return pred


def _score_niah(answer: str, sample: Sample) -> float:
    keys, values = sample.metadata["keys"], sample.gold
    pred = niah_predictions(answer, keys)
    return sum(pred.get(k) == v for k, v in zip(keys, values, strict=True)) / len(keys)


def _score_niah_single(answer: str, sample: Sample) -> float:
    return float(sample.gold[0] in _KEY_RE.findall(answer.lower()))


def _score_vt(answer: str, sample: Sample) -> float:
    return iou(_VAR_RE.findall(answer), sample.gold)


def parse_word_list(answer: str) -> list[str]:
    """Items separated by commas, semicolons or newlines; numbering dropped; each item's first word, lowercase."""
    words = []
    for item in re.split(r"[,;\n]+", answer):
        item = _NUMBERED.sub(r"\2", item) if _NUMBERED.match(item) else item
        found = re.findall(r"[a-z]+", item.lower())
        if found:
            words.append(found[0])
    return words


def _score_cwe(answer: str, sample: Sample) -> float:
    return iou(parse_word_list(answer), sample.gold)


def _score_squad(answer: str, sample: Sample) -> float:
    return max(token_f1(answer, g) for g in sample.gold)


def parse_letters(answer: str, allowed: Iterable[str] = "ABCD") -> list[str]:
    """Option letters: the run of letter tokens at the start ("B", "A, C", "(B) text", "A and C"); if none,
    every standalone capital letter among the allowed options."""
    tokens = [t for t in re.split(r"[\s,;/&+]+|\band\b", answer.strip()) if t]
    letters = []
    for t in tokens:
        m = _LETTER_TOKEN.match(t)
        if not m:
            break
        letters.append(m.group(1))
    if not letters:
        allowed_set = set(allowed)
        letters = [c for c in re.findall(r"\b([A-Z])\b", answer) if c in allowed_set]
    return sorted(set(letters))


def _score_choice(answer: str, sample: Sample) -> float:
    allowed = sample.metadata.get("option_letters") or "ABCD"
    return float(parse_letters(answer, allowed) == sorted(set(sample.gold)))


def parse_numbered(answer: str) -> dict[int, str]:
    """Numbered lines "i. text" -> {i: text}; without any numbering, non-empty lines in order from 1."""
    out: dict[int, str] = {}
    lines = [ln for ln in answer.splitlines() if ln.strip()]
    for ln in lines:
        m = _NUMBERED.match(ln)
        if m:
            out.setdefault(int(m.group(1)), m.group(2))
    if not out:
        out = {i + 1: ln.strip() for i, ln in enumerate(lines)}
    return out


def _score_retrieval(answer: str, sample: Sample) -> float:
    pred = parse_numbered(answer)
    gold = sample.gold
    return sum(normalize_answer(pred.get(i + 1, "")) == normalize_answer(g) for i, g in enumerate(gold)) / len(gold)


def _score_multihop(answer: str, sample: Sample) -> float:
    return float(normalize_answer(answer) == normalize_answer(sample.gold[0]))


def _score_filtering(answer: str, sample: Sample) -> float:
    return iou((int(x) for x in re.findall(r"\d+", answer)), sample.gold)


SCORERS: dict[str, Callable[[str, Sample], float]] = {
    "ruler_niah": _score_niah,
    "ruler_niah_single": _score_niah_single,
    "ruler_vt": _score_vt,
    "ruler_cwe": _score_cwe,
    "qa_squad": _score_squad,
    "qa_quality": _score_choice,
    "qa_toefl": _score_choice,
    "story_retrieval": _score_retrieval,
    "story_multihop": _score_multihop,
    "story_filtering": _score_filtering,
}


SCORING_MODES = ("strict", "lenient")


def score(task: str | Task, sample: Sample, completion: str, mode: str = "strict") -> ScoreResult:
    """Score one completion of `sample` (task given by name or Task object), strictly (the `<answer>` format)
    or leniently (the answer found in free text; see the module docstring)."""
    name = task if isinstance(task, str) else task.name
    if mode not in SCORING_MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; known: {', '.join(SCORING_MODES)}")
    try:
        scorer = SCORERS[name] if mode == "strict" else LENIENT_SCORERS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(SCORERS)}") from None
    if mode == "lenient":
        text = (extract_answer(completion) or completion or "").strip()
        value, found = scorer(text, sample)
        return ScoreResult(float(value), bool(text) and found, text)
    answer = extract_answer(completion)
    if answer is None:
        return ScoreResult(0.0, False, "")
    return ScoreResult(float(scorer(answer, sample)), True, answer)


# ---------------------------------------------------------------------------------------------- lenient
# Each returns (score, whether the text held a candidate answer of the task's shape).
_CHOICE_CUE = re.compile(r"\b(?:answer|option|choice)\b[^A-Za-z(]{0,12}(?:is\s*)?[(\[]?([A-Z])\b[)\]]?")
_LONE_LETTER = re.compile(r"(?:^|\n)\s*[(\[]?([A-Z])[)\].:]?(?=\s|$)")


def _contains(text: str, gold: str) -> bool:
    g = normalize_answer(gold)
    return bool(g) and f" {g} " in f" {normalize_answer(text)} "


def _lenient_niah(text: str, sample: Sample) -> tuple[float, bool]:
    # Credit per eight-letter group of each value: a small model often copies a value with one group garbled.
    # A random group matching by chance has odds 26^-8, so partial credit is still retrieval.
    groups = set(re.findall(r"(?<![a-z])[a-z]{8}(?![a-z])", text.lower()))
    key_groups = {g for k in sample.metadata["keys"] for g in k.split("-")}
    per_value = [sum(g in groups for g in v.split("-")) / len(v.split("-")) for v in sample.gold]
    return sum(per_value) / len(per_value), bool(groups - key_groups)


def _lenient_vt(text: str, sample: Sample) -> tuple[float, bool]:
    names = _VAR_RE.findall(text)
    return iou(names, sample.gold), bool(names)


def _lenient_cwe(text: str, sample: Sample) -> tuple[float, bool]:
    words = set(re.findall(r"[a-z]+", text.lower()))
    return sum(g in words for g in sample.gold) / len(sample.gold), bool(words)


def _lenient_squad(text: str, sample: Sample) -> tuple[float, bool]:
    if any(_contains(text, g) for g in sample.gold):
        return 1.0, True
    return _score_squad(text, sample), bool(normalize_answer(text))


def _lenient_choice(text: str, sample: Sample) -> tuple[float, bool]:
    allowed = set(sample.metadata.get("option_letters") or "ABCD")
    letters = [c for c in _CHOICE_CUE.findall(text) if c in allowed]
    letters = letters or [c for c in _LONE_LETTER.findall(text) if c in allowed]
    return float(sorted(set(letters)) == sorted(set(sample.gold))), bool(letters)


def _lenient_retrieval(text: str, sample: Sample) -> tuple[float, bool]:
    return sum(_contains(text, g) for g in sample.gold) / len(sample.gold), bool(normalize_answer(text))


def _lenient_multihop(text: str, sample: Sample) -> tuple[float, bool]:
    return float(_contains(text, sample.gold[0])), bool(normalize_answer(text))


def _lenient_filtering(text: str, sample: Sample) -> tuple[float, bool]:
    numbers = [int(x) for x in re.findall(r"\d+", text)]
    return iou(numbers, sample.gold), bool(numbers)


LENIENT_SCORERS: dict[str, Callable[[str, Sample], tuple[float, bool]]] = {
    "ruler_niah": _lenient_niah,
    "ruler_niah_single": _lenient_niah,
    "ruler_vt": _lenient_vt,
    "ruler_cwe": _lenient_cwe,
    "qa_squad": _lenient_squad,
    "qa_quality": _lenient_choice,
    "qa_toefl": _lenient_choice,
    "story_retrieval": _lenient_retrieval,
    "story_multihop": _lenient_multihop,
    "story_filtering": _lenient_filtering,
}


# ------------------------------------------------------------------------------------------ aggregation
@dataclass(frozen=True)
class Aggregate:
    mean: float
    stderr: float  # sample standard deviation / sqrt(n); 0 for n < 2
    n: int
    unparsable: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "stderr": self.stderr, "n": self.n, "unparsable": self.unparsable}


def wilson_interval(mean: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% at z = 1.96) for a success rate `mean` over `n` trials. Scores in [0, 1]
    that are not 0/1 (IoU, F1, fractions of keys) are treated as mean * n successes: an approximation, but
    unlike mean +- 1.96 stderr it stays in [0, 1] and is not zero-width when every sample scored the same."""
    if n <= 0 or math.isnan(mean):
        return float("nan"), float("nan")
    p = min(max(mean, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def aggregate(results: Iterable[ScoreResult | float]) -> Aggregate:
    """Mean, standard error, count and unparsable count; plain floats count as parsable."""
    scores, unparsable = [], 0
    for r in results:
        if isinstance(r, ScoreResult):
            scores.append(r.score)
            unparsable += not r.parsable
        else:
            scores.append(float(r))
    n = len(scores)
    if n == 0:
        return Aggregate(float("nan"), float("nan"), 0, 0)
    mean = sum(scores) / n
    if n < 2:
        return Aggregate(mean, 0.0, n, unparsable)
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return Aggregate(mean, math.sqrt(var / n), n, unparsable)
