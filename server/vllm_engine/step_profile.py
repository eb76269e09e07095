"""A torch profile of a few steps inside vLLM's worker while sparse requests run (a diagnostic).

``SPARSE_SERVE_VLLM_PROFILE=FILE[:SKIP[:STEPS]]`` (default SKIP 100, STEPS 20), set before the engine starts (the
engine-core process inherits it): the worker counts the steps that hold a sparse request, profiles steps SKIP+1 ..
SKIP+STEPS (CPU, and CUDA where there is one) and writes to FILE the wall time of those steps and the operators'
self times, by host time and by device time. The window runs from one step's logits processor to another's, so it
holds whole steps: the metadata builder, the forward with its attention layers, sampling, the side channel. The
sparse path's own host work is named in the table (``sparse_serve::plan``: the builder's row plan, once per step and
KV-cache group; ``sparse_serve::rows``: the sparse rows of one layer; ``sparse_serve::end_step``). Why: on
the H200 a sparse decode step through vLLM took 11 ms more than a dense one (2026-12-03), and that time is host work
that no kernel profile shows.
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
        self.skip = int(rest[0]) if rest else 100
        self.steps = int(rest[1]) if len(rest) > 1 else 20
        if not path or self.skip < 0 or self.steps < 1:
            raise ValueError(f"{PROFILE_ENV}={setting!r}: FILE[:SKIP[:STEPS]] with SKIP >= 0, STEPS >= 1")
        self.seen = 0
        self.started = 0.0
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)

    def step(self) -> None:
        """One step's end (called once per step that holds a sparse request)."""
        self.seen += 1
        if self.seen == self.skip + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.start()
            self.started = time.perf_counter()
        elif self.seen == self.skip + 1 + self.steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.started
            self.prof.stop()
            self._write(wall)

    def _write(self, wall: float) -> None:
        table = self.prof.key_averages()
        parts = [f"{self.steps} steps after {self.skip}: {1e3 * wall / self.steps:.3f} ms a step (wall, synchronised "
                 f"at both ends)\n", "\n## by host (self CPU) time\n",
                 table.table(sort_by="self_cpu_time_total", row_limit=40)]
        if torch.cuda.is_available():
            parts += ["\n## by device time\n", table.table(sort_by="self_cuda_time_total", row_limit=40)]
        with open(self.path, "w") as f:
            f.write("".join(parts))
        log.warning("wrote the profile of %d sparse steps to %s", self.steps, self.path)


@functools.cache
def requested() -> StepProfile | None:
    """The profile ``SPARSE_SERVE_VLLM_PROFILE`` asks for, read at the first step, not at import: the worker is forked
    from a front end that set the variable after its imports."""
    setting = os.environ.get(PROFILE_ENV)
    return StepProfile(setting) if setting else None


def step_ended() -> None:
    """Count a step for the requested profile."""
    profile = requested()
    if profile is not None:
        profile.step()
