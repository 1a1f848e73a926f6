"""PPO with a critic: layouts, the update's invariances, learning against a reward model, and exact
resume (including kill -9) with the critic and both optimizers."""

from __future__ import annotations

import copy
import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kill_resume import kill_mid_run
from posttrain.config import ConfigError, GRPOConfig, PPOConfig, RewardModelConfig, config_from_dict
from posttrain.models.loading import ModelError
from posttrain.models.scalar import scalar_from_causal
from posttrain.recipes import grpo, ppo
from posttrain.recipes import reward_model as rm
from posttrain.rl.groups import Group
from posttrain.runtime.tracking import read_metrics

TESTS = Path(__file__).parent


def _cfg(tmp_path, *overrides):
    return config_from_dict(PPOConfig, {}, [f"train.output_dir={tmp_path}", "train.progress=false", *overrides])


def _group(row, prompt, completions, rewards, truncated=None):
    G = len(completions)
    return Group(
        row,
        tuple(prompt),
        tuple(tuple(c) for c in completions),
        tuple("x" * len(c) for c in completions),
        tuple(truncated or [False] * G),
        tuple(rewards),
        {"r": tuple(rewards)},
    )


def _varied_groups():
    g = torch.Generator().manual_seed(3)
    out = []
    for p in range(3):
        comps = [torch.randint(5, 60, (n,), generator=g).tolist() for n in (1, 2, 3, 30)]
        out.append(
            _group(
                p,
                torch.randint(5, 60, (2 + 2 * p,), generator=g).tolist(),
                comps,
                torch.rand(4, generator=g).tolist(),
                truncated=[False, False, False, p == 1],
            )
        )
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_row_layout_round_trips_to_completion_layout(packed):
    seqs = grpo.sequences(_varied_groups(), mask_truncated=True)
    mask = ppo.completion_mask(seqs)
    assert mask.sum(1).tolist() == [
        float(len(e) - len([t for t in e.loss_mask if t == 0])) if k else 0.0 for e, k in seqs
    ] + [0.0]  # + the empty slot of padding micro-batches
    x = torch.randn(mask.shape) * mask
    back = torch.zeros_like(x)
    for batch, idx in grpo.micro_batches(seqs, 2, 0, "cpu", packed=packed):
        rows = ppo.to_rows(x, batch, idx, mask)
        # each row holds its sequence's completion values, in order, at its loss positions
        for j, n in enumerate(idx.tolist()):
            k = int(mask[n].sum())
            assert torch.equal(rows[j][batch.target_mask_BT[j] > 0], x[n, :k])
        ppo.from_rows(rows, batch, idx, back, mask)
    assert torch.equal(back, x)


def test_critic_values_line_up_with_a_one_sequence_forward(tiny_model, char_tok):
    critic = scalar_from_causal(tiny_model, char_tok, seed=1)  # a random (non-zero) head
    seqs = grpo.sequences(_varied_groups(), mask_truncated=False)
    mask = ppo.completion_mask(seqs)
    from posttrain.data.collate import collate_padded
    from posttrain.models.scalar import token_values

    for packed in (False, True):
        out = torch.zeros_like(mask)
        with torch.no_grad():
            for batch, idx in grpo.micro_batches(seqs, 2, 0, "cpu", packed=packed):
                ppo.from_rows(ppo.critic_values(critic, batch), batch, idx, out, mask)
        for n, (ex, _) in enumerate(seqs):
            b = collate_padded([ex], 0)
            with torch.no_grad():
                v = token_values(critic, b.input_ids_BT, b.attention_mask, b.position_ids_BT)[0]
            k = int(mask[n].sum())
            assert torch.allclose(out[n, :k], v[b.target_mask_BT[0] > 0], atol=1e-5), (packed, n)


def _update(model, critic, cfg, groups, lr=0.5):
    model, critic = copy.deepcopy(model), copy.deepcopy(critic)
    opts = []
    for m in (model, critic):
        o = torch.optim.SGD(m.parameters(), lr=lr)
        opts += [o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)]
    timing = {"logps": 0.0, "update": 0.0}
    metrics = ppo.ppo_update(cfg, model, critic, None, groups, *opts, grpo.make_policy_loss(cfg), 0, "cpu", timing, 1)
    return model, critic, metrics


