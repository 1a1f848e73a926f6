"""Environments and tools for multi-turn (tool-using) RL: the environment API (``base``), tools as typed
functions (``tools.Toolbox``), the built-in tools (an exact calculator, python in the code sandbox), tool-call
parsers (hermes, llama3_json, code), the generic ``ToolEnv``, built-in games, ``env_factory`` (by name or
"module:name"), and the multi-turn driver that runs episodes through them (``episode``, ``chat``, ``runner``).

    make_env = envs.env_factory("tools", {"tools": ["calculator", "python"], "parser": "hermes", "timeout": 5})
    env = make_env()                                  # one per trajectory
    messages = env.reset(row)                         # tokenizer.apply_chat_template(messages, tools=env.tools)
    out = env.step(envs.get_parser("hermes").parse(policy_text))

The trainer owns tokenization; an environment sees and returns chat messages only.

May import: rollout, rewards, models, data, config, runtime, tasks; never run, evaluation, rl, recipes or above.
"""

from posttrain.envs.base import STOP_REASONS, Environment, ParsedTurn, StepResult, ToolCall
from posttrain.envs.builtin import PythonTool, calculator
from posttrain.envs.episode import Budgets, Episode, run_episodes
from posttrain.envs.games import GuessNumberEnv
from posttrain.envs.parsers import PARSERS, ToolParser, get_parser
from posttrain.envs.registry import BUILTIN_ENVS, env_factory
from posttrain.envs.runner import EpisodeRunner, turn_stop_ids
from posttrain.envs.tool_env import ToolEnv
from posttrain.envs.tools import Tool, Toolbox, ToolError, ToolResult, ToolTimeout

__all__ = [
    "BUILTIN_ENVS",
    "PARSERS",
    "STOP_REASONS",
    "Budgets",
    "Environment",
    "Episode",
    "EpisodeRunner",
    "GuessNumberEnv",
    "ParsedTurn",
    "PythonTool",
    "StepResult",
    "Tool",
    "ToolCall",
    "ToolEnv",
    "ToolError",
    "ToolParser",
    "ToolResult",
    "ToolTimeout",
    "Toolbox",
    "calculator",
    "env_factory",
    "get_parser",
    "run_episodes",
    "turn_stop_ids",
]
