"""Multi-turn rollouts: KV reuse across turns vs re-prefilling, and posttrain's multi-turn GRPO vs TRL's.

Run (2-core CPU defaults):
    .venv/bin/python benchmarks/multiturn.py --parts rollout      # KV reuse vs re-prefill, 2/4/8 turns (~8 min)
    .venv/bin/python benchmarks/multiturn.py --parts grpo --trl-python /tmp/trlvenv/bin/python   # (~8 min)
    .venv/bin/python benchmarks/multiturn.py --help               # every knob

Part 1, rollout. The same model, prompts, seeds and environment through posttrain's episode loop
(``envs.episode.run_episodes``: what ``EpisodeRunner.run`` and the GRPO round call) on the two turn sessions
``open_session`` gives: ``KVSession`` (reuse_kv: the native engine keeps each trajectory's KV cache across turns
and prefills only what a turn added) and ``ReprefillSession`` (each turn generates from the whole context), at
2, 4 and 8 turns. Printed: wall time, sampled tokens/s, tokens run through the model as prefill, the ratio, and
whether both sessions produced the same token ids.
  - ``FixedEnv`` (below) answers every turn with the same short tool result (~40 tokens with the template's turn
    markers) and is never done, so with ``max_turns`` = the turn count every episode runs that many turns.
  - A random-init model samples <|im_end|> (the end of a turn) at ~1% per token, so most turns would hit the
    per-turn cap and end their episode (stop_reason "length") after turn 1. A forward hook on the LM head adds
    a constant to the <|im_end|> logit (both sessions: the same model) so a turn ends after ~--turn-tokens
    tokens on average (turn lengths vary, geometric, as real ones do); the cap is 8x that, so a turn is
    practically never cut (the stop reasons are printed).
  - Workload "fixed" (``--workload``) drives the same two sessions with the calls run_episodes makes (whole
    contexts, per-turn seeds, limits) but with <|im_end|> and EOS never sampled, so every turn is exactly
    --turn-tokens long and the observation is appended as tokens: the difference is then the prefill alone.
  Each (turns, session) is run --rounds times in this process, alternating the order; medians are printed.

Part 2, grpo. posttrain's GRPO recipe with ``env: {name: calculator, max_turns: 3}`` on the built-in tools task
against TRL's ``GRPOTrainer(tools=[calculator])`` (its tool loop: parse the tool calls, run them, append the
results, generate again, up to ``max_tool_calling_iterations`` = max_turns - 1) on the same model directory,
prompts and reward: steps/s and peak memory (CPU: peak RSS minus RSS after the imports, bench_common.PeakMemory),
each run a fresh subprocess, runs alternating, medians.
  - The model: the --grpo-preset tiny model SFT'd for --sft-steps on ``builtin:tools/sft`` (posttrain's SFT
    recipe), so it calls the calculator and episodes really have several turns (a random model never writes a
    tool call: every episode would be one turn). Cached in --model-dir when given.
  - Same budgets: max_completion_length C tokens per turn and C after the prompt in all (posttrain
    ``env.max_tokens``; TRL's max_completion_length bounds the whole multi-turn completion, each generation
    asking for up to C), 3 turns, temperature 1, DAPO loss settings, beta 0, one update per rollout, P*G
    completions per optimizer step (bench_common.grpo_bench_config; TRL as in grpo_vs_trl.py).
  - Same cheap reward (``boxed_reward``: 1 if the last assistant turn contains \\boxed{answer}), so the
    verifier is not what is measured.
  - TRL parses tool calls only with a response template for the tokenizer's chat template, and knows only the
    templates it ships (exact match). The tiny tokenizer's ChatML template writes Qwen's Hermes format
    (<tool_call>{json}</tool_call>), so the TRL side sets TRL's own qwen3 response template on it; the error
    TRL gives without it is recorded in the JSON (``trl_note``). TRL also takes the tokenizer's EOS for the end
    of a turn, so its tokenizer gets EOS = <|im_end|> (as Qwen's chat tokenizers have), and the model directory's
    generation config ends generation at <|im_end|> or <|endoftext|> (as Qwen's instruct models ship).
  - TRL is optional: --trl-python names an interpreter with trl (e.g. a separate venv:
    ``python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl transformers datasets
    pyyaml rich math-verify jsonschema psutil``); posttrain is imported there from src/. Both sides then run
    under that interpreter and import the same modules (trl included) before the memory baseline. Without it
    the benchmark prints "TRL: not installed" and posttrain's figures alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

TARGET_RATIO = 1.5  # the target: KV reuse >= 1.5x re-prefill's tokens/s at 4 turns
TOOL_RESULT = "result: 287663 (exact, no rounding)"  # the fixed observation's content


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="rollout,grpo", help="comma-separated: rollout, grpo")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); see README")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the settings, every run and the summary here")
    g = ap.add_argument_group("rollout (part 1)")
    g.add_argument("--preset", default="small", help="posttrain.models.tiny preset (tiny|small|medium)")
    g.add_argument("--workload", default="episodes,fixed", help="episodes (run_episodes + FixedEnv), fixed")
    g.add_argument("--turns", default="2,4,8", help="turn counts (max_turns)")
    g.add_argument("--prompts", type=int, default=32, help="distinct prompts")
    g.add_argument("--generations", type=int, default=1, help="trajectories per prompt (a GRPO group)")
    g.add_argument("--prompt-tokens", type=int, default=300, help="tokens of each rendered prompt")
    g.add_argument("--turn-tokens", type=int, default=32, help="sampled tokens per turn (mean; fixed: exact)")
    g.add_argument("--rounds", type=int, default=3, help="timed runs per (turns, session), alternating")
    g.add_argument(
        "--split", action="store_true", help="also time the model's prefill and decode forward calls (ForwardSplit)"
    )
    g = ap.add_argument_group("grpo (part 2)")
    g.add_argument("--trl-python", default=sys.executable, help="an interpreter that has trl")
    g.add_argument("--grpo-preset", default="tiny")
    g.add_argument("--sft-steps", type=int, default=600, help="SFT steps on builtin:tools/sft (0: random model)")
    g.add_argument("--model-dir", help="use (or build, then keep) the GRPO model here")
    g.add_argument("--grpo-prompts", type=int, default=4, help="P: prompts per step")
    g.add_argument("--grpo-generations", type=int, default=8, help="G: episodes per prompt")
    g.add_argument("--max-completion-length", type=int, default=160, help="C: tokens per turn and per episode")
    g.add_argument("--max-turns", type=int, default=3)
    g.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    g.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    g.add_argument("--grpo-rounds", type=int, default=2, help="runs per trainer (alternating)")
    g.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--worker", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Part 1: KV reuse vs re-prefill


class FixedEnv:
    """Answers every turn with the same short tool result and is never done: an episode runs max_turns turns."""

    tools: list = []

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn):
        from posttrain.envs.base import StepResult

        return StepResult([{"role": "tool", "name": "calculator", "content": TOOL_RESULT}])

    def close(self):
        pass


def logit_hook(model, bias: dict[int, float]):
    """Adds ``bias[token]`` to the LM head's output (the logits) for those tokens; returns the hook handle."""
    import torch

    head = model.get_output_embeddings()
    bias_V = torch.zeros(head.weight.shape[0])
    for t, b in bias.items():
        bias_V[t] = b
    return head.register_forward_hook(lambda mod, inp, out: out + bias_V.to(out.dtype))


