"""Typed, frozen config records from plain data: YAML files, dotted command-line overrides, type and range
checks that name the field (and whether the value came from the file or an override), and ``--help`` rows.

The records themselves (one per recipe) are in ``posttrain.config``; this module knows nothing of them
but the field names whose ranges it checks. It imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the field (and the file or the override) at fault.

    ``field`` is the dotted field path when known, so `load_config` can say whether the value came
    from the YAML file or from a command-line override; ``override`` marks an error in an override's
    own syntax."""

    def __init__(self, message: str, field: str | None = None, override: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.override = override


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line doc shown by ``--help``."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or a factory for mutable defaults")
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def dict_doc(text: str) -> Any:
    return field(default_factory=dict, metadata={"doc": text})


# ---------------------------------------------------------------------------------------------
# Building records from plain data


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the typed value."""
    origin = get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})", where)
    if tp is Any or (dataclasses.is_dataclass(tp) and isinstance(value, tp)):
        return value  # (a typed record: a nested default merged by _build, already checked when it was built)
    if origin is Literal:
        if value not in get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {_type_name(tp)}{hint}", where)
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError:
                continue
        raise bad
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            # A single string is accepted where a list of strings is expected: `report_to=wandb`.
            args = get_args(tp)
            if isinstance(value, str) and len(args) == 2 and args[1] is Ellipsis and args[0] is str:
                return tuple(s for s in (p.strip() for p in value.split(",")) if s)
            raise bad
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise ConfigError(f"{where}: unsupported annotation {tp!r}", where)


def _build(cls: type, data: Any, where: str) -> Any:
    shorthand = getattr(cls, "_shorthand", None)
    if shorthand and not isinstance(data, dict):
        data = {shorthand: data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping ({cls.__name__}), got {data!r}", where or None)
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    defaults = {f.name: _default_of(f) for f in dataclasses.fields(cls)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (valid: {', '.join(names)})", path)
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            # Partial nested mapping: start from the field's own default, not the class default.
            value = {**_asdict_shallow(defaults[key]), **value}
        kwargs[key] = _convert(value, tp, path)
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _asdict_shallow(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value", override=text)
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key", override=text)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads `3e-4` as a string; read it as a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def _set_path(data: dict, keys: list[str], value: Any, cls: type | None = None) -> None:
    """Set ``data[k1][k2]... = value``; a record written in its shorthand (``model: tiny``, ``critic:
    reward_model``) is first expanded into its mapping, so ``model.dtype=...`` keeps the path."""
    node = data
    for k in keys[:-1]:
        tp = _hints(cls).get(k) if cls is not None and dataclasses.is_dataclass(cls) else None
        cls = tp if dataclasses.is_dataclass(tp) else None
        child = node.get(k)
        if not isinstance(child, dict):
            shorthand = getattr(cls, "_shorthand", None) or "path"
            child = {} if child is None or not isinstance(child, str) else {shorthand: child}
            node[k] = child
        node = child
    node[keys[-1]] = value


def config_from_dict(cls: type, data: dict, overrides: list[str] = ()) -> Any:
    data = dict(data or {})
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value, cls)
    cfg = _build(cls, data, "")
    _check_ranges(cfg, "")
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist" if not p.exists() else f"config file {str(p)!r} is not a file"
        )
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); a config is a YAML text file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    return data


RUN_RECORD_KEYS = ("recipe", "world_size")  # what a run's config.yaml records besides the config itself


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = (), recipe: str | None = None) -> Any:
    """``cls`` from a YAML file and overrides. With ``recipe``, a run directory's ``config.yaml`` loads as
    the config it records (its ``recipe`` must be this one; ``world_size`` is a fact of that run)."""
    data = read_yaml(path) if path else {}
    if recipe is not None and isinstance(data, dict) and "recipe" in data:
        if data["recipe"] != recipe:
            raise ConfigError(
                f"{path}: this is the config of a {data['recipe']!r} run (its `recipe:` key); "
                f"run it with `posttrain {data['recipe']}`",
                "recipe",
            )
        data = {k: v for k, v in data.items() if k not in RUN_RECORD_KEYS}
    try:
        return config_from_dict(cls, data, overrides)
    except ConfigError as e:
        raise locate_error(e, path, overrides) from None


def _parts(dotted: str) -> list[str]:
    return [p for p in re.split(r"[.\[\]]+", dotted) if p and not p.isdigit()]


def locate_error(e: ConfigError, path: str | Path | None, overrides: Sequence[str]) -> ConfigError:
    """Name where the faulty value came from: the command-line override that set the field (or a
    section above it), else the YAML file."""
    if e.override is not None:
        return e
    text = str(e)
    field_path = e.field or (re.match(r"^([\w.\[\]]+):", text) or [None, None])[1]
    if field_path:
        fparts = _parts(field_path)
        for ov in reversed(list(overrides)):  # the last override of a key is the one in force
            key = ov.split("=", 1)[0].strip()
            kparts = _parts(key)
            n = min(len(kparts), len(fparts))
            if n and kparts[:n] == fparts[:n]:
                return ConfigError(f"override {ov!r}: {text}", e.field, ov)
    return ConfigError(f"{path}: {text}", e.field) if path else e


# Ranges by field name (every recipe's field of that name, so a new recipe's `steps` or `top_p` is
# checked without code of its own): (low, low inclusive, high, high inclusive), None = unbounded. Values
# a recipe would reject (or silently misuse) later fail at load time, naming the field.
_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "alpha": (0, False, None, False),
    "dropout": (0, True, 1, False),
    "eval_fraction": (0, True, 1, False),
    "num_examples": (0, True, None, False),
    "betas": (0, True, 1, False),
    "eps": (0, False, None, False),
    "min_lr_ratio": (0, True, 1, True),
    "max_grad_norm": (0, True, None, False),
    "seed": (0, True, 2**32 - 1, True),
    "keep_checkpoints": (0, True, None, False),
    "log_every": (0, True, None, False),
    "threads": (0, True, None, False),
    "reward_workers": (0, True, None, False),
    "top_p": (0, False, 1, True),
    "temperature": (0, True, None, False),
    "eval_examples": (1, True, None, False),
    "samples_every": (0, True, None, False),
    "examples": (0, True, None, False),
    "k": (0, True, None, False),
    "max_new_tokens": (1, True, None, False),
    "eval_k": (0, True, None, False),
    "limit": (0, True, None, False),
    "pairs_per_prompt": (1, True, None, False),
    "n": (2, True, None, False),
    # the clipped policy losses (losses/policy.py: eps_low in [0, 1), eps_high >= 0)
    "eps_low": (0, True, 1, False),
    "eps_high": (0, True, None, False),
    # importance weights (losses/importance.py: cap > 0; cap_low < cap is the record's own check)
    "rollout_is_cap": (0, False, None, False),
    "rollout_is_cap_low": (0, True, None, False),
    # preference losses (losses/preference.py: cDPO's flip rate in [0, 0.5); the term weights >= 0 or > 0)
    "label_smoothing": (0, True, 0.5, False),
    "rpo_alpha": (0, True, None, False),
    "simpo_gamma": (0, True, None, False),
    "orpo_lambda": (0, True, None, False),
    "kto_desirable_weight": (0, False, None, False),
    "kto_undesirable_weight": (0, False, None, False),
    "center_rewards_coefficient": (0, True, None, False),
    # PPO: GAE's discount and lambda, the critic's value clip
    "gamma": (0, True, 1, True),
    "lam": (0, True, 1, True),
    "value_clip": (0, True, None, False),
    # the diagnostics' thresholds are shares and ratios: outside (0, 1] a warning could never fire
    "collapse_share": (0, False, 1, True),
    "entropy_ratio": (0, False, 1, False),
    "zero_variance_frac": (0, False, 1, True),
    "rearm_margin": (0, True, 1, False),
    "flat_min_rise": (0, True, None, False),
    "truncation_share": (0, False, 1, True),
    "truncation_rise": (0, True, 1, True),
    # vLLM: a share of the GPU's memory, a size
    "gpu_memory_utilization": (0, False, 1, True),
    "kv_cache_gb": (0, True, None, False),
    # environments (EnvConfig): 0 means "derive it" or "never" where the field's doc says so
    "turn_tokens": (0, True, None, False),
    "max_tokens": (0, True, None, False),
    "max_tool_tokens": (0, True, None, False),
    "tool_timeout_s": (0, False, None, False),
    "max_tool_errors": (0, True, None, False),
    "episode_tokens": (0, True, None, False),
}
# Numeric fields that take any finite value, with the reason; every other numeric field of every recipe has a
# range above (tests/test_config.py checks that no field is left out).
UNBOUNDED = {
    "weight": "a reward's weight: negative is a penalty, 0 logs the reward only",
    "dual_clip": "0 (off) or > 1: the record's own check",
    "beta": "preference beta: None or > 0, the record's own check; RL beta: in _NON_NEGATIVE",
}
_POSITIVE = {
    "steps",
    "micro_batch_size",
    "grad_accum",
    "max_length",
    "num_generations",
    "prompts_per_step",
    "max_completion_length",
    "num_iterations",
    "max_gen_batches",
    "ppo_epochs",
    "num_mini_batches",
    "collapse_steps",
    "entropy_start_steps",
    "zero_variance_steps",
    "eval_drops",
    "rearm_steps",
    "flat_window",
    "truncation_window",
    "entropy_window",
    "max_turns",
    "workers",
}
_NON_NEGATIVE = {"lr", "weight_decay", "warmup_steps", "save_every", "eval_every", "beta", "r"}


def _range_text(lo, lo_in, hi, hi_in) -> str:
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo}"
    if lo is None:
        return f"{'<=' if hi_in else '<'} {hi}"
    return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def _check_value(path: str, name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"{path}: must be a finite number, got {v!r}", path)
    bounds = _RANGES.get(name)
    if name in _POSITIVE:
        bounds = (0, False, None, False)
    elif name in _NON_NEGATIVE:
        bounds = (0, True, None, False)
    if bounds is None:
        return
    lo, lo_in, hi, hi_in = bounds
    below = lo is not None and (v < lo or (v == lo and not lo_in))
    above = hi is not None and (v > hi or (v == hi and not hi_in))
    if below or above:
        raise ConfigError(f"{path}: must be {_range_text(lo, lo_in, hi, hi_in)}, got {v!r}", path)


def _check_ranges(cfg: Any, where: str) -> None:
    """Value checks that types cannot express; named so the error points at the field."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        path = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(v):
            _check_ranges(v, path)
        elif isinstance(v, tuple):
            for i, item in enumerate(v):
                if dataclasses.is_dataclass(item):
                    _check_ranges(item, f"{path}[{i}]")
                else:
                    _check_value(f"{path}[{i}]", f.name, item)
        else:
            _check_value(path, f.name, v)
    if hasattr(cfg, "check"):
        try:
            cfg.check()
        except ConfigError as e:
            # A record's own check names its fields relative to itself: prefix where it sits.
            if not where:
                raise
            raise ConfigError(f"{where}.{e}", f"{where}.{e.field}" if e.field else None) from None


def at_least(minimum: int):
    """An argparse ``type`` for a whole number >= ``minimum`` (a negative --limit silently dropped rows)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, doc) for every leaf field, for `--help`."""
    rows = []
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        tp = hints[f.name]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            sub = field_help(tp, name + ".")
            # Use this record's own default values for nested fields.
            sub = [(n, t, repr(to_dict(_dig(value, n[len(name) + 1 :]))), d) for n, t, _, d in sub]
            rows.extend(sub)
        else:
            rows.append((name, _type_name(tp), repr(to_dict(value)), f.metadata.get("doc", "")))
    return rows


def _dig(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
