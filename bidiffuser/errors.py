"""User-facing errors: the CLIs print these as one line and exit with code 2."""


class BiDiffuserError(Exception):
    """Bad input from the user (missing file, wrong checkpoint, bad image, bad flag value)."""


class CheckpointError(BiDiffuserError):
    """A checkpoint file that cannot be read or does not match the model it is loaded into."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (at most 200 characters), for one-line errors."""
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]
