"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input (a file, a flag, an adapter): printed as `error: <message>` with no traceback."""


class DataError(UserError):
    """A problem in a data file, located as `path:line: problem`."""

    def __init__(self, path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class AdapterError(UserError):
    """An adapter folder that cannot be loaded onto the model as asked."""
