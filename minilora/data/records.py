"""JSONL records: read a file line by line (streaming), parse and validate each line, name its format.

One JSON object per line, one format per file (detected from the first valid record):

    alpaca             {"instruction": str, "input": str (optional), "output": str}
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    prompt_completion  {"prompt": str, "completion": str}
    text               {"text": str}

Every problem is a `DataError` located as `path:line: problem`, so the CLI can print one line that
points the user at what to fix; with `skip_bad_lines` a line's problem is collected instead.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from threading import Event

from minilora.errors import DataError

# Fields that identify each format (any of them present claims the record) and the required ones.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
ACCEPTED = (
    "alpaca {instruction, input (optional), output}, chat {messages}, "
    "prompt_completion {prompt, completion}, text {text}"
)
ROLES = ("user", "assistant", "system")


# Longest line read. Tokenizing costs memory in proportion to the text (a 50 MB line took about 10 GB),
# and even at --seq-len 32768 with a generous 256 bytes per token an example uses only 8 MiB of its text.
MAX_LINE_BYTES = 8 * 2**20


class BadLine(Exception):
    """A problem with one line; becomes a DataError (or a skipped line) once its line number is known."""


def _type_name(value) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _with_article(name: str) -> str:
    return name if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name


def _check_str(record: dict, key: str, where: str = "") -> None:
    value = record[key]
    if not isinstance(value, str):
        raise BadLine(f"{where}field '{key}' must be a string, got {_type_name(value)}")
    if not value.isascii():
        try:  # JSON's \ud800-style escapes can leave a lone surrogate, which no tokenizer accepts
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadLine(f"{where}field '{key}' holds a lone surrogate \\u{ord(value[e.start]):04x} at character "
                          f"{e.start + 1}, which is not text") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise BadLine(f"field 'messages' must be a list, got {_type_name(messages)}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadLine(f"messages[{i}] must be a JSON object, got {_with_article(_type_name(msg))}")
        for key in ("role", "content"):
            if key not in msg:
                raise BadLine(f"messages[{i}] is missing field '{key}'")
        if msg["role"] not in ROLES:
            raise BadLine(f"messages[{i}]: role {json.dumps(msg['role'])} is not one of {', '.join(ROLES)}")
        _check_str(msg, "content", f"messages[{i}]: ")
    if not any(msg["role"] == "assistant" for msg in messages):
        raise BadLine("no assistant message in 'messages', so there is nothing to train on")


def detect_format(record) -> str:
    """The format of one parsed JSON value, after checking its fields; raises BadLine."""
    if not isinstance(record, dict):
        raise BadLine(f"expected a JSON object, got {_with_article(_type_name(record))}")
    found = [fmt for fmt, keys in FORMAT_FIELDS.items() if any(k in record for k in keys)]
    if not found:
        got = ", ".join(sorted(record)) or "no fields"
        raise BadLine(f"no known fields (got: {got}); accepted formats: {ACCEPTED}")
    if len(found) > 1:
        raise BadLine(f"fields of several formats ({', '.join(found)}); use exactly one of: {ACCEPTED}")
    fmt = found[0]
    for key in REQUIRED_FIELDS[fmt]:
        if key not in record:
            raise BadLine(f"{fmt} record is missing field '{key}'")
    if fmt == "chat":
        _check_messages(record["messages"])
    else:
        for key in FORMAT_FIELDS[fmt]:
            # A null alpaca input is common in exported datasets and means "no input".
            if key in record and not (key == "input" and record[key] is None):
                _check_str(record, key)
    return fmt


def parse_line(line: bytes):
    """One line's JSON value (the line without its newline); raises BadLine."""
    if len(line) > MAX_LINE_BYTES:
        raise BadLine(f"the line is longer than the {MAX_LINE_BYTES // 2**20} MiB a line may hold; split the text "
                      "into several examples")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(
            f"not UTF-8: byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line; save the file as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(f"expected JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise BadLine("expected JSON: nested too deeply to read") from None
    except ValueError as e:  # past Python's digit limit for an integer (4,300 digits)
        raise BadLine(f"expected JSON: {str(e)[:120]}") from None


def check_record(line: bytes, lineno: int, fmt: str, first: int) -> dict:
    """The validated record on `line` of a file in format `fmt` (decided on line `first`); raises BadLine."""
    record = parse_line(line)
    line_fmt = detect_format(record)
    if line_fmt != fmt:
        raise BadLine(
            f"line {lineno} is {line_fmt} format but the file started as {fmt} (line {first}); use one format per file"
        )
    return record


def check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(path, None, "no such file")
    if path.is_dir():
        raise DataError(path, None, "is a directory, expected a JSONL file")
    if path.stat().st_size == 0:
        raise DataError(path, None, "the file is empty")


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) for every non-blank line, read in blocks.

    Split on b"\\n" before decoding so a bad byte is reported on its own line; a UTF-8 byte order mark
    at the start of the file is dropped. At most MAX_LINE_BYTES + 2 bytes of a line are kept.
    """
    with open(path, "rb") as f:
        lineno = 0
        while line := f.readline(MAX_LINE_BYTES + 2):  # bounded: an over-long line is not held whole
            lineno += 1
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(2**20)) and not rest.endswith(b"\n"):
                    pass  # the rest of the over-long line; parse_line refuses what was read of it
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            line = line.removesuffix(b"\n")
            if line.strip():
                yield lineno, line


def first_record(path: Path, skip_bad_lines: bool) -> tuple[str, int, list[tuple[int, str]]]:
    """(format, its line, lines skipped before it): the first valid line decides the file's format."""
    skipped = []
    for lineno, line in iter_lines(path):
        try:
            return detect_format(parse_line(line)), lineno, skipped
        except BadLine as bad:
            if not skip_bad_lines:
                raise DataError(path, lineno, str(bad)) from None
            skipped.append((lineno, str(bad)))
    if not skipped:
        raise DataError(path, None, "the file has only blank lines")
    raise no_valid_line(path, skipped)


def first_bad_line(path: Path, fmt: str, first: int, stop: Event | None = None) -> tuple[int, str] | None:
    """(line, problem) of the first line from `first` on that `check_record` refuses; None if every line
    is valid (or `stop` was set before the end)."""
    for lineno, line in iter_lines(path):
        if stop is not None and stop.is_set():
            return None
        if lineno < first:
            continue
        try:
            check_record(line, lineno, fmt, first)
        except BadLine as bad:
            return lineno, str(bad)
    return None


def no_valid_line(path: Path, skipped: list[tuple[int, str]]) -> DataError:
    line, reason = skipped[0]
    return DataError(path, None, f"no valid line: all {len(skipped)} were skipped (first, line {line}: {reason})")


def read_records(path, skip_bad_lines: bool = False) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """Parse and validate a JSONL file: ([(line, record)], [(line, why skipped)]), lines 1-based.

    File-level problems always raise; per-line ones raise unless `skip_bad_lines`, which collects them.
    Holds every record: for inspecting small files (training streams the file instead).
    """
    path = Path(path)
    check_file(path)
    fmt, first, skipped = first_record(path, skip_bad_lines)
    records = []
    for lineno, line in iter_lines(path):
        if lineno < first:
            continue
        try:
            records.append((lineno, check_record(line, lineno, fmt, first)))
        except BadLine as bad:
            if not skip_bad_lines:
                raise DataError(path, lineno, str(bad)) from None
            skipped.append((lineno, str(bad)))
    return records, skipped
