"""PPO with a critic: the RLHF recipe (Ziegler et al. 2019; Ouyang et al. 2022) that GRPO replaced.

Four models: the policy, a frozen reference (none when beta = 0), the reward (reward models and/or
verifiers, as in GRPO) and a critic -- a scalar value head over its own backbone, trained with its own
optimizer. Each step:
  1. rollout   -- P prompts x G samples, scored by the rewards: one score per completion (shared with GRPO,
                  ``rl/rollouts.py``)
  2. score     -- one pass without gradient: the rollout policy's log-probs (old), the reference's, the
                  critic's values V
  3. reward    -- per token: r_t = -beta * KL_t on every completion token, + the score at the last one
                  (a completion cut at the length cap is terminal too, with its score, unless
                  mask_truncated_completions drops it: the run warns, see PPOConfig.advice)
  4. advantage -- GAE(gamma, lambda) over each completion, A whitened over the batch's valid tokens; the
                  critic's targets G = A' + V with critic.lam (decoupled GAE, VC-PPO; default: lambda)
  5. update    -- ppo_epochs passes over the batch in num_mini_batches shuffled mini-batches; each
                  mini-batch is one policy step (GRPO's policy loss and aggregation, global counts of
                  the mini-batch) and one critic step (clipped value loss, token mean); during the first
                  critic.warmup_steps steps the critic's step only (value pretraining, VC-PPO)
Shapes: N sequences of the rollout batch, L completion tokens (the "completion layout": token t of
sequence n at [n, t]), B rows and T tokens of a micro-batch (its "row layout", as the model sees it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from posttrain.config import PPOConfig
from posttrain.losses.aggregation import aggregate
from posttrain.losses.importance import rollout_is_weights
from posttrain.losses.kl import kl_estimate
from posttrain.losses.value import clipped_value_loss, explained_variance
from posttrain.models.loading import DTYPES, ModelError
from posttrain.models.lora import apply_lora
from posttrain.models.scalar import check_scalar_dir, load_scalar, same_vocabulary, scalar_from_causal, token_values
from posttrain.recipes import grpo
from posttrain.recipes.grpo import StepBatch
from posttrain.recipes.preference import disable_dropout
from posttrain.rl.advantages import batch_normalize, decoupled_gae, per_token_rewards
from posttrain.rl.groups import Group, collect_groups
from posttrain.rl.rollouts import Rollouts, rollout_metrics, start_rl
from posttrain.rl.watch import RunWatch
from posttrain.run import loop
from posttrain.runtime.distributed import Dist
from posttrain.runtime.memory import reward_models

log = logging.getLogger("posttrain")


# ---------------------------------------------------------------------------------------------
# The critic


def load_critic(cfg: PPOConfig, policy, tok, device):
    """The value model, before the policy gets LoRA adapters: from the policy's starting backbone (value
    head at zero), from the reward model, or from a directory; it must read the policy's token ids."""
    init, dtype = cfg.critic.init, DTYPES[cfg.critic.dtype]
    if init == "policy":
        critic = scalar_from_causal(policy, tok, zero_head=True, seed=cfg.train.seed).to(dtype)
    else:
        field = "critic.init"
        if init == "reward_model":
            i, spec = next((i, r) for i, r in enumerate(cfg.rewards) if r.name == "reward_model")
            init, field = str(spec.options.get("path", "")), f"rewards[{i}].options.path"
            check_scalar_dir(init, field)
        critic, critic_tok = load_scalar(
            replace(cfg.model, path=init, dtype=cfg.critic.dtype, tokenizer=""),
            device=device,
            field=field,
            zero_head=True,
        )
        if not same_vocabulary(critic_tok, tok):
            raise ModelError(
                f"{field}={init!r}: the critic's tokenizer differs from the policy's "
                f"({len(critic_tok)} vs {len(tok)} tokens); a critic reads the policy's token ids, "
                f"so it needs the same vocabulary"
            )
    disable_dropout(critic)
    return critic.to(device).train()


