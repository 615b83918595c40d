"""Errors that the command line reports as one line with exit code 2."""


class AtlasError(Exception):
    """A problem with the user's input, config, path or layer name.

    The message is one line that says what is wrong and what to do; the CLI prints it
    without a traceback and exits with code 2.
    """


def unknown_name(what: str, name: str, known: list[str], owner: str) -> AtlasError:
    """The error for a name that is not among `known`: "unknown <what> 'x'; did you mean ...? <owner> a, b"."""
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return AtlasError(f"unknown {what} {name!r}; {hint}{owner} {', '.join(known)}")
