"""Scoring: answer extraction, per-task metrics, aggregation."""

import math

import pytest

from clients.tasks.base import Sample
from clients.tasks.scoring import (
    ScoreResult,
    aggregate,
    extract_answer,
    iou,
    normalize_answer,
    parse_letters,
    score,
    token_f1,
)

K1 = "aaaaaaaa-bbbbbbbb-cccccccc-dddddddd"
K2 = "eeeeeeee-ffffffff-gggggggg-hhhhhhhh"
V1 = "iiiiiiii-jjjjjjjj-kkkkkkkk-llllllll"
V2 = "mmmmmmmm-nnnnnnnn-oooooooo-pppppppp"


def sample(task, gold, **metadata):
    return Sample(task=task, length=1024, seed=0, index=0, prompt="", gold=gold, metadata=metadata)


# ------------------------------------------------------------------------------------------- extraction
def test_extract_last_block_only():
    text = "<answer>first</answer> thinking... <ANSWER> second </Answer> tail"
    assert extract_answer(text) == "second"


def test_extract_unclosed_final_block_runs_to_end():
    assert extract_answer("<answer>done</answer> more <answer>cut off") == "cut off"


@pytest.mark.parametrize("text", ["no tags here", "<answer>   </answer>", "<answer></answer>", "", "<answer>"])
def test_missing_or_empty_answer_is_unparsable_zero(text):
    r = score("qa_squad", sample("qa_squad", ["Paris"]), text)
    assert r == ScoreResult(0.0, False, "")


def test_only_last_block_is_scored():
    s = sample("qa_squad", ["Paris"])
    assert score("qa_squad", s, "<answer>Paris</answer> wait, no: <answer>London</answer>").score == 0.0
    assert score("qa_squad", s, "<answer>London</answer> wait, no: <answer>Paris</answer>").score == 1.0


def test_unknown_task():
    with pytest.raises(KeyError, match="unknown task"):
        score("nope", sample("nope", []), "<answer>x</answer>")