def stop_bias(vocab: int, mean_len: int) -> float:
    """The logit offset that makes P(<|im_end|> or EOS) ~ 1/mean_len per token when the other logits are ~equal:
    (x + 1) / (x + V - 1) = 1 / L, x = exp(bias)."""
    import math

    x = (vocab - 1 - mean_len) / max(1, mean_len - 1)
    return math.log(x) if x > 0 else 0.0


def build_prompts(tok, n: int, target: int) -> list[dict]:
    """Tools-task questions, each after a filler note so the rendered prompt is ``target`` tokens long."""
    from posttrain.envs.chat import ChatTrack
    from posttrain.tasks import get_task

    filler = "Notes: use the calculator tool for exact products; reply with the result in a box. " * 40
    rows = []
    for r in get_task("tools").rows(n):
        base = len(ChatTrack(tok, [{"role": "user", "content": r["prompt"]}], []).prompt_ids())
        rows.append({**r, "prompt": filler[: max(0, target - base - 1)] + " " + r["prompt"]})
    return rows


def prompt_ids(tok, row) -> list[int]:
    """The row's prompt as run_episodes renders it (FixedEnv's first observation, no tools)."""
    from posttrain.envs.chat import ChatTrack

    return ChatTrack(tok, FixedEnv().reset(row), []).prompt_ids()


