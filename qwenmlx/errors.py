class QwenMLXError(Exception):
    """A problem the user can fix (bad file, bad option): printed as one line, no traceback."""
