"""One exception type for every user-facing failure, so the CLI can print one line instead of a traceback."""


class CaptionerError(Exception):
    """A problem with the user's input (paths, files, flags) that deserves a one-line message."""
