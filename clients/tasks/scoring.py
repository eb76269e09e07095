"""Scoring of completions, and aggregation of scores per task.

Only the text inside the LAST `<answer>...</answer>` block of the completion is read (tags are matched
case-insensitively; a final `<answer>` that was never closed, e.g. cut by the token budget, runs to the end
of the text). A missing or empty block scores 0 with `parsable=False`; it is never excluded from the mean.

Metrics: ruler_niah fraction of queried keys given their exact value; ruler_vt, ruler_cwe, story_filtering
IoU of sets; qa_squad SQuAD token F1 (standard normalisation) max over gold answers; qa_quality, qa_toefl
exact match of the set of option letters; story_retrieval fraction of questions answered exactly (after
SQuAD normalisation); story_multihop exact match (after SQuAD normalisation).
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
_KEY = r"[a-z]{8}(?:-[a-z]{8}){3}"
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
    "ruler_vt": _score_vt,
    "ruler_cwe": _score_cwe,
    "qa_squad": _score_squad,
    "qa_quality": _score_choice,
    "qa_toefl": _score_choice,
    "story_retrieval": _score_retrieval,
    "story_multihop": _score_multihop,
    "story_filtering": _score_filtering,
}


def score(task: str | Task, sample: Sample, completion: str) -> ScoreResult:
    """Score one completion of `sample` (task given by name or Task object)."""
    name = task if isinstance(task, str) else task.name
    try:
        scorer = SCORERS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(SCORERS)}") from None
    answer = extract_answer(completion)
    if answer is None:
        return ScoreResult(0.0, False, "")
    return ScoreResult(float(scorer(answer, sample)), True, answer)


# ------------------------------------------------------------------------------------------ aggregation
@dataclass(frozen=True)
class Aggregate:
    mean: float
    stderr: float  # sample standard deviation / sqrt(n); 0 for n < 2
    n: int
    unparsable: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "stderr": self.stderr, "n": self.n, "unparsable": self.unparsable}


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
