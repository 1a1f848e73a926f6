import copy

import pytest
import torch

from posttrain.config import GRPOConfig, config_from_dict
from posttrain.recipes import grpo
from posttrain.rl.groups import Group, collect_groups
from posttrain.runtime.tracking import read_metrics


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


def test_dynamic_sampling_keeps_only_varied_groups():
    rounds = iter(
        [
            [_group(0, [5], [[6], [7]], [1, 1]), _group(1, [5], [[6], [7]], [0, 1])],
            [_group(2, [5], [[6], [7]], [0, 0]), _group(3, [5], [[6], [7]], [1, 0])],
            [_group(4, [5], [[6], [7]], [0, 1])],
        ]
    )
    kept, generated, stats = collect_groups(lambda: next(rounds), 2, dynamic=True, max_rounds=5)
    assert [g.row for g in kept] == [1, 3] and all(g.has_variance for g in kept)
    assert (stats.rounds, stats.generated_groups, stats.zero_variance_groups) == (2, 4, 2)
    assert not stats.bound_reached and len(generated) == 4


def test_dynamic_sampling_survives_all_uniform_groups():
    calls = []

    def uniform():
        calls.append(1)
        return [_group(i, [5], [[6], [7]], [1, 1]) for i in range(4)]

    kept, _, stats = collect_groups(uniform, 4, dynamic=True, max_rounds=3)
    assert kept == [] and stats.bound_reached and stats.rounds == 3 and len(calls) == 3
    assert stats.zero_variance_frac == 1.0
    # Without dynamic sampling every group is kept after one round.
    kept, _, stats = collect_groups(uniform, 4, dynamic=False, max_rounds=3)
    assert len(kept) == 4 and stats.rounds == 1


def _cfg(tmp_path, *overrides):
    return config_from_dict(GRPOConfig, {}, [f"train.output_dir={tmp_path}", "train.progress=false", *overrides])


def _groups():
    torch.manual_seed(0)
    out = []
    for p in range(4):
        comps = [torch.randint(5, 60, (int(n),)).tolist() for n in torch.randint(1, 9, (4,))]
        out.append(_group(p, torch.randint(5, 60, (3 + p,)).tolist(), comps, torch.rand(4).tolist()))
    return out


def _update(model, cfg, groups, lr=1.0):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    timing = {"logps": 0.0, "update": 0.0}
    m = grpo.update_policy(cfg, model, None, groups, opt, sched, grpo.make_policy_loss(cfg), 0, "cpu", timing, 1)
    return model, m


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_sum_const"])
def test_micro_batch_1x8_equals_8x1_for_the_whole_update(tmp_path, tiny_model, mode):
    groups = _groups()[:2]  # 8 sequences
    cfg8 = _cfg(tmp_path, f"aggregation={mode}", "train.micro_batch_size=8", "optim.max_grad_norm=0")
    cfg1 = _cfg(tmp_path, f"aggregation={mode}", "train.micro_batch_size=1", "optim.max_grad_norm=0")
    a, ma = _update(tiny_model, cfg8, groups)
    b, mb = _update(tiny_model, cfg1, groups)
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), tiny_model.parameters()))


def test_truncated_completions_add_no_loss_when_masked(tmp_path, tiny_model):
    # The only completions with a non-zero advantage are truncated: masked, the update is exactly zero.
    groups = [
        _group(0, [10, 11, 12], [[20, 21], [22, 23, 24]], [1.0, 0.0], truncated=[True, True]),
        _group(1, [13, 14], [[25], [26, 27]], [0.5, 0.5]),
    ]
    on = _cfg(tmp_path, "mask_truncated_completions=true", "train.micro_batch_size=4")
    off = _cfg(tmp_path, "mask_truncated_completions=false", "train.micro_batch_size=4")
    a, m = _update(tiny_model, on, groups)
    assert m["num_tokens"] == 3  # only group 1's completion tokens remain
    for pa, p0 in zip(a.parameters(), tiny_model.parameters()):
        assert torch.equal(pa, p0)
    b, _ = _update(tiny_model, off, groups)
    assert any(not torch.equal(pb, p0) for pb, p0 in zip(b.parameters(), tiny_model.parameters()))


