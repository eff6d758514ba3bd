"""llm-compressor adapter: STaR-Quant modifiers, registered with ModifierFactory on import."""

from llmcompressor.modifiers.factory import ModifierFactory

from .sgat import SGATModifier
from .tac import TACModifier

__all__ = ["SGATModifier", "TACModifier"]

for _modifier in (SGATModifier, TACModifier):
    ModifierFactory.register(_modifier.__name__, _modifier)
