"""`posttrain eval`: greedy accuracy, pass@k, maj@k and mean@k of a model directory with a verifier."""

from __future__ import annotations

import argparse
from pathlib import Path

from posttrain.commands import verifier_options
from posttrain.config import ConfigError, EnvConfig, at_least, config_from_dict, is_data_file
from posttrain.evaluation import evaluate_model_dir, format_summary
from posttrain.runtime.files import atomic_write_json


def main(argv: list[str]) -> int:
    """posttrain eval --model DIR --data FILE --verifier NAME [-k 8] [--temperature 1.0] [--env calculator]
    [--json OUT]"""
    p = argparse.ArgumentParser(prog="posttrain eval", description=main.__doc__)
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--data", required=True, help="prompt rows with the verifier's columns (e.g. answer)")
    p.add_argument(
        "--split",
        default=None,
        help="split of a dataset directory / hub dataset / builtin task (default: test); a single file has none",
    )
    p.add_argument("--verifier", default="math", help="built-in verifier name or pkg.module:function")
    verifier_options.add_arguments(p)
    p.add_argument("-k", type=at_least(0), default=0, help="samples per prompt for pass@k / maj@k / mean@k")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--limit", type=at_least(0), default=0, help="evaluate the first N rows only")
    p.add_argument("--json", default="", help="write the summary here")
    p.add_argument("--engine", default="native", choices=["native", "vllm"], help="rollout engine")
    p.add_argument(
        "--env",
        default="",
        help="answer in multi-turn episodes in this environment (calculator | python | tools | guess_number | "
        "module:name); the verifier scores each episode's last turn",
    )
    p.add_argument(
        "--env-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an EnvConfig field (max_turns=3, parser=hermes, turn_tokens=96) or options.KEY=VALUE for the "
        "environment's own options; repeatable",
    )
    p.add_argument("--max-length", type=at_least(0), default=0, help="with --env: most tokens of an episode")
    a = p.parse_args(argv)
    env = None
    if a.env:
        try:
            env = config_from_dict(EnvConfig, {"name": a.env}, a.env_option)
        except ConfigError as e:
            p.error(f"--env-option: {e}")
    elif a.env_option:
        p.error("--env-option needs --env")
    if a.split is not None and is_data_file(a.data):
        p.error(f"--split {a.split!r} cannot apply to the file {a.data!r}: a single file has no splits")
    s = evaluate_model_dir(
        a.model,
        a.data,
        split=a.split or "test",
        limit=a.limit,
        verifier=a.verifier,
        verifier_options=verifier_options.from_args(a),
        k=a.k,
        temperature=a.temperature,
        max_new_tokens=a.max_new_tokens,
        engine=a.engine,
        env=env,
        max_length=a.max_length,
    )
    print(format_summary(s))
    if a.json:
        atomic_write_json(Path(a.json), s.to_json())
    return 0
