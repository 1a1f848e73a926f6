"""Multi-turn episodes: the policy and an environment take turns until one of them stops.

    for each trajectory: messages = env.reset(row); buffer = the prompt's tokens
    repeat (all live trajectories together):
        the policy samples one turn per trajectory (one batched call on a turn session: KV cache reused)
        each turn is parsed (tool calls, parse errors) and handed to its environment; the environments of
        the live trajectories step concurrently on a thread pool (one trajectory's steps stay in order)
        the observation is rendered as the chat template's delta and appended to the buffer as env tokens

Budgets, checked before every generation and every append: ``max_turns`` policy turns, ``turn_tokens`` new
tokens per turn, ``max_tokens`` tokens after the prompt (sampled and environment tokens both count), and the
model's ``context``. Each episode ends with one ``stop_reason`` (base.STOP_REASONS): done (the environment
said so: e.g. a final answer without tool calls), max_turns, length (a turn or the trajectory budget ran out),
context (the model's context would overflow), tool_error (``max_tool_errors`` reached), timeout (a step ran
past ``tool_timeout_s`` with ``on_timeout: end``). An observation that would not fit is not appended (the
episode ends as it is, never cut mid-observation). Tool output is cut to ``max_tool_tokens`` tokens (head and
tail kept, a marker between) before it is rendered, so it counts against the budget at its cut size.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.tokenize import text_ids
from posttrain.envs.base import TRUNCATED_STOPS, Environment, ParsedTurn, StepResult
from posttrain.envs.chat import ChatTrack
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.trajectory import Trajectory


@dataclass(frozen=True)
class Budgets:
    max_turns: int = 4
    turn_tokens: int = 64
    max_tokens: int = 256
    context: int = 2048
    max_tool_tokens: int = 64
    tool_timeout_s: float = 30.0
    on_timeout: str = "error"  # "error": a tool-error observation | "end": the episode ends (stop: timeout)
    max_tool_errors: int = 0  # end the episode (stop: tool_error) at this many tool errors; 0: never
    history: str = "keep"  # chat template rewrites history: keep (append-only) | error

    def __post_init__(self) -> None:
        if self.on_timeout not in ("error", "end"):
            raise ValueError(f"on_timeout: expected error | end, got {self.on_timeout!r}")


@dataclass
class Episode:
    traj: Trajectory
    track: ChatTrack
    final_text: str = ""  # the last policy turn (what the final-answer verifiers score)
    turns: int = 0
    stop_reason: str = ""
    env_reward: float | None = None  # sum of the environment's step rewards (None: it gave none)
    tool_calls: int = 0
    tool_errors: int = 0
    parse_errors: int = 0
    timeouts: int = 0
    turn_texts: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.stop_reason in TRUNCATED_STOPS

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.track.messages

    def summary(self) -> dict[str, Any]:
        """What the run records per trajectory (metrics, samples, the report)."""
        return {
            "turns": self.turns,
            "stop_reason": self.stop_reason,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "parse_errors": self.parse_errors,
            "timeouts": self.timeouts,
            "rewrites": self.track.rewrites,
            "sampled_tokens": self.traj.num_sampled,
            "env_reward": self.env_reward,
        }


def cut_tokens(tok, text: str, limit: int) -> str:
    """``text`` cut to at most ~``limit`` tokens: head and tail kept, a marker saying how many were cut."""
    ids = text_ids(tok, text)
    if limit <= 0 or len(ids) <= limit:
        return text
    head, tail = limit // 2, limit - limit // 2
    return f"{tok.decode(ids[:head])}\n...[{len(ids) - limit} tokens cut]...\n{tok.decode(ids[len(ids) - tail :])}"


def run_episodes(
    session,
    tok,
    make_env: Callable[[], Environment],
    parser,
    rows: Sequence[dict],
    n: int,
    params: SamplingParams,
    budgets: Budgets,
    seeds: Callable[[int], Sequence[int]] | None = None,
    pool: cf.Executor | None = None,
) -> list[Episode]:
    """``n`` episodes per row (row-major: row i's are contiguous), sampled with ``params`` (its stop ids end a
    turn; ``max_new_tokens`` is ignored for ``budgets.turn_tokens``). ``seeds(turn)``: one sampling seed per
    episode for that turn (see ``rl.rollouts.rollout_seeds``), so an episode samples the same in any batch."""
    envs = [make_env() for _ in range(len(rows) * n)]
    try:
        episodes = []
        for e, env in enumerate(envs):
            track = ChatTrack(
                tok, env.reset(dict(rows[e // n])), list(getattr(env, "tools", []) or []), budgets.history
            )
            episodes.append(Episode(Trajectory.start(track.prompt_ids()), track))
            if len(episodes[-1].traj) >= budgets.context:
                raise ValueError(
                    f"row {e // n}: the environment's first observation is {len(episodes[-1].traj)} tokens, which "
                    f"leaves no room for a turn in a context of {budgets.context} (data.max_length)"
                )
        own_pool = pool is None
        pool = pool or cf.ThreadPoolExecutor(max_workers=8)
        try:
            _loop(session, tok, envs, parser, episodes, params, budgets, seeds, pool)
        finally:
            if own_pool:
                pool.shutdown(wait=False, cancel_futures=True)
        return episodes
    finally:
        for env in envs:
            env.close()


def _loop(session, tok, envs, parser, episodes, params, budgets, seeds, pool) -> None:
    p = SamplingParams(budgets.turn_tokens, params.temperature, params.top_p, params.return_logps, params.stop_ids)
    stop_ids = {tok.eos_token_id, *params.stop_ids}
    live = list(range(len(episodes)))
    for turn in range(1, budgets.max_turns + 1):
        limits, asked = [], []
        for e in live:
            ep = episodes[e]
            room_total = budgets.max_tokens - (len(ep.traj) - ep.traj.prompt_len)
            room_ctx = budgets.context - len(ep.traj)
            if min(room_total, room_ctx) <= 0:
                ep.stop_reason = "context" if room_ctx <= room_total else "length"
                continue
            asked.append(e)
            limits.append(min(budgets.turn_tokens, room_total, room_ctx))
        live = asked
        if not live:
            return
        turn_seeds = None if seeds is None else [seeds(turn)[e] for e in live]
        gen = session.generate(live, [episodes[e].traj.ids for e in live], p, turn_seeds, limits)
        stepping: dict[int, ParsedTurn] = {}
        for j, e in enumerate(live):
            ep, ids = episodes[e], gen.completion_ids[j]
            ep.traj.append_sampled(ids, None if gen.logps is None else gen.logps[j])
            ep.turns = turn
            ended = bool(ids) and ids[-1] in stop_ids and not gen.truncated[j]
            text = tok.decode(ids[:-1] if ended else ids, skip_special_tokens=False)
            ep.final_text = tok.decode(ids, skip_special_tokens=True)
            ep.turn_texts.append(text)
            if not ended:  # cut by a budget mid-turn
                room_ctx = budgets.context - len(ep.traj)
                ep.stop_reason = "context" if room_ctx <= 0 and limits[j] < budgets.turn_tokens else "length"
                ep.track.finish(text)
                continue
            stepping[e] = (getattr(envs[e], "parser", None) or parser).parse(text)
        results = _step_all(envs, stepping, pool, budgets.tool_timeout_s)
        live = []
        for e, res in results.items():
            ep = episodes[e]
            if res is None:  # the step ran past tool_timeout_s
                ep.timeouts += 1
                ep.tool_errors += 1
                if budgets.on_timeout == "end":
                    ep.stop_reason = "timeout"
                    ep.track.finish(ep.turn_texts[-1])
                    continue
                res = StepResult([{"role": "tool", "content": f"error: timed out after {budgets.tool_timeout_s:g}s"}])
            else:
                # the environment's own counts when it reports them (it knows what it ran), else the parser's
                parsed = stepping[e]
                ep.tool_calls += int(res.info.get("tool_calls", len(parsed.tool_calls)))
                ep.parse_errors += int(res.info.get("parse_errors", len(parsed.errors)))
                ep.tool_errors += int(res.info.get("tool_errors", 0))
            if res.reward is not None:
                ep.env_reward = (ep.env_reward or 0.0) + float(res.reward)
            if res.done:
                ep.stop_reason = "done"
            elif budgets.max_tool_errors and ep.tool_errors >= budgets.max_tool_errors:
                ep.stop_reason = "tool_error"
            elif turn == budgets.max_turns:
                ep.stop_reason = "max_turns"
            if ep.stop_reason:
                ep.track.finish(ep.turn_texts[-1])
            else:
                obs = [
                    {**m, "content": cut_tokens(tok, m.get("content") or "", budgets.max_tool_tokens)}
                    if m.get("role") == "tool"
                    else m
                    for m in res.messages
                ]
                last = ep.traj.ids[-1]
                delta = ep.track.observe(ep.turn_texts[-1], tok.decode([last], skip_special_tokens=False), obs)
                after = len(ep.traj) + len(delta)
                if after + 1 > budgets.context:
                    ep.stop_reason = "context"  # the observation stays in `messages`, not in the buffer
                elif after + 1 - ep.traj.prompt_len > budgets.max_tokens:
                    ep.stop_reason = "length"
                else:
                    ep.traj.append_env(delta)
                    live.append(e)
        live.sort()


def _step_all(envs, stepping: dict[int, ParsedTurn], pool, timeout: float) -> dict[int, StepResult | None]:
    """Every stepping environment's ``step`` at once on ``pool``; None for a step not done within ``timeout``
    (its thread cannot be killed: a tool must enforce its own limits -- the python tool does, in its sandbox --
    and this is the backstop that keeps the loop going)."""
    futures = {e: pool.submit(envs[e].step, turn) for e, turn in stepping.items()}
    cf.wait(list(futures.values()), timeout=timeout)
    out: dict[int, StepResult | None] = {}
    for e, fut in futures.items():
        if not fut.done():
            fut.cancel()
            out[e] = None
        else:
            out[e] = fut.result()  # an exception inside an environment is a bug in it: it propagates
    return out
