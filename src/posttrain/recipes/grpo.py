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

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from posttrain import loop
from posttrain.config import GRPOConfig
from posttrain.data.collate import EpochSampler, LMBatch, collate_packed, collate_padded, pack_indices
from posttrain.data.formats import reward_columns, validate
from posttrain.data.io import read_rows
from posttrain.data.tokenize import Example, prompt_ids as encode_prompt
from posttrain.io_utils import keep_steps_upto
from posttrain.losses.aggregation import aggregate
from posttrain.losses.kl import kl_estimate
from posttrain.losses.logprobs import completion_logps
from posttrain.losses.policy import PolicyLossTerms, cispo_loss, gspo_loss, ppo_clip_loss
from posttrain.models.checkpoint import export_model
from posttrain.models.loading import load_frozen, load_model, resolve_device
from posttrain.models.lora import apply_lora, is_peft
from posttrain.rl.advantages import batch_normalize, group_advantages, rloo_advantages
from posttrain.rl.groups import Group, collect_groups
from posttrain.rl.watch import RunWatch, held_out_metrics
from posttrain.rollout.engine import KVCacheEngine, SamplingParams
from posttrain.verifiers import build_reward, is_correct

log = logging.getLogger("posttrain")

PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], PolicyLossTerms]


def make_policy_loss(cfg: GRPOConfig) -> PolicyLoss:
    """Chosen once at setup: (logps_BT, old_logps_BT, advantages_B, mask_BT) -> per-token terms."""
    if cfg.loss == "ppo_clip":
        return lambda lp, old, adv, m: ppo_clip_loss(lp, old, adv[:, None], eps_low=cfg.eps_low,
                                                     eps_high=cfg.eps_high, dual_clip=cfg.dual_clip or None)
    if cfg.loss == "gspo":
        return lambda lp, old, adv, m: gspo_loss(lp, old, adv, m, eps_low=cfg.eps_low, eps_high=cfg.eps_high)
    return lambda lp, old, adv, m: cispo_loss(lp, old, adv[:, None], eps_high=cfg.eps_high)


