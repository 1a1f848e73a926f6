"""Multi-turn episodes: the token-exact buffer, the template delta, budgets and stop reasons, KV reuse.

A scripted policy (a turn session that "samples" given texts) drives each parser and chat template through
several turns; a tiny random model drives the real engines where log-probs and KV reuse are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kill_resume import kill_mid_run
from posttrain.commands.main import main
from posttrain.config import EnvConfig, GRPOConfig, PPOConfig, config_from_dict
from posttrain.data.tokenize import encode_row
from posttrain.envs import (
    Budgets,
    EpisodeRunner,
    GuessNumberEnv,
    StepResult,
    Toolbox,
    ToolEnv,
    calculator,
    env_factory,
    get_parser,
    run_episodes,
)
from posttrain.envs.chat import ChatTrack, TemplateRewrite
from posttrain.evaluation import evaluate_model_dir
from posttrain.losses.aggregation import aggregate
from posttrain.losses.logprobs import completion_logps
from posttrain.recipes import grpo, ppo
from posttrain.recipes.grpo import micro_batches, policy_logps, sequences
from posttrain.rl.groups import Group
from posttrain.rollout.engine import Generation, KVCacheEngine, SamplingParams, row_seeds
from posttrain.rollout.session import KVSession, ReprefillSession
from posttrain.runtime.tracking import read_metrics
from posttrain.tasks import get_task
from posttrain.tasks.toolcalc import CALCULATOR_SCHEMA

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'


class ScriptedSession:
    """A turn session whose policy says ``script[row][turn]`` (the turn's stop token appended), cut at the
    row's limit like an engine would: the bookkeeping around sampling, without a model."""

    def __init__(self, tok, script, stop_id):
        self.tok, self.script, self.stop_id = tok, script, stop_id
        self.turn: dict = {}
        self.contexts: dict = {}

    def generate(self, keys, contexts, params, seeds=None, limits=None):
        outs, trunc = [], []
        for i, (k, ctx) in enumerate(zip(keys, contexts)):
            if k in self.contexts:  # a turn may only append
                assert ctx[: len(self.contexts[k])] == self.contexts[k]
            t = self.turn.get(k, 0)
            self.turn[k] = t + 1
            ids = self.tok.encode(self.script[k][min(t, len(self.script[k]) - 1)]) + [self.stop_id]
            cap = min(params.max_new_tokens, limits[i] if limits is not None else params.max_new_tokens)
            outs.append(ids[:cap])
            trunc.append(len(ids) > cap)
            self.contexts[k] = list(ctx) + outs[-1]
        return Generation([list(c) for c in contexts], outs, trunc, [[-0.5] * len(o) for o in outs])

    def close(self):
        pass


def im_end(tok):
    return tok.convert_tokens_to_ids("<|im_end|>")


def run(tok, script, make_env, rows, budgets, parser="hermes", n=1, stop=None):
    stop = im_end(tok) if stop is None else stop
    session = ScriptedSession(tok, script, stop)
    params = SamplingParams(budgets.turn_tokens, 1.0, 1.0, True, (stop,))
    return run_episodes(session, tok, make_env, get_parser(parser), rows, n, params, budgets)


def assert_buffer_is_the_render(tok, ep, tools, tail=""):
    """The buffer is the chat template's render of the final conversation, token for token (what the
    template adds after the last policy token, ``tail``, excepted): re-tokenizing it changes nothing."""
    render = tok.apply_chat_template(ep.messages, tools=tools or None, tokenize=False)
    ids = tok(render, add_special_tokens=False)["input_ids"]
    assert ids[: len(ep.traj.ids)] == ep.traj.ids and tok.decode(ids[len(ep.traj.ids) :]) == tail
    assert len(ep.traj.ids) == len(ep.traj.sampled) == len(ep.traj.logps)


def calc_env():
    return ToolEnv(Toolbox([calculator]), "hermes")


def test_tool_episode_buffer_is_the_template_render(char_tok):
    """Two tool calls then an answer: the buffer equals the chat template's render of the conversation
    (re-tokenizing it changes nothing), env tokens are unsampled, and every sampled token is the script's."""
    tok = char_tok
    script = [[CALL % "12*34", CALL % "408+1", "\\boxed{409}"]]
    (ep,) = run(
        tok, script, calc_env, [{"prompt": "What is 12*34+1?"}], Budgets(max_turns=4, turn_tokens=120, max_tokens=1000)
    )
    assert ep.stop_reason == "done" and ep.turns == 3 and ep.tool_calls == 2 and ep.tool_errors == 0
    assert ep.final_text == "\\boxed{409}"
    messages = [dict(m) for m in ep.messages]
    render = tok.apply_chat_template(messages, tools=calc_env().tools, tokenize=False)
    ids = tok(render, add_special_tokens=False)["input_ids"]
    # The render adds only the boundary after the last <|im_end|> (never sampled, never appended).
    assert ids[: len(ep.traj.ids)] == ep.traj.ids and tok.decode(ids[len(ep.traj.ids) :]) == "\n"
    # Sampled tokens are exactly the policy's turns (+ their stop token); the rest is environment.
    policy = [t for t, m in zip(ep.traj.ids, ep.traj.sampled) if m]
    want = [x for turn in script[0] for x in tok.encode(turn) + [im_end(tok)]]
    assert policy == want
    assert len(ep.traj.ids) == len(ep.traj.sampled) == len(ep.traj.logps)
    env_text = tok.decode([t for t, m in zip(ep.traj.completion_ids, ep.traj.completion_mask) if not m])
    assert "408" in env_text and "409" in env_text and "<|im_start|>assistant" in env_text
    # The boundary "\n" after each sampled <|im_end|> is an env token, never sampled.
    for kind, a, _end in ep.traj.spans[1:]:
        if kind == "env":
            assert tok.decode(ep.traj.ids[a : a + 1]) == "\n" and ep.traj.sampled[a] == 0


def test_tool_errors_are_observations_not_crashes(char_tok):
    tok = char_tok
    script = [['<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "<tool_call>{bad json</tool_call>", "42"]]
    (ep,) = run(tok, script, calc_env, [{"prompt": "q"}], Budgets(max_turns=4, turn_tokens=120, max_tokens=1000))
    assert ep.stop_reason == "done" and ep.turns == 3
    assert ep.tool_errors >= 1 and ep.parse_errors == 1
    tool_turns = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert any("unknown tool" in c for c in tool_turns) and len(tool_turns) == 2


@pytest.mark.parametrize(
    "budgets, want",
    [
        (
            Budgets(max_turns=2, turn_tokens=120, max_tokens=1000),
            "max_turns",
        ),  # still calling tools after the last turn
        (Budgets(max_turns=9, turn_tokens=20, max_tokens=1000), "length"),  # a turn cut mid-call by the per-turn cap
        (Budgets(max_turns=9, turn_tokens=120, max_tokens=150), "length"),  # the trajectory budget
        (Budgets(max_turns=9, turn_tokens=120, max_tokens=1000, context=200), "context"),  # the model's context
        (Budgets(max_turns=9, turn_tokens=120, max_tokens=1000, max_tool_errors=1), "tool_error"),
    ],
)
def test_budgets_end_with_their_stop_reason(char_tok, budgets, want):
    tok = char_tok
    calls = [CALL % "1*2", CALL % "1/0", CALL % "3*4", CALL % "5*6"]  # 1/0: a tool error on turn 2
    (ep,) = run(tok, [calls], calc_env, [{"prompt": "q"}], budgets)
    assert ep.stop_reason == want, ep.summary()
    assert ep.truncated == (want in ("max_turns", "length", "context"))
    assert len(ep.traj) <= budgets.context
    assert len(ep.traj) - ep.traj.prompt_len <= budgets.max_tokens
    # an observation that would not fit is never appended: the buffer ends with the policy's tokens
    assert ep.traj.sampled[-1] == 1


def test_tool_output_is_cut_by_tokens_with_a_marker(char_tok):
    tok = char_tok
    (ep,) = run(
        tok,
        [[CALL % "7**300", "done"]],
        calc_env,
        [{"prompt": "q"}],
        Budgets(max_turns=3, turn_tokens=120, max_tool_tokens=20),
    )
    tool = next(m["content"] for m in ep.messages if m["role"] == "tool")
    assert "tokens cut" in tool and len(tok.encode(tool)) < 60


def test_game_needs_several_turns(char_tok):
    tok = char_tok
    script = [["guess: 50", "guess: 25", "guess: 37", "guess: 31"]]
    (ep,) = run(
        tok,
        script,
        env_factory("guess_number", {}),
        [{"prompt": "", "secret": 31, "low": 1, "high": 100}],
        Budgets(max_turns=6, turn_tokens=20),
    )
    assert ep.stop_reason == "done" and ep.turns == 4 and ep.env_reward == 1.0
    replies = [m["content"].lower() for m in ep.messages if m["role"] == "user"][1:]
    assert "lower" in replies[0] and "higher" in replies[1] and "lower" in replies[2]
    assert isinstance(GuessNumberEnv(), GuessNumberEnv)


THINK_TEMPLATE = (
    # Qwen3-style: earlier assistant turns lose their <think> block once a later turn exists.
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_history_rewrite_is_detected_and_never_rerendered(char_tok):
    tok = char_tok
    tok.chat_template = THINK_TEMPLATE
    script = [["<think>hmm</think>" + CALL % "2*3", "<think>ok</think>6"]]
    (ep,) = run(tok, script, calc_env, [{"prompt": "q"}], Budgets(max_turns=3, turn_tokens=120, max_tokens=1000))
    assert ep.stop_reason == "done" and ep.track.rewrites >= 1
    # append-only: the first turn's reasoning is still in the buffer the policy is trained on
    assert "<think>hmm</think>" in tok.decode(ep.traj.ids)
    with pytest.raises(TemplateRewrite):
        run(
            tok,
            script,
            calc_env,
            [{"prompt": "q"}],
            Budgets(max_turns=3, turn_tokens=120, max_tokens=1000, history="error"),
        )


def test_chat_track_delta_without_tools(char_tok):
    track = ChatTrack(char_tok, [{"role": "user", "content": "hi"}], [])
    delta = track.observe("yo", "<|im_end|>", [{"role": "user", "content": "again"}])
    assert char_tok.decode(delta) == "\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"


# ------------------------------------------------------------------ the real engines


def _turns(session, tok, prompts, temp, turns=3):
    ctx = [list(p) for p in prompts]
    keys, out = list(range(len(prompts))), []
    stop = (im_end(tok),)
    for t in range(turns):
        g = session.generate(
            keys,
            [ctx[k] for k in keys],
            SamplingParams(12, temp, 1.0, True, stop),
            row_seeds((0, t), keys),
            [9, 5, 12, 7][: len(keys)],
        )
        out.append((g.completion_ids, g.logps))
        for k, c in zip(keys, g.completion_ids):
            ctx[k] = ctx[k] + c + tok.encode(f"\nobs {t}{k}\n")
        if t == 1:
            keys = [k for k in keys if k != 1]  # a trajectory that ended leaves the batch
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_reuse_equals_reprefill_token_for_token(char_tok, tiny_model, temperature):
    engine = KVCacheEngine(tiny_model, char_tok)
    prompts = [char_tok.encode(p) for p in ("What is 12*34?", "hi", "What is 12*34?", "a longer prompt here")]
    kv = _turns(KVSession(engine), char_tok, prompts, temperature)
    re = _turns(ReprefillSession(engine), char_tok, prompts, temperature)
    for (ids_a, lp_a), (ids_b, lp_b) in zip(kv, re):
        assert ids_a == ids_b
        for a, b in zip(lp_a, lp_b):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)


def test_kv_session_refuses_a_context_that_is_not_an_extension(char_tok, tiny_model):
    s = KVSession(KVCacheEngine(tiny_model, char_tok))
    s.generate([0], [char_tok.encode("abc")], SamplingParams(3, 0.0))
    with pytest.raises(ValueError, match="not an extension"):
        s.generate([0], [char_tok.encode("xyz12345")], SamplingParams(3, 0.0))


@pytest.mark.parametrize("reuse_kv", [True, False])
def test_trainer_logps_reproduce_the_samplers_on_sampled_tokens(char_tok, tiny_model, reuse_kv):
    """Episodes sampled by a real model through the calculator: the trainer's forward over the final buffer
    gives the sampler's log-probs on every sampled token (env tokens are context only)."""
    runner = EpisodeRunner(
        EnvConfig(name="calculator", max_turns=3, reuse_kv=reuse_kv), char_tok, context=400, turn_tokens=24
    )
    try:
        eps = runner.run(
            KVCacheEngine(tiny_model, char_tok),
            [{"prompt": "What is 12*34?"}, {"prompt": "Multiply 5 by 6."}],
            3,
            SamplingParams(24, 1.0, 1.0, True, runner.stop_ids),
            lambda turn: row_seeds((1, turn), range(6)),
        )
    finally:
        runner.close()
    checked = 0
    for ep in eps:
        ids = torch.tensor([ep.traj.ids])
        mask = torch.tensor([ep.traj.sampled], dtype=torch.float32)
        targets = torch.roll(ids, -1, 1)
        tmask = torch.roll(mask, -1, 1)
        tmask[:, -1] = 0
        lp, _ = completion_logps(
            tiny_model, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], targets, tmask, 1.0
        )
        got = lp[0][tmask[0] > 0]
        want = torch.tensor([x for x, m in zip(ep.traj.logps, ep.traj.sampled) if m])
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        checked += len(want)
    assert checked > 50


# ------------------------------------------------------------------ the recipes


def test_env_tokens_carry_no_loss_and_no_gradient(char_tok, tiny_model):

    tok = char_tok
    prompt = tuple(tok.encode("What is 2*3?"))
    parts = [(tok.encode("<call>"), 1), (tok.encode("\ntool: 6\n"), 0), (tok.encode("6"), 1)]
    ids = tuple(t for p, _ in parts for t in p)
    mask = tuple(m for p, m in parts for _ in p)
    g = Group(0, prompt, (ids,), ("6",), (False,), (1.0,), {"r": (1.0,)}, 0, None, (mask,), ({},))
    ((ex, kept),) = sequences([g], mask_truncated=False)
    assert ex.loss_mask == (0,) * len(prompt) + mask and kept
    ((batch, _),) = micro_batches(sequences([g], False), 4, tok.pad_token_id, "cpu")
    logps, _ = policy_logps(tiny_model, batch, 1.0)
    logps.retain_grad()
    m = batch.target_mask_BT
    aggregate(-logps, m, "token_mean", num_tokens=m.sum().item()).backward()
    assert int(m.sum()) == sum(mask)  # only sampled tokens count in the loss's normalization
    assert (logps.grad[m == 0] == 0).all() and (logps.grad[m > 0] != 0).all()
    # the sampled tokens' targets are exactly the policy's tokens, none of the environment's
    targets = batch.inputs.targets_BT[m > 0].tolist()
    assert targets == [t for t, k in zip(ids, mask) if k]


GAME = [
    "model=tiny",
    "train.progress=false",
    "data.max_length=480",
    "data.num_examples=40",
    "env.name=guess_number",
    "env.max_turns=3",
    "env.stop_token=e",  # a common character: a random model's turns end within the budget, so episodes go on
    "max_completion_length=48",
    "rewards=[toy_rewards:parity, env_reward]",
    "prompts_per_step=2",
    "num_generations=4",
    "train.micro_batch_size=8",
    "optim.lr=3e-3",
    "optim.schedule=constant",
]


@pytest.fixture
def game_rows(tmp_path):

    path = tmp_path / "guess.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": "g", "secret": 1 + (7 * i) % 20, "low": 1, "high": 20}) + "\n" for i in range(40))
    )
    return path


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_rl_recipes_run_multi_turn_episodes(tmp_path, game_rows, recipe):

    sys.path.insert(0, str(Path(__file__).parent))
    cls, mod = (GRPOConfig, grpo) if recipe == "grpo" else (PPOConfig, ppo)
    out = tmp_path / "run"
    cfg = config_from_dict(cls, {}, [*GAME, f"data.path={game_rows}", f"train.output_dir={out}", "train.steps=2"])
    mod.train(cfg)
    m = read_metrics(out)[-1]
    assert m["episode/turns"] > 1 and m["episode/parse_errors"] > 0
    assert sum(
        m[f"stop_reason/{r}"] for r in ("done", "max_turns", "length", "context", "tool_error", "timeout")
    ) == pytest.approx(1.0)
    # the loss counted the policy's tokens only: fewer than the trajectories' tokens after the prompt
    assert 0 < m["num_tokens"] <= m["completion_len/mean"] * 8 + 1e-6
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    kinds = [k for k, _ in sample["segments"]]
    assert kinds[0] == "policy" and ("env" in kinds or sample["episode"]["turns"] == 1)


