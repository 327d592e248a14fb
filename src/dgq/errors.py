"""The one exception type dgq raises for bad input: the CLI prints its message on one line and exits 2."""


class DGQError(Exception):
    """A user-facing error: the message alone must say what is wrong and what to do."""
