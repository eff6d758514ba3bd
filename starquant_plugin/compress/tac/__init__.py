from .base import TACModifier

__all__ = ["TACModifier"]
