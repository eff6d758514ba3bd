"""The timers of the kernel probes in this folder: median seconds per call after one warm-up."""

import statistics
import time


def timed(fn, repeats: int = 3) -> float:
    return timed_together({"fn": fn}, repeats)["fn"]


def timed_together(fns: dict, repeats: int = 3) -> dict:
    """Median seconds per call of each function, the calls taken in turn (one of each, `repeats`
    times): on a shared machine a slow spell then hits every function, not one of them."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
