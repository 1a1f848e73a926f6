"""``EpisodeRunner``: an ``EnvConfig`` made runnable -- the environment factory, the tool-call parser, the budgets,
the turn's stop token and the thread pool the environments step on. What the RL round and the evaluation call."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Sequence

from posttrain.config import EnvConfig
from posttrain.envs.episode import Budgets, Episode, run_episodes
from posttrain.envs.parsers import get_parser
from posttrain.envs.registry import env_factory
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.session import open_session

BUILTIN_TOOL_ENVS = ("tools", "calculator", "python")  # the built-in environments that read tool calls
_TURN_END = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


def turn_stop_ids(tok, stop_token: str = "auto") -> tuple[int, ...]:
    """The token that ends a policy turn: ``stop_token``, or (auto) the first of ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, Gemma's <end_of_turn> the tokenizer knows; none of them: EOS alone (returns ())."""
    names = _TURN_END if stop_token == "auto" else (stop_token,)
    for name in names:
        tid = tok.convert_tokens_to_ids(name)
        if tid is not None and tid != tok.unk_token_id and tok.convert_ids_to_tokens(tid) == name:
            return (tid,)
    if stop_token != "auto":
        raise ValueError(f"env.stop_token: {stop_token!r} is not a single token of the tokenizer")
    return ()


class EpisodeRunner:
    def __init__(self, cfg: EnvConfig, tok, *, context: int, turn_tokens: int):
        self.cfg, self.tok, self.name = cfg, tok, cfg.name
        options = dict(cfg.options)
        if cfg.parser != "auto" and cfg.name in BUILTIN_TOOL_ENVS:  # a user's spec takes it in its options
            options.setdefault("parser", cfg.parser)
        self.make_env = env_factory(cfg.name, options)
        # An environment that reads tool calls has its own parser (ToolEnv); the others' turns are read as text.
        self.parser = get_parser(cfg.parser if cfg.parser != "auto" else "hermes")
        self.stop_ids = turn_stop_ids(tok, cfg.stop_token)
        self.budgets = Budgets(
            max_turns=cfg.max_turns,
            turn_tokens=cfg.turn_tokens or turn_tokens,
            max_tokens=cfg.max_tokens or context,
            context=context,
            max_tool_tokens=cfg.max_tool_tokens,
            tool_timeout_s=cfg.tool_timeout_s,
            on_timeout=cfg.on_timeout,
            max_tool_errors=cfg.max_tool_errors,
            history=cfg.history,
        )
        self.pool = cf.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="posttrain-env")

    def run(
        self,
        engine,
        rows: Sequence[dict],
        n: int,
        params: SamplingParams,
        seeds: Callable[[int], Sequence[int]] | None = None,
    ) -> list[Episode]:
        """``n`` episodes per row on ``engine`` (a turn session on it: KV reuse on the native engine)."""
        session = open_session(engine, reuse_kv=self.cfg.reuse_kv)
        try:
            return run_episodes(
                session, self.tok, self.make_env, self.parser, rows, n, params, self.budgets, seeds, self.pool
            )
        finally:
            session.close()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
