"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class RefusalScopeError(Exception):
    """A problem with the user's input or environment, explained in plain words."""
