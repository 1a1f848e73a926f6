"""GRPO with verifiable rewards and the DAPO fixes (Shao et al. 2024; Yu et al. 2025).

Each step:
  1. rollout  -- P prompts x G samples from the policy (dynamic sampling: more rounds until P groups vary)
  2. reward   -- the configured verifiers, weighted and summed (each logged)
  3. advantage-- group z-score / Dr. GRPO centring / RLOO, per completion, broadcast over its tokens
  4. loss     -- per-token policy loss (PPO-clip with eps_low/eps_high, GSPO or CISPO) [+ beta * KL],
                 aggregated with global token / sequence counts over every micro-batch of the step
  5. update   -- mu = num_iterations optimizer steps on the same rollouts (old log-probs computed once;
                 with mu = 1 the ratio is exactly 1 and no extra forward pass is made). The model runs
                 on packed rows (padding_free): no compute on padding, the loss unchanged.
Shapes: P prompts, G generations, B sequences in a micro-batch, T tokens.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from posttrain.config import GRPOConfig
from posttrain.data.collate import LMBatch, collate_packed, collate_padded, pack_indices
from posttrain.data.tokenize import Example
from posttrain.losses.aggregation import aggregate
from posttrain.losses.importance import mismatch_stats, rollout_is_weights
from posttrain.losses.kl import kl_estimate
from posttrain.losses.logprobs import completion_logps
from posttrain.losses.policy import PolicyLossTerms, cispo_loss, gspo_loss, ppo_clip_loss
from posttrain.models.loading import load_frozen, load_model
from posttrain.models.lora import apply_lora, is_peft
from posttrain.rl.advantages import batch_normalize, group_advantages, rloo_advantages
from posttrain.rl.groups import Group, collect_groups
from posttrain.rl.rollouts import Rollouts, rollout_metrics, start_rl
from posttrain.rl.watch import RunWatch
from posttrain.run import loop
from posttrain.runtime.distributed import Dist
from posttrain.runtime.memory import reward_models

log = logging.getLogger("posttrain")

PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], PolicyLossTerms]


def make_policy_loss(cfg: GRPOConfig) -> PolicyLoss:
    """Chosen once at setup: (logps_BT, old_logps_BT, advantages, mask_BT) -> per-token terms. The
    advantages are per sequence, (B,) (GRPO), or per token, (B, T) (PPO's GAE). ``cfg`` is any config
    with the policy-loss fields (GRPO's, PPO's)."""

    def per_token(adv):
        return adv[:, None] if adv.dim() == 1 else adv

    if cfg.loss == "ppo_clip":
        return lambda lp, old, adv, m: ppo_clip_loss(
            lp, old, per_token(adv), eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip or None
        )
    if cfg.loss == "gspo":
        return lambda lp, old, adv, m: gspo_loss(lp, old, adv, m, eps_low=cfg.eps_low, eps_high=cfg.eps_high)
    return lambda lp, old, adv, m: cispo_loss(lp, old, per_token(adv), eps_high=cfg.eps_high)


def compute_advantages(rewards_PG: torch.Tensor, cfg: GRPOConfig, valid_PG: torch.Tensor | None = None) -> torch.Tensor:
    """``valid_PG``: False for samples without a reward (excluded judge failures): out of every baseline."""
    if cfg.advantage == "rloo":
        adv = rloo_advantages(rewards_PG, valid_PG)
    else:
        adv = group_advantages(rewards_PG, scale="none" if cfg.scale in ("none", "batch") else "std", valid_PG=valid_PG)
    return batch_normalize(adv, mask=valid_PG) if cfg.scale == "batch" else adv


def sequences(groups: list[Group], mask_truncated: bool) -> list[tuple[Example, bool]]:
    """Flatten groups into (prompt + completion example, trained?) in group order; the example's mask is
    the completion's sampled mask (multi-turn: environment tokens are context, never loss)."""
    out = []
    for g in groups:
        for i, (ids, trunc) in enumerate(zip(g.completion_ids, g.truncated)):
            # Only sampled tokens are trained: a multi-turn completion's environment tokens get mask 0.
            ex = Example(g.prompt_ids + ids, (0,) * len(g.prompt_ids) + g.sampled_mask(i))
            excluded = g.excluded is not None and g.excluded[i]  # no reward to learn from
            out.append((ex, not (mask_truncated and trunc) and not excluded))
    return out


@dataclass(frozen=True)
class StepBatch:
    """One micro-batch of rollout sequences.

    The loss always sees sequence layout: row i of ``target_mask_BT`` (and of every log-prob tensor) is
    sequence i, right-padded. The model runs on ``inputs``: those same padded rows, or -- padding-free
    -- several sequences packed into each row (per-sequence positions, block-diagonal attention), which
    skips the padding's share of the forward and backward. ``src`` then maps each loss position
    (row-major over ``target_mask_BT > 0``) to its flat index in the packed rows.
    """

    inputs: LMBatch
    target_mask_BT: torch.Tensor
    src: torch.Tensor | None = None

    def to(self, device) -> "StepBatch":
        return StepBatch(
            self.inputs.to(device), self.target_mask_BT.to(device), None if self.src is None else self.src.to(device)
        )


def micro_batches(seqs, size: int, pad_id: int, device, packed: bool = False) -> list[tuple[StepBatch, torch.Tensor]]:
    """Micro-batches of the step's sequences, each with the flat indices of its sequences.

    Padded: length-sorted chunks of ``size`` sequences (sorting cuts padding). Packed: all sequences
    packed first-fit into rows as long as the step's longest sequence, ``size`` rows per micro-batch --
    the same bound on tokens per forward, with (almost) no padding -- when that runs fewer tokens
    than the padded chunks (else the padded layout is used). The loss uses global counts, so
    how sequences are grouped changes neither its value nor its gradient (tests/test_grpo.py)."""
    lengths = [len(e) for e, _ in seqs]
    order = sorted(range(len(seqs)), key=lambda i: lengths[i])
    chunks = [[[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
    if packed:
        bins = pack_indices(lengths, max(lengths))
        # Packing pays only where it removes padding; else (e.g. every completion hit the length cap)
        # the padded rows cost no more and skip the 4D mask.
        packed = len(bins) * max(lengths) < sum(len(c) * lengths[c[-1][0]] for c in chunks)
        if packed:
            chunks = [bins[s : s + size] for s in range(0, len(bins), size)]
    out = []
    for rows in chunks:
        idx = [i for row in rows for i in row]
        exs = [seqs[i][0] for i in idx]
        b = collate_padded(exs, pad_id)
        keep = torch.tensor([float(seqs[i][1]) for i in idx])
        mask_BT = b.target_mask_BT * keep[:, None]
        if packed:
            mb = _pack_rows([[seqs[i][0] for i in row] for row in rows], mask_BT, pad_id)
        else:
            mb = StepBatch(LMBatch(b.input_ids_BT, b.attention_mask, b.position_ids_BT, b.targets_BT, mask_BT), mask_BT)
        out.append((mb.to(device), torch.tensor(idx)))
    return out


def _pack_rows(rows: list[list[Example]], mask_BT: torch.Tensor, pad_id: int) -> StepBatch:
    """``rows`` of sequences packed one row each; ``mask_BT`` is their loss mask in sequence layout,
    sequences numbered row by row."""
    p = collate_packed(rows, pad_id)
    row_B = torch.tensor([r for r, row in enumerate(rows) for _ in row])
    offset_B = torch.tensor([sum(len(e) for e in row[:j]) for row in rows for j in range(len(row))])
    seq_K, t_K = (mask_BT > 0).nonzero(as_tuple=True)
    src_K = row_B[seq_K] * p.input_ids_BT.shape[1] + offset_B[seq_K] + t_K
    packed_mask = torch.zeros_like(p.target_mask_BT)
    packed_mask.view(-1)[src_K] = 1.0
    return StepBatch(
        LMBatch(p.input_ids_BT, p.attention_mask, p.position_ids_BT, p.targets_BT, packed_mask), mask_BT, src_K
    )


def policy_logps(model, batch: StepBatch, temperature: float, with_entropy: bool = False):
    """(logps_BT, mean entropy): log-probs of the completion tokens in sequence layout (0 at masked
    positions), whichever layout the model ran on."""
    x = batch.inputs
    logps, ent = completion_logps(
        model,
        x.input_ids_BT,
        x.attention_mask,
        x.position_ids_BT,
        x.targets_BT,
        x.target_mask_BT,
        temperature,
        with_entropy=with_entropy,
    )
    if batch.src is None:
        return logps, ent
    sel_BT = batch.target_mask_BT > 0
    return torch.zeros(sel_BT.shape, dtype=logps.dtype, device=logps.device).masked_scatter(
        sel_BT, logps.reshape(-1)[batch.src]
    ), ent


@torch.no_grad()
def frozen_logps(model, mbs, temperature: float) -> list[torch.Tensor]:
    return [policy_logps(model, b, temperature)[0] for b, _ in mbs]


def reference_model(cfg: GRPOConfig, policy, device):
    """None when beta == 0: GRPO then holds one model. LoRA + initial: the adapters switched off."""
    if cfg.beta == 0:
        return None
    if cfg.ref_model == "initial":
        if is_peft(policy):
            return "adapters_off"
        ref, _ = load_model(cfg.model, seed=cfg.train.seed, device=device)
        return ref.eval().requires_grad_(False)
    return load_frozen(cfg.ref_model, cfg.model, device)


def ref_logps(ref, policy, mbs, temperature: float) -> list[torch.Tensor]:
    if ref == "adapters_off":
        with policy.disable_adapter():
            return frozen_logps(policy, mbs, temperature)
    return frozen_logps(ref, mbs, temperature)


def train(cfg: GRPOConfig) -> Path:
    run, rows, model, tok = start_rl(cfg, "grpo")
    device, dist = run.device, run.dist
    model = apply_lora(model, cfg.lora)
    ref = reference_model(cfg, model, run.load_device)
    if isinstance(ref, torch.nn.Module):
        ref = loop.wrap(run, cfg, ref)  # a frozen model runs in lockstep with the policy
    model = loop.wrap(run, cfg, model)
    model.train()
    optimizer, scheduler = loop.make_optimizer(model, cfg.optim, cfg.train.steps * cfg.num_iterations)
    policy_loss = make_policy_loss(cfg)
    rollouts = Rollouts.build(cfg, rows, model, tok)
    start, state = loop.resume(run, model, optimizer, scheduler)
    rollouts.start(run, model, state, start)
    # Collapse / futility diagnostics and warnings (rl/diagnostics.py); a run stopped by stop_on stays stopped.
    watch = RunWatch(run.dir, cfg, rows.rows, start, state.get("watch"), writes=dist.is_main, reader=rollouts.reader())
    last = start if state.get("stopped") else cfg.train.steps

    progress = loop.Progress(cfg.train.steps, start, "grpo", cfg.train.progress and dist.is_main)
    short_steps = flat_steps = faulty = 0
    try:
        for step in range(start + 1, last + 1):
            timing = {"generate": 0.0, "reward": 0.0, "logps": 0.0, "update": 0.0}
            rounds = itertools.count()
            t_step = time.time()
            # 1-2. rollout + reward (dynamic sampling may take several rounds)
            groups, generated, stats = collect_groups(
                lambda: rollouts.round(model, dist, step, next(rounds), timing),  # noqa: B023 - called within this iteration
                cfg.prompts_per_step,
                dynamic=cfg.dynamic_sampling,
                max_rounds=cfg.max_gen_batches,
                gather=dist.gather,
                rank=dist.rank,
            )
            timing["generate"] = time.time() - t_step - timing["reward"]
            generated = [g for part in dist.gather(generated) for g in part]  # every rank's, for the metrics
            metrics = rollout_metrics(generated, stats)  # what the policy did, before any filtering
            faulty += metrics["reward/non_finite"]
            metrics.update(watch.metrics(generated))
            if stats.bound_reached:
                short_steps += 1
                log.debug(
                    "step %d: dynamic sampling hit max_gen_batches=%d with %d/%d varied groups; training on those",
                    step,
                    cfg.max_gen_batches,
                    stats.kept_groups,
                    cfg.prompts_per_step,
                )
            n_groups = dist.sum(len(groups))  # a rank may hold none of the kept groups: it still runs the update
            if n_groups and not dist.sum(sum(g.has_variance for g in groups)):
                # Every group's rewards are equal: all advantages are 0, nothing to learn from (a step
                # would still move the weights through Adam's momentum and weight decay). Skipped and
                # counted, as dynamic sampling does when it finds no varied group (the same test on the
                # reward alone, also with kl_in=reward).
                flat_steps += 1
                if flat_steps == 1:
                    log.warning(
                        "step %d: every group has identical rewards, nothing to learn from; the update is "
                        "skipped (metric skipped_update)",
                        step,
                    )
                n_groups = 0
            if n_groups:
                rollouts.engine.sleep()  # vllm on CUDA: its memory goes back to the trainer during the update
                metrics.update(
                    update_policy(
                        cfg,
                        model,
                        ref,
                        groups,
                        optimizer,
                        scheduler,
                        policy_loss,
                        tok.pad_token_id,
                        device,
                        timing,
                        step,
                        dist,
                    )
                )
                t0 = time.time()
                rollouts.sync(model, dist)
                timing["update"] += time.time() - t0
            else:
                metrics["skipped_update"] = 1.0  # no group with a learning signal: nothing to train on
            gen_tokens = sum(len(c) for g in generated for c in g.completion_ids)
            dt = time.time() - t_step
            metrics.update({f"time/{k}": v for k, v in timing.items()})
            metrics.update(
                step_time=dt,
                tokens_per_s=gen_tokens / max(dt, 1e-9),
                lr=scheduler.get_last_lr()[0],
                wall_time=time.time() - run.start_time,
            )
            metrics.update(run.memory.metrics([model, ref, *reward_models(rollouts.reward_fn)], [optimizer]))
            stop = rollouts.record(run, model, step, last, generated, metrics, watch)
            progress.update(step, f"reward {metrics['reward/mean']:.3f} acc {metrics['accuracy']:.2f}")
            if not cfg.train.progress and loop.should(cfg.train.log_every, step, last):
                log.info(
                    "grpo step %d/%d reward %.3f acc %.3f len %.1f",
                    step,
                    last,
                    metrics["reward/mean"],
                    metrics["accuracy"],
                    metrics["completion_len/mean"],
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
                    {**rollouts.state_dict(dist), "watch": watch.state_dict(), "stopped": stop},
                )
            if stop:
                last = step
                break
    finally:
        progress.close()
        run.tracker.close()
        rollouts.close()
    if short_steps:
        log.warning(
            "dynamic sampling reached max_gen_batches=%d with fewer than %d varied groups on %d of %d "
            "steps; those steps trained on the groups they had (metric: dynamic_sampling_short)",
            cfg.max_gen_batches,
            cfg.prompts_per_step,
            short_steps,
            last - start,
        )
    if flat_steps:
        log.warning(
            "every group had identical rewards on %d of %d steps: nothing to learn from, so those updates "
            "were skipped (metric skipped_update). Check that the reward can tell completions apart "
            "(posttrain audit-verifier) and that the task is neither too easy nor too hard for the model",
            flat_steps,
            last - start,
        )
    if faulty:
        log.warning(
            "reward_non_finite=zero: %d completions had a non-finite reward (or none that applied) and "
            "were scored 0 in this run (metric reward/non_finite)",
            faulty,
        )
    return loop.export(run, model, tok)


def pad_micro_batches(mbs: list, empty_index: int, dist, pad_id: int, device) -> list:
    """``mbs`` plus empty micro-batches, so this rank runs as many forwards and backwards as the busiest
    (FSDP's collectives pair them up across ranks). An empty one holds a 2-token row with nothing to
    train, numbered ``empty_index`` (a slot after the rank's sequences): it adds 0 to every loss, count
    and metric."""
    extra = dist.pad_count(len(mbs))
    if not extra:
        return mbs
    empty = micro_batches([(Example((pad_id, pad_id), (0, 0)), False)], 1, pad_id, device)[0][0]
    return mbs + [(empty, torch.tensor([empty_index]))] * extra


def update_policy(
    cfg: GRPOConfig,
    model,
    ref,
    groups: list[Group],
    optimizer,
    scheduler,
    policy_loss: PolicyLoss,
    pad_id: int,
    device,
    timing: dict,
    step: int,
    dist=None,
) -> dict:
    """Steps 3-5: advantages, log-probs, mu optimizer updates. Returns the update metrics. Data-parallel,
    ``groups`` are this rank's; counts, batch statistics and metrics are taken over every rank's."""
    dist = dist or Dist()
    G = len(groups[0].rewards) if groups else cfg.num_generations
    rewards_PG = torch.tensor([g.rewards for g in groups], dtype=torch.float32).view(-1, G)
    t0 = time.time()
    seqs = sequences(groups, cfg.mask_truncated_completions)
    mbs = micro_batches(seqs, cfg.train.micro_batch_size, pad_id, device, packed=cfg.padding_free) if seqs else []
    mbs = pad_micro_batches(mbs, len(seqs), dist, pad_id, device)
    refs = ref_logps(ref, model, mbs, cfg.temperature) if ref is not None else None
    if refs is not None and cfg.kl_in == "reward":
        # Subtract beta * (summed KL of the completion) from its reward, before the baseline.
        rewards_PG = rewards_PG - cfg.beta * sequence_kl(model, mbs, refs, cfg)[: len(seqs)].view_as(rewards_PG)
    valid_PG = torch.tensor([[not x for x in (g.excluded or (False,) * G)] for g in groups], dtype=torch.bool).view(
        -1, G
    )
    adv = global_advantages(rewards_PG, cfg, dist, valid_PG).flatten()
    adv = torch.cat([adv, torch.zeros(1)])  # 0: the empty slot
    advs = [adv[idx].to(device) for _, idx in mbs]
    old = frozen_logps(model, mbs, cfg.temperature) if cfg.num_iterations > 1 else None
    rollout = rollout_logps(groups, mbs)
    timing["logps"] += time.time() - t0
    num_tokens, counts = aggregation_counts(cfg, mbs, dist)
    out = {"num_tokens": num_tokens}
    if num_tokens == 0:
        return {**out, "skipped_update": 1.0}  # every completion masked (e.g. all truncated)
    t0 = time.time()
    seen: dict[str, list[torch.Tensor]] = {"old": [], "rollout": [], "w": [], "clipped": []}
    for it in range(cfg.num_iterations):
        sums = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "entropy": 0.0}
        for j, (batch, _) in enumerate(mbs):
            m, adv_B = batch.target_mask_BT, advs[j]
            logps, ent = policy_logps(model, batch, cfg.temperature, with_entropy=(it == 0))
            old_lp = old[j] if old is not None else logps.detach()
            terms = policy_loss(logps, old_lp, adv_B, m)
            loss_BT = terms.loss_BT
            if rollout is not None:
                # The weight compares theta_old under the trainer with the engine (a constant): the same
                # in every one of the mu updates.
                isw = rollout_is_weights(
                    old_lp,
                    rollout[j],
                    m,
                    mode="mask" if cfg.rollout_is == "mis" else "truncate",
                    level=cfg.rollout_is_level,
                    cap=cfg.rollout_is_cap,
                    cap_low=cfg.rollout_is_cap_low,
                )
                if cfg.rollout_is != "none":
                    loss_BT = loss_BT * isw.weights_BT
                if it == 0:
                    keep = m > 0
                    for k, v in (
                        ("old", old_lp),
                        ("rollout", rollout[j]),
                        ("w", isw.weights_BT),
                        ("clipped", isw.clipped_BT),
                    ):
                        seen[k].append(v.detach()[keep].float().cpu())
            if refs is not None:
                kl_BT = kl_estimate(logps, refs[j], cfg.kl_estimator)
                sums["kl"] += (kl_BT.detach() * m).sum().item() / num_tokens
                if cfg.kl_in == "loss":
                    loss_BT = loss_BT + cfg.beta * kl_BT
            loss = aggregate(loss_BT, m, cfg.aggregation, **counts)
            (loss * dist.loss_scale).backward()
            w = m.sum().item() / num_tokens
            sums["loss"] += loss.item()
            sums["clip_low"] += (terms.clipped_low_BT * m).sum().item() / num_tokens
            sums["clip_high"] += (terms.clipped_high_BT * m).sum().item() / num_tokens
            if ent is not None:
                sums["entropy"] += ent * w
        sums = {k: dist.sum(v) for k, v in sums.items()}  # each rank held its share of the global sums
        grad_norm = loop.optimizer_step(
            model, optimizer, scheduler, max_grad_norm=cfg.optim.max_grad_norm, step=step, loss=sums["loss"]
        )
        if it == 0:
            out.update(
                loss=sums["loss"],
                entropy=sums["entropy"],
                grad_norm=grad_norm,
                **{"clip_frac/low": sums["clip_low"], "clip_frac/high": sums["clip_high"]},
            )
            if refs is not None:
                out["kl"] = sums["kl"]
    seen = {k: [t for part in dist.gather(v) for t in part] for k, v in seen.items()}
    if seen["old"]:
        out.update(correction_metrics(cfg, *(torch.cat(seen[k]) for k in ("old", "rollout", "w", "clipped"))))
    out["clip_frac/low_last"] = sums["clip_low"]
    out["clip_frac/high_last"] = sums["clip_high"]
    timing["update"] += time.time() - t0
    return out


def global_advantages(rewards_PG: torch.Tensor, cfg, dist, valid_PG: torch.Tensor | None = None) -> torch.Tensor:
    """``compute_advantages`` of this rank's groups. Group baselines need only the rank's own (whole)
    groups; batch whitening needs every rank's, so they are gathered first and the rank's rows kept."""
    if cfg.scale != "batch" or not dist.enabled:
        return compute_advantages(rewards_PG, cfg, valid_PG)
    parts = dist.gather(rewards_PG)
    valid = dist.gather(valid_PG if valid_PG is not None else torch.ones_like(rewards_PG, dtype=torch.bool))
    start = sum(len(p) for p in parts[: dist.rank])
    return compute_advantages(torch.cat(parts), cfg, torch.cat(valid))[start : start + len(rewards_PG)]


def aggregation_counts(cfg, mbs, dist=None) -> tuple[float, dict]:
    """(token count, the keyword counts of ``aggregate`` for ``cfg.aggregation``), global over every
    micro-batch of the optimizer step, on every rank (``dist``)."""
    dist = dist or Dist()
    num_tokens = dist.sum(sum(b.target_mask_BT.sum().item() for b, _ in mbs))
    num_seqs = dist.sum(sum((b.target_mask_BT.sum(1) > 0).sum().item() for b, _ in mbs))
    return num_tokens, {
        "token_mean": dict(num_tokens=num_tokens),
        "seq_mean_token_mean": dict(num_seqs=num_seqs),
        "seq_mean_token_sum": dict(num_seqs=num_seqs),
        "seq_sum_const": dict(num_seqs=num_seqs, const_len=cfg.max_completion_length),
    }[cfg.aggregation]


def rollout_logps(groups: list[Group], mbs) -> list[torch.Tensor] | None:
    """The engine's sampling log-probs in each micro-batch's sequence layout (``target_mask_BT``'s: row i
    is sequence idx[i], completion token k predicted at position len(prompt) - 1 + k); None when the
    rollout did not return them."""
    if any(g.logps is None for g in groups):
        return None
    flat = [(len(g.prompt_ids), lp) for g in groups for lp in g.logps]
    out = []
    for batch, idx in mbs:
        r_BT = torch.zeros(batch.target_mask_BT.shape, dtype=torch.float32)
        for row, i in enumerate(idx.tolist()):
            if i >= len(flat):
                continue  # an empty micro-batch's row (pad_micro_batches): nothing was sampled
            start, lp = flat[i]
            r_BT[row, start - 1 : start - 1 + len(lp)] = torch.tensor(lp, dtype=torch.float32)
        out.append(r_BT.to(batch.target_mask_BT.device))
    return out


def correction_metrics(cfg: GRPOConfig, old_N, rollout_N, w_N, clipped_N) -> dict:
    """Trainer-vs-engine mismatch over the step's loss tokens and, with a correction on, the
    distribution of the importance weights it applied."""
    out = {f"mismatch/{k}": v for k, v in mismatch_stats(old_N, rollout_N, torch.ones_like(old_N)).items()}
    if cfg.rollout_is != "none" and len(w_N):
        out.update(
            {
                "is_weight/mean": w_N.mean().item(),
                "is_weight/min": w_N.min().item(),
                "is_weight/max": w_N.max().item(),
                "is_weight/clipped_frac": clipped_N.mean().item(),
            }
        )
    return out


@torch.no_grad()
def sequence_kl(model, mbs, refs, cfg: GRPOConfig) -> torch.Tensor:
    """Summed per-token KL of each completion, in flat group order (for kl_in: reward)."""
    n = sum(len(idx) for _, idx in mbs)
    kl = torch.zeros(n)
    for (batch, idx), ref_lp in zip(mbs, refs):
        lp, _ = policy_logps(model, batch, cfg.temperature)
        kl[idx] = (kl_estimate(lp, ref_lp, cfg.kl_estimator) * batch.target_mask_BT).sum(1).float().cpu()
    return kl
