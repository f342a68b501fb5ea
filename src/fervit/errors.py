"""The one exception type for mistakes a user can cause; the CLI prints it as one line."""


class FervitError(Exception):
    """A user-facing error: its message says what was expected and how to fix it."""
