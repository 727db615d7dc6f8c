"""The error of bad user input: the CLI prints its message as one line and exits non-zero."""


class InputError(Exception):
    """A file, folder or option that cannot be used; the message names it and the problem."""

    @property
    def message(self) -> str:
        return str(self)