def compute_advantages(rewards_PG: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    if cfg.advantage == "rloo":
        adv = rloo_advantages(rewards_PG)
    else:
        adv = group_advantages(rewards_PG, scale="none" if cfg.scale in ("none", "batch") else "std")
    return batch_normalize(adv) if cfg.scale == "batch" else adv


def sequences(groups: list[Group], mask_truncated: bool) -> list[tuple[Example, bool]]:
    """Flatten groups into (prompt + completion example, trained?) in group order."""
    out = []
    for g in groups:
        for ids, trunc in zip(g.completion_ids, g.truncated):
            ex = Example(g.prompt_ids + ids, (0,) * len(g.prompt_ids) + (1,) * len(ids))
            out.append((ex, not (mask_truncated and trunc)))
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
        return StepBatch(self.inputs.to(device), self.target_mask_BT.to(device),
                         None if self.src is None else self.src.to(device))


def micro_batches(seqs, size: int, pad_id: int, device, packed: bool = False) -> list[tuple[StepBatch, torch.Tensor]]:
    """Micro-batches of the step's sequences, each with the flat indices of its sequences.

    Padded: length-sorted chunks of ``size`` sequences (sorting cuts padding). Packed: all sequences
    packed first-fit into rows as long as the step's longest sequence, ``size`` rows per micro-batch --
    the same bound on tokens per forward, with (almost) no padding -- when that runs fewer tokens
    than the padded chunks (else the padded layout is used). The loss uses global counts, so
    how sequences are grouped changes neither its value nor its gradient (tests/test_grpo.py)."""
    lengths = [len(e) for e, _ in seqs]
    order = sorted(range(len(seqs)), key=lambda i: lengths[i])
    chunks = [[[i] for i in order[s:s + size]] for s in range(0, len(order), size)]
    if packed:
        bins = pack_indices(lengths, max(lengths))
        # Packing pays only where it removes padding; else (e.g. every completion hit the length cap)
        # the padded rows cost no more and skip the 4D mask.
        packed = len(bins) * max(lengths) < sum(len(c) * lengths[c[-1][0]] for c in chunks)
        if packed:
            chunks = [bins[s:s + size] for s in range(0, len(bins), size)]
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
    return StepBatch(LMBatch(p.input_ids_BT, p.attention_mask, p.position_ids_BT, p.targets_BT, packed_mask),
                     mask_BT, src_K)


def policy_logps(model, batch: StepBatch, temperature: float, with_entropy: bool = False):
    """(logps_BT, mean entropy): log-probs of the completion tokens in sequence layout (0 at masked
    positions), whichever layout the model ran on."""
    x = batch.inputs
    logps, ent = completion_logps(model, x.input_ids_BT, x.attention_mask, x.position_ids_BT, x.targets_BT,
                                  x.target_mask_BT, temperature, with_entropy=with_entropy)
    if batch.src is None:
        return logps, ent
    sel_BT = batch.target_mask_BT > 0
    return torch.zeros(sel_BT.shape, dtype=logps.dtype, device=logps.device).masked_scatter(
        sel_BT, logps.reshape(-1)[batch.src]), ent


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


def sample_groups(engine, tok, rows: list[dict], prompt_ids: list[list[int]], picked: list[int], G: int,
                  sampling: SamplingParams, reward_fn, timing: dict) -> list[Group]:
    """Steps 1-2 for the rows ``picked``: G samples each from ``engine``, scored by ``reward_fn`` (the
    dataset's extra columns reach the verifiers), as one Group per prompt. ``timing["reward"]`` gains the
    scoring time. Shared by every RL recipe (GRPO, PPO)."""
    gen = engine.generate([prompt_ids[i] for i in picked], G, sampling)
    texts = [tok.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
    row_of = [i for i in picked for _ in range(G)]
    columns = {k: [rows[i].get(k) for i in row_of] for k in reward_columns(rows[picked[0]])}
    t0 = time.time()
    scores = reward_fn(texts, [rows[i]["prompt"] for i in row_of], columns,
                       completion_lengths=[len(c) for c in gen.completion_ids])
    timing["reward"] += time.time() - t0
    total = torch.nan_to_num(torch.tensor(scores.total, dtype=torch.float32), nan=0.0)
    return [Group(row, tuple(prompt_ids[row]), tuple(tuple(c) for c in gen.completion_ids[k * G:(k + 1) * G]),
                  tuple(texts[k * G:(k + 1) * G]), tuple(gen.truncated[k * G:(k + 1) * G]),
                  tuple(total[k * G:(k + 1) * G].tolist()),
                  {n: tuple(v[k * G:(k + 1) * G]) for n, v in scores.components.items()})
            for k, row in enumerate(picked)]


def train(cfg: GRPOConfig) -> Path:
    device = resolve_device(cfg.model.device)
    run = loop.start_run(cfg, "grpo", device)

    rows = read_rows(cfg.data.path, cfg.data.split, num_examples=cfg.data.num_examples, seed=cfg.train.seed)
    validate(rows, "prompt")
    model, tok = load_model(cfg.model, seed=cfg.train.seed, device=device)
    model = apply_lora(model, cfg.lora)
    model.train()
    ref = reference_model(cfg, model, device)
    reward_fn = build_reward([(r.name, r.weight, r.options) for r in cfg.rewards], workers=cfg.reward_workers)
    engine = KVCacheEngine(model, tok, decode=cfg.rollout_decode)
    sampling = SamplingParams(cfg.max_completion_length, cfg.temperature, cfg.top_p)
    policy_loss = make_policy_loss(cfg)

    prompt_ids = [encode_prompt(tok, r["prompt"]) for r in rows.rows]
    usable = [i for i, p in enumerate(prompt_ids) if len(p) <= cfg.data.max_length]
    if len(usable) < len(prompt_ids):
        log.warning("%s: %d of %d prompts are longer than max_length=%d and are dropped", rows.source,
                    len(prompt_ids) - len(usable), len(prompt_ids), cfg.data.max_length)
    if not usable:
        raise ValueError(f"{rows.source}: no prompt fits data.max_length={cfg.data.max_length}")
    eval_rows = read_rows(cfg.data.eval_path, "test", seed=cfg.train.seed).rows[:cfg.eval_examples] \
        if cfg.data.eval_path else []
    sampler = EpochSampler(len(usable), cfg.train.seed, shuffle=cfg.data.shuffle)
    optimizer, scheduler = loop.make_optimizer(model, cfg.optim, cfg.train.steps * cfg.num_iterations)
    start, state = loop.resume(run, model, optimizer, scheduler)
    if state:
        sampler.load_state_dict(state["sampler"])
        keep_steps_upto(run.dir / "samples.jsonl", start)  # steps after the checkpoint run again
    elif (run.dir / "samples.jsonl").exists():
        (run.dir / "samples.jsonl").unlink()
    # Collapse / futility diagnostics and warnings (rl/diagnostics.py); a run stopped by stop_on stays stopped.
    watch = RunWatch(run.dir, cfg, rows.rows, start, state.get("watch"))
    last = start if state.get("stopped") else cfg.train.steps

    def rollout_round() -> list[Group]:
        picked = [usable[i] for i in sampler.take(cfg.prompts_per_step)]
        return sample_groups(engine, tok, rows.rows, prompt_ids, picked, cfg.num_generations, sampling, reward_fn,
                             timing)

    progress = loop.Progress(cfg.train.steps, start, "grpo", cfg.train.progress)
    short_steps = 0
    try:
        for step in range(start + 1, last + 1):
            timing = {"generate": 0.0, "reward": 0.0, "logps": 0.0, "update": 0.0}
            t_step = time.time()
            # 1-2. rollout + reward (dynamic sampling may take several rounds)
            groups, generated, stats = collect_groups(rollout_round, cfg.prompts_per_step,
                                                      dynamic=cfg.dynamic_sampling, max_rounds=cfg.max_gen_batches)
            timing["generate"] = time.time() - t_step - timing["reward"]
            metrics = rollout_metrics(generated, stats)  # what the policy did, before any filtering
            metrics.update(watch.metrics(generated))
            if stats.bound_reached:
                short_steps += 1
                log.debug("step %d: dynamic sampling hit max_gen_batches=%d with %d/%d varied groups; "
                          "training on those", step, cfg.max_gen_batches, stats.kept_groups, cfg.prompts_per_step)
            if groups:
                metrics.update(update_policy(cfg, model, ref, groups, optimizer, scheduler, policy_loss,
                                             tok.pad_token_id, device, timing, step))
            else:
                metrics["skipped_update"] = 1.0  # no group with a learning signal: nothing to train on
            gen_tokens = sum(len(c) for g in generated for c in g.completion_ids)
            dt = time.time() - t_step
            metrics.update({f"time/{k}": v for k, v in timing.items()})
            metrics.update(step_time=dt, tokens_per_s=gen_tokens / max(dt, 1e-9), lr=scheduler.get_last_lr()[0],
                           wall_time=time.time() - run.start_time)
            if eval_rows and loop.should(cfg.eval_every, step, last):
                metrics.update(held_out_metrics(model, tok, eval_rows, cfg))
                watch.evaluated(step, metrics["eval_accuracy"], model, tok)
            stop = watch.check(step, metrics)
            run.tracker.log(step, metrics)
            if step == 1 or step == last or (cfg.samples_every and step % cfg.samples_every == 0):
                write_samples(run.dir, step, generated, tok)
            progress.update(step, f"reward {metrics['reward/mean']:.3f} acc {metrics['accuracy']:.2f}")
            if not cfg.train.progress and loop.should(cfg.train.log_every, step, last):
                log.info("grpo step %d/%d reward %.3f acc %.3f len %.1f", step, last, metrics["reward/mean"],
                         metrics["accuracy"], metrics["completion_len/mean"])
            if loop.should(cfg.train.save_every, step, last) or stop:
                loop.save(run, cfg, step, model, tok, optimizer, scheduler,
                          {"sampler": sampler.state_dict(), "watch": watch.state_dict(), "stopped": stop})
            if stop:
                last = step
                break
    finally:
        progress.close()
        run.tracker.close()
        reward_fn.close()
    if short_steps:
        log.warning("dynamic sampling reached max_gen_batches=%d with fewer than %d varied groups on %d of %d "
                    "steps; those steps trained on the groups they had (metric: dynamic_sampling_short)",
                    cfg.max_gen_batches, cfg.prompts_per_step, short_steps, last - start)
    return export_model(run.dir, model, tok)


def update_policy(cfg: GRPOConfig, model, ref, groups: list[Group], optimizer, scheduler, policy_loss: PolicyLoss,
                  pad_id: int, device, timing: dict, step: int) -> dict:
    """Steps 3-5: advantages, log-probs, mu optimizer updates. Returns the update metrics."""
    rewards_PG = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    t0 = time.time()
    mbs = micro_batches(sequences(groups, cfg.mask_truncated_completions), cfg.train.micro_batch_size, pad_id, device,
                       packed=cfg.padding_free)
    refs = ref_logps(ref, model, mbs, cfg.temperature) if ref is not None else None
    if refs is not None and cfg.kl_in == "reward":
        # Subtract beta * (summed KL of the completion) from its reward, before the baseline.
        rewards_PG = rewards_PG - cfg.beta * sequence_kl(model, mbs, refs, cfg).view_as(rewards_PG)
    adv = compute_advantages(rewards_PG, cfg).flatten()
    advs = [adv[idx].to(device) for _, idx in mbs]
    old = frozen_logps(model, mbs, cfg.temperature) if cfg.num_iterations > 1 else None
    timing["logps"] += time.time() - t0
    num_tokens = sum(b.target_mask_BT.sum().item() for b, _ in mbs)      # global over the whole step
    num_seqs = sum((b.target_mask_BT.sum(1) > 0).sum().item() for b, _ in mbs)
    counts = {"token_mean": dict(num_tokens=num_tokens), "seq_mean_token_mean": dict(num_seqs=num_seqs),
              "seq_mean_token_sum": dict(num_seqs=num_seqs),
              "seq_sum_const": dict(num_seqs=num_seqs, const_len=cfg.max_completion_length)}[cfg.aggregation]
    out = {"num_tokens": num_tokens}
    if num_tokens == 0:
        return {**out, "skipped_update": 1.0}  # every completion masked (e.g. all truncated)
    t0 = time.time()
    for it in range(cfg.num_iterations):
        sums = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "entropy": 0.0}
        for j, (batch, _) in enumerate(mbs):
            m, adv_B = batch.target_mask_BT, advs[j]
            logps, ent = policy_logps(model, batch, cfg.temperature, with_entropy=(it == 0))
            old_lp = old[j] if old is not None else logps.detach()
            terms = policy_loss(logps, old_lp, adv_B, m)
            loss_BT = terms.loss_BT
            if refs is not None:
                kl_BT = kl_estimate(logps, refs[j], cfg.kl_estimator)
                sums["kl"] += (kl_BT.detach() * m).sum().item() / num_tokens
                if cfg.kl_in == "loss":
                    loss_BT = loss_BT + cfg.beta * kl_BT
            loss = aggregate(loss_BT, m, cfg.aggregation, **counts)
            loss.backward()
            w = m.sum().item() / num_tokens
            sums["loss"] += loss.item()
            sums["clip_low"] += (terms.clipped_low_BT * m).sum().item() / num_tokens
            sums["clip_high"] += (terms.clipped_high_BT * m).sum().item() / num_tokens
            if ent is not None:
                sums["entropy"] += ent * w
        grad_norm = loop.optimizer_step(model, optimizer, scheduler, max_grad_norm=cfg.optim.max_grad_norm,
                                        step=step, loss=sums["loss"])
        if it == 0:
            out.update(loss=sums["loss"], entropy=sums["entropy"], grad_norm=grad_norm,
                       **{"clip_frac/low": sums["clip_low"], "clip_frac/high": sums["clip_high"]})
            if refs is not None:
                out["kl"] = sums["kl"]
    out["clip_frac/low_last"] = sums["clip_low"]
    out["clip_frac/high_last"] = sums["clip_high"]
    timing["update"] += time.time() - t0
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


def rollout_metrics(groups: list[Group], stats) -> dict:
    totals = [r for g in groups for r in g.rewards]
    lengths = [len(c) for g in groups for c in g.completion_ids]
    trunc = [t for g in groups for t in g.truncated]
    out = {"gen_rounds": stats.rounds, "zero_variance_frac": stats.zero_variance_frac,
           "groups_trained": stats.kept_groups, "dynamic_sampling_short": float(stats.bound_reached)}
    t = torch.tensor(totals)
    out.update({"reward/mean": t.mean().item(), "reward/std": t.std().item() if len(totals) > 1 else 0.0,
                "completion_len/mean": sum(lengths) / len(lengths), "completion_len/min": min(lengths),
                "completion_len/max": max(lengths), "truncation_rate": sum(trunc) / len(trunc)})
    names = list(groups[0].components)
    for name in names:
        v = torch.tensor([x for g in groups for x in g.components[name]], dtype=torch.float32)
        v = v[~torch.isnan(v)]
        out[f"reward/{name}/mean"] = v.mean().item() if len(v) else 0.0
        out[f"reward/{name}/std"] = v.std().item() if len(v) > 1 else 0.0
    first = [x for g in groups for x in g.components[names[0]]]
    out["accuracy"] = sum(is_correct(x) for x in first) / len(first)
    return out


def held_out_accuracy(model, tok, rows: list[dict], cfg: GRPOConfig) -> float:
    from posttrain.evaluation import evaluate
    from posttrain.verifiers import load

    first = cfg.rewards[0]
    return evaluate(model, tok, rows, load(first.name, **first.options),
                    max_new_tokens=cfg.max_completion_length).greedy_accuracy


def write_samples(run_dir: Path, step: int, groups: list[Group], tok, per_step: int = 4) -> None:
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
        for g in groups[:per_step]:
            fh.write(json.dumps({"step": step, "prompt": tok.decode(g.prompt_ids, skip_special_tokens=True),
                                 "completion": g.texts[0], "reward": g.rewards[0]}) + "\n")
