"""The one exception type whose message is shown to the user as a single line."""


class HwcError(Exception):
    """A problem the user can act on (bad input, unknown target, ...).

    The CLI prints ``hwc: error: <message>`` and exits non-zero without a traceback, so the
    message must name the file, node or option at fault and say what would fix it.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
