from .base import SGATModifier

__all__ = ["SGATModifier"]
