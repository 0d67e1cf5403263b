"""Errors of the loop that the CLI turns into one clear line and a non-zero exit."""


class RoundFailed(RuntimeError):
    """A round cannot run as asked (not enough labels, empty test split...); nothing already stored is lost."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `systemctl stop`, `docker stop`, `kill`) taken as a Ctrl-C is: the round
    stops where it is and records itself as failed, instead of being left as running until the next round."""

    how = "SIGTERM"
