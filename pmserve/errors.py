"""The one exception type for problems a user can fix; the CLI prints it on one line and exits non-zero."""


class PMError(Exception):
    """Bad input: a file, folder or option the user gave. The message names it and says what is wrong."""