def test_multi_turn_resume_is_exact(tmp_path, game_rows):

    sys.path.insert(0, str(Path(__file__).parent))
    common = [*GAME, f"data.path={game_rows}", "samples_every=0", "num_iterations=2"]

    def cfg(d, steps):
        return config_from_dict(GRPOConfig, {}, [*common, f"train.output_dir={d}", f"train.steps={steps}"])

    grpo.train(cfg(tmp_path / "full", 3))
    grpo.train(cfg(tmp_path / "split", 2))
    grpo.train(cfg(tmp_path / "split", 3))  # resume: auto
    wa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


# ------------------------------------------------------------------ the tool task, SFT, eval


def test_tool_task_sft_rows_follow_trl_conventions(char_tok):

    task = get_task("tools")
    rows = task.sft_rows(400)
    calls = [any(m.get("tool_calls") for m in r["messages"]) for r in rows]
    taught = [r["messages"][0]["content"].startswith(("What is", "Multiply")) for r in rows]
    share = lambda want: sum(c for c, t in zip(calls, taught) if t == want) / sum(t == want for t in taught)
    # the call is shown mostly on the first two phrasings (tool_share 0.9), less on the others (0.3)
    assert 0.82 < share(True) < 0.97 and 0.2 < share(False) < 0.4
    assert CALCULATOR_SCHEMA == Toolbox([calculator]).schemas[0]  # SFT shows the template what RL's env gives
    held = {r["prompt"] for r in task.rows(200, split="test")}
    assert not held & {r["messages"][0]["content"] for r in rows}
    row = next(r for r in rows if len(r["messages"]) == 4)
    ex = encode_row(char_tok, row, "sft")
    text = char_tok.decode(list(ex.input_ids))
    assert text.startswith("<|im_start|>system\ntools: calculator")
    trained = char_tok.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    result = row["messages"][2]["content"]
    # the call and the final answer train; the tool's turn (its result) and the question are context
    assert '"expression": "' in trained and f"\\boxed{{{result}}}" in trained
    assert f"tool\n{result}" not in trained and row["messages"][0]["content"] not in trained