@pytest.mark.parametrize(
    "overrides",
    [
        ("aggregation=token_mean",),
        ("aggregation=seq_mean_token_mean", "ppo_epochs=2"),
        ("num_mini_batches=2", "ppo_epochs=2", "eps_high=0.28", "dual_clip=3"),
    ],
)
def test_update_is_the_same_packed_padded_and_in_any_micro_batch_size(tmp_path, tiny_model, char_tok, overrides):
    model = copy.deepcopy(tiny_model).double()
    critic = scalar_from_causal(model, char_tok, seed=1)
    groups = _varied_groups()
    results = []
    for packed, mbs in ((False, 12), (False, 1), (True, 2)):
        cfg = _cfg(
            tmp_path,
            *overrides,
            f"padding_free={str(packed).lower()}",
            f"train.micro_batch_size={mbs}",
            "mask_truncated_completions=true",
            "optim.max_grad_norm=0",
            "critic.max_grad_norm=0",
            "beta=0",
        )
        results.append(_update(model, critic, cfg, groups))
    (a, ca, ma) = results[0]
    for b, cb, mb in results[1:]:
        for k in ("loss", "value_loss", "explained_variance", "approx_kl", "entropy", "clip_frac/high", "num_tokens"):
            assert ma[k] == pytest.approx(mb[k], rel=1e-9, abs=1e-12), k
        for (n, pa), (_, pb) in zip(
            list(a.named_parameters()) + list(ca.named_parameters()),
            list(b.named_parameters()) + list(cb.named_parameters()),
        ):
            assert torch.allclose(pa, pb, rtol=0, atol=1e-10), n
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), model.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(ca.parameters(), critic.parameters()))
    assert ma["approx_kl"] > 0 or "ppo_epochs=2" not in overrides


# One epoch, gamma = lam = 1, no whitening, no KL, no clipping of gradients: every token's advantage is the
# completion's score minus the critic's value, so an update can be checked against a hand-made gradient.
PLAIN_RETURNS = (
    "ppo_epochs=1",
    "gamma=1",
    "lam=1",
    "whiten_advantages=false",
    "beta=0",
    "optim.max_grad_norm=0",
    "critic.max_grad_norm=0",
)


def test_first_update_is_the_gae_advantage_policy_gradient(tmp_path, tiny_model, char_tok):
    """One epoch, one mini-batch, gamma = lam = 1, no whitening, a zero critic: A_t = score (the return
    from every token), so the policy gradient is that of -sum_t score * logp_t / N_tokens."""
    model = copy.deepcopy(tiny_model).double()
    critic = scalar_from_causal(model, char_tok, zero_head=True)
    groups = _varied_groups()
    cfg = _cfg(tmp_path, *PLAIN_RETURNS, "train.micro_batch_size=12")
    a, _, m = _update(model, critic, cfg, groups, lr=1.0)
    assert m["values/mean"] == 0 and m["explained_variance"] == 0
    # the same step by hand
    b = copy.deepcopy(model)
    seqs = grpo.sequences(groups, False)
    scores = [r for g in groups for r in g.rewards]
    ((batch, idx),) = grpo.micro_batches(seqs, 12, 0, "cpu")
    lp, _ = grpo.policy_logps(b, batch, 1.0)
    adv = torch.tensor(scores, dtype=torch.float64)[idx][:, None] * batch.target_mask_BT
    (-(adv * lp).sum() / batch.target_mask_BT.sum()).backward()
    with torch.no_grad():
        for p in b.parameters():
            p -= p.grad
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-10), n


# --- end to end -------------------------------------------------------------------------------------


def _count_pairs(path, rows, seed=0):
    """Preference pairs that prefer more '1' characters: a reward model trained on them scores 'how many
    ones', which a tiny policy can learn to raise."""
    rng = random.Random(seed)

    def sample(f):
        return "".join(
            "1" if rng.random() < f else rng.choice(string.printable[:94]) for _ in range(rng.randint(4, 12))
        )

    with open(path, "w") as fh:
        for r in rows * 8:
            a, b = sample(rng.random()), sample(rng.random())
            fa, fb = a.count("1") / len(a), b.count("1") / len(b)
            if fa != fb:
                fh.write(
                    json.dumps({"prompt": r["prompt"], "chosen": a if fa > fb else b, "rejected": b if fa > fb else a})
                    + "\n"
                )
    return path


@pytest.fixture(scope="module")
def ones_reward_model(tmp_path_factory):
    from posttrain.data.io import read_rows

    tmp = tmp_path_factory.mktemp("rm")
    data = _count_pairs(tmp / "pairs.jsonl", read_rows("builtin:arithmetic", num_examples=80).rows)
    cfg = config_from_dict(
        RewardModelConfig,
        {},
        [
            f"train.output_dir={tmp / 'rm'}",
            "train.progress=false",
            "model=tiny",
            f"data.path={data}",
            "optim.lr=5e-3",
            "optim.schedule=constant",
            "train.steps=80",
            "train.micro_batch_size=32",
            "data.eval_fraction=0.2",
        ],
    )
    out = rm.train(cfg)
    assert read_metrics(tmp / "rm")[-1]["eval_accuracy"] > 0.85
    return out


