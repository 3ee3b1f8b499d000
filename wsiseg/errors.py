"""The one exception type for user errors."""


class WsisegError(Exception):
    """A user error: the message names the problem and the fix.

    The command line prints it as one line and exits with status 2; anything
    else that escapes is a bug and keeps its traceback.
    """
