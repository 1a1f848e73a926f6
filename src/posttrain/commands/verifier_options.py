"""Verifier options on the command line, the same for `posttrain eval`, `audit-verifier` and `make-pairs`:
`--option key=value` (repeatable; a value that parses as JSON -- a number, a list, an object -- is taken as
such) and `--options FILE.yaml` (a mapping, as a config's `rewards[i].options`; `--option` wins over it)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from posttrain.config import ConfigError, read_yaml


def add_arguments(parser: argparse.ArgumentParser, flag: str = "option", what: str = "verifier") -> None:
    """``--option`` / ``--options`` (or ``--{flag}`` / ``--{flag}s``, e.g. make-pairs' ``--judge-option``)."""
    example = 'labels=\'["a","b"]\' or schema=schema.json' if what == "verifier" else "template=judge.txt"
    parser.add_argument(
        f"--{flag}",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a {what} option, e.g. {example} (JSON values parsed; repeatable)",
    )
    parser.add_argument(
        f"--{flag}s", default="", metavar="FILE.yaml", help=f"{what} options as a YAML mapping (--{flag} wins)"
    )


def parse_options(pairs: list[str], flag: str = "option") -> dict[str, Any]:
    """`key=value` pairs; a value that parses as JSON (numbers, booleans, lists, objects) is taken as such."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--{flag} expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def from_args(args: argparse.Namespace, flag: str = "option", what: str = "verifier") -> dict[str, Any]:
    """The options ``add_arguments`` declared, merged: the file's, then each --option."""
    dest = flag.replace("-", "_")
    options: dict[str, Any] = {}
    path = getattr(args, f"{dest}s")
    if path:
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: {what} options must be a mapping of option -> value")
        options.update(data)
    options.update(parse_options(getattr(args, dest), flag))
    return options