RL_COMMON = [
    "model=tiny",
    "data.path=builtin:arithmetic",
    "data.num_examples=200",
    "prompts_per_step=4",
    "num_generations=4",
    "max_completion_length=12",
    "optim.schedule=constant",
    "train.micro_batch_size=32",
    "samples_every=0",
]


def test_ppo_raises_the_reward_model_score(tmp_path, ones_reward_model):
    cfg = _cfg(
        tmp_path,
        *RL_COMMON,
        f"rewards=[{{name: toy_rewards:ones, weight: 0}}, "
        f"{{name: reward_model, options: {{path: '{ones_reward_model}'}}}}]",
        "optim.lr=6e-3",
        "critic.lr=6e-3",
        "train.steps=25",
        "critic=reward_model",
    )
    ppo.train(cfg)
    m = read_metrics(tmp_path)
    first = sum(r["reward/reward_model/mean"] for r in m[:5]) / 5
    last = sum(r["reward/reward_model/mean"] for r in m[-5:]) / 5
    assert last > first + 1.0, (first, last)
    # the monitor-only component is logged but does not train: the total is the reward model's score alone
    assert all(r["reward/mean"] == pytest.approx(r["reward/reward_model/mean"], abs=1e-5) for r in m)
    # The gold it stands for is logged each step. (It need not rise: on this seed the policy learns to write
    # ';', which this small reward model scores high -- reward-model over-optimization, in miniature.)
    assert all(0.0 <= r["reward/ones/mean"] <= 1.0 for r in m)
    for key in (
        "value_loss",
        "explained_variance",
        "value_clip_frac",
        "kl",
        "approx_kl",
        "clip_frac/low",
        "clip_frac/high",
        "returns/mean",
        "advantages/mean",
        "entropy",
        "grad_norm",
        "critic/grad_norm",
        "critic/lr",
        "accuracy",
        "truncation_rate",
        "time/update",
    ):
        assert key in m[-1], key
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "critic" / "config.json").exists()


def test_reward_model_reward_trains_grpo(tmp_path, ones_reward_model):
    cfg = config_from_dict(
        GRPOConfig,
        {},
        [
            f"train.output_dir={tmp_path}",
            "train.progress=false",
            *RL_COMMON,
            "num_generations=8",
            "optim.lr=6e-3",
            "train.steps=20",
            f"rewards=[{{name: reward_model, options: {{path: '{ones_reward_model}'}}}}]",
        ],
    )
    grpo.train(cfg)
    m = read_metrics(tmp_path)
    first = sum(r["reward/mean"] for r in m[:5]) / 5
    last = sum(r["reward/mean"] for r in m[-5:]) / 5
    assert last > first + 1.0, (first, last)