class ForwardSplit:
    """Wraps the model's forward to time prefill calls (several new tokens per row) and decode calls (one), and
    count the row-tokens fed and the row x cache-column products attended (the attention's work)."""

    def __init__(self, model):
        self.orig = model.forward
        model.forward = self
        self.reset()

    def reset(self):
        self.t = {"prefill": [0.0, 0, 0], "decode": [0.0, 0, 0]}  # seconds, row-tokens, rows x cache columns

    def __call__(self, *args, **kw):
        ids, attn = kw["input_ids"], kw["attention_mask"]
        t0 = time.perf_counter()
        out = self.orig(*args, **kw)
        s = self.t["prefill" if ids.shape[1] > 1 else "decode"]
        s[0] += time.perf_counter() - t0
        s[1] += ids.numel()
        s[2] += ids.shape[0] * attn.shape[1]
        return out


class PrefillCount:
    """A turn session that counts the tokens it is given as context (ReprefillSession prefills all of them)."""

    def __init__(self, session):
        self.s, self.prefilled_tokens = session, 0

    def generate(self, keys, contexts, params, seeds=None, limits=None):
        self.prefilled_tokens += sum(len(c) for c in contexts)
        return self.s.generate(keys, contexts, params, seeds, limits)

    def close(self):
        self.s.close()


