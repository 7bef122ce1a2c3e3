"""The one exception type a user is meant to read."""


class PipelineError(Exception):
    """A problem with the user's data, params or environment, stated in one line.

    Stages raise it for anything the user can fix; the stage runner prints the message
    without a traceback and exits non-zero.
    """