def test_critic_with_another_tokenizer_is_refused_naming_the_field(tmp_path, char_tok):
    from posttrain.models.tiny import build_tiny_model, build_tokenizer

    bpe = build_tokenizer("bpe", ["12+34=46 hello"] * 20, vocab_size=120)
    other = scalar_from_causal(build_tiny_model("tiny", bpe), bpe)
    other.save_pretrained(tmp_path / "critic")
    bpe.save_pretrained(tmp_path / "critic")
    cfg = _cfg(tmp_path / "run", *RL_COMMON, "rewards=[toy_rewards:ones]", f"critic.init={tmp_path / 'critic'}")
    with pytest.raises(ModelError, match=r"critic.init=.*tokenizer differs from the policy's"):
        ppo.train(cfg)
    cfg = _cfg(tmp_path / "run2", *RL_COMMON, "rewards=[toy_rewards:ones]", f"critic.init={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"critic.init=.*neither a tiny preset"):  # before anything starts
        ppo.train(cfg)
    assert not (tmp_path / "run2").exists()


def _cli(out_dir, steps):
    return [
        sys.executable,
        "-m",
        "posttrain.commands.main",
        "ppo",
        *RL_COMMON,
        "rewards=[toy_rewards:ones]",
        "beta=0.05",
        "prompts_per_step=2",
        "num_generations=2",
        "max_completion_length=8",
        "num_mini_batches=2",
        "ppo_epochs=2",
        "optim.lr=3e-3",
        "critic.lr=3e-3",
        f"train.steps={steps}",
        "train.save_every=3",
        "train.progress=false",
        f"train.output_dir={out_dir}",
    ]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    steps = 40  # the kill lands at step >= 6, before the end, even on a fast machine
    full = tmp_path / "full"
    subprocess.run(_cli(full, steps), check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    ckpt = kill_mid_run(_cli(killed, steps), killed, 6, env=env)
    assert int(ckpt.name.split("-")[1]) < steps and (ckpt / "critic").is_dir()
    subprocess.run(_cli(killed, steps), check=True, capture_output=True, env=env)
    for name in ("final", "critic"):
        wa, wb = load_file(full / name / "model.safetensors"), load_file(killed / name / "model.safetensors")
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-6), (name, k)
    ma, mb = read_metrics(full), read_metrics(killed)
    assert [r["step"] for r in mb] == list(range(1, steps + 1))
    for key in ("reward/mean", "value_loss", "loss", "kl"):
        assert [r[key] for r in mb] == pytest.approx([r[key] for r in ma], abs=1e-6), key


def test_ppo_with_lora_uses_adapters_off_as_reference_and_a_full_critic(tmp_path):
    cfg = _cfg(
        tmp_path,
        *RL_COMMON,
        "rewards=[toy_rewards:ones]",
        "lora.r=4",
        "beta=0.1",
        "optim.lr=1e-2",
        "train.steps=3",
        "ppo_epochs=2",
    )
    ppo.train(cfg)
    m = read_metrics(tmp_path)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts equal to its reference
    assert m[-1]["kl"] != 0.0  # and moves away from it
    assert m[0]["memory/models_held"] == 2  # policy (its reference is itself, adapters off) + critic
    from transformers import AutoModelForCausalLM

    assert not any("lora" in n for n, _ in AutoModelForCausalLM.from_pretrained(tmp_path / "final").named_parameters())


# --- truncation, critic warmup, decoupled GAE (issue 23) ----------------------------------------------------


def _one_truncated_group():
    # three finished completions scored 0, one cut at the length cap with the overlong penalty -1
    return [
        _group(
            0,
            [5, 6, 7],
            [[8, 9], [10, 11, 12], [13], [14, 15, 16, 17]],
            [0.0, 0.0, 0.0, -1.0],
            truncated=[False, False, False, True],
        )
    ]


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_a_truncated_completion_is_a_terminal_state_with_its_reward_and_carries_gradient(
    tmp_path, tiny_model, char_tok, mask_truncated
):
    """Only the truncated completion has a non-zero return (-1, at its last token: terminal), so with gamma =
    lam = 1, a zero critic and no whitening, the policy moves exactly when its tokens carry gradient: by
    default (PPO's truncation is terminal) they do; with mask_truncated_completions they carry none."""
    model = copy.deepcopy(tiny_model).double()
    critic = scalar_from_causal(model, char_tok, zero_head=True)
    groups = _one_truncated_group()
    seqs = grpo.sequences(groups, mask_truncated)
    mask = ppo.completion_mask(seqs)
    from posttrain.rl.advantages import per_token_rewards

    rewards = per_token_rewards(torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0]), torch.zeros_like(mask), mask, 0.0)
    assert rewards[3].tolist() == ([0.0] * 3 if mask_truncated else [0.0, 0.0, 0.0, -1.0])  # -1 at the last token
    cfg = _cfg(tmp_path, *PLAIN_RETURNS, f"mask_truncated_completions={str(mask_truncated).lower()}")
    a, _, m = _update(model, critic, cfg, groups, lr=1.0)
    moved = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), model.parameters()))
    assert m["num_tokens"] == (6 if mask_truncated else 10)
    assert (moved == 0.0) if mask_truncated else (moved > 1e-6)


def test_masking_truncated_completions_in_ppo_earns_a_warning_at_the_start(tmp_path, caplog):
    cfg = _cfg(tmp_path, "mask_truncated_completions=true")
    assert "the one place no negative signal reaches" in cfg.advice()[0]
    assert _cfg(tmp_path).advice() == [] and not hasattr(GRPOConfig, "advice")


def test_the_truncation_warning_fires_once_as_completions_run_into_the_cap():
    from posttrain.config import DiagnosticsConfig
    from posttrain.rl.diagnostics import Monitor

    mon = Monitor(DiagnosticsConfig())  # window 20, share 0.5, rise 0.1
    rates = [0.0] * 30 + [min(0.97, 0.02 * k) for k in range(1, 60)] + [0.97] * 200  # the measured escape
    fired = [(s, a) for s, r in enumerate(rates, 1) for a in mon.observe(s, {"truncation_rate": r})]
    ((step, alert),) = fired
    assert alert.kind == "truncation" and 50 < step < 90
    assert "hit the length cap" in alert.cause and "mask_truncated_completions false" in alert.suggestion
    # a run that always needs the whole budget, but does not drift there, is not this failure
    steady = Monitor(DiagnosticsConfig())
    assert not [a for s in range(1, 200) for a in steady.observe(s, {"truncation_rate": 0.6})]