def test_eval_cli_runs_episodes_and_agrees_with_the_library(tmp_path, char_tok, tiny_model, capsys):

    model_dir = tmp_path / "m"
    tiny_model.save_pretrained(model_dir)
    char_tok.save_pretrained(model_dir)
    argv = ["eval", "--model", str(model_dir), "--data", "builtin:tools", "--limit", "6", "--max-new-tokens", "16"]
    out = tmp_path / "e.json"
    assert main([*argv, "--env", "calculator", "--env-option", "max_turns=2", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    lib = evaluate_model_dir(
        str(model_dir),
        "builtin:tools",
        limit=6,
        max_new_tokens=16,
        env=EnvConfig(name="calculator", max_turns=2),
    )
    assert got["greedy_accuracy"] == lib.greedy_accuracy and got["n_prompts"] == 6
    with pytest.raises(SystemExit):
        main([*argv, "--env-option", "max_turns=2"])
    assert "--env-option needs --env" in capsys.readouterr().err


LLAMA3_TEMPLATE = (
    # Llama 3's layout: headers, no newline after <|eot_id|>, tool results as the "ipython" role
    "{% for m in messages %}<|start_header_id|>{{ 'ipython' if m['role'] == 'tool' else m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_llama3_json_calls_through_a_llama3_template(char_tok):
    tok = char_tok
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    script = [['{"name": "calculator", "parameters": {"expression": "6*7"}}', "The answer is 42."]]
    make = lambda: ToolEnv(Toolbox([calculator]), "llama3_json")
    (ep,) = run(
        tok, script, make, [{"prompt": "6*7?"}], Budgets(max_turns=3, turn_tokens=120, max_tokens=1000), stop=eot
    )
    assert ep.stop_reason == "done" and ep.tool_calls == 1 and ep.turns == 2
    assert_buffer_is_the_render(tok, ep, make().tools)
    env_text = tok.decode([t for t, m in zip(ep.traj.completion_ids, ep.traj.completion_mask) if not m])
    assert (
        env_text
        == "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make system-deps)")
def test_code_interpreter_blocks_run_in_the_sandbox(char_tok):
    tok = char_tok
    script = [
        [
            "Let me compute.\n```python\nprint(2**100 % 97)\n```",
            "```python\nimport os\nos.kill(os.getppid(), 9)\n```",
            "\\boxed{16}",
        ]
    ]
    make = env_factory("python", {"timeout": 5})
    (ep,) = run(
        tok,
        script,
        make,
        [{"prompt": "2**100 mod 97?"}],
        Budgets(max_turns=4, turn_tokens=120, max_tokens=1000),
        parser="code",
    )
    assert ep.stop_reason == "done" and ep.tool_calls == 2 and ep.turns == 3
    outputs = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert outputs[0] == f"```output\n{2**100 % 97}\n```"  # the output block the code-interpreter style reads
    assert_buffer_is_the_render(tok, ep, make().tools, tail="\n")


class SlowEnv:
    """Every step sleeps ``delay`` seconds (a hung tool when ``delay`` is long)."""

    tools: list = []

    def __init__(self, delay):
        self.delay = delay

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, turn):
        time.sleep(self.delay)
        return StepResult([{"role": "user", "content": "again"}])

    def close(self):
        pass


@pytest.mark.parametrize("on_timeout, want", [("error", "max_turns"), ("end", "timeout")])
def test_a_hung_step_is_a_timeout_and_the_loop_goes_on(char_tok, on_timeout, want):
    budgets = Budgets(max_turns=2, turn_tokens=20, max_tokens=500, tool_timeout_s=0.3, on_timeout=on_timeout)
    t0 = time.time()
    eps = run(char_tok, [["a"]] * 4, lambda: SlowEnv(30), [{"prompt": "q"}] * 4, budgets)
    assert time.time() - t0 < 5  # four hung steps per turn, waited for once, together
    for ep in eps:
        assert ep.stop_reason == want and ep.timeouts >= 1
    if on_timeout == "error":
        assert any("timed out" in m["content"] for m in eps[0].messages if m["role"] == "tool")


def test_environments_step_concurrently(char_tok):
    budgets = Budgets(max_turns=2, turn_tokens=20, max_tokens=500, tool_timeout_s=10)
    t0 = time.time()
    eps = run(char_tok, [["a"]] * 8, lambda: SlowEnv(0.5), [{"prompt": "q"}] * 8, budgets)
    # 8 episodes x 2 steps of 0.5 s: 8 s in a row, about 1 s when the 8 steps of a turn run together
    assert time.time() - t0 < 3 and all(ep.turns == 2 for ep in eps)


def test_rollout_logps_line_up_with_sampled_tokens_for_the_off_policy_correction(char_tok):
    # TIS / MIS compare the sampler's log-probs with the trainer's token by token: in a multi-turn completion the
    # sampler's value of every sampled token must sit at that token's loss position, env tokens carry none
    tok = char_tok
    prompt = tuple(tok.encode("q?"))
    parts = [(tok.encode("call"), 1), (tok.encode("\nresult\n"), 0), (tok.encode("ans"), 1)]
    ids = tuple(t for p, _ in parts for t in p)
    mask = tuple(m for p, m in parts for _ in p)
    lps = tuple(-(i + 1) / 10 if m else 0.0 for i, m in enumerate(mask))
    g = Group(0, prompt, (ids,), ("ans",), (False,), (1.0,), {"r": (1.0,)}, 0, (lps,), (mask,), ({},))
    mbs = micro_batches(sequences([g], False), 4, tok.pad_token_id, "cpu")
    (r_BT,) = grpo.rollout_logps([g], mbs)
    m = mbs[0][0].target_mask_BT
    assert r_BT[m > 0].tolist() == pytest.approx([x for x, k in zip(lps, mask) if k])


def test_sigkill_mid_run_then_resume_matches_the_uninterrupted_multi_turn_run(tmp_path, game_rows):
    steps = 24  # the kill lands at step >= 4, before the end
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}

    def cli(out):
        return [
            sys.executable,
            "-m",
            "posttrain.commands.main",
            "grpo",
            *GAME,
            f"data.path={game_rows}",
            "train.save_every=2",
            "samples_every=0",
            f"train.steps={steps}",
            f"train.output_dir={out}",
        ]

    subprocess.run(cli(tmp_path / "full"), check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    ckpt = kill_mid_run(cli(killed), killed, 5, env=env, timeout=300)
    assert int(ckpt.name.split("-")[1]) < steps
    subprocess.run(cli(killed), check=True, capture_output=True, env=env)
    wa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    wb = load_file(killed / "final" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    ma, mb = read_metrics(tmp_path / "full"), read_metrics(killed)
    assert [r["step"] for r in mb] == list(range(1, steps + 1))
    for key in ("reward/mean", "episode/turns", "num_tokens"):
        assert [r.get(key) for r in mb] == pytest.approx([r.get(key) for r in ma], abs=1e-6), key
