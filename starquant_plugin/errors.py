"""The exception type for bad user input (a file, field or value), reported as one line."""

__all__ = ["InputError"]


class InputError(ValueError):
    """A user's file, field or value is wrong; the message names it. The CLI prints it as one
    line and exits with status 2; the server answers 400 with it. A subclass of ValueError, so
    callers that catch ValueError keep working."""
