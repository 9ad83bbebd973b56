"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a wrong path, an impossible option, a file of the wrong kind.

    The message says what is wrong and what to do; the CLI prints it on one line without a traceback.
    """


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the last good checkpoint is kept and the run stops."""
