"""docs/modifiers.md is generated from the modifiers' fields and docstrings: it must be current."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_modifier_reference_is_generated_from_the_code():
    spec = importlib.util.spec_from_file_location("modifier_docs", ROOT / "scripts" / "modifier_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: .venv/compress/bin/python scripts/modifier_docs.py"
    text = (ROOT / "docs" / "modifiers.md").read_text()
    assert "| `validation_depth` | `int \\| None` | `8` | > 0 |" in text and "| `rotation_block_size` |" in text
