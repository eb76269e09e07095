"""Task names -> task objects."""

from __future__ import annotations

import os

from .base import Sample, Task, TokenCounter
from .qa import QATask
from .ruler_cwe import RulerCwe
from .ruler_niah import RulerNiah, RulerNiahSingle
from .ruler_vt import RulerVt
from .story import StoryFiltering, StoryMultihop, StoryRetrieval

TASK_NAMES: tuple[str, ...] = (
    "ruler_niah", "ruler_vt", "ruler_cwe",
    "qa_squad", "qa_quality", "qa_toefl",
    "story_retrieval", "story_multihop", "story_filtering",
)
# Selectable by name, not part of "all" (the paper's nine): variants for models too small for the nine.
EXTRA_TASK_NAMES: tuple[str, ...] = ("ruler_niah_single",)
QA_TASKS = ("qa_squad", "qa_quality", "qa_toefl")
_SYNTHETIC = {
    "ruler_niah": RulerNiah, "ruler_niah_single": RulerNiahSingle, "ruler_vt": RulerVt, "ruler_cwe": RulerCwe,
    "story_retrieval": StoryRetrieval, "story_multihop": StoryMultihop, "story_filtering": StoryFiltering,
}


def get_task(
    name: str,
    *,
    qa_data_dir: str | os.PathLike[str] | None = None,
    qa_path: str | os.PathLike[str] | None = None,
    max_doc_tokens: int = 8192,
) -> Task:
    """The task called `name`. QA tasks read `qa_path`, else `<qa_data_dir>/<default file name>` (lazily, at
    the first sample); `max_doc_tokens` bounds a QA question's own document."""
    if name in _SYNTHETIC:
        return _SYNTHETIC[name]()
    if name in QA_TASKS:
        return QATask(name, path=qa_path, data_dir=qa_data_dir, max_doc_tokens=max_doc_tokens)
    raise KeyError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES + EXTRA_TASK_NAMES)}")


def build_sample(name: str, length: int, seed: int, index: int, counter: TokenCounter, **task_options) -> Sample:
    """One-off convenience; a runner building many samples should keep the Task object (QA tasks cache)."""
    return get_task(name, **task_options).build(length, seed, index, counter)
