"""One exception type for every bad input, so the CLI can print one clear line and exit 2."""


class RankwiseError(ValueError):
    """A user-facing error: the message names the problem and the fix."""


class NonFiniteError(RankwiseError):
    """Training produced a NaN / inf (loss, gradient norm, eval loss or weights); the CLI exits with 3."""

    exit_code = 3
