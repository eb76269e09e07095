"""Where the native engine's time goes: torch.profiler over one prefill and over a window of steady decode.

Runs on the model directory ``benchmarks/e2e.py write-model`` writes, through the same engine wrapper as e2e.py,
and prints, per case, the wall time next to the summed GPU kernel time (a step whose kernels add up to much less
than its wall time is bound by the host: Python, launches, synchronisation) and the top operators by GPU and by
host time. The profiler runs on the engine's own loop thread (it records the ops of the thread that starts it):
:class:`ThreadProfiler` wraps the engine's step.

    python3 benchmarks/profile_native.py --dir /tmp/e2e-model \
        --prefill dense@8192,vertical_slash:10@8192 --decode dense@8x32768,quest:10@8x32768 --out $OUT/profile.txt
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (the engine wrapper, prompts and patterns of the yardstick)


class ThreadProfiler:
    """Starts and stops ``torch.profiler`` between two steps of the engine's loop thread, on that thread."""

    def __init__(self, native_engine):
        self.want = False
        self.prof = None
        self.done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        step = native_engine._step

        def profiled_step() -> None:
            import torch

            if self.want and self.prof is None:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
            elif not self.want and self.prof is not None and not self.done.is_set():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                self._loop.call_soon_threadsafe(self.done.set)
            step()

        native_engine._step = profiled_step

    async def start(self) -> None:
        self.done.clear()
        self.prof, self.want = None, True

    async def stop(self, next_step=None):
        """Stops at the engine's next step; ``next_step`` (an awaitable that gives it one) when it may be idle."""
        self.want = False
        if next_step is not None:
            await next_step
        await self.done.wait()
        return self.prof


def kernel_seconds(prof) -> float:
    """Summed time of the GPU kernels and copies the profiler saw (the host ops that launched them are not
    counted again): a lower bound of the GPU's busy time."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA) / 1e6


def table(prof, sort: str, rows: int) -> str:
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


async def profile_prefill(bench: e2e.Bench, profiler: ThreadProfiler, pattern: str, length: int, rows: int,
                          out: io.StringIO) -> None:
    await bench.engine.run(bench.prompt(length), 1, pattern)  # compile and warm this length bucket
    await profiler.start()
    s = await bench.engine.run(bench.prompt(length), 1, pattern)
    prof = await profiler.stop(bench.engine.run(bench.prompt(8), 1, pattern))
    ttft = s.times[0] - s.submitted if s.times else float("nan")
    out.write(f"\n=== prefill {pattern} @ {length}: TTFT {ttft:.3f} s, GPU kernels {kernel_seconds(prof):.3f} s "
              f"{s.report or ''} {s.error or ''}\n")
    out.write(table(prof, "self_cuda_time_total", rows) + "\n")
    out.write(table(prof, "self_cpu_time_total", rows) + "\n")


async def profile_decode(bench: e2e.Bench, profiler: ThreadProfiler, pattern: str, batch: int, context: int,
                         window_s: float, rows: int, out: io.StringIO) -> None:
    streams = [e2e.Stream(uuid.uuid4().hex, time.monotonic()) for _ in range(batch)]
    budget = bench.max_model_len - context  # tokens left to generate; the requests are aborted long before
    tasks = [asyncio.create_task(bench.engine.run(bench.prompt(context), budget, pattern, s)) for s in streams]
    try:
        while not all(len(s.tokens) > 4 for s in streams):  # past the first steps (graphs, first allocations)
            if any(t.done() for t in tasks):
                out.write(f"\n=== decode {pattern} B={batch}: a request ended early "
                          f"{[s.error for s in streams if s.error][:1]}\n")
                return
            await asyncio.sleep(0.005)
        n0 = sum(len(s.tokens) for s in streams)
        await profiler.start()
        t0 = time.monotonic()
        await asyncio.sleep(window_s)
        t1 = time.monotonic()
        prof = await profiler.stop()
        tokens = sum(len(s.tokens) for s in streams) - n0
        steps = tokens / batch
        out.write(f"\n=== decode {pattern} B={batch} ctx={context}: {tokens / (t1 - t0):.1f} tok/s under the "
                  f"profiler, {1e3 * (t1 - t0) / max(steps, 1):.1f} ms/step wall, "
                  f"{1e3 * kernel_seconds(prof) / max(steps, 1):.1f} ms/step GPU kernels ({steps:.0f} steps)\n")
        out.write(table(prof, "self_cuda_time_total", rows) + "\n")
        out.write(table(prof, "self_cpu_time_total", rows) + "\n")
    finally:
        for s in streams:
            await bench.engine.abort(s.request_id)
        await asyncio.gather(*tasks, return_exceptions=True)


def cases(spec: str) -> list[tuple[str, str]]:
    """``pattern@size,...`` -> [(pattern, size)]."""
    return [tuple(c.rsplit("@", 1)) for c in spec.split(",") if c]  # type: ignore[misc]


async def main_async(args) -> None:
    import json

    config = json.loads((Path(args.dir) / "config.json").read_text())
    engine = e2e.make_engine("native", args.dir, args.max_model_len, tiny=args.tiny)
    await engine.start()
    bench = e2e.Bench(engine, e2e.Protocol(), config["vocab_size"], sparse=True)
    bench.max_model_len = args.max_model_len
    profiler = ThreadProfiler(engine.engine)
    out = io.StringIO()
    try:
        for pattern, size in cases(args.prefill):
            await profile_prefill(bench, profiler, pattern, int(size), args.rows, out)
            print(out.getvalue(), flush=True)
            out = io.StringIO()  # printed as it goes: a call cut short keeps what it has
        for pattern, size in cases(args.decode):
            batch, context = (int(x) for x in size.split("x"))
            await profile_decode(bench, profiler, pattern, batch, context, args.window, args.rows, out)
            print(out.getvalue(), flush=True)
            out = io.StringIO()
    finally:
        await engine.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="the model directory e2e.py write-model wrote")
    p.add_argument("--prefill", default="", help="prefills to profile: PATTERN@LENGTH,...")
    p.add_argument("--decode", default="", help="steady decodes to profile: PATTERN@BATCHxCONTEXT,...")
    p.add_argument("--window", type=float, default=1.0, help="seconds of decode under the profiler")
    p.add_argument("--rows", type=int, default=18, help="operators per table")
    p.add_argument("--max-model-len", type=int, default=34816)
    p.add_argument("--tiny", action="store_true", help="the CPU settings of e2e.py --tiny (a smoke run)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
