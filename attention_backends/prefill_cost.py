"""Does a sparse prefill method pay at this length? One cost model and the dense-fallback rule built on it
(``docs/performance.md``, "Dense fallback").

The model predicts the seconds one attention layer of one call takes, for a method and for dense attention, from
a per-device *profile* of measured constants (:class:`PrefillProfile`; ``benchmarks/calibrate_fallback.py``
measures them). A call is a whole prompt of ``n`` tokens, or a prefill chunk: the queries of positions
``[q_offset, n)`` against all ``n`` keys. Every method (and dense) has the same four terms::

    t = fixed + per_token * n * h + per_cell * cells + per_dense_cell * dense_cells

with ``h`` query heads, ``dense_cells`` the call's causal cells (``h n (n + 1) / 2`` for a whole prompt;
:func:`~.cost.causal_cells` with ``q_offset`` for a chunk) and ``cells`` the cells the method computes at its
target ratio ``r`` (``dense_cells / r``; dense: ``dense_cells``). Dense attention over a chunk (SDPA with a
lower-right causal mask) does fewer cells per ms than over a whole prompt, so a profile may time it apart
(``dense_chunk``). ``fixed``: kernel launches and host syncs of
the index (the vertical-slash budget search); ``per_token``: the last-window estimate and the index build;
``per_cell``: the attention kernel per computed cell (dense SDPA is the fastest per cell, 16-token block tiles
are ~9x slower); ``per_dense_cell``: index work quadratic in ``n`` (block_sparse's block score matrix). What
is not attention (projections, MLP) costs the same either way and is left out. The cell terms are scaled by
``flops_per_cell(d) / flops_per_cell(profile head_dim)`` for a model whose head dim differs from the profile's.

The rule (:func:`decide`): a prefill call falls back to dense when its predicted time exceeds dense's. It is
asked per call, so per chunk: a method pays its index once per chunk and layer, and with short chunks that fixed
cost can outweigh what it saves at any length (measured on the H200, 2026-12-01: vertical_slash:10 on a
4096-token chunk takes 55 ms against dense's 22 ms at 128K). An engine that prefills a dense prompt whole asks
first of the whole prompt (:func:`decide_prompt`): its chunks, each the method or dense whichever is predicted
faster, against dense attention over the whole prompt in one call; when dense wins, the prompt runs dense. It
does not apply (the method runs as asked) when the request says ``"fallback": "never"``, when the device has
no profile for the implementation that runs (the CPU: it is for correctness and accuracy work, where the method
itself is the point), when the ratio is 1 (the method is dense already), or when the method's own parameters
set its budget instead of the ratio (``MethodInfo.budget_params``: the cells are known only once the index is
built). The decision depends on the request, the context length and where the chunk starts only, so it is the
same in every layer.

Profiles: ``attention_backends/profiles/prefill-<card>.json`` for a CUDA card (``torch.cuda.get_device_name``
with every run of non-alphanumerics made ``-``), or the file named by ``$SPARSE_SERVE_PREFILL_PROFILE`` for
every device (tests; a card without a shipped profile; ``none`` turns the rule off everywhere, for checks of the
methods themselves on a GPU). A profile applies only to the ``impl`` it measured.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cost import causal_cells, flops_per_cell
from .reports import PrefillCallReport
from .spec import PREFILL_METHODS, PhaseSpec

PROFILE_ENV = "SPARSE_SERVE_PREFILL_PROFILE"
PROFILE_OFF = "none"  # $SPARSE_SERVE_PREFILL_PROFILE=none: no profile anywhere (checks of the methods themselves)
PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class Terms:
    """The four constants of one method's (or dense's) per-layer time, in seconds per unit."""

    fixed_s: float = 0.0
    per_token_s: float = 0.0  # per prompt token per query head
    per_cell_s: float = 0.0  # per computed cell (one query head's query-key product)
    per_dense_cell_s: float = 0.0  # per causal cell of the prompt, computed or not

    def seconds(self, n: int, heads: int, cells: float, dense_cells: float, cell_scale: float = 1.0) -> float:
        return (self.fixed_s + self.per_token_s * n * heads
                + cell_scale * (self.per_cell_s * cells + self.per_dense_cell_s * dense_cells))


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: profiles are loaded once per file
class PrefillProfile:
    card: str  # the device it was measured on
    impl: str  # the implementation measured ("triton" on CUDA)
    head_dim: int  # of the measured layer shape (the cell terms scale to another head dim)
    dense: Terms  # dense attention over a whole prompt
    methods: dict[str, Terms]  # by :func:`profile_key`
    source: str = ""  # how the constants were obtained
    extra: dict[str, Any] = field(default_factory=dict)  # measured shape, lengths, fit residuals, ...
    dense_chunk: Terms | None = None  # dense attention over a chunk (q_offset > 0); None: as ``dense``

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrefillProfile:
        chunk = d.get("dense_chunk")
        return cls(card=str(d["card"]), impl=str(d["impl"]), head_dim=int(d["head_dim"]), dense=Terms(**d["dense"]),
                   methods={k: Terms(**v) for k, v in d["methods"].items()}, source=str(d.get("source", "")),
                   extra=dict(d.get("extra", {})), dense_chunk=None if chunk is None else Terms(**chunk))

    def to_dict(self) -> dict[str, Any]:
        chunk = {} if self.dense_chunk is None else {"dense_chunk": asdict(self.dense_chunk)}
        return {"card": self.card, "impl": self.impl, "head_dim": self.head_dim, "dense": asdict(self.dense),
                **chunk, "methods": {k: asdict(v) for k, v in self.methods.items()}, "source": self.source,
                "extra": self.extra}

    def dense_terms(self, q_offset: int) -> Terms:
        """Dense attention's terms for a call whose queries start at ``q_offset`` (0: a whole prompt)."""
        return self.dense_chunk if q_offset and self.dense_chunk is not None else self.dense


