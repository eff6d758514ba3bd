"""JSON-lines reading with errors that name the file and line."""

import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["read_jsonl_objects"]


def read_jsonl_objects(path: str | Path, what: str) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)` for each non-blank line; ValueError on a missing file,
    invalid JSON or a non-object line. `what` names the file's role in messages."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record
