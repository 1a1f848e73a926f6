"""The off-policy correction inside the GRPO update (recipes/grpo.py + losses/importance.py), with
rollout log-probs built by hand from the trainer's own: a shift of log 2 on every token makes every
importance ratio exactly 2 or 1/2, so the corrected update must be exactly the uncorrected one
times the weight."""

import dataclasses
import math

import pytest
import torch

from posttrain.config import GRPOConfig, config_from_dict
from posttrain.recipes import grpo
from posttrain.rl.groups import Group


def _groups():
    torch.manual_seed(0)
    out = []
    for p in range(3):
        comps = [torch.randint(5, 60, (int(n),)).tolist() for n in torch.randint(1, 9, (4,))]
        rewards = torch.rand(4).tolist()
        out.append(
            Group(
                p,
                tuple(torch.randint(5, 60, (3 + p,)).tolist()),
                tuple(tuple(c) for c in comps),
                tuple("x" * len(c) for c in comps),
                (False,) * 4,
                tuple(rewards),
                {"r": tuple(rewards)},
            )
        )
    return out


def _with_rollout_logps(model, groups, shift: float):
    """Each group with logps = the trainer's teacher-forced log-probs + ``shift`` (rho = e^-shift)."""
    model.eval()
    out = []
    with torch.no_grad():
        for g in groups:
            lps = []
            for c in g.completion_ids:
                logits = model(input_ids=torch.tensor([list(g.prompt_ids) + list(c)])).logits[0].float()
                P = len(g.prompt_ids)
                lp = logits.log_softmax(-1)[P - 1 : -1].gather(-1, torch.tensor(c)[:, None])[:, 0]
                lps.append(tuple((lp + shift).tolist()))
            out.append(dataclasses.replace(g, logps=tuple(lps)))
    model.train()
    return out


def _update(model, groups, tmp_path, *overrides):
    import copy

    cfg = config_from_dict(
        GRPOConfig,
        {},
        [f"train.output_dir={tmp_path}", "optim.max_grad_norm=0", "train.micro_batch_size=4", *overrides],
    )
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    m = grpo.update_policy(
        cfg, model, None, groups, opt, sched, grpo.make_policy_loss(cfg), 0, "cpu", {"logps": 0.0, "update": 0.0}, 1
    )
    return [p.detach() - b for p, b in zip(model.parameters(), before)], m


def test_rollout_logps_land_on_the_completion_positions(tiny_model):
    groups = _with_rollout_logps(tiny_model, _groups(), 0.0)
    flat = [lp for g in groups for lp in g.logps]
    for packed in (False, True):
        mbs = grpo.micro_batches(grpo.sequences(groups, False), 5, 0, "cpu", packed=packed)
        got = grpo.rollout_logps(groups, mbs)
        # The trainer's own log-probs in the same layout: the two must agree token for token.
        trainer = grpo.frozen_logps(tiny_model.eval(), mbs, 1.0)
        for (batch, idx), r_BT, t_BT in zip(mbs, got, trainer):
            m = batch.target_mask_BT > 0
            assert torch.allclose(r_BT[m], t_BT[m], atol=1e-5)
            assert torch.equal(r_BT[m], torch.tensor([x for i in idx.tolist() for x in flat[i]]))
    assert grpo.rollout_logps(_groups(), mbs) is None  # sampled without log-probs


@pytest.mark.parametrize("shift,weight", [(math.log(2), 0.5), (-math.log(4), 2.0)])
def test_tis_scales_the_update_by_the_truncated_weight(tmp_path, tiny_model, shift, weight):
    """rho = e^-shift on every token: 1/2 (kept) or 4 (truncated at C = 2)."""
    groups = _with_rollout_logps(tiny_model, _groups(), shift)
    plain, m0 = _update(tiny_model, groups, tmp_path)
    tis, m1 = _update(tiny_model, groups, tmp_path, "rollout_is=tis", "rollout_is_cap=2.0")
    assert m1["loss"] == pytest.approx(weight * m0["loss"], rel=1e-4)
    for a, b in zip(plain, tis):
        assert torch.allclose(b, weight * a, atol=1e-6)
    assert any(a.abs().max() > 0 for a in plain)
    assert m1["is_weight/mean"] == pytest.approx(weight, rel=1e-5)
    assert m1["is_weight/clipped_frac"] == (1.0 if weight == 2.0 else 0.0)
    # Mismatch metrics are reported with or without a correction.
    for m in (m0, m1):
        assert m["mismatch/abs_diff_mean"] == pytest.approx(abs(shift), rel=1e-4)
        assert m["mismatch/abs_diff_max"] == pytest.approx(abs(shift), rel=1e-4)
    assert "is_weight/mean" not in m0


def test_masked_is_drops_out_of_range_tokens(tmp_path, tiny_model):
    groups = _with_rollout_logps(tiny_model, _groups(), math.log(2))  # rho = 1/2 everywhere
    zero, m = _update(tiny_model, groups, tmp_path, "rollout_is=mis", "rollout_is_cap=2.0", "rollout_is_cap_low=0.6")
    assert all(torch.equal(d, torch.zeros_like(d)) for d in zero)
    assert m["is_weight/clipped_frac"] == 1.0 and m["is_weight/max"] == 0.0
    kept, _ = _update(tiny_model, groups, tmp_path, "rollout_is=mis", "rollout_is_cap=2.0", "rollout_is_cap_low=0.4")
    plain, _ = _update(tiny_model, groups, tmp_path)
    for a, b in zip(plain, kept):
        assert torch.allclose(b, 0.5 * a, atol=1e-6)


def test_sequence_level_weight_is_the_product_over_the_completion(tmp_path, tiny_model):
    """rho_i = 2^-|y_i| per sequence (shift log 2 per token), below C: the weights the update applied
    range from the longest completion's product to the shortest one's."""
    groups = _with_rollout_logps(tiny_model, _groups(), math.log(2))
    seq, m = _update(tiny_model, groups, tmp_path, "rollout_is=tis", "rollout_is_level=sequence")
    lengths = torch.tensor([len(c) for g in groups for c in g.completion_ids], dtype=torch.float32)
    assert m["is_weight/min"] == pytest.approx(2.0 ** -lengths.max().item(), rel=1e-4)
    assert m["is_weight/max"] == pytest.approx(2.0 ** -lengths.min().item(), rel=1e-4)
    assert all(torch.isfinite(d).all() for d in seq)