def profile_key(phase: PhaseSpec) -> str:
    """The profile entry of a prefill phase: its method, plus ``/b<block_size>`` for a method with a block size
    (block_sparse's kernel cost per cell depends on its tile)."""
    block = phase.params.get("block_size")
    return phase.method if block is None else f"{phase.method}/b{block}"


def card_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


@functools.lru_cache(maxsize=16)
def load_profile(path: str) -> PrefillProfile:
    return PrefillProfile.from_dict(json.loads(Path(path).read_text()))


@functools.lru_cache(maxsize=16)
def _shipped_profile(device: torch.device) -> PrefillProfile | None:
    if device.type != "cuda":
        return None
    path = PROFILE_DIR / f"prefill-{card_slug(torch.cuda.get_device_name(device))}.json"
    return load_profile(str(path)) if path.exists() else None


def device_profile(device: torch.device, impl: str) -> PrefillProfile | None:
    """The profile that applies to ``impl`` running on ``device``, or None (then nothing falls back)."""
    path = os.environ.get(PROFILE_ENV)
    if path == PROFILE_OFF:
        return None
    profile = load_profile(path) if path else _shipped_profile(device)
    return profile if profile is not None and profile.impl == impl else None


def expected_cells(phase: PhaseSpec, n: int, heads: int, q_offset: int = 0) -> float | None:
    """Cells ``phase`` computes in a call (an n-token prompt, or its chunk from ``q_offset``) at its target ratio,
    or None when they cannot be known before the index is built (the method's own parameters set the budget, not
    the ratio)."""
    dense = causal_cells(n, q_offset) * heads
    if phase.is_dense:
        return float(dense)
    info = PREFILL_METHODS[phase.method]
    if info.budget_params and all(phase.params.get(p) is not None for p in info.budget_params):
        return None
    return dense / phase.compression_ratio


def predict(profile: PrefillProfile, phase: PhaseSpec, n: int, heads: int, head_dim: int, q_offset: int = 0
            ) -> tuple[float, float] | None:
    """(method, dense) predicted seconds of one layer's call (the prompt's queries from ``q_offset`` against its
    ``n`` keys), or None when the profile has no entry for the method or its cells cannot be predicted."""
    terms = profile.methods.get(profile_key(phase))
    cells = expected_cells(phase, n, heads, q_offset)
    if terms is None or cells is None:
        return None
    dense_cells = float(causal_cells(n, q_offset) * heads)
    scale = flops_per_cell(head_dim) / flops_per_cell(profile.head_dim)
    return (terms.seconds(n, heads, cells, dense_cells, scale),
            profile.dense_terms(q_offset).seconds(n, heads, dense_cells, dense_cells, scale))


