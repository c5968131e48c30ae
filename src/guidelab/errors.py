"""One error type for bad input: the entry points print its message on one line and exit non-zero."""


class GuidelabError(Exception):
    """A problem the user can fix. The message names the problem and the fix, on one line."""


def one_line(e: BaseException | None, limit: int = 300) -> str:
    """An exception's message squeezed onto one line and shortened, for one-line error messages."""
    text = " ".join(str(e).split()) or repr(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."
