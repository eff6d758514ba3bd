"""llm-compressor adapter: STaR-Quant modifiers, registered with ModifierFactory on import."""

from llmcompressor.modifiers.factory import ModifierFactory

from .sgat import SGATModifier

__all__ = ["SGATModifier"]

for _modifier in (SGATModifier,):
    ModifierFactory.register(_modifier.__name__, _modifier)
