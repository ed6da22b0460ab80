"""metrics.jsonl: one JSON line per optimizer step and per evaluation, appended as the run goes.

An append cut short (disk full, power loss) leaves a last line without its newline, or with bytes
that do not parse. Readers drop that line, and a resume rewrites the file without it, so it never
blocks a resume. Every line is strict JSON: a number that is not finite is written as null.
"""

import json
import math
from pathlib import Path

from minilora.atomic import atomic_write_text, writing
from minilora.errors import UserError

METRICS_NAME = "metrics.jsonl"


def finite_or_null(value):
    """`value` with every non-finite float replaced by null: strict JSON has no NaN or Infinity (Python's
    json would write bare `NaN`, which other readers reject), and a null says "no number" plainly."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def metric_line(record: dict) -> str:
    return json.dumps(finite_or_null(record), allow_nan=False) + "\n"


def append_metric(path: str | Path, record: dict) -> None:
    line = metric_line(record)
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(line)  # one write per line: a crash can only tear the last one


def read_metrics(path: str | Path) -> list[dict]:
    """The records in the file. The last line is dropped if it does not parse (a torn append, whether
    or not its newline made it to disk); a bad line before it is damage, reported as an error."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip("\x00 \t"):
        lines.pop()  # a power cut can leave the tail zero-filled
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise UserError(f"{path}:{number}: not a JSON line; remove or repair it and run again") from None
    return records


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep the records up to `step` (a resume writes the later ones again) and drop a torn last line."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(metric_line(r) for r in kept))
