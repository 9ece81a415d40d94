"""The one exception type whose message is shown to the user as a single line."""


def first_line(exc: BaseException, last: bool = False, limit: int = 300) -> str:
    """One line of an exception's message for a user-facing error (the last line for tracebacks
    that end with the message, as TVM's do); the exception type when it has no message."""
    lines = str(exc).strip().splitlines()
    return (lines[-1] if last else lines[0])[:limit] if lines else type(exc).__name__


class HwcError(Exception):
    """A problem the user can act on (bad input, unknown target, ...).

    The CLI prints ``hwc: error: <message>`` and exits non-zero without a traceback, so the
    message must name the file, node or option at fault and say what would fix it.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
