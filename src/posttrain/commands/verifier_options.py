"""Verifier options on the command line, the same for `posttrain eval`, `audit-verifier` and `make-pairs`:
`--option key=value` (repeatable; a value that parses as JSON -- a number, a list, an object -- is taken as
such) and `--options FILE.yaml` (a mapping, as a config's `rewards[i].options`; `--option` wins over it)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from posttrain.config import ConfigError, read_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='a verifier option, e.g. labels=\'["a","b"]\' or schema=schema.json (JSON values parsed; repeatable)',
    )
    parser.add_argument(
        "--options", default="", metavar="FILE.yaml", help="verifier options as a YAML mapping (--option wins)"
    )


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value that parses as JSON (numbers, booleans, lists, objects) is taken as such."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options ``add_arguments`` declared, merged: the file's, then each --option."""
    options: dict[str, Any] = {}
    if args.options:
        data = read_yaml(args.options)
        if not isinstance(data, dict):
            raise ConfigError(f"{args.options}: verifier options must be a mapping of option -> value")
        options.update(data)
    options.update(parse_options(args.option))
    return options