def critic_values(critic, batch: StepBatch) -> torch.Tensor:
    """(B, T) values in row layout (0 off the loss mask), whichever layout the critic ran on."""
    x = batch.inputs
    v = token_values(critic, x.input_ids_BT, x.attention_mask, x.position_ids_BT)
    sel = batch.target_mask_BT > 0
    if batch.src is None:
        return torch.where(sel, v, torch.zeros_like(v))
    return torch.zeros(sel.shape, dtype=v.dtype, device=v.device).masked_scatter(sel, v.reshape(-1)[batch.src])


# ---------------------------------------------------------------------------------------------
# Completion layout <-> row layout. Row j of a micro-batch is sequence idx[j]; its loss positions are
# that sequence's valid completion tokens in order, so a masked_scatter in row-major order maps them.


def to_rows(x_NL: torch.Tensor, batch: StepBatch, idx: torch.Tensor, mask_NL: torch.Tensor) -> torch.Tensor:
    sel_BT = batch.target_mask_BT > 0
    vals = x_NL[idx][mask_NL[idx] > 0].to(sel_BT.device)
    return torch.zeros(sel_BT.shape, dtype=x_NL.dtype, device=sel_BT.device).masked_scatter(sel_BT, vals)


def from_rows(
    x_BT: torch.Tensor, batch: StepBatch, idx: torch.Tensor, out_NL: torch.Tensor, mask_NL: torch.Tensor
) -> None:
    sel = mask_NL[idx] > 0
    out_NL[idx] = out_NL[idx].masked_scatter(sel, x_BT[batch.target_mask_BT > 0].detach().to(out_NL))


def completion_mask(seqs) -> torch.Tensor:
    """(N + 1, L): 1 on each kept sequence's loss tokens (a masked-out truncated sample has none); the
    last row is empty: the slot of the empty micro-batches (``grpo.pad_micro_batches``)."""
    lengths = [sum(ex.loss_mask[1:]) if kept else 0 for ex, kept in seqs]
    mask = torch.zeros(len(seqs) + 1, max(lengths + [1]))
    for n, k in enumerate(lengths):
        mask[n, :k] = 1.0
    return mask


@dataclass(frozen=True)
class Scored:
    """The rollout batch in completion layout, before any update: the rollout policy's log-probs, the
    reference's (None when beta = 0), the critic's values, the mask (one more row than sequences: the
    empty slot); the entropy summed over this rank's tokens; and the importance weights of the
    rollout/trainer correction (None without one)."""

    old_NL: torch.Tensor
    ref_NL: torch.Tensor | None
    values_NL: torch.Tensor
    mask_NL: torch.Tensor
    entropy_sum: float
    is_weights_NL: torch.Tensor | None = None


def engine_logps(groups: list[Group], mask_NL: torch.Tensor) -> torch.Tensor | None:
    """The engine's sampling log-probs in completion layout, or None when it did not return them."""
    if any(g.logps is None for g in groups):
        return None
    out = torch.zeros_like(mask_NL)
    # The completion layout holds sampled tokens only (a multi-turn completion's environment tokens are not
    # in it), so the engine's log-probs are taken at the sampled positions.
    sampled = [[x for x, m in zip(lp, g.sampled_mask(i)) if m] for g in groups for i, lp in enumerate(g.logps)]
    for n, lp in enumerate(sampled):
        k = int(mask_NL[n].sum())
        out[n, :k] = torch.tensor(lp[:k], dtype=out.dtype)
    return out


