"""One error type for bad input: the entry points print its message on one line and exit non-zero."""


class GuidelabError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""
