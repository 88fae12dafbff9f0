"""Errors that the command line turns into one line and exit code 2."""


class LmarchError(Exception):
    """A problem with the user's input (a file, a preset, an option), not a bug.

    ``hint`` is an optional second half of the message telling the user what to try.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (hint: {self.hint})" if self.hint else base


class LmarchNotice(UserWarning):
    """Something the user should know that is not an error (a prompt cut to fit the context,
    a fallback taken): issued with :func:`warnings.warn`, shown by the command line as one line
    on stderr."""