@torch.no_grad()
def score_rollouts(cfg: PPOConfig, model, critic, ref, seqs, pad_id: int, device, dist) -> Scored:
    # float32 at least (float64 for a float64 model): the statistics of GAE and whitening
    mask = completion_mask(seqs).to(torch.promote_types(next(model.parameters()).dtype, torch.float32))
    old, values = torch.zeros_like(mask), torch.zeros_like(mask)
    refs = torch.zeros_like(mask) if ref is not None else None
    mbs = grpo.micro_batches(seqs, cfg.train.micro_batch_size, pad_id, device, packed=cfg.padding_free)
    mbs = grpo.pad_micro_batches(mbs, len(seqs), dist, pad_id, device)
    ref_lps = grpo.ref_logps(ref, model, mbs, cfg.temperature) if ref is not None else [None] * len(mbs)
    entropy = 0.0
    for (batch, idx), ref_lp in zip(mbs, ref_lps):
        lp, ent = grpo.policy_logps(model, batch, cfg.temperature, with_entropy=True)
        from_rows(lp, batch, idx, old, mask)
        from_rows(critic_values(critic, batch), batch, idx, values, mask)
        if ref_lp is not None:
            from_rows(ref_lp, batch, idx, refs, mask)
        entropy += (ent or 0.0) * batch.target_mask_BT.sum().item()
    return Scored(old, refs, values, mask, entropy)


def gathered(dist, *tensors_NL: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's rows of each tensor, concatenated in rank order (the one-process batch), the
    completion axis padded to the longest rank's."""
    if not dist.enabled:
        return list(tensors_NL)
    parts = dist.gather([t.cpu() for t in tensors_NL])
    L = max(p[0].shape[1] for p in parts)
    return [
        torch.cat([torch.nn.functional.pad(p[i], (0, L - p[i].shape[1])) for p in parts])
        for i in range(len(tensors_NL))
    ]


# ---------------------------------------------------------------------------------------------
# The update


def ppo_update(
    cfg: PPOConfig,
    model,
    critic,
    ref,
    groups: list[Group],
    opt,
    sched,
    critic_opt,
    critic_sched,
    policy_loss,
    pad_id: int,
    device,
    timing: dict,
    step: int,
    dist=None,
    warmup: bool = False,
) -> dict:
    """Steps 2-5 for one rollout batch. Returns the step's update metrics. Data-parallel, ``groups`` are
    this rank's: whitening and the metrics take every rank's tokens, and mini-batch k holds the same
    sequences, over the ranks, as it does in one process. ``warmup``: the critic's steps only (the policy
    does not move)."""
    dist = dist or Dist()
    t0 = time.time()
    seqs = grpo.sequences(groups, cfg.mask_truncated_completions)
    n = len(seqs)
    s = score_rollouts(cfg, model, critic, ref, seqs, pad_id, device, dist)
    mask = s.mask_NL
    correction = {}
    rollout_NL = engine_logps(groups, mask)
    if rollout_NL is not None:
        # theta_old under the trainer against the engine that sampled (a constant for every update)
        isw = rollout_is_weights(
            s.old_NL,
            rollout_NL,
            mask,
            mode="mask" if cfg.rollout_is == "mis" else "truncate",
            level=cfg.rollout_is_level,
            cap=cfg.rollout_is_cap,
            cap_low=cfg.rollout_is_cap_low,
        )
        keep = mask > 0
        seen = [x[keep].float().cpu() for x in (s.old_NL, rollout_NL, isw.weights_BT, isw.clipped_BT)]
        correction = grpo.correction_metrics(cfg, *(torch.cat(p) for p in zip(*dist.gather(seen))))
        if cfg.rollout_is != "none":
            s = replace(s, is_weights_NL=isw.weights_BT)
    scores_N = torch.tensor([r for g in groups for r in g.rewards] + [0.0], dtype=mask.dtype)
    kl_NL = kl_estimate(s.old_NL, s.ref_NL, cfg.kl_estimator) * mask if s.ref_NL is not None else torch.zeros_like(mask)
    rewards_NL = per_token_rewards(scores_N, kl_NL, mask, cfg.beta)
    lam_critic = cfg.lam if cfg.critic.lam is None else cfg.critic.lam
    adv_NL, ret_NL = decoupled_gae(
        rewards_NL, s.values_NL, mask, gamma=cfg.gamma, lam_actor=cfg.lam, lam_critic=lam_critic
    )
    # Batch statistics over every rank's sequences (this rank's are rows offset..offset+n of the batch).
    g_mask, g_kl, g_adv, g_ret, g_val = gathered(dist, *(x[:n] for x in (mask, kl_NL, adv_NL, ret_NL, s.values_NL)))
    sizes = dist.gather(n)
    offset, n_total = sum(sizes[: dist.rank]), sum(sizes)
    if g_mask.sum() == 0:  # every completion masked (all truncated): no token to measure, nothing to update
        timing["logps"] += time.time() - t0
        return {**correction, "num_tokens": 0.0, "skipped_update": 1.0}
    n_tok = g_mask.sum()
    out = {
        **correction,
        "num_tokens": g_mask.sum().item(),
        "entropy": dist.sum(s.entropy_sum) / n_tok.item(),
        "kl": (g_kl.sum() / n_tok).item(),
        "non_score_reward": (-cfg.beta * g_kl.sum(1)).mean().item(),
        "advantages/mean": (g_adv.sum() / n_tok).item(),
        "returns/mean": (g_ret.sum() / n_tok).item(),
        "values/mean": (g_val * g_mask).sum().item() / n_tok.item(),
        "explained_variance": explained_variance(g_val, g_ret, g_mask),
    }
    if cfg.whiten_advantages:
        white = batch_normalize(g_adv, mask=g_mask)[offset : offset + n, : adv_NL.shape[1]]
        adv_NL = torch.cat([white.to(adv_NL), adv_NL[n:]])
    timing["logps"] += time.time() - t0

    t0 = time.time()
    gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)  # the same shuffles on resume
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(cfg.ppo_epochs):
        for chunk in torch.randperm(n_total, generator=gen).chunk(cfg.num_mini_batches):
            mine = chunk[(chunk >= offset) & (chunk < offset + n)] - offset  # this rank's part of the mini-batch
            m = minibatch_step(
                cfg,
                model,
                critic,
                seqs,
                mine,
                s,
                adv_NL,
                ret_NL,
                opt,
                sched,
                critic_opt,
                critic_sched,
                policy_loss,
                pad_id,
                device,
                step,
                dist,
                warmup,
            )
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            updates += 1
    timing["update"] += time.time() - t0
    out.update({k: v / updates for k, v in sums.items() if not k.endswith("grad_norm")})
    out.update(grad_norm=m["grad_norm"], **{"critic/grad_norm": m["critic/grad_norm"]})
    return out