def run_rollout(a, engine, tok, rows, workload: str, turns: int, reuse_kv: bool, pool, split=None) -> dict:
    """One timed multi-turn rollout; returns wall time, sampled tokens, prefill tokens and the token ids."""
    from posttrain.envs import Budgets, get_parser, run_episodes
    from posttrain.rollout.engine import SamplingParams, row_seeds
    from posttrain.rollout.session import open_session

    n_traj = len(rows) * a.generations
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    session = open_session(engine, reuse_kv=reuse_kv)
    counted = session if reuse_kv else PrefillCount(session)
    if split is not None:
        split.reset()
    t0 = time.perf_counter()
    if workload == "episodes":
        cap = 8 * a.turn_tokens
        budgets = Budgets(max_turns=turns, turn_tokens=cap, max_tokens=4096, context=4096)
        eps = run_episodes(
            counted,
            tok,
            FixedEnv,
            get_parser("hermes"),
            rows,
            a.generations,
            SamplingParams(cap, 1.0, 1.0, True, (im_end,)),
            budgets,
            lambda turn: row_seeds((a.seed, turn), range(n_traj)),
            pool,
        )
        seconds = time.perf_counter() - t0
        ids = [e.traj.ids for e in eps]
        turn_lens = [[b - s for kind, s, b in e.traj.spans if kind == "policy"] for e in eps]
        stops = {}
        for e in eps:
            stops[e.stop_reason] = stops.get(e.stop_reason, 0) + 1
        logps = [e.traj.logps for e in eps]
    else:
        from posttrain.envs.chat import encode_text

        obs = encode_text(tok, f"<|im_end|>\n<|im_start|>tool\n{TOOL_RESULT}<|im_end|>\n<|im_start|>assistant\n")
        ids = [prompt_ids(tok, rows[i // a.generations]) for i in range(n_traj)]
        keys, turn_lens, logps = list(range(n_traj)), [[] for _ in range(n_traj)], [[] for _ in range(n_traj)]
        params = SamplingParams(a.turn_tokens, 1.0, 1.0, True, (im_end,))
        for t in range(1, turns + 1):
            g = counted.generate(keys, ids, params, row_seeds((a.seed, t), keys), [a.turn_tokens] * n_traj)
            for k, c in enumerate(g.completion_ids):
                ids[k] = ids[k] + c + (obs if t < turns else [])
                turn_lens[k].append(len(c))
                logps[k] += g.logps[k]
        seconds = time.perf_counter() - t0
        stops = {"fixed": n_traj}
    session.close()
    per_turn_max = [max(ls[t] for ls in turn_lens if len(ls) > t) for t in range(max(map(len, turn_lens)))]
    return {
        "seconds": seconds,
        "sampled": sum(map(sum, turn_lens)),
        "prefill": counted.prefilled_tokens,
        "turns_mean": sum(map(len, turn_lens)) / n_traj,
        "turn_len_mean": sum(map(sum, turn_lens)) / max(1, sum(map(len, turn_lens))),
        "decode_steps": sum(per_turn_max),  # a batch decodes until its longest turn ends
        "context_end_mean": sum(map(len, ids)) / n_traj,
        "stops": stops,
        "split": None if split is None else {k: list(v) for k, v in split.t.items()},
        "ids": ids,
        "logps": logps,
    }


def summarize(workload: str, turns: int, kv: list[dict], rp: list[dict]) -> dict:
    """Medians of one (workload, turns) cell's runs, and whether every run gave the same token ids."""
    s = {
        "workload": workload,
        "turns": turns,
        "kv_seconds": bc.median([x["seconds"] for x in kv]),
        "reprefill_seconds": bc.median([x["seconds"] for x in rp]),
        "kv_tok_s": bc.median([x["sampled"] / x["seconds"] for x in kv]),
        "reprefill_tok_s": bc.median([x["sampled"] / x["seconds"] for x in rp]),
        "sampled_tokens": kv[0]["sampled"],
        "kv_prefill_tokens": kv[0]["prefill"],
        "reprefill_prefill_tokens": rp[0]["prefill"],
        "identical": all(x["ids"] == kv[0]["ids"] for x in kv + rp),
        "differing_trajectories": sum(x != y for x, y in zip(kv[0]["ids"], rp[0]["ids"])),
        "max_logp_diff": max(
            (abs(p - q) for x, y in zip(kv[0]["logps"], rp[0]["logps"]) for p, q in zip(x, y)), default=0.0
        ),
        "split": {"kv": [x["split"] for x in kv], "reprefill": [x["split"] for x in rp]},
        "all_kv_seconds": [round(x["seconds"], 3) for x in kv],
        "all_reprefill_seconds": [round(x["seconds"], 3) for x in rp],
    }
    for k in ("turns_mean", "turn_len_mean", "decode_steps", "context_end_mean", "stops"):
        s[k] = kv[0][k]
    s["ratio"] = s["kv_tok_s"] / s["reprefill_tok_s"]
    return s


ROW_HEADER = (
    f"{'turns':>5} | {'KV reuse s':>10} {'tok/s':>7} {'prefill':>8} | {'re-prefill s':>12} {'tok/s':>7} "
    f"{'prefill':>8} | {'ratio':>6} | identical | turn len | decode steps | stops"
)


def print_row(s: dict, with_split: bool) -> None:
    print(
        f"{s['turns']:>5} | {s['kv_seconds']:>10.2f} {s['kv_tok_s']:>7.0f} {s['kv_prefill_tokens']:>8} | "
        f"{s['reprefill_seconds']:>12.2f} {s['reprefill_tok_s']:>7.0f} {s['reprefill_prefill_tokens']:>8} | "
        f"x{s['ratio']:>5.2f} | {'yes' if s['identical'] else 'no':>9} | {s['turn_len_mean']:>8.1f} | "
        f"{s['decode_steps']:>12} | {s['stops']}",
        flush=True,
    )
    for name, key in (("KV reuse", "kv"), ("re-prefill", "reprefill")) if with_split else ():
        (pt, pn, pc), (dt, dn, dc) = s["split"][key][0]["prefill"], s["split"][key][0]["decode"]
        print(
            f"      {name:10s} (round 1): prefill {pt:.2f}s ({pn} row-tokens, {pc / 1e6:.2f}M rows x cache "
            f"columns), decode {dt:.2f}s ({dn} row-steps, {dc / 1e6:.2f}M rows x cache columns)"
        )
    if not s["identical"]:
        print(f"      ({s['differing_trajectories']} trajectories differ; max |logp diff| {s['max_logp_diff']:.2e})")


def part_rollout(a) -> dict:
    import concurrent.futures as cf

    import torch

    from posttrain.models.tiny import build_tiny_model, build_tokenizer
    from posttrain.rollout.engine import KVCacheEngine

    tok = build_tokenizer("char")
    model = build_tiny_model(a.preset, tok, seed=a.seed, max_positions=4096)
    engine = KVCacheEngine(model, tok)
    rows = build_prompts(tok, a.prompts, a.prompt_tokens)
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    prompt_len = sum(len(prompt_ids(tok, r)) for r in rows) / len(rows)
    print(
        f"rollout: preset {a.preset} ({n_params / 1e6:.2f}M parameters, char vocab {len(tok)}), float32, "
        f"{a.prompts} prompts x {a.generations} = {a.prompts * a.generations} trajectories, prompt ~{a.prompt_tokens} "
        f"tokens (rendered: {prompt_len:.0f} on average), ~{a.turn_tokens} sampled tokens per turn, observation "
        f"'{TOOL_RESULT}' (~{len(TOOL_RESULT) + 20} tokens with turn markers), temperature 1, log-probs on, "
        f"{a.rounds} rounds, threads {a.threads or 'default'}",
        flush=True,
    )
    out: dict = {"summary": {}}
    split = ForwardSplit(model) if a.split else None
    pool = cf.ThreadPoolExecutor(max_workers=8)
    for workload in a.workload.split(","):
        bias = {im_end: stop_bias(len(tok), a.turn_tokens)} if workload == "episodes" else {im_end: -1e4, eos: -1e4}
        hook = logit_hook(model, bias)
        with torch.no_grad():  # warm-up: allocator, kernels, the template renders
            for reuse in (True, False):
                run_rollout(a, engine, tok, rows[:4], workload, 2, reuse, pool)
        what = (
            f"run_episodes + FixedEnv, <|im_end|> logit +{bias[im_end]:.2f} (mean turn ~{a.turn_tokens}), "
            f"turn cap {8 * a.turn_tokens}"
            if workload == "episodes"
            else f"session.generate per turn, every turn exactly {a.turn_tokens} tokens"
        )
        print(f"\nworkload {workload}: {what}\n{ROW_HEADER}\n" + "-" * len(ROW_HEADER), flush=True)
        for turns in [int(t) for t in a.turns.split(",")]:
            res = {True: [], False: []}
            for r in range(a.rounds):
                for reuse in (True, False) if r % 2 == 0 else (False, True):
                    res[reuse].append(run_rollout(a, engine, tok, rows, workload, turns, reuse, pool, split))
            s = out["summary"][f"{workload}/{turns}"] = summarize(workload, turns, res[True], res[False])
            print_row(s, a.split)
        hook.remove()
    pool.shutdown()
    for v in (v for v in out["summary"].values() if v["turns"] == 4):
        met = "met" if v["ratio"] >= TARGET_RATIO else "NOT met"
        print(
            f"{v['workload']}, 4 turns: KV reuse / re-prefill tokens/s x{v['ratio']:.2f} (target >= {TARGET_RATIO}: {met})"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Part 2: multi-turn GRPO, posttrain vs TRL (workers run in fresh processes)


def boxed_reward(completions, answer=None, **kwargs) -> list[float]:
    """1.0 when the last assistant turn contains \\boxed{answer}, else 0.0. Takes posttrain's completion texts
    (the last policy turn) and TRL's conversational completions (lists of messages) alike."""
    out = []
    for c, ans in zip(completions, answer or [None] * len(completions)):
        if isinstance(c, list):
            said = [m.get("content") or "" for m in c if m.get("role") == "assistant"]
            c = said[-1] if said else ""
        out.append(float(ans is not None and f"\\boxed{{{ans}}}" in c))
    return out


def grpo_settings(a, model_dir, run_dir):
    """posttrain's config: the shared GRPO benchmark settings, with the tools task and the calculator env."""
    ns = SimpleNamespace(
        warmup=a.warmup,
        steps=a.steps,
        prompts=a.grpo_prompts,
        generations=a.grpo_generations,
        max_completion_length=a.max_completion_length,
        device="cpu",
        dtype="float32",
        lr=a.lr,
        seed=a.seed,
        set=[
            "data.path=builtin:tools",
            "data.max_length=320",
            "rewards=[multiturn:boxed_reward]",
            "env.name=calculator",
            f"env.max_turns={a.max_turns}",
            f"env.max_tokens={a.max_completion_length}",
            f"train.threads={a.threads}",
        ],
    )
    return bc.grpo_bench_config(ns, model_dir, run_dir)


def grpo_rows(a) -> list[dict]:
    from posttrain.tasks import get_task

    return get_task("tools").rows(a.grpo_prompts * (a.warmup + a.steps))


def run_posttrain(a, run_dir: Path) -> dict:
    from posttrain.recipes import grpo
    from posttrain.runtime.tracking import read_metrics

    grpo.train(grpo_settings(a, a.model_dir, run_dir))
    m = read_metrics(run_dir)
    timed = m[a.warmup :]
    mean = lambda k: sum(r.get(k, 0.0) for r in timed) / len(timed)
    return {
        "seconds": m[-1]["wall_time"] - m[a.warmup - 1]["wall_time"],
        "turns": mean("episode/turns"),
        "tool_calls": mean("episode/tool_calls"),
        "tokens": mean("completion_len/mean"),
        "tokens_kind": "sampled policy tokens per episode",
        "reward": mean("reward/mean"),
    }


def run_trl(a, run_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl import chat_template_utils as ctu

    from posttrain.envs.builtin import calculator

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    # TRL takes the tokenizer's EOS for the end of a turn: it cuts the template's tool suffix there. Qwen's chat
    # tokenizers have EOS = <|im_end|>; the tiny one's is <|endoftext|>, with which TRL drops the "\n" after each
    # turn's <|im_end|> from the context (a context the SFT'd model never saw: its post-tool answers go wrong).
    tok.eos_token = "<|im_end|>"
    note = ""
    if getattr(tok, "response_template", None) is None and getattr(tok, "response_schema", None) is None:
        try:
            ctu.add_response_schema(tok)
        except ValueError as exc:
            note = f"add_response_schema: {exc}"
            tok.response_template = ctu.qwen3_template
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in grpo_rows(a)]
    )
    seen = {"turns": [], "tools": [], "tokens": [], "rewards": []}

    def reward(completions, completion_ids, answer, **kwargs):
        seen["turns"].append(sum(sum(m["role"] == "assistant" for m in c) for c in completions) / len(completions))
        seen["tools"].append(sum(sum(m["role"] == "tool" for m in c) for c in completions) / len(completions))
        seen["tokens"].append(sum(len(c) for c in completion_ids) / len(completion_ids))
        out = boxed_reward(completions, answer)
        seen["rewards"].append(sum(out) / len(out))
        return out

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    P, G = a.grpo_prompts, a.grpo_generations
    args = GRPOConfig(
        **bc.trl_dapo_args(
            output_dir=str(run_dir),
            max_steps=a.warmup + a.steps,
            per_device_train_batch_size=P * G,
            num_generations=G,
            max_completion_length=a.max_completion_length,
            max_tool_calling_iterations=a.max_turns - 1,
            learning_rate=a.lr,
            use_cpu=True,
            seed=a.seed,
            use_vllm=False,
            model_init_kwargs={"dtype": torch.float32},
        )
    )
    clock = StepClock()
    trainer = GRPOTrainer(
        model=a.model_dir,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        tools=[calculator],
        callbacks=[clock],
    )
    trainer.train()
    w = a.warmup
    return {
        "seconds": clock.ends[-1] - clock.ends[w - 1],
        "turns": sum(seen["turns"][w:]) / a.steps,
        "tool_calls": sum(seen["tools"][w:]) / a.steps,
        "tokens": sum(seen["tokens"][w:]) / a.steps,
        "tokens_kind": "completion tokens per episode, tool results included",
        "reward": sum(seen["rewards"][w:]) / a.steps,
        "trl_note": note,
    }


def worker(a) -> None:
    bc.set_threads(a.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # Both workers import the same modules before the memory baseline (trl where it is installed).
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from posttrain.recipes import grpo  # noqa: F401

    try:
        import trl  # noqa: F401
    except ImportError:
        pass
    mem = bc.PeakMemory("cpu")
    mem.start()
    with tempfile.TemporaryDirectory() as d:
        res = (run_posttrain if a.worker == "posttrain" else run_trl)(a, Path(d) / "run")
    res.update(mem.stop(), trainer=a.worker, python=sys.executable)
    bc.write_json(a.out, res)


def build_grpo_model(a, out: Path) -> Path:
    """The tiny model both trainers load: SFT'd on tool-call demonstrations (--sft-steps) so it calls the tool."""
    if not (out / "config.json").exists():
        _train_grpo_model(a, out)
    # A ChatML chat model's generation config ends generation at <|im_end|> too (Qwen's instruct models ship
    # [<|im_end|>, <|endoftext|>]): TRL's generate stops a turn there, as posttrain's episode loop does
    # (env.stop_token auto). posttrain does not read it.
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    gen.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    gen.save_pretrained(out)
    return out


def _train_grpo_model(a, out: Path) -> None:
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    if a.sft_steps <= 0:
        tok = build_tokenizer("char")
        build_tiny_model(a.grpo_preset, tok, seed=a.seed).save_pretrained(out)
        tok.save_pretrained(out)
        return
    from posttrain.config import SFTConfig, config_from_dict
    from posttrain.recipes import sft

    with tempfile.TemporaryDirectory() as d:
        cfg = config_from_dict(
            SFTConfig,
            {},
            [
                f"model.path={a.grpo_preset}",
                "data.path=builtin:tools/sft",
                "data.num_examples=2000",
                "data.max_length=256",
                "optim.lr=3e-3",
                "optim.warmup_steps=20",
                f"train.steps={a.sft_steps}",
                "train.micro_batch_size=32",
                f"train.seed={a.seed}",
                f"train.output_dir={d}/sft",
                "train.progress=false",
                "train.log_every=100",
                f"train.threads={a.threads}",
            ],
        )
        final = sft.train(cfg)
        out.mkdir(parents=True, exist_ok=True)
        for f in Path(final).iterdir():
            if f.is_file():
                (out / f.name).write_bytes(f.read_bytes())


def has_trl(python: str) -> bool:
    return subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0


def spawn(a, which: str, python: str, model_dir: Path, out: Path) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", which, "--model-dir", str(model_dir), "--out", str(out)]
    for k in ("threads", "seed", "grpo_prompts", "grpo_generations", "max_completion_length", "max_turns", "steps"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    cmd += ["--warmup", str(a.warmup), "--lr", str(a.lr)]
    env = bc.child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env["PYTHONPATH"]])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stdout[-2000:] + proc.stderr[-6000:]).strip()
        last = [ln for ln in err.splitlines() if re.match(r"^\w*(Error|Exception)", ln)]
        return {"trainer": which, "failed": True, "error": last[-1] if last else err[-500:], "log_tail": err[-3000:]}
    return json.loads(out.read_text())


def part_grpo(a) -> dict:
    trl_ok = has_trl(a.trl_python)
    python = a.trl_python if trl_ok else sys.executable
    print(
        f"\ngrpo: preset {a.grpo_preset}"
        + (f" SFT'd {a.sft_steps} steps on builtin:tools/sft" if a.sft_steps else " (random init)")
        + f", builtin:tools, calculator env, max_turns {a.max_turns}, C={a.max_completion_length} tokens per turn "
        f"and per episode, P={a.grpo_prompts} x G={a.grpo_generations}, {a.steps} timed steps (+{a.warmup} warm-up), "
        f"{a.grpo_rounds} rounds, threads {a.threads or 'default'}, interpreter {python}",
        flush=True,
    )
    if not trl_ok:
        print(f"TRL: not installed ({a.trl_python} cannot import trl); posttrain only", flush=True)
    sides = ["posttrain", "trl"] if trl_ok else ["posttrain"]
    runs = []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        model_dir = build_grpo_model(a, Path(a.model_dir) if a.model_dir else Path(d) / "model")
        print(f"model: {model_dir} ({time.perf_counter() - t0:.0f}s to build)", flush=True)
        for r in range(a.grpo_rounds):
            for which in sides if r % 2 == 0 else sides[::-1]:
                res = spawn(a, which, python, model_dir, Path(d) / f"{which}-{r}.json")
                runs.append(res)
                if res.get("failed"):
                    print(f"  round {r + 1} {which:9s}: FAILED: {res['error']}", flush=True)
                    continue
                print(
                    f"  round {r + 1} {which:9s}: {a.steps / res['seconds']:.3f} steps/s, peak +"
                    f"{res['delta_bytes'] / 2**20:.0f} MiB, {res['turns']:.2f} turns and {res['tool_calls']:.2f} "
                    f"tool calls per episode, reward {res['reward']:.2f}",
                    flush=True,
                )
    summary = {}
    print(f"\nmedians over {a.grpo_rounds} runs each (load average now {bc.load_average()}):")
    for which in sides:
        rs = [r for r in runs if r["trainer"] == which and not r.get("failed")]
        if not rs:
            err = next(r["error"] for r in runs if r["trainer"] == which)
            print(f"  {which:9s}: failed: {err}")
            summary[which] = {"failed": err}
            continue
        summary[which] = {
            k: bc.median([f(r) for r in rs])
            for k, f in (
                ("steps_per_s", lambda r: a.steps / r["seconds"]),
                ("peak_mem_mb", lambda r: r["delta_bytes"] / 2**20),
                ("turns", lambda r: r["turns"]),
                ("tool_calls", lambda r: r["tool_calls"]),
                ("tokens", lambda r: r["tokens"]),
            )
        }
        x = summary[which]
        print(
            f"  {which:9s}: {x['steps_per_s']:.3f} steps/s  peak memory +{x['peak_mem_mb']:.0f} MiB  "
            f"{x['turns']:.2f} turns, {x['tool_calls']:.2f} tool calls, {x['tokens']:.1f} tokens per episode "
            f"({rs[0]['tokens_kind']})"
        )
    if "trl" in summary and "steps_per_s" in summary.get("trl", {}) and "steps_per_s" in summary["posttrain"]:
        p, t = summary["posttrain"], summary["trl"]
        summary["ratios"] = {
            "steps_per_s": p["steps_per_s"] / t["steps_per_s"],
            "peak_mem": p["peak_mem_mb"] / t["peak_mem_mb"],
        }
        print(
            f"  posttrain / TRL: steps/s x{summary['ratios']['steps_per_s']:.2f}, "
            f"peak memory x{summary['ratios']['peak_mem']:.2f}"
        )
    notes = {r.get("trl_note") for r in runs if r.get("trl_note")}
    for n in notes:
        print(f"  TRL note: {n.splitlines()[0]} -> set TRL's qwen3 response template on the tokenizer")
    return {"runs": runs, "summary": summary, "trl_installed": trl_ok, "python": python}


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    bc.set_threads(a.threads)
    print(f"machine: {bc.machine()}; load average {bc.load_average()}")
    result = {"args": {k: v for k, v in vars(a).items() if k not in ("worker", "out")}}
    parts = a.parts.split(",")
    if "rollout" in parts:
        result["rollout"] = part_rollout(a)
    if "grpo" in parts:
        result["grpo"] = part_grpo(a)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
