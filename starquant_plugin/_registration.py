"""Register the STaR-Quant modifiers with llm-compressor whenever llm-compressor is imported.

Importing llm-compressor costs seconds and prints to stdout, so `import starquant_plugin`
does not import it; instead the modifiers are registered right after the `llmcompressor`
package finishes importing (or at once, if it already has), before any recipe is parsed.
"""

import importlib.abc
import importlib.util
import sys

__all__ = ["register_modifiers_when_llmcompressor_loads"]

_PACKAGE = "llmcompressor"


def _register() -> None:
    from . import compress  # noqa: F401  (its import registers the modifiers)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _PACKAGE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]
            _register()

        loader.exec_module = exec_module
        return spec


def register_modifiers_when_llmcompressor_loads() -> None:
    """Idempotent: registers now if llm-compressor is loaded, else on its import."""
    if _PACKAGE in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
