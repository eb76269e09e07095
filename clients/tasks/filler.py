"""Deterministic filler prose: plain sentences built from this module's own templates (no downloaded text).

The sentences contain no digits, no words in capitals other than a sentence's first letter, and none of the
words the synthetic tasks look for ("key", "value", "VAR", "bought", "sold", "chapter"), so they never
interfere with a task's answer.
"""

from __future__ import annotations

import random

_SUBJECTS = [
    "the old miller", "a young shepherd", "the village baker", "a tired traveller", "the schoolteacher",
    "a quiet fisherman", "the blacksmith", "a curious child", "the innkeeper", "a wandering poet",
    "the ferryman", "an elderly weaver", "the gardener", "a street musician", "the clockmaker",
    "a retired sailor", "the night watchman", "a busy seamstress", "the potter's apprentice", "a lonely painter",
]
_ACTIONS = [
    "mended the fence", "painted the shutters", "counted the sheep", "swept the courtyard", "watered the herbs",
    "read an old letter", "tuned a fiddle", "carried firewood", "fed the geese", "repaired a cart wheel",
    "folded the linen", "sharpened a knife", "picked ripe plums", "hummed a quiet tune", "patched a torn sail",
    "stacked the crates", "chased a stray goat", "lit the lanterns", "polished the windows", "gathered kindling",
]
_PLACES = [
    "near the river", "behind the mill", "on the hill road", "in the orchard", "by the harbor wall",
    "under the chestnut tree", "at the edge of the forest", "beside the chapel", "in the narrow lane",
    "on the stone bridge", "next to the well", "outside the bakery", "along the canal", "in the walled garden",
]
_TIMES = [
    "before dawn", "in the late afternoon", "after the rain", "while the bells rang", "as the fog lifted",
    "on a windy morning", "just before supper", "at first light", "during the long evening", "after the market",
    "while the kettle boiled", "as the tide came in",
]
_ENDINGS = [
    "", "", "", " and then rested for a while", " without saying a word", " and smiled at the passers-by",
    " while the dogs slept nearby", " and went home satisfied", " as the swallows circled overhead",
]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def prose_sentence(rng: random.Random) -> str:
    subject, action, place, time = rng.choice(_SUBJECTS), rng.choice(_ACTIONS), rng.choice(_PLACES), rng.choice(_TIMES)
    ending = rng.choice(_ENDINGS)
    if rng.random() < 0.5:
        return f"{_cap(subject)} {action} {place} {time}{ending}."
    return f"{_cap(time)}, {subject} {action} {place}{ending}."


def prose_sentences(rng: random.Random, n: int) -> list[str]:
    return [prose_sentence(rng) for _ in range(n)]
