"""Errors that are the user's to fix: the CLI prints them as one line and exits with code 2."""

import reprlib


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


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to about `limit` characters: a message never formats an unbounded value (a YAML alias
    bomb expands to gigabytes of text; a 5,000-digit integer has no repr past Python's digit limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of about {int(value.bit_length() * 0.30103):,} digits>"
    if isinstance(value, str):
        text = repr(value[: limit + 1])
        return text if len(value) <= limit else text[:limit] + "..."
    shorten = reprlib.Repr()
    shorten.maxstring = shorten.maxother = shorten.maxlong = limit
    shorten.maxlist = shorten.maxtuple = shorten.maxdict = shorten.maxset = 6
    shorten.maxlevel = 3
    text = shorten.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
