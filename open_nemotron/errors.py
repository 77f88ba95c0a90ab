"""The error type every user-facing failure derives from; the CLI prints these as one line."""


class OpenNemotronError(Exception):
    """A problem with the user's input or files, explained in one line (field, value, what was expected)."""
