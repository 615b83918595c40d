"""Errors that the command line reports as one line with exit code 2."""


class AtlasError(Exception):
    """A problem with the user's input, config, path or layer name.

    The message is one line that says what is wrong and what to do; the CLI prints it
    without a traceback and exits with code 2.
    """
