"""Write docs/modifiers.md from the modifiers themselves: every field of `SGATModifier` and
`TACModifier` (type, default, bounds from its pydantic definition) with its `:param` text from
the class docstring, so the reference cannot drift from the code.

    .venv/compress/bin/python scripts/modifier_docs.py           # rewrite docs/modifiers.md
    .venv/compress/bin/python scripts/modifier_docs.py --check   # exit 1 if it is out of date

A field without a `:param` entry is an error (documented or not added).
"""

import argparse
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUTPUT = ROOT / "docs" / "modifiers.md"


def _type(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return f"`{text.replace('typing.', '').replace('NoneType', 'None')}`".replace("|", "\\|")


def _bounds(metadata) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "at least", "max_length": "at most"}
    parts = []
    for item in metadata:
        for name, symbol in words.items():
            if getattr(item, name, None) is not None:
                suffix = " item(s)" if "length" in name else ""
                parts.append(f"{symbol} {getattr(item, name)}{suffix}")
    return ", ".join(parts)


def _default(field) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    return "`null`" if value is None else f"`{str(value).lower() if isinstance(value, bool) else value}`"


def parameters(docstring: str) -> dict[str, str]:
    """`:param name: text` entries of a docstring, continuation lines joined."""
    entries, current = {}, None
    for line in docstring.splitlines():
        match = re.match(r"\s*:param (\w+):\s*(.*)", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current and line.strip() and not line.strip().startswith(":"):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def summary(docstring: str) -> str:
    """The docstring's first paragraph."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def render() -> str:
    import starquant_plugin  # noqa: F401  (registers the modifiers)
    from llmcompressor.modifiers import Modifier

    from starquant_plugin.compress import SGATModifier, TACModifier

    lines = [
        "# SGATModifier and TACModifier parameters",
        "",
        "Generated from the modifiers' fields and docstrings by `scripts/modifier_docs.py` (the test",
        "suite fails when this page is out of date); the method: `docs/method.md`; recipes: `docs/recipes.md`.",
    ]
    for modifier in (SGATModifier, TACModifier):
        documented = parameters(modifier.__doc__)
        lines += ["", f"## {modifier.__name__}", "", summary(modifier.__doc__), "",
                  "| parameter | type | default | bounds | meaning |", "| --- | --- | --- | --- | --- |"]
        for name, field in modifier.model_fields.items():
            if name in Modifier.model_fields:
                continue  # llm-compressor's own (index, group, start, ...)
            if name not in documented:
                raise SystemExit(f"{modifier.__name__}.{name} has no :param entry in the class docstring")
            meaning = documented[name].replace("|", "\\|")
            lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {_bounds(field.metadata)} | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/modifiers.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run scripts/modifier_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