# ------------------------------------------------------------------------------------------- SQuAD F1
@pytest.mark.parametrize("raw,norm", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("a cat, an owl and the dog.", "cat owl and dog"),
    ("Theater", "theater"),  # 'the' only as a word
    ("  U.S.A.  ", "usa"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_token_f1_cases():
    assert token_f1("the Eiffel Tower", "Eiffel tower.") == 1.0
    assert token_f1("Eiffel", "Eiffel Tower") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("red apple pie", "green apple tart") == pytest.approx(1 / 3)
    assert token_f1("nothing", "else") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to empty


def test_squad_max_over_gold():
    s = sample("qa_squad", ["Matilda Rusk", "the engineer Matilda Rusk"])
    assert score("qa_squad", s, "<answer>engineer Matilda Rusk</answer>").score == 1.0
    r = score("qa_squad", s, "<answer>Rusk</answer>")
    assert r.score == pytest.approx(2 / 3) and r.parsable and r.prediction == "Rusk"


# ------------------------------------------------------------------------------------------------ NIAH
def test_niah_fraction_of_keys():
    s = sample("ruler_niah", [V1, V2], keys=[K1, K2])
    full = f"<answer>\n1. The answer for {K1} is {V1}.\n2. The answer for {K2} is {V2}.\n</answer>"
    assert score("ruler_niah", s, full).score == 1.0
    half = f"<answer>1. The answer for {K1} is {V1}.\n2. The answer for {K2} is {V1}.</answer>"
    assert score("ruler_niah", s, half).score == 0.5
    swapped_order = f"<answer>1. The answer for {K2} is {V2}.\n2. The answer for {K1} is {V1}.</answer>"
    assert score("ruler_niah", s, swapped_order).score == 1.0
    loose = f"<answer>{K1}: {V1}\n{K2} -> {V2[:-1]}x</answer>"
    assert score("ruler_niah", s, loose).score == 0.5
    garbage = score("ruler_niah", s, "<answer>I don't know</answer>")
    assert garbage.score == 0.0 and garbage.parsable


# --------------------------------------------------------------------------------------------- IoU tasks
def test_iou():
    assert iou({1, 2, 3}, {2, 3, 4}) == 0.5
    assert iou([], []) == 1.0
    assert iou(["a"], ["b"]) == 0.0


def test_vt_iou():
    s = sample("ruler_vt", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"])
    assert score("ruler_vt", s, "<answer>ABCDE, FGHIJ, KLMNO, PQRST</answer>").score == 1.0
    assert score("ruler_vt", s, "<answer>VAR ABCDE, VAR FGHIJ</answer>").score == 0.5
    assert score("ruler_vt", s, "<answer>ABCDE, FGHIJ, ZZZZZ</answer>").score == pytest.approx(2 / 5)


def test_cwe_iou():
    s = sample("ruler_cwe", ["apple", "river", "stone", "cloud"])
    assert score("ruler_cwe", s, "<answer>Apple, river, stone, cloud</answer>").score == 1.0
    assert score("ruler_cwe", s, "<answer>\n1. apple\n2. river (30 times)\n3. tree</answer>").score == 0.4
    assert score("ruler_cwe", s, "<answer>apple; apple; river</answer>").score == 0.5


def test_filtering_iou():
    s = sample("story_filtering", [3, 7, 12])
    assert score("story_filtering", s, "<answer>3, 7, 12</answer>").score == 1.0
    assert score("story_filtering", s, "<answer>Chapter 12, Chapter 3</answer>").score == pytest.approx(2 / 3)
    assert score("story_filtering", s, "<answer>3, 7, 9, 12</answer>").score == 0.75


# ----------------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize("text,letters", [
    ("B", ["B"]), ("(C)", ["C"]), ("B. With fire", ["B"]), ("A, C", ["A", "C"]), ("C and A", ["A", "C"]),
    ("Option D", ["D"]), ("The answer is B", ["B"]), ("", []),
])
def test_parse_letters(text, letters):
    assert parse_letters(text) == letters


def test_choice_exact_match():
    s = sample("qa_quality", ["B"], option_letters="ABCD")
    assert score("qa_quality", s, "<answer>B</answer>").score == 1.0
    assert score("qa_quality", s, "<answer>B, C</answer>").score == 0.0
    t = sample("qa_toefl", ["A", "C"], option_letters="ABCD")
    assert score("qa_toefl", t, "<answer>C, A</answer>").score == 1.0
    assert score("qa_toefl", t, "<answer>A</answer>").score == 0.0


# --------------------------------------------------------------------------------------------- story
def test_retrieval_fraction_exact():
    s = sample("story_retrieval", ["the Amber Market", "Tobias Wren", "polished brass compass", "the Iron Pier"])
    text = "<answer>\n1. Amber Market\n2. tobias wren.\n3. brass compass\n</answer>"
    assert score("story_retrieval", s, text).score == 0.5
    unnumbered = "<answer>the Amber Market\nTobias Wren\npolished brass compass\nthe Iron Pier</answer>"
    assert score("story_retrieval", s, unnumbered).score == 1.0


def test_multihop_exact():
    s = sample("story_multihop", ["polished brass compass"])
    assert score("story_multihop", s, "<answer>The polished brass compass.</answer>").score == 1.0
    assert score("story_multihop", s, "<answer>brass compass</answer>").score == 0.0


# ----------------------------------------------------------------------------------------- aggregation
def test_aggregate():
    results = [ScoreResult(1.0, True, "x"), ScoreResult(0.0, False, ""), ScoreResult(0.5, True, "y")]
    agg = aggregate(results)
    assert agg.n == 3 and agg.unparsable == 1
    assert agg.mean == pytest.approx(0.5)
    assert agg.stderr == pytest.approx(math.sqrt(0.25 / 3))  # sample variance 0.25
    single = aggregate([ScoreResult(1.0, True, "x")])
    assert (single.mean, single.stderr, single.n, single.unparsable) == (1.0, 0.0, 1, 0)
    assert aggregate([]).n == 0 and math.isnan(aggregate([]).mean)
    assert aggregate([1.0, 0.0]).to_dict() == {"mean": 0.5, "stderr": 0.5, "n": 2, "unparsable": 0}


# ---------------------------------------------------------------------------------------------- lenient
def test_lenient_niah_finds_values_in_free_text_strict_does_not():
    s = sample("ruler_niah", [V1, V2], keys=[K1, K2])
    text = f"Looking at the text, {K1} has value {V1}. The other is mmmmmmmm-nnnnnnn-oooooooo-qqqqqqqq."
    strict, lenient = score("ruler_niah", s, text), score("ruler_niah", s, text, "lenient")
    assert (strict.score, strict.parsable) == (0.0, False)
    # V1 whole, V2 with two of its four groups copied right
    assert lenient.parsable and lenient.score == pytest.approx((1 + 0.5) / 2)


def test_niah_single_strict_and_lenient():
    s = sample("ruler_niah_single", ["iiiiiiii-jjjjjjjj"], keys=["aaaaaaaa-bbbbbbbb"])
    assert score("ruler_niah_single", s, "<answer>iiiiiiii-jjjjjjjj</answer>").score == 1.0
    near = "The value for key aaaaaaaa-bbbbbbbb is: iiiiiiii-jjjjjjj"
    assert score("ruler_niah_single", s, near).parsable is False
    assert score("ruler_niah_single", s, near, "lenient").score == 0.5
    # echoing only the asked key is no answer
    echo = score("ruler_niah_single", s, "The value for key aaaaaaaa-bbbbbbbb is 1.", "lenient")
    assert (echo.score, echo.parsable) == (0.0, False)


def test_lenient_prefers_the_answer_block_when_there_is_one():
    s = sample("story_multihop", ["polished brass compass"])
    text = "The polished brass compass? No. <answer>wooden spoon</answer>"
    assert score("story_multihop", s, text, "lenient").score == 0.0
    assert score("story_multihop", s, "He bought the Polished Brass Compass.", "lenient").score == 1.0


@pytest.mark.parametrize("text, value, parsable", [
    ("The answer is (B) because the author says so.", 1.0, True),
    ("B. The second option", 1.0, True),
    ("A man walked in. The correct option: C", 0.0, True),
    ("I do not know.", 0.0, False),
])
def test_lenient_choice(text, value, parsable):
    r = score("qa_quality", sample("qa_quality", ["B"], option_letters="ABCD"), text, "lenient")
    assert (r.score, r.parsable) == (value, parsable)


def test_lenient_other_tasks():
    assert score("qa_squad", sample("qa_squad", ["Denver Broncos"]), "It was the Denver Broncos, I think.",
                 "lenient").score == 1.0
    assert score("ruler_vt", sample("ruler_vt", ["ABCDE", "FGHIJ"]), "Variables ABCDE and XYZWV.",
                 "lenient").score == pytest.approx(1 / 3)
    assert score("ruler_cwe", sample("ruler_cwe", ["apple", "pear"]), "Most common: apple, banana",
                 "lenient").score == 0.5
    assert score("story_filtering", sample("story_filtering", [2, 5]), "chapters 2 and 7",
                 "lenient").score == pytest.approx(1 / 3)
    assert score("story_retrieval", sample("story_retrieval", ["Mira", "Oslo"]), "1. Mira 2. Bergen",
                 "lenient").score == 0.5
    empty = score("qa_squad", sample("qa_squad", ["x"]), "", "lenient")
    assert (empty.score, empty.parsable) == (0.0, False)
    with pytest.raises(ValueError, match="scoring mode"):
        score("qa_squad", sample("qa_squad", ["x"]), "x", "fuzzy")


def test_wilson_interval():
    from clients.tasks import wilson_interval

    lo, hi = wilson_interval(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(0.5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-3), pytest.approx(0.7634, abs=1e-3))
    assert all(math.isnan(x) for x in wilson_interval(0.5, 0))
