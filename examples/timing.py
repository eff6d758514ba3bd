"""The timer of the kernel probes in this folder: median seconds per call after one warm-up."""

import statistics
import time


def timed(fn, repeats: int = 3) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