def minibatch_step(
    cfg: PPOConfig,
    model,
    critic,
    seqs,
    chunk: torch.Tensor,
    s: Scored,
    adv_NL,
    ret_NL,
    opt,
    sched,
    critic_opt,
    critic_sched,
    policy_loss,
    pad_id: int,
    device,
    step: int,
    dist=None,
    warmup: bool = False,
) -> dict:
    """One optimizer step of the policy and of the critic on the sequences ``chunk`` (this rank's indices),
    accumulated over micro-batches with the mini-batch's global counts; of the critic only in ``warmup``."""
    dist = dist or Dist()
    chunk = chunk.sort().values
    mbs = (
        grpo.micro_batches(
            [seqs[i] for i in chunk.tolist()], cfg.train.micro_batch_size, pad_id, device, packed=cfg.padding_free
        )
        if len(chunk)
        else []
    )
    mbs = grpo.pad_micro_batches(mbs, len(chunk), dist, pad_id, device)
    chunk = torch.cat([chunk, torch.tensor([len(seqs)])])  # the empty micro-batches' slot: s's empty row
    num_tokens, counts = grpo.aggregation_counts(cfg, mbs, dist)
    sums = {
        "loss": 0.0,
        "value_loss": 0.0,
        "clip_frac/low": 0.0,
        "clip_frac/high": 0.0,
        "value_clip_frac": 0.0,
        "approx_kl": 0.0,
    }
    if num_tokens == 0:
        return {**sums, "grad_norm": 0.0, "critic/grad_norm": 0.0}
    for batch, local in mbs:
        idx, m = chunk[local], batch.target_mask_BT
        frac = lambda x: (x * m).sum().item() / num_tokens  # noqa: E731, B023 - called within this iteration
        values = critic_values(critic, batch)
        vt = clipped_value_loss(
            values,
            to_rows(s.values_NL, batch, idx, s.mask_NL),
            to_rows(ret_NL, batch, idx, s.mask_NL),
            clip=cfg.critic.value_clip or None,
        )
        val = aggregate(vt.loss_BT, m, "token_mean", num_tokens=num_tokens)
        sums["value_loss"] += val.item()
        sums["value_clip_frac"] += frac(vt.clipped_BT)
        if warmup:  # value pretraining: the policy runs no forward and gets no gradient
            (val * dist.loss_scale).backward()
            continue
        logps, _ = grpo.policy_logps(model, batch, cfg.temperature)
        old = to_rows(s.old_NL, batch, idx, s.mask_NL)
        terms = policy_loss(logps, old, to_rows(adv_NL, batch, idx, s.mask_NL), m)
        loss_BT = terms.loss_BT
        if s.is_weights_NL is not None:
            loss_BT = loss_BT * to_rows(s.is_weights_NL, batch, idx, s.mask_NL)
        pol = aggregate(loss_BT, m, cfg.aggregation, **counts)
        # disjoint parameters: one backward fills the policy's and the critic's grads
        ((pol + val) * dist.loss_scale).backward()
        sums["loss"] += pol.item()
        sums["clip_frac/low"] += frac(terms.clipped_low_BT)
        sums["clip_frac/high"] += frac(terms.clipped_high_BT)
        sums["approx_kl"] += frac(0.5 * (logps.detach() - old) ** 2)  # how far this update moved the policy
    sums = {k: dist.sum(v) for k, v in sums.items()}  # each rank held its share of the global sums
    sums["grad_norm"] = (
        0.0
        if warmup
        else loop.optimizer_step(model, opt, sched, max_grad_norm=cfg.optim.max_grad_norm, step=step, loss=sums["loss"])
    )
    sums["critic/grad_norm"] = loop.optimizer_step(
        critic, critic_opt, critic_sched, max_grad_norm=cfg.critic.max_grad_norm, step=step, loss=sums["value_loss"]
    )
    return sums


