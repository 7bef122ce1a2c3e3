"""The one exception type a user is meant to read."""


class PipelineError(Exception):
    """A problem with the user's data, params or environment, stated in one line.

    Stages raise it for anything the user can fix; the stage runner prints the message
    without a traceback and exits non-zero.
    """


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), or its type when it has none:
    what a one-line report quotes of a library's exception."""
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