def may_fall_back(phase: PhaseSpec) -> bool:
    """Whether the request lets the rule run ``phase`` as dense at all (see the module docstring)."""
    return not (phase.is_dense or phase.fallback == "never" or phase.compression_ratio <= 1.0)


def applies(phase: PhaseSpec, profile: PrefillProfile | None) -> bool:
    """Whether the rule may run ``phase`` as dense on a device with ``profile``."""
    return profile is not None and may_fall_back(phase)


@functools.lru_cache(maxsize=4096)  # once per (request spec, chunk): every layer asks the same question
def decide(phase: PhaseSpec, n: int, heads: int, head_dim: int, profile: PrefillProfile | None,
           q_offset: int = 0) -> str | None:
    """``"dense"`` when ``phase`` should run as dense attention on the call of queries ``[q_offset, n)`` over
    ``n`` keys, else None (see the module docstring for when the rule does not apply)."""
    if not applies(phase, profile):
        return None
    times = predict(profile, phase, n, heads, head_dim, q_offset)
    return "dense" if times is not None and times[0] > times[1] else None


def decide_prompt(phase: PhaseSpec, n: int, heads: int, head_dim: int, profile: PrefillProfile | None,
                  chunk_starts: tuple[int, ...] = (0,)) -> str | None:
    """``"dense"`` when an n-token prompt prefilled in chunks starting at ``chunk_starts`` (each chunk as
    :func:`decide` runs it: the method, or dense where that is faster) is not predicted faster than dense attention
    over the whole prompt in one call, else None. With one chunk it is :func:`decide`."""
    if not applies(phase, profile):
        return None
    ends = (*chunk_starts[1:], n)
    chunks = [predict(profile, phase, end, heads, head_dim, start) for start, end in zip(chunk_starts, ends,
                                                                                          strict=True)]
    if any(c is None for c in chunks):
        return None
    whole = predict(profile, phase, n, heads, head_dim)
    assert whole is not None
    return "dense" if sum(min(c) for c in chunks) >= whole[1] else None


def prompt_fallback(phase: PhaseSpec, q_shape: torch.Size | tuple[int, ...], device: torch.device, impl: str,
                    chunk_starts: tuple[int, ...] = (0,)) -> str | None:
    """:func:`decide_prompt` for a prompt of ``q_shape`` ``[h, n, d]`` on ``device`` with ``impl``."""
    h, n, d = q_shape
    return decide_prompt(phase, n, h, d, device_profile(device, impl), tuple(chunk_starts))


def prefill_fallback(phase: PhaseSpec, q_shape: torch.Size | tuple[int, ...], device: torch.device, impl: str,
                     q_offset: int = 0) -> PrefillCallReport | None:
    """The rule for one layer's call (``q_shape`` is ``[h, n, d]``, ``impl`` the implementation that would run;
    a prefill chunk's queries start at ``q_offset``, its keys are all ``n``): None when the method runs, else the
    report of the dense attention that runs instead."""
    if not may_fall_back(phase):  # no file or device lookup for what cannot fall back
        return None
    h, n, d = q_shape
    fallback = decide(phase, n, h, d, device_profile(device, impl), q_offset)
    return None if fallback is None else fallback_report(phase, q_shape, q_offset, fallback)


def fallback_report(phase: PhaseSpec, q_shape: torch.Size | tuple[int, ...], q_offset: int = 0,
                    fallback: str = "dense") -> PrefillCallReport:
    """The report of a call of ``phase`` that ran dense attention instead (every cell computed)."""
    h, n, d = q_shape
    return PrefillCallReport.dense(causal_cells(n, q_offset) * h, d, phase.method, phase.compression_ratio,
                                   fallback)
