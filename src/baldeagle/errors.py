"""`BaldEagleError`: a problem the user can fix (bad input, settings, files, an engine that failed),
reported by the CLI as one line and exit status 2. Every error type of the project derives from it;
it is a ValueError for callers that catch those. Bugs and torch's own errors (RuntimeError) are not
BaldEagleErrors: they keep their traceback."""


class BaldEagleError(ValueError):
    """A user-facing error whose message says what to change."""