def test_mu_1_makes_no_old_logp_pass_and_mu_2_makes_one(tmp_path, tiny_model, monkeypatch):
    calls = []
    real = grpo.frozen_logps
    monkeypatch.setattr(grpo, "frozen_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, m1 = _update(tiny_model, _cfg(tmp_path, "num_iterations=1"), _groups())
    assert calls == [] and m1["clip_frac/low"] == 0 and m1["clip_frac/high"] == 0  # ratio exactly 1
    _, m2 = _update(tiny_model, _cfg(tmp_path, "num_iterations=2", "optim.lr=1e-2"), _groups(), lr=0.5)
    assert calls == [1]
    # The second update sees ratio != 1: with lr 0.5 some tokens leave the clip range.
    assert m2["clip_frac/low_last"] + m2["clip_frac/high_last"] > 0


def test_beta_zero_loads_no_reference_model(tmp_path, tiny_model):
    assert grpo.reference_model(_cfg(tmp_path, "beta=0"), tiny_model, "cpu") is None
    ref = grpo.reference_model(_cfg(tmp_path, "beta=0.1"), tiny_model, "cpu")
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())


def test_grpo_reward_rises_on_a_toy_verifiable_task(tmp_path):
    cfg = _cfg(
        tmp_path,
        "model=tiny",
        "data.path=builtin:arithmetic",
        "data.num_examples=200",
        "rewards=[toy_rewards:ones]",
        "prompts_per_step=4",
        "num_generations=8",
        "max_completion_length=12",
        "optim.lr=3e-3",
        "optim.schedule=constant",
        "train.steps=30",
        "train.micro_batch_size=32",
        "samples_every=0",
    )
    grpo.train(cfg)
    m = read_metrics(tmp_path)
    first = sum(r["reward/mean"] for r in m[:5]) / 5
    last = sum(r["reward/mean"] for r in m[-5:]) / 5
    assert last > first + 0.3, (first, last)
    for key in (
        "reward/ones/mean",
        "accuracy",
        "zero_variance_frac",
        "completion_len/max",
        "truncation_rate",
        "entropy",
        "clip_frac/low",
        "clip_frac/high",
        "grad_norm",
        "lr",
        "time/generate",
        "time/reward",
        "time/logps",
        "time/update",
        "tokens_per_s",
    ):
        assert key in m[-1], key
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_grpo_resume_is_exact(tmp_path):
    from safetensors.torch import load_file

    common = [
        "model=tiny",
        "data.path=builtin:arithmetic",
        "data.num_examples=100",
        "rewards=[toy_rewards:ones]",
        "prompts_per_step=2",
        "num_generations=4",
        "max_completion_length=8",
        "optim.lr=3e-3",
        "optim.schedule=constant",
        "train.micro_batch_size=8",
        "samples_every=0",
        "num_iterations=2",
    ]
    full = _cfg(tmp_path / "full", *common, "train.steps=4")
    grpo.train(full)
    grpo.train(_cfg(tmp_path / "split", *common, "train.steps=2"))
    grpo.train(_cfg(tmp_path / "split", *common, "train.steps=4"))  # resume: auto
    wa = load_file(tmp_path / "full" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "split" / "final" / "model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    ra = [r["reward/mean"] for r in read_metrics(tmp_path / "full")]
    rb = [r["reward/mean"] for r in read_metrics(tmp_path / "split")]
    assert ra == pytest.approx(rb, abs=1e-7) and len(rb) == 4


def test_grpo_with_lora_and_kl_uses_adapters_off_as_reference(tmp_path):
    cfg = _cfg(
        tmp_path,
        "model=tiny",
        "data.path=builtin:arithmetic",
        "data.num_examples=50",
        "lora.r=4",
        "beta=0.1",
        "kl_estimator=k3",
        "rewards=[toy_rewards:parity]",
        "prompts_per_step=2",
        "num_generations=4",
        "max_completion_length=8",
        "optim.lr=1e-2",
        "train.steps=3",
        "train.micro_batch_size=8",
        "samples_every=0",
        "num_iterations=2",
    )
    grpo.train(cfg)
    m = read_metrics(tmp_path)
    assert m[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts equal to its reference
    assert m[-1]["kl"] > 0  # and moves away from it


def test_kl_in_reward_subtracts_the_summed_sequence_kl_before_the_baseline(tmp_path, tiny_model, monkeypatch):
    """With kl_in=reward the advantages come from r - beta * sum_t KL_t; a policy equal to its reference
    has zero KL, so the advantages equal the plain ones; a shifted reference changes them."""
    groups = _groups()[:2]
    cfg = _cfg(tmp_path, "beta=0.5", "kl_in=reward", "kl_estimator=k1", "train.micro_batch_size=8")
    seen = []
    real = grpo.compute_advantages
    monkeypatch.setattr(grpo, "compute_advantages", lambda r, c, v=None: seen.append(r.clone()) or real(r, c, v))
    ref_same = copy.deepcopy(tiny_model).requires_grad_(False)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    timing = {"logps": 0.0, "update": 0.0}
    grpo.update_policy(cfg, tiny_model, ref_same, groups, opt, sched, grpo.make_policy_loss(cfg), 0, "cpu", timing, 1)
    plain = torch.tensor([g.rewards for g in groups])
    assert torch.allclose(seen[-1], plain, atol=1e-5)
    ref_other = copy.deepcopy(tiny_model).requires_grad_(False)
    with torch.no_grad():
        for p in ref_other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grpo.update_policy(cfg, tiny_model, ref_other, groups, opt, sched, grpo.make_policy_loss(cfg), 0, "cpu", timing, 1)
    mbs = grpo.micro_batches(grpo.sequences(groups, False), 8, 0, "cpu")
    refs = grpo.frozen_logps(ref_other, mbs, 1.0)
    kl = grpo.sequence_kl(tiny_model, mbs, refs, cfg).view_as(plain)
    assert kl.abs().sum() > 0
    assert torch.allclose(seen[-1], plain - 0.5 * kl, atol=1e-5)
    # sequence_kl against a one-sequence-at-a-time reference: k1 summed over completion tokens
    from posttrain.data.collate import collate_padded
    from posttrain.losses.logprobs import forward_logits, token_logps

    seqs = grpo.sequences(groups, False)
    for i, (ex, _) in enumerate(seqs):
        b = collate_padded([ex], 0)
        with torch.no_grad():
            lp = token_logps(
                forward_logits(tiny_model, b.input_ids_BT, b.attention_mask, b.position_ids_BT), b.targets_BT
            )
            rp = token_logps(
                forward_logits(ref_other, b.input_ids_BT, b.attention_mask, b.position_ids_BT), b.targets_BT
            )
        expected = ((lp - rp) * b.target_mask_BT).sum().item()
        assert kl.flatten()[i].item() == pytest.approx(expected, abs=1e-4)


# --- padding-free update: packed rows compute the padded update exactly ------------------------------


def _varied_groups():
    """Completions of very different lengths, so packing changes the layout a lot."""
    g = torch.Generator().manual_seed(3)
    out = []
    for p in range(3):
        lens = [1, 2, 3, 30]
        comps = [torch.randint(5, 60, (n,), generator=g).tolist() for n in lens]
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


def test_packed_micro_batches_run_fewer_tokens_and_map_back_exactly():
    seqs = grpo.sequences(_varied_groups(), mask_truncated=True)
    packed = grpo.micro_batches(seqs, 4, 0, "cpu", packed=True)  # up to 4 packed rows per micro-batch
    assert sorted(i for _, idx in packed for i in idx.tolist()) == list(range(len(seqs)))
    assert len(packed) == 2  # 12 sequences fit in 8 rows of the longest length
    for b, idx in packed:
        # the same micro-batch, padded: the loss layout must be identical
        a, _ = grpo.micro_batches([seqs[i] for i in idx.tolist()], 99, 0, "cpu")[0]
        order = sorted(range(len(idx)), key=lambda j: len(seqs[idx[j]][0]))  # padded sorts by length
        a_mask = torch.zeros_like(a.target_mask_BT)
        a_mask[order] = a.target_mask_BT
        assert torch.equal(a_mask, b.target_mask_BT)
        assert b.inputs.input_ids_BT.shape[0] <= 4 and b.inputs.attention_mask.dim() == 4
        a_targets, a_pos = torch.zeros_like(a.inputs.targets_BT), torch.zeros_like(a.inputs.position_ids_BT)
        a_targets[order], a_pos[order] = a.inputs.targets_BT, a.inputs.position_ids_BT
        sel = b.target_mask_BT > 0
        # every loss position maps to the same target token and the same position id in the packed rows
        assert torch.equal(b.inputs.targets_BT.reshape(-1)[b.src], a_targets[sel])
        assert torch.equal(b.inputs.position_ids_BT.reshape(-1)[b.src], a_pos[sel])
        assert b.inputs.target_mask_BT.sum() == b.target_mask_BT.sum()
    padded = grpo.micro_batches(seqs, 12, 0, "cpu")
    total = lambda mbs: sum(m.inputs.input_ids_BT.numel() for m, _ in mbs)  # noqa: E731
    assert total(packed) < 0.8 * total(padded)


def test_packing_falls_back_to_padded_rows_when_it_saves_nothing():
    # Every sequence the same length (e.g. all completions hit the cap): nothing to pack.
    groups = [_group(p, [5, 6, 7], [[8] * 10] * 4, [0.0, 1.0, 0.0, 1.0]) for p in range(2)]
    mbs = grpo.micro_batches(grpo.sequences(groups, False), 4, 0, "cpu", packed=True)
    assert all(m.src is None and m.inputs.attention_mask.dim() == 2 for m, _ in mbs)


@pytest.mark.parametrize(
    "overrides",
    [
        ("loss=ppo_clip", "aggregation=token_mean"),
        ("loss=ppo_clip", "aggregation=seq_mean_token_mean", "num_iterations=2"),
        ("loss=gspo", "aggregation=seq_mean_token_mean"),
        ("loss=cispo", "aggregation=seq_sum_const"),
        ("loss=ppo_clip", "aggregation=seq_mean_token_sum", "beta=0.1"),
    ],
)
def test_padding_free_update_equals_padded_update(tmp_path, tiny_model, overrides):
    model = copy.deepcopy(tiny_model).double()
    ref = None
    if "beta=0.1" in overrides:
        ref = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.05 * torch.randn_like(p))
    results = []
    for packed in (False, True):
        cfg = _cfg(
            tmp_path,
            *overrides,
            f"padding_free={str(packed).lower()}",
            "train.micro_batch_size=2",
            "mask_truncated_completions=true",
            "optim.max_grad_norm=0",
        )
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        metrics = grpo.update_policy(
            cfg,
            m,
            ref,
            _varied_groups(),
            opt,
            sched,
            grpo.make_policy_loss(cfg),
            0,
            "cpu",
            {"logps": 0.0, "update": 0.0},
            1,
        )
        results.append((m, metrics))
    # the packed run really packed: 3 micro-batches of 2 packed rows instead of 6 padded ones
    mbs = grpo.micro_batches(grpo.sequences(_varied_groups(), True), 2, 0, "cpu", packed=True)
    assert len(mbs) == 3 and all(m.src is not None for m, _ in mbs)
    (a, ma), (b, mb) = results
    for k in ("loss", "entropy", "clip_frac/low_last", "clip_frac/high_last", "num_tokens") + (("kl",) if ref else ()):
        assert ma[k] == pytest.approx(mb[k], rel=1e-9, abs=1e-12), k
    moved = False
    for (n, pa), (_, pb), p0 in zip(a.named_parameters(), b.named_parameters(), model.parameters()):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-10), n
        moved |= not torch.equal(pa, p0)
    assert moved


def test_resume_drops_samples_and_metrics_written_after_the_checkpoint(tmp_path):
    import json

    common = [
        "model=tiny",
        "data.path=builtin:arithmetic",
        "data.num_examples=50",
        "rewards=[toy_rewards:ones]",
        "prompts_per_step=2",
        "num_generations=2",
        "max_completion_length=4",
        "train.micro_batch_size=4",
        "samples_every=1",
    ]
    grpo.train(_cfg(tmp_path, *common, "train.steps=2"))
    # A run killed during step 3, after its samples and metrics were written but before a checkpoint:
    for name in ("samples.jsonl", "metrics.jsonl"):
        with open(tmp_path / name, "a") as fh:
            fh.write(json.dumps({"step": 3, "prompt": "stale", "completion": "stale", "reward": 0.0}) + "\n")
            fh.write('{"step": 3, "prom')  # torn line
    grpo.train(_cfg(tmp_path, *common, "train.steps=4"))  # resumes from step 2
    samples = [json.loads(ln) for ln in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2, 3, 4]
    assert all(s["prompt"] != "stale" for s in samples)
    assert len([s for s in samples if s["step"] == 3]) == 2  # prompts_per_step records, once
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
