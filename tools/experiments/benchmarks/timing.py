"""Timing of benchmark candidates: CUDA events (or a wall clock on CPU), alternating calls, medians."""

import gc
import math
import statistics
import time

import torch


class Timer:
    """CUDA events (synchronised after each call) on CUDA, a wall clock on CPU; times in ms."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def measure(self, fns, repeat, warmup):
        """{name: stats} of the callables ``fns`` ({name: fn}); after ``warmup`` calls of each, the calls alternate
        (one of each per round, ``repeat`` rounds) so that clock or thermal drift hits them all alike."""
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        self.sync()
        times = {name: [] for name in fns}
        for _ in range(repeat):
            for name, fn in fns.items():
                times[name].append(self.once(fn))
        return {name: summarize(t) for name, t in times.items()}

    def peak_mib(self, fn):
        """Peak CUDA memory of one call of ``fn`` above what was allocated before it (MiB); NaN on CPU."""
        if not self.cuda:
            return float("nan")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def percentile(sorted_values, q):
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times):
    s = sorted(times)
    return {
        "median": statistics.median(s),
        "p10": percentile(s, 0.1),
        "p90": percentile(s, 0.9),
        "mean": statistics.fmean(s),
        "min": s[0],
        "n": len(s),
        "times_ms": [round(t, 4) for t in times],
    }


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
