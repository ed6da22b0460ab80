"""Training data: read a JSONL file, validate it line by line, tokenize with a loss mask on responses.

One JSON object per line, one format per file (detected from the first record):

    alpaca             {"instruction": str, "input": str (optional), "output": str}
    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    prompt_completion  {"prompt": str, "completion": str}
    text               {"text": str}

Every problem is a `DataError` located as `path:line: problem`, so the CLI can print one line that
points the user at what to fix. Labels are `IGNORE_INDEX` wherever no loss is taken (prompts, system
and user turns); `text` trains on every token.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from minilora.data.batching import IGNORE_INDEX, seeded_permutation
from minilora.errors import DataError, UserError

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

# Used for alpaca records when the tokenizer has no chat template (the Stanford Alpaca layout).
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class _BadLine(Exception):
    """A problem with one line; becomes a DataError (or a skipped line) once its line number is known."""


def _type_name(value) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _with_article(name: str) -> str:
    return name if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name


def _check_str(record: dict, key: str, where: str = "") -> None:
    if not isinstance(record[key], str):
        raise _BadLine(f"{where}field '{key}' must be a string, got {_type_name(record[key])}")


def _check_messages(messages) -> None:
    if not isinstance(messages, list):
        raise _BadLine(f"field 'messages' must be a list, got {_type_name(messages)}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _BadLine(f"messages[{i}] must be a JSON object, got {_with_article(_type_name(msg))}")
        for key in ("role", "content"):
            if key not in msg:
                raise _BadLine(f"messages[{i}] is missing field '{key}'")
        if msg["role"] not in ROLES:
            raise _BadLine(f"messages[{i}]: role {json.dumps(msg['role'])} is not one of {', '.join(ROLES)}")
        _check_str(msg, "content", f"messages[{i}]: ")
    if not any(msg["role"] == "assistant" for msg in messages):
        raise _BadLine("no assistant message in 'messages', so there is nothing to train on")


def detect_format(record) -> str:
    """The format of one parsed JSON value, after checking its fields; raises _BadLine."""
    if not isinstance(record, dict):
        raise _BadLine(f"expected a JSON object, got {_with_article(_type_name(record))}")
    found = [fmt for fmt, keys in FORMAT_FIELDS.items() if any(k in record for k in keys)]
    if not found:
        got = ", ".join(sorted(record)) or "no fields"
        raise _BadLine(f"no known fields (got: {got}); accepted formats: {ACCEPTED}")
    if len(found) > 1:
        raise _BadLine(f"fields of several formats ({', '.join(found)}); use exactly one of: {ACCEPTED}")
    fmt = found[0]
    for key in REQUIRED_FIELDS[fmt]:
        if key not in record:
            raise _BadLine(f"{fmt} record is missing field '{key}'")
    if fmt == "chat":
        _check_messages(record["messages"])
    else:
        for key in FORMAT_FIELDS[fmt]:
            # A null alpaca input is common in exported datasets and means "no input".
            if key in record and not (key == "input" and record[key] is None):
                _check_str(record, key)
    return fmt


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(path, None, "no such file")
    if path.is_dir():
        raise DataError(path, None, "is a directory, expected a JSONL file")
    raw = path.read_bytes()
    if not raw:
        raise DataError(path, None, "the file is empty")
    return raw


def _parse_line(line: bytes):
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadLine(
            f"not UTF-8: byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line; save the file as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadLine(f"expected JSON: {e.msg} (column {e.colno})") from None


def _parse(path: Path, raw: bytes, skip_bad_lines: bool):
    records, skipped = [], []
    fmt = first = None
    # Split on b"\n" before decoding so a bad byte is reported on its own line.
    for lineno, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = _parse_line(line)
            line_fmt = detect_format(record)
            if fmt is None:
                fmt, first = line_fmt, lineno
            elif line_fmt != fmt:
                raise _BadLine(
                    f"line {lineno} is {line_fmt} format but the file started as {fmt} (line {first}); "
                    "use one format per file"
                )
        except _BadLine as bad:
            if not skip_bad_lines:
                raise DataError(path, lineno, str(bad)) from None
            skipped.append((lineno, str(bad)))
            continue
        records.append((lineno, record))
    if not records and not skipped:
        raise DataError(path, None, "the file has only blank lines")
    if not records:
        line, reason = skipped[0]
        raise DataError(path, None, f"no valid line: all {len(skipped)} were skipped (first, line {line}: {reason})")
    return records, skipped


def read_records(path, skip_bad_lines: bool = False) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """Parse and validate a JSONL file: ([(line, record)], [(line, why skipped)]), lines 1-based.

    File-level problems always raise; per-line ones raise unless `skip_bad_lines`, which collects them.
    """
    path = Path(path)
    return _parse(path, _read_bytes(path), skip_bad_lines)


# --- tokenization -------------------------------------------------------------------------------


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[list[int], bool]]:
    """Split the rendered conversation into (ids, trained) pieces; assistant turns are trained.

    A turn's span starts where `messages[:i]` + generation prompt ends and stops where `messages[:i+1]`
    ends. Both are measured as common token prefixes with the full rendering, because templates may
    append tokens only after the final turn (Phi-3's eos) and BPE may merge across a boundary.
    """

    def render(msgs, gen):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        # The template writes bos itself; letting the tokenizer add it again would double it.
        return _encode(tokenizer, text, special=False)

    full = render(messages, False)
    segments, pos = [], 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        start = _common_prefix(prefix, full)
        end = _common_prefix(render(messages[: i + 1], False), full)
        # A divergence of more than one boundary token means the template re-renders history
        # differently once a turn is added; the span is then unknown and the turn is left untrained.
        if start < len(prefix) - 1 or end <= max(start, pos):
            continue
        start = max(start, pos)
        segments += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segments.append((full[pos:], False))
    return segments


def alpaca_messages(record: dict) -> list[dict]:
    """An alpaca record as a user/assistant exchange: instruction, blank line, input (if any)."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _segments(record: dict, fmt: str, tokenizer) -> list[tuple[list[int], bool]]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "text":
        return [(_with_eos(tokenizer, _encode(tokenizer, record["text"], special=True)), True)]
    if fmt == "chat" or (fmt == "alpaca" and has_template):
        if not has_template:
            raise UserError("chat-format data needs a tokenizer with a chat template, and this one has none")
        return _chat_segments(record["messages"] if fmt == "chat" else alpaca_messages(record), tokenizer)
    if fmt == "alpaca":
        template = PLAIN_PROMPT_WITH_INPUT if record.get("input") else PLAIN_PROMPT
        prompt, response = template.format(**record), record["output"]
    elif fmt == "prompt_completion":
        prompt, response = record["prompt"], record["completion"]
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    return [
        (_encode(tokenizer, prompt, special=True), False),
        (_with_eos(tokenizer, _encode(tokenizer, response, special=False)), True),
    ]


def tokenize_record(record: dict, fmt: str, tokenizer, seq_len: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels copy the ids on trained tokens, IGNORE_INDEX elsewhere.

    Labels are aligned with input_ids (not shifted); the loss shifts them. Cut to `seq_len` tokens.
    """
    input_ids, labels = [], []
    for ids, trained in _segments(record, fmt, tokenizer):
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids[:seq_len], labels[:seq_len], len(input_ids) > seq_len


def prompt_ids(record: dict, fmt: str, tokenizer) -> list[int]:
    """The tokens a model is given to generate the record's (last) response, rendered as in training."""
    if fmt == "text":
        raise ValueError("a text record has no prompt")
    segments = _segments(record, fmt, tokenizer)
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    return [t for ids, _ in segments[:last] for t in ids]


# --- datasets -----------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids, IGNORE_INDEX where no loss
    line: int  # 1-based line in the source file

    @property
    def n_targets(self) -> int:
        # labels[0] is never predicted: the loss shifts labels left by one.
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class Dataset:
    path: str
    fmt: str
    examples: list[Example]
    n_lines: int  # non-blank lines in the file (kept + skipped + dropped)
    n_truncated: int  # kept examples cut to seq_len
    n_dropped: int  # examples with no target token left after truncation
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) with skip_bad_lines
    sha256: str = ""  # of the file's bytes, recorded with checkpoints to detect a changed file on resume
    n_tokens: int = 0
    n_target_tokens: int = 0


def load_dataset(path, tokenizer, seq_len: int, skip_bad_lines: bool = False) -> Dataset:
    """Read, validate and tokenize a JSONL file into examples of at most `seq_len` tokens."""
    path = Path(path)
    raw = _read_bytes(path)
    records, skipped = _parse(path, raw, skip_bad_lines)
    fmt = detect_format(records[0][1])
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(path, None, "chat-format data needs a tokenizer with a chat template, and this one has none")
    examples, n_truncated, n_dropped = [], 0, 0
    for line, record in records:
        input_ids, labels, truncated = tokenize_record(record, fmt, tokenizer, seq_len)
        example = Example(input_ids, labels, line)
        if example.n_targets == 0:
            n_dropped += 1
            continue
        n_truncated += truncated
        examples.append(example)
    if not examples:
        raise DataError(
            path,
            None,
            f"no example has a response token within --seq-len {seq_len} (the prompts are too long); "
            "raise --seq-len or shorten the prompts",
        )
    return Dataset(
        path=str(path),
        fmt=fmt,
        examples=examples,
        n_lines=len(records) + len(skipped),
        n_truncated=n_truncated,
        n_dropped=n_dropped,
        skipped=skipped,
        sha256=hashlib.sha256(raw).hexdigest(),
        n_tokens=sum(len(e.input_ids) for e in examples),
        n_target_tokens=sum(e.n_targets for e in examples),
    )


def split_eval(examples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval), a seeded split that keeps file order inside each part.

    With a fraction > 0 and at least 2 examples, eval gets at least one example and train keeps one.
    """
    if not 0 <= eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = 0 if eval_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    eval_idx = set(seeded_permutation(n, f"split:{seed}")[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    return train, [e for i, e in enumerate(examples) if i in eval_idx]
