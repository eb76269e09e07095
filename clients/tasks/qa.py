"""qa_squad, qa_quality, qa_toefl: one question about one of many documents.

Data comes from local files only (never downloaded), found by `path=` or in a directory `qa_data_dir`
(argument, else the environment variable SPARSE_SERVE_QA_DATA_DIR) under the default file names
`dev-v2.0.json`, `quality.jsonl`, `toefl.jsonl`. A missing file raises FileNotFoundError naming its path.

File formats
------------
SQuAD v2 (`dev-v2.0.json`, the public format): ``{"version": "v2.0", "data": [{"title": str, "paragraphs":
[{"context": str, "qas": [{"id": str, "question": str, "answers": [{"text": str, "answer_start": int}],
"is_impossible": bool}]}]}]}``. Each paragraph is a document; only answerable questions are kept (not
`is_impossible`, at least one answer); gold answers are the distinct answer texts.

QuALITY and TOEFL-QA (`quality.jsonl`, `toefl.jsonl`): one JSON object per line, one document each:
  - `context` (str): the document (article / lecture transcript);
  - `questions` (list): each either an object ``{"question": str, "options": [str, ...]}`` (options are
    lettered A, B, C, ... in order; `choices` is accepted for `options`) or a string that already contains
    its lettered options;
  - `answer` (list, parallel to `questions`): the correct option letter(s) of each question, as "B", "A,C"
    or ["A", "C"];
  - `id` (str, optional).
Identical contexts on several lines are one document.

Sample construction
-------------------
The question of `(task, seed, index)` is the index-th of a seeded permutation of the eligible questions,
independent of the length, so every length asks the same questions. Eligible: the question's own document,
alone, fits in `max_doc_tokens` (default 8192) tokens. The context is the gold document and distractor
documents (all other documents, in seeded random order), the last one cut at a word boundary to fit the
length, shuffled, each labelled "Document i:". The filler unit is one distractor word.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .base import LengthFitError, Sample, Task, TokenCounter, assemble_prompt, fit_length, make_rng, require_window

QA_DATA_DIR_ENV = "SPARSE_SERVE_QA_DATA_DIR"
DEFAULT_FILES = {"qa_squad": "dev-v2.0.json", "qa_quality": "quality.jsonl", "qa_toefl": "toefl.jsonl"}
LETTERS = "ABCDEFGHIJ"
_OPTION_PREFIX = re.compile(r"^\s*\(?[A-J][.)]\s*")  # an option already lettered "A." or "(A)"


@dataclass(frozen=True)
class QAQuestion:
    doc: int  # index into QADataset.documents
    question: str  # rendered question, options included for multiple choice
    answers: tuple[str, ...]  # SQuAD: gold texts; multiple choice: sorted option letters
    qid: str
    option_letters: str = ""  # "" for open questions


@dataclass
class QADataset:
    name: str
    path: str
    documents: list[str] = field(default_factory=list)
    questions: list[QAQuestion] = field(default_factory=list)


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"QA data file not found: {p} (QA data is never downloaded; place the file there, "
                                f"or point --qa-data / qa_data_dir / ${QA_DATA_DIR_ENV} at its directory)")
    return p


def load_squad_v2(path: str | os.PathLike[str]) -> QADataset:
    p = _check_file(path)
    raw = json.loads(p.read_text(encoding="utf-8"))
    ds = QADataset("qa_squad", str(p))
    for article in raw["data"]:
        for para in article["paragraphs"]:
            doc = len(ds.documents)
            ds.documents.append(para["context"])
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa.get("answers", []) if a["text"].strip()))
                if qa.get("is_impossible", False) or not answers:
                    continue
                ds.questions.append(QAQuestion(doc, qa["question"].strip(), answers, str(qa.get("id", ""))))
    return ds


def _letters(ans: object, where: str) -> tuple[str, ...]:
    if isinstance(ans, str):
        items = re.findall(r"[A-Za-z]", ans)
    elif isinstance(ans, list | tuple) and all(isinstance(a, str) for a in ans):
        items = [a.strip() for a in ans]
    else:
        raise ValueError(f"{where}: answer must be option letter(s) like 'B', 'A,C' or ['A','C'], got {ans!r}")
    letters = sorted({a.upper() for a in items})
    if not letters or any(len(a) != 1 or a not in LETTERS for a in letters):
        raise ValueError(f"{where}: bad option letters {ans!r}")
    return tuple(letters)


def _render_choice(q: object, where: str) -> tuple[str, str]:
    """(question text with lettered options, option letters)."""
    if isinstance(q, str):
        found = sorted(set(re.findall(r"^\s*\(?([A-J])[.)]", q, re.MULTILINE)))
        return q.strip(), "".join(found) or "ABCD"
    if isinstance(q, dict) and "question" in q:
        options = q.get("options", q.get("choices"))
        if not isinstance(options, list) or not options:
            raise ValueError(f"{where}: question object needs a non-empty 'options' list")
        letters = LETTERS[: len(options)]
        lines = [f"{L}. {_OPTION_PREFIX.sub('', str(o)).strip()}" for L, o in zip(letters, options, strict=True)]
        return q["question"].strip() + "\n" + "\n".join(lines), letters
    raise ValueError(f"{where}: a question is a string or an object with 'question' and 'options'")


def load_choice_jsonl(path: str | os.PathLike[str], name: str) -> QADataset:
    """QuALITY / TOEFL-QA style JSONL (see the module docstring)."""
    p = _check_file(path)
    ds = QADataset(name, str(p))
    doc_ids: dict[str, int] = {}
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        rec = json.loads(line)
        try:
            context, questions = rec["context"], rec["questions"]
            answers = rec["answer"] if "answer" in rec else rec["answers"]
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e}") from None
        if isinstance(questions, str | dict):
            questions, answers = [questions], [answers]
        if len(questions) != len(answers):
            raise ValueError(f"{where}: {len(questions)} questions but {len(answers)} answers")
        doc = doc_ids.setdefault(context, len(ds.documents))
        if doc == len(ds.documents):
            ds.documents.append(context)
        for j, (q, a) in enumerate(zip(questions, answers, strict=True)):
            text, letters = _render_choice(q, where)
            gold = _letters(a, where)
            if not set(gold) <= set(letters):
                raise ValueError(f"{where}: answer {a!r} is not among the options {letters}")
            ds.questions.append(QAQuestion(doc, text, gold, f"{rec.get('id', lineno)}-{j}", letters))
    return ds


LOADERS: dict[str, Callable[[str], QADataset]] = {
    "qa_squad": load_squad_v2,
    "qa_quality": lambda p: load_choice_jsonl(p, "qa_quality"),
    "qa_toefl": lambda p: load_choice_jsonl(p, "qa_toefl"),
}


def resolve_path(task: str, path: str | os.PathLike[str] | None = None,
                 data_dir: str | os.PathLike[str] | None = None) -> Path:
    if path is not None:
        return Path(path)
    data_dir = data_dir if data_dir is not None else os.environ.get(QA_DATA_DIR_ENV)
    if data_dir is None:
        raise FileNotFoundError(
            f"{task}: no data file given; pass its path or set qa_data_dir (or {QA_DATA_DIR_ENV}) to a directory "
            f"holding {DEFAULT_FILES[task]}"
        )
    return Path(data_dir) / DEFAULT_FILES[task]


_WORD_END = re.compile(r"\S+")


class QATask(Task):
    kind = "natural"

    def __init__(self, name: str, *, path: str | os.PathLike[str] | None = None,
                 data_dir: str | os.PathLike[str] | None = None, max_doc_tokens: int = 8192):
        if name not in LOADERS:
            raise KeyError(f"unknown QA task {name!r}")
        self.name = name  # type: ignore[misc]
        self._path, self._data_dir = path, data_dir
        self.max_doc_tokens = max_doc_tokens
        self._dataset: QADataset | None = None
        self._eligible: list[int] | None = None
        self._words: dict[int, int] = {}

    @property
    def path(self) -> Path:
        return resolve_path(self.name, self._path, self._data_dir)

    def dataset(self) -> QADataset:
        if self._dataset is None:
            self._dataset = LOADERS[self.name](str(self.path))
        return self._dataset

    def eligible(self, counter: TokenCounter) -> list[int]:
        """Indices of questions whose own document fits in max_doc_tokens (counted once per task object;
        documents whose UTF-8 size is already below the limit are not counted)."""
        if self._eligible is None:
            ds = self.dataset()
            fits: dict[int, bool] = {}
            for d in sorted({q.doc for q in ds.questions}):
                text = ds.documents[d]
                fits[d] = (len(text.encode("utf-8")) + 64 <= self.max_doc_tokens
                           or counter.count(text) <= self.max_doc_tokens)
            self._eligible = [i for i, q in enumerate(ds.questions) if fits[q.doc]]
        return self._eligible

    def num_available(self, counter: TokenCounter) -> int:
        return len(self.eligible(counter))

    def question_for(self, seed: int, index: int, counter: TokenCounter) -> QAQuestion:
        eligible = list(self.eligible(counter))
        if not 0 <= index < len(eligible):
            raise IndexError(f"{self.name}: sample index {index} out of range, {len(eligible)} eligible questions "
                             f"in {self.dataset().path}")
        make_rng(self.name, "questions", seed).shuffle(eligible)
        return self.dataset().questions[eligible[index]]

    def _word_count(self, d: int) -> int:
        if d not in self._words:
            self._words[d] = len(self.dataset().documents[d].split())
        return self._words[d]

    def build(self, length: int, seed: int, index: int, counter: TokenCounter) -> Sample:
        ds = self.dataset()
        q = self.question_for(seed, index, counter)
        rng = make_rng(self.name, length, seed, index)
        others = [d for d in range(len(ds.documents)) if d != q.doc]
        rng.shuffle(others)
        gold_at = rng.random()
        # distractor documents and cumulative word counts, up to `length` words (every word is >= 1 token)
        cum = [0]
        for d in others:
            if cum[-1] >= length:
                break
            cum.append(cum[-1] + self._word_count(d))
        n_max = min(cum[-1], length)

        def cut(text: str, words: int) -> str:
            for i, m in enumerate(_WORD_END.finditer(text)):
                if i == words - 1:
                    return text[: m.end()]
            return text

        if q.option_letters:
            question = "Question: " + q.question
            fmt = ("<answer>X</answer>\nwhere X is the letter of the correct option. If the question asks for "
                   "more than one option, give all their letters separated by commas, e.g. <answer>A, C</answer>.")
            intro = ("Below are several documents, followed by a multiple-choice question about one of them. "
                     "Read the documents and choose the correct option.")
        else:
            question = "Question: " + q.question
            fmt = "<answer>short answer</answer>\nwhere the short answer is a phrase taken from the document."
            intro = ("Below are several documents, followed by a question about one of them. "
                     "Answer it with a short phrase from the relevant document.")

        def build(n: int) -> str:
            docs: list[str] = []
            for i, d in enumerate(others[: len(cum) - 1]):
                if cum[i] >= n:
                    break
                text = ds.documents[d]
                docs.append(text if cum[i + 1] <= n else cut(text, n - cum[i]))
            pos = int(gold_at * (len(docs) + 1))
            docs.insert(pos, ds.documents[q.doc])
            context = "\n\n".join(f"Document {i + 1}:\n{t.strip()}" for i, t in enumerate(docs))
            return assemble_prompt(intro, question, context, fmt)

        try:
            res = fit_length(counter, length, build, n_max)
        except LengthFitError as e:
            raise LengthFitError(f"{self.name}: question {q.qid}: its own document does not fit in {length} "
                                 f"tokens ({e}); use a longer length or a smaller max_doc_tokens") from None
        require_window(res, self.name, length, f"not enough distractor text in {ds.path}" if res.n == n_max else "")
        gold = list(q.answers)
        return Sample(
            task=self.name, length=length, seed=seed, index=index, prompt=res.text, gold=gold,
            metadata={"qid": q.qid, "option_letters": q.option_letters, "distractor_words": res.n,
                      "count_calls": res.calls},
            prompt_tokens=res.tokens,
        )