# ---------------------------------------------------------------------------------------------


def train(cfg: PPOConfig) -> Path:
    """Train; return the exported policy directory (``<output_dir>/final``; the critic goes to ``critic/``)."""
    run, rows, model, tok = start_rl(cfg, "ppo")
    device, dist = run.device, run.dist
    critic = load_critic(cfg, model, tok, run.load_device)
    model = apply_lora(model, cfg.lora)
    ref = grpo.reference_model(cfg, model, run.load_device)
    if isinstance(ref, torch.nn.Module):
        ref = loop.wrap(run, cfg, ref)  # frozen models run in lockstep with the policy
    model, critic = loop.wrap(run, cfg, model), loop.wrap(run, cfg, critic)
    model.train()
    per_step = cfg.ppo_epochs * cfg.num_mini_batches
    warmup = cfg.critic.warmup_steps  # the first steps train the critic alone; the policy's schedule starts after
    optimizer, scheduler = loop.make_optimizer(model, cfg.optim, (cfg.train.steps - warmup) * per_step)
    critic_opt, critic_sched = loop.make_optimizer(
        critic, replace(cfg.optim, lr=cfg.critic.lr), cfg.train.steps * per_step
    )
    policy_loss = grpo.make_policy_loss(cfg)
    rollouts = Rollouts.build(cfg, rows, model, tok)
    start, state = loop.resume(run, model, optimizer, scheduler, extras={"critic": (critic, critic_opt)})
    rollouts.start(run, model, state, start)
    if state:
        critic_sched.load_state_dict(state["critic_scheduler"])
    # The same collapse / futility warnings as GRPO (rl/watch.py); a run stopped by stop_on stays stopped.
    watch = RunWatch(run.dir, cfg, rows.rows, start, state.get("watch"), writes=dist.is_main, reader=rollouts.reader())
    last = start if state.get("stopped") else cfg.train.steps
    progress = loop.Progress(cfg.train.steps, start, "ppo", cfg.train.progress and dist.is_main)
    try:
        for step in range(start + 1, last + 1):
            timing = {"generate": 0.0, "reward": 0.0, "logps": 0.0, "update": 0.0}
            t_step = time.time()
            groups, _, stats = collect_groups(
                lambda: rollouts.round(model, dist, step, 0, timing),  # noqa: B023 - called within this iteration
                cfg.prompts_per_step,
                dynamic=False,
                max_rounds=1,
                gather=dist.gather,
                rank=dist.rank,
            )
            timing["generate"] = time.time() - t_step - timing["reward"]
            generated = [g for part in dist.gather(groups) for g in part]  # every rank's, for the metrics
            metrics = rollout_metrics(generated, stats)
            metrics.update(watch.metrics(generated))
            if cfg.num_generations == 1:
                del metrics["zero_variance_frac"]  # a group of one never varies; PPO's baseline is the critic
            rollouts.engine.sleep()  # vllm on CUDA: its memory goes back to the trainer during the update
            metrics.update(
                ppo_update(
                    cfg,
                    model,
                    critic,
                    ref,
                    groups,
                    optimizer,
                    scheduler,
                    critic_opt,
                    critic_sched,
                    policy_loss,
                    tok.pad_token_id,
                    device,
                    timing,
                    step,
                    dist,
                    warmup=step <= warmup,
                )
            )
            if step <= warmup:
                metrics["critic/warmup"] = 1.0
            rollouts.sync(model, dist)
            dt = time.time() - t_step
            gen_tokens = sum(len(c) for g in generated for c in g.completion_ids)
            metrics.update({f"time/{k}": v for k, v in timing.items()})
            metrics.update(
                step_time=dt,
                tokens_per_s=gen_tokens / max(dt, 1e-9),
                lr=scheduler.get_last_lr()[0],
                **{"critic/lr": critic_sched.get_last_lr()[0]},
                wall_time=time.time() - run.start_time,
            )
            metrics.update(
                run.memory.metrics([model, ref, critic, *reward_models(rollouts.reward_fn)], [optimizer, critic_opt])
            )
            stop = rollouts.record(run, model, step, last, generated, metrics, watch)
            progress.update(
                step, f"reward {metrics['reward/mean']:.3f} ev {metrics.get('explained_variance', 0.0):.2f}"
            )
            if not cfg.train.progress and loop.should(cfg.train.log_every, step, last):
                log.info(
                    "ppo step %d/%d reward %.3f acc %.3f value_loss %.4f kl %.4f",
                    step,
                    last,
                    metrics["reward/mean"],
                    metrics["accuracy"],
                    metrics.get("value_loss", 0.0),
                    metrics.get("kl", 0.0),
                )
            if loop.should(cfg.train.save_every, step, last) or stop:
                loop.save(
                    run,
                    cfg,
                    step,
                    model,
                    tok,
                    optimizer,
                    scheduler,
                    {
                        **rollouts.state_dict(dist),
                        "critic_scheduler": critic_sched.state_dict(),
                        "watch": watch.state_dict(),
                        "stopped": stop,
                    },
                    extras={"critic": (critic, critic_opt)},
                )
            if stop:
                break
    finally:
        progress.close()
        run.tracker.close()
        rollouts.close()
    loop.export(run, critic, tok, name="critic")
    return loop.export(run, model, tok)
