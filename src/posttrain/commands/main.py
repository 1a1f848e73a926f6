"""`posttrain <command>`: parse, load the config, call a recipe or a command module. Nothing else lives here.

A recipe's or command's module is imported only when it runs (``importlib`` below), so ``posttrain --help``
and a config error never import torch.

Every failure reaches the user as one message, never a traceback: `--debug` (anywhere on the command
line) or POSTTRAIN_DEBUG=1 lets the exception through with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

from posttrain.config import PREFERENCE_LOSSES, RECIPE_CONFIGS, ConfigError, load_config, recipe_help
from posttrain.data.io import DataError
from posttrain.rewards.base import VerifierError
from posttrain.rewards.registry import VerifierLoadError, add_search_dir
from posttrain.runtime.errors import ModelError, NonFiniteError, ReportError, RunDirError, TrackingError
from posttrain.runtime.files import describe_write_error
from posttrain.runtime.launch import is_main_process

# recipe name -> module whose train(cfg) runs it; configs come from posttrain.config.RECIPE_CONFIGS
RECIPES: dict[str, str] = {
    "pretrain": "posttrain.recipes.pretrain",
    "sft": "posttrain.recipes.sft",
    "grpo": "posttrain.recipes.grpo",
    "preference": "posttrain.recipes.preference",
    "reward_model": "posttrain.recipes.reward_model",
    "ppo": "posttrain.recipes.ppo",
}

# shorthand recipes: name -> (recipe, overrides put before the user's own)
ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: ("preference", (f"loss={name}",)) for name in PREFERENCE_LOSSES},
    "reward-model": ("reward_model", ()),
}

# other commands -> "module:function" taking argv and returning an exit code
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("posttrain.commands.demo:main", "run the built-in demo end to end on a tiny model"),
    "eval": ("posttrain.commands.eval:main", "greedy accuracy, pass@k, maj@k, mean@k of a model with a verifier"),
    "pipeline": (
        "posttrain.commands.pipeline:main",
        "run stages (pretrain -> sft -> dpo -> grpo) with evaluation between them",
    ),
    "report": (
        "posttrain.commands.report:main",
        "write RUN_DIR/report.html: curves, per-stage accuracy, samples, configs",
    ),
    "audit-verifier": ("posttrain.commands.audit:main", "probe a verifier with gold and adversarial completions"),
    "make-pairs": (
        "posttrain.commands.make_pairs:main",
        "sample completions, score them with a verifier, write preference pairs",
    ),
    "plan": (
        "posttrain.commands.plan:main",
        "will it fit? per-GPU memory by component and the cheapest configuration that fits",
    ),
}


DEBUG_ENV = "POSTTRAIN_DEBUG"


def _expected_errors() -> tuple[type, ...]:
    """Failures whose message says all a user needs (what, where, what to do)."""
    return (
        DataError,
        ModelError,
        NonFiniteError,
        TrackingError,
        RunDirError,
        VerifierError,
        VerifierLoadError,
        ReportError,
        FileNotFoundError,
    )


def guarded(command: str, fn: Callable[[], int], where: str | None = None, debug: bool = False) -> int:
    """Run ``fn`` and turn any exception into one line on stderr and an exit status: 2 for a config
    error, 130 for Ctrl-C, 1 otherwise. ``where`` (the output directory) names the place a failed write
    went to when the error itself does not. ``debug`` (or $POSTTRAIN_DEBUG) lets exceptions through."""
    if debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return fn()
    try:
        return fn()
    except ConfigError as e:
        print(f"posttrain {command}: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"posttrain {command}: interrupted (rerunning a recipe with train.resume=auto continues from its newest "
            f"checkpoint)",
            file=sys.stderr,
        )
        return 130
    except _expected_errors() as e:
        print(f"posttrain {command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence: a message, not a traceback
        storage = describe_write_error(e, where or Path.cwd())
        if storage is not None:
            print(f"posttrain {command}: error: {storage}", file=sys.stderr)
        elif isinstance(e, OSError):
            print(f"posttrain {command}: error: {e}", file=sys.stderr)
        else:
            print(
                f"posttrain {command}: error: {type(e).__name__}: {e}\n(unexpected: rerun with --debug or "
                f"{DEBUG_ENV}=1 for the traceback, and report it if it looks like a bug)",
                file=sys.stderr,
            )
        return 1


def run_recipe(name: str, argv: list[str], preset: tuple[str, ...] = (), debug: bool = False) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(recipe_help(name))
        return 0
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = [*preset, *(argv[1:] if path else argv)]
    try:
        cfg = load_config(RECIPE_CONFIGS[name], path, overrides, recipe=name)
    except ConfigError as e:
        print(f"posttrain {name}: config error: {e}", file=sys.stderr)
        return 2
    if path:
        add_search_dir(Path(path).resolve().parent)  # `module:function` rewards next to the config file

    def run() -> int:
        out = importlib.import_module(RECIPES[name]).train(cfg)
        if is_main_process():  # under torchrun: one line for the run, not one per rank
            print(f"posttrain {name}: finished; model at {out}")
        return 0

    return guarded(name, run, cfg.train.output_dir, debug)


def _load(target: str) -> Callable[[list[str]], int]:
    mod, fn = target.split(":")
    return getattr(importlib.import_module(mod), fn)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=[*RECIPES, *ALIASES, *COMMANDS], help="a recipe or a command")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        print("\nrecipes:  " + ", ".join(RECIPES) + "   (posttrain RECIPE --help lists every config field)")
        print("aliases:  " + ", ".join(f"{a} = {r} {' '.join(o)}" for a, (r, o) in ALIASES.items()))
        for cmd, (_, text) in COMMANDS.items():
            print(f"  {cmd:<16} {text}")
        print(f"\n--debug (anywhere on the line) or {DEBUG_ENV}=1: show an error's traceback instead of its message")
        return 0
    if argv[0] not in RECIPES and argv[0] not in ALIASES and argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints the choices and exits 2
    if argv[0] in RECIPES:
        return run_recipe(argv[0], argv[1:], debug=debug)
    if argv[0] in ALIASES:
        recipe, preset = ALIASES[argv[0]]
        return run_recipe(recipe, argv[1:], preset, debug)
    fn = _load(COMMANDS[argv[0]][0])
    return guarded(argv[0], lambda: int(fn(argv[1:]) or 0), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
