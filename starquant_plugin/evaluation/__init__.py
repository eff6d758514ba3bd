"""Evaluation of diffusion LLMs: task files, exact match, runners."""

from .runner import EvaluationResult, default_sampling, evaluate_examples, generate_texts
from .tasks import TaskExample, exact_match, load_tasks

__all__ = [
    "EvaluationResult",
    "TaskExample",
    "default_sampling",
    "evaluate_examples",
    "exact_match",
    "generate_texts",
    "load_tasks",
]
