"""Where `starquant quantize` spends its time and memory: wall time and peak memory per stage.

`quantize` opens a `QuantizeReport`; the modifiers mark their stages with `stage(name)`, which
records into the open report and does nothing otherwise (plain `oneshot` users pay nothing).
Peak memory is the process's resident memory (sampled every few milliseconds, so the peak of a
stage is at least what it held) and, on CUDA, the peak allocated by torch.
"""

import contextlib
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field

import psutil
import torch

__all__ = ["STAGES", "QuantizeReport", "StageRecord", "stage"]

# The stages of `starquant quantize`, in the order they run. "weight quantizer" is what oneshot
# spends outside SGAT's and TAC's own stages and the save: the stock modifiers (GPTQ, ...) and the
# calibration forward passes of llm-compressor's pipeline (its peak is oneshot's peak).
STAGES = (
    "load model", "calibration data", "SGAT statistics and clip search", "weight quantizer", "TAC trajectories",
    "TAC reference", "TAC fit", "TAC validation", "save", "other",
)

_OPEN: ContextVar["QuantizeReport | None"] = ContextVar("starquant_quantize_report", default=None)


@dataclass
class StageRecord:
    name: str
    seconds: float
    peak_memory_bytes: int  # resident memory of the process (CPU) or torch's peak allocation (CUDA)


class _PeakResidentMemory:
    """Samples the process's resident memory in a background thread; `peak` since `reset`."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def reset(self) -> None:
        self.peak = self._process.memory_info().rss

    def __enter__(self) -> "_PeakResidentMemory":
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class QuantizeReport:
    """Per stage name, total wall time and peak memory; a name entered several times (SGAT's
    blocks, TAC's layers) accumulates. Stages do not overlap unless a caller nests them."""

    stages: dict[str, StageRecord] = field(default_factory=dict)
    _memory: _PeakResidentMemory | None = None

    @contextlib.contextmanager
    def open(self) -> Iterator["QuantizeReport"]:
        """Make this the report `stage` records into, and sample memory, for the block."""
        token = _OPEN.set(self)
        with _PeakResidentMemory() as self._memory:
            try:
                yield self
            finally:
                _OPEN.reset(token)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        memory = self._memory
        outer_peak = memory.peak if memory is not None else 0
        if memory is not None:
            memory.reset()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            yield
        finally:
            peak = memory.peak if memory is not None else psutil.Process().memory_info().rss
            if cuda:
                peak = max(peak, torch.cuda.max_memory_allocated())
            self.add(name, time.perf_counter() - started, peak)
            if memory is not None:  # an enclosing stage's peak includes this one's
                memory.peak = max(outer_peak, peak)

    def add(self, name: str, seconds: float, peak_memory_bytes: int) -> None:
        record = self.stages.setdefault(name, StageRecord(name, 0.0, 0))
        record.seconds += seconds
        record.peak_memory_bytes = max(record.peak_memory_bytes, int(peak_memory_bytes))

    def to_json(self) -> dict:
        return {"stages": [{**asdict(s), "seconds": round(s.seconds, 3)} for s in self.stages.values()]}


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Record `name` into the report `quantize` has open; a no-op outside `quantize`."""
    report = _OPEN.get()
    if report is None:
        yield
        return
    with report.stage(name):
        yield
