"""Task files: JSON lines `{"prompt": str, "answer": str, "task"?: str}`."""

from dataclasses import dataclass
from pathlib import Path

from ..data.jsonl import read_jsonl_objects

__all__ = ["TaskExample", "exact_match", "load_tasks"]

DEFAULT_TASK = "default"


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str
    task: str = DEFAULT_TASK


def exact_match(generated: str, answer: str) -> bool:
    """Generated text (special tokens already skipped) equals the answer, both stripped."""
    return generated.strip() == answer.strip()


def load_tasks(path: str | Path) -> list[TaskExample]:
    """Read a task file; a ValueError names the file and line of the first bad record."""
    examples = []
    for line_number, record in read_jsonl_objects(path, "task"):
        for key in ("prompt", "answer"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{path}:{line_number}: field {key!r} must be a string, got {record.get(key)!r}")
        task = record.get("task", DEFAULT_TASK)
        if not isinstance(task, str):
            raise ValueError(f"{path}:{line_number}: field 'task' must be a string, got {task!r}")
        examples.append(TaskExample(record["prompt"], record["answer"], task))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples
