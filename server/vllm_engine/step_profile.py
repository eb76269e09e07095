"""A torch profile of a few steps inside vLLM's worker (a diagnostic).

``SPARSE_SERVE_VLLM_PROFILE=FILE[:SKIP[,SKIP...][:STEPS[:decode]]]`` (default SKIP 100, STEPS 20), set before the engine
starts (the engine-core process inherits it): the worker counts its steps, profiles steps SKIP+1 .. SKIP+STEPS (CPU, and
CUDA where there is one) and writes to FILE the wall time of those steps and the operators' self times, by host time and
by device time. With ``decode`` it counts only uniform decode steps (one token a row: what vLLM's full decode graphs
replay), so the window misses the prefills of a large batch, and dense traffic can be profiled too. Several SKIPs (each
counted from the start) open a window after each, written to FILE, then FILE-2, ... (before its extension): one server
start, several batches.

The window runs from one step's logits processor to another's, so it holds whole steps: the metadata builder, the
forward with its attention layers, sampling, the side channel. The sparse path's own host work is named in the table
(``sparse_serve::plan``: the builder's row plan, once per step and KV-cache group; ``sparse_serve::rows``: the sparse
rows of one layer; ``sparse_serve::end_step``). Why: on the H200 a sparse decode step through vLLM took 11 ms more
than a dense one (2026-12-03), and that time is host work that no kernel profile shows.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch

log = logging.getLogger("sparse_serve.vllm_engine")

PROFILE_ENV = "SPARSE_SERVE_VLLM_PROFILE"


class StepProfile:
    def __init__(self, setting: str):
        path, *rest = setting.split(":")
        self.path = path
        try:
            self.skips = [int(x) for x in rest[0].split(",")] if rest else [100]
            self.steps = int(rest[1]) if len(rest) > 1 else 20
        except ValueError:
            self.skips = []
        self.decode_only = len(rest) > 2 and rest[2] == "decode"
        if (not path or not self.skips or min(self.skips) < 0 or self.skips != sorted(set(self.skips))
                or self.steps < 1 or len(rest) > 3 or (len(rest) > 2 and not self.decode_only)):
            raise ValueError(f"{PROFILE_ENV}={setting!r}: FILE[:SKIP[,SKIP...][:STEPS[:decode]]] with ascending "
                             "SKIPs >= 0, STEPS >= 1")
        self.uniform_decode = False  # the kind of the step being built (noted by the metadata builder)
        self.seen = 0
        self.window = 0  # the window open or next
        self.started = 0.0
        self.prof = None

    def _open(self) -> bool:
        return self.prof is not None

    def step(self) -> None:
        """One step's end."""
        if self.window >= len(self.skips) or (self.decode_only and not self.uniform_decode and not self._open()):
            return  # (once a window is open, it closes after STEPS steps of any kind)
        self.seen += 1
        skip = self.skips[self.window]
        if self.seen == skip + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
            self.started = time.perf_counter()
        elif self.seen == skip + 1 + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.prof.stop()
            self._write(wall, skip)
            self.prof = None
            self.window += 1

    def _write(self, wall: float, skip: int) -> None:
        """The window's table: to FILE, or FILE-2, FILE-3 ... (before its extension) for the later windows."""
        table = self.prof.key_averages()
        parts = [f"{self.steps} steps after {skip}: {1e3 * wall / self.steps:.3f} ms a step (wall, synchronised "
                 f"at both ends)\n", "\n## by host (self CPU) time\n",
                 table.table(sort_by="self_cpu_time_total", row_limit=40)]
        if torch.cuda.is_available():
            parts += ["\n## by device time\n", table.table(sort_by="self_cuda_time_total", row_limit=40)]
        path = self.path
        if self.window:
            stem, dot, ext = path.rpartition(".")
            path = f"{stem}-{self.window + 1}.{ext}" if dot and "/" not in ext else f"{path}-{self.window + 1}"
        with open(path, "w") as f:
            f.write("".join(parts))
        log.warning("wrote the profile of %d steps to %s", self.steps, path)


@functools.cache
def requested() -> StepProfile | None:
    """The profile ``SPARSE_SERVE_VLLM_PROFILE`` asks for, read at the first step, not at import: the worker is forked
    from a front end that set the variable after its imports."""
    setting = os.environ.get(PROFILE_ENV)
    return StepProfile(setting) if setting else None


def step_ended() -> None:
    """Count a step for the requested profile (the logits processor calls it once a step)."""
    profile = requested()
    if profile is not None:
        profile.step()


def step_built(uniform_decode: bool) -> None:
    """The metadata builder's note of the step it plans: one token a row or not."""
    profile = requested()
    if profile is not None:
        profile.uniform_decode = uniform_decode
