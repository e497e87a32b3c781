"""The one exception type for user errors; the CLI turns it into a one-line message."""


class DaliFlError(Exception):
    """A problem the user can fix: bad input, missing or corrupt files, an unusable device."""
