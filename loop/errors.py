"""Errors of the loop that the CLI turns into one clear line and a non-zero exit."""


class RoundFailed(RuntimeError):
    """A round cannot run as asked (not enough labels, empty test split...); nothing already stored is lost."""
