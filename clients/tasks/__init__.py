"""The nine evaluation tasks: reproducible generators/loaders at a target prompt length, and their scoring.

    counter = LocalTokenCounter(tokenizer)            # or the HTTP client's /tokenize counter
    task = get_task("ruler_niah")                      # QA tasks: get_task("qa_squad", qa_data_dir=...)
    sample = task.build(length=4096, seed=0, index=3, counter=counter)
    result = task.score(sample, completion_text)       # == score("ruler_niah", sample, completion_text)
    summary = aggregate(results)                       # mean, stderr, n, unparsable
"""

from .base import (
    DEFAULT_MAX_NEW_TOKENS,
    LengthFitError,
    LocalTokenCounter,
    Sample,
    Task,
    TokenCounter,
    fit_length,
    fit_length_2d,
    stable_seed,
)
from .qa import QA_DATA_DIR_ENV, QATask, load_choice_jsonl, load_squad_v2
from .registry import EXTRA_TASK_NAMES, QA_TASKS, TASK_NAMES, build_sample, get_task
from .scoring import (
    SCORING_MODES,
    Aggregate,
    ScoreResult,
    aggregate,
    extract_answer,
    normalize_answer,
    score,
    token_f1,
    wilson_interval,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "LengthFitError", "LocalTokenCounter", "Sample", "Task", "TokenCounter",
    "fit_length", "fit_length_2d", "stable_seed", "QA_DATA_DIR_ENV", "QATask", "load_choice_jsonl",
    "load_squad_v2", "QA_TASKS", "TASK_NAMES", "EXTRA_TASK_NAMES", "build_sample", "get_task", "Aggregate",
    "ScoreResult",
    "aggregate", "SCORING_MODES", "extract_answer", "normalize_answer", "score", "token_f1", "wilson_interval",
]
