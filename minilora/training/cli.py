"""`train.py`'s command line: flags generated from TrainConfig and an optional YAML/TOML config file.
Failures become one `error:` line and an exit code in minilora/cli_runner.py."""

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from minilora.cli_runner import run_cli
from minilora.errors import UserError, shown
from minilora.training.config import TrainConfig, validate

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few dozen keys; more is a mistake (or hostile)
# A config is a mapping of scalars and one list. For every token, PyYAML's pure-Python scanner walks the
# possible key of each open `[`/`{` level within 1,024 characters (yaml/scanner.py,
# stale_possible_simple_keys): about 2 ms a level on a 2-core CPU, 5,000 levels 11 s, 10,000 21 s, so a
# 1 MiB file of `[` would take over half an hour to refuse. The event pass stops at this depth instead.
MAX_CONFIG_DEPTH = 32
# Keys that other trainers' configs use (transformers' `gradient_checkpointing`), with minilora's names for
# them: the error points there instead of only saying "unknown".
OTHER_NAMES = {"gradient_checkpointing": "recompute (none: no recompute) and recompute_every",
               "grad_checkpointing": "recompute (none: no recompute) and recompute_every",
               "checkpoint_every": "recompute_every"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="QLoRA fine-tuning: a LoRA adapter for a 4-bit base model, in PEFT's format.",
        argument_default=argparse.SUPPRESS,  # so we know which flags were given explicitly
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or TOML file with the same keys as the flags (flags win)")
    for f in dataclasses.fields(TrainConfig):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        help_text = f"{meta['help']} (default: {_default(f)})"
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        elif f.name == "targets":
            parser.add_argument(flag, dest=f.name, nargs="+", metavar="NAME", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_flag_type(f), choices=meta.get("choices"), help=help_text)
    return parser


def _default(f: dataclasses.Field):
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return ",".join(value) if isinstance(value, list) else value


def _type(f: dataclasses.Field) -> Callable:
    return {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)


def _flag_type(f: dataclasses.Field) -> Callable:
    """The flag's parser; a refusal quotes the text shortened (argparse would print all of it)."""
    kind = _type(f)
    if kind is str:
        return str

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {shown(text)}") from None

    parse.__name__ = kind.__name__
    return parse


def read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such config file (--config)")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: {p.stat().st_size:,} bytes is not a config file (at most {MAX_CONFIG_BYTES:,})")
    try:
        text = p.read_text(encoding="utf-8")
        values = tomllib.loads(text) if p.suffix == ".toml" else _load_yaml(path, text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{path}: cannot parse ({str(err).splitlines()[0][:200]})") from err
    except RecursionError as err:
        raise UserError(f"{path}: cannot parse (nested too deeply)") from err
    except ValueError as err:  # an integer past Python's digit limit (4,300 digits)
        raise UserError(f"{path}: cannot parse ({str(err)[:120]})") from err
    values = values or {}
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in OTHER_NAMES:
            raise UserError(f"{path}: key {shown(key)}: minilora calls it {OTHER_NAMES[name]}")
        if name not in known:
            raise UserError(f"{path}: unknown key {shown(key)}")
        out[name] = _coerce(path, name, value, known[name])
    return out


def _load_yaml(path: str, text: str):
    """The YAML document, refusing aliases (`*name`) before anything is built: flags need none, and a few
    hundred bytes of nested aliases expand to gigabytes wherever the value is walked or printed; and
    refusing nesting past MAX_CONFIG_DEPTH as soon as the parser reaches it."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise UserError(f"{path}: uses a YAML alias (*{event.anchor[:40]}); write each value out")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise UserError(f"{path}, line {event.start_mark.line + 1}: cannot parse (nested more than "
                                f"{MAX_CONFIG_DEPTH} deep)")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.safe_load(text)


def _coerce(path: str, name: str, value, f: dataclasses.Field):
    """The value as the field's type, refusing any conversion that could change what the user meant
    (3.7 for an int, null or a number for a string); an int is a fine float."""
    if name == "targets":
        value = value.split(",") if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise UserError(f"{path}: 'targets' must be a list of module names, got {shown(value)}")
        return value
    kind = _type(f) if f.type not in (bool, "bool") else bool
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
        raise UserError(f"{path}: '{name}' must be {_TYPE_WORDS[kind]}, got {shown(value)}")
    return kind(value)


_TYPE_WORDS = {bool: "true or false", int: "int", float: "float", str: "str"}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    values = read_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    if "targets" in values:  # accept both `--targets a b` and `--targets a,b`
        values["targets"] = [t for item in values["targets"] for t in item.split(",") if t]
    cfg = TrainConfig(**values)
    validate(cfg, explicit=set(values))
    return cfg


def run(argv: list[str] | None = None) -> int:
    """train.py's whole command line; returns the exit code."""

    def entry(args: list[str] | None) -> int:
        cfg = parse_config(args)  # --help and flag errors end here, before torch is imported
        from minilora.training.job import train_from_config

        return train_from_config(cfg)

    return run_cli(entry, argv)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))
