class ExmyError(Exception):
    """A problem with the user's input or files: shown as one line, exit status 1."""
