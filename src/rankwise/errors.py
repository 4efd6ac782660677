"""One exception type for every bad input, so the CLI can print one clear line and exit 2."""


class RankwiseError(ValueError):
    """A user-facing error: the message names the problem and the fix."""
