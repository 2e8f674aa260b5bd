class YoloqError(Exception):
    """A problem with the user's input: the CLI prints it on one line and exits with code 2."""