def test_critic_warmup_leaves_the_policy_bit_identical_while_the_value_loss_falls(tmp_path, tiny_model, char_tok):
    model = copy.deepcopy(tiny_model)
    critic = scalar_from_causal(model, char_tok, zero_head=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg(tmp_path, "ppo_epochs=1", "beta=0", "critic.value_clip=0", "train.micro_batch_size=12")
    opts = []
    for m in (model, critic):
        o = torch.optim.AdamW(m.parameters(), lr=3e-3)
        opts += [o, torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0)]
    losses = []
    for step in range(1, 9):
        timing = {"logps": 0.0, "update": 0.0}
        m = ppo.ppo_update(
            cfg,
            model,
            critic,
            None,
            _varied_groups(),
            *opts,
            grpo.make_policy_loss(cfg),
            0,
            "cpu",
            timing,
            step,
            warmup=True,
        )
        losses.append(m["value_loss"])
        assert m["grad_norm"] == 0.0 and m["loss"] == 0.0 and m["critic/grad_norm"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert losses[-1] < 0.5 * losses[0], losses


def test_decoupled_gae_against_a_hand_computed_vector():
    from posttrain.rl.advantages import decoupled_gae, gae

    # one completion of 3 tokens (+ a padded position), reward 1 at the end, values 0.5, 0.2, 0.4; gamma 1.
    # deltas: t2 = 1 - 0.4 = 0.6, t1 = 0.4 - 0.2 = 0.2, t0 = 0.2 - 0.5 = -0.3
    # actor, lam 0.5: A = [-0.3 + 0.5 * 0.5, 0.2 + 0.5 * 0.6, 0.6] = [-0.05, 0.5, 0.6]
    # critic, lam 1: A = [0.5, 0.8, 0.6], returns A + V = [1, 1, 1] (the undecayed terminal reward)
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.2, 0.4, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    adv, ret = decoupled_gae(r, v, mask, gamma=1.0, lam_actor=0.5, lam_critic=1.0)
    assert torch.allclose(adv, torch.tensor([[-0.05, 0.5, 0.6, 0.0]], dtype=torch.float64))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64))
    coupled = gae(r, v, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(coupled[1], torch.tensor([[0.45, 0.7, 1.0, 0.0]], dtype=torch.float64))
    same = decoupled_gae(r, v, mask, gamma=1.0, lam_actor=0.5, lam_critic=0.5)
    assert all(torch.equal(x, y) for x, y in zip(same, coupled))


def test_the_recipe_warms_the_critic_up_before_the_policy_moves(tmp_path):
    """critic.warmup_steps through train(): the first steps update the critic only (no policy gradient, the
    policy's learning rate not yet stepped), the next ones both."""
    cfg = _cfg(
        tmp_path,
        *RL_COMMON,
        "rewards=[toy_rewards:ones]",
        "beta=0",
        "train.steps=4",
        "critic.warmup_steps=2",
        "optim.warmup_steps=0",
        "optim.schedule=constant",
    )
    ppo.train(cfg)
    m = read_metrics(tmp_path)
    assert [r.get("critic/warmup", 0.0) for r in m] == [1.0, 1.0, 0.0, 0.0]
    assert [r["grad_norm"] == 0.0 for r in m] == [True, True, False, False]
    assert all("value_loss" in r and "critic/grad_norm" in r for r in m)  # the critic trains at every step
    with pytest.raises(ConfigError, match="critic.warmup_steps: 4 warmup steps leave none"):
        _cfg(tmp_path, "train.steps=4", "critic.warmup_steps=4")


def test_a_step_whose_completions_are_all_masked_logs_no_entropy(tmp_path, tiny_model, char_tok):
    """Every completion truncated and masked: there is no token to measure. The step logged entropy 0, which
    fired the entropy warning again and again in a PPO run escaping into truncation."""
    model = copy.deepcopy(tiny_model)
    critic = scalar_from_causal(model, char_tok, zero_head=True)
    groups = [_group(0, [5, 6], [[7, 8], [9]], [0.0, 1.0], truncated=[True, True])]
    cfg = _cfg(tmp_path, "mask_truncated_completions=true", "beta=0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, m = _update(model, critic, cfg, groups)
    assert m["skipped_update"] == 1.0 and m["num_tokens"] == 0.0 and "entropy" not in m
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
