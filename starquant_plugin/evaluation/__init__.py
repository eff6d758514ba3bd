"""Evaluation of diffusion LLMs: task files, exact match, runners."""

from .runner import EvaluationResult, GenerateFn, core_generate_fn, default_sampling, evaluate_examples, generate_texts
from .tasks import TaskExample, exact_match, load_tasks

__all__ = [
    "EvaluationResult",
    "GenerateFn",
    "TaskExample",
    "core_generate_fn",
    "default_sampling",
    "evaluate_examples",
    "exact_match",
    "generate_texts",
    "load_tasks",
]
