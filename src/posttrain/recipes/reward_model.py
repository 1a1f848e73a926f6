"""Reward model training: Bradley-Terry on preference pairs, the first stage of the RLHF branch.

setup -> encode pairs (each prompt tokenized once, then chosen and rejected) -> for step: draw
micro-batches of pairs -> one forward over [chosen..., rejected...] (the scalar head read on each
sequence's last non-pad token) -> Bradley-Terry loss summed over the micro-batch / the step's pair count
-> backward -> clip, AdamW step -> log (pair accuracy, margin, score mean/std) -> held-out pair accuracy
-> checkpoint. The export is a one-label ``AutoModelForSequenceClassification`` directory: a reward
source for GRPO and PPO (``rewards: [{name: reward_model, options: {path: DIR}}]``), and a model that
transformers and TRL load and score exactly as posttrain does.

Shapes: B pairs in a micro-batch, T tokens.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import RewardModelConfig
from posttrain.data.collate import EpochSampler, collate_padded
from posttrain.data.formats import validate
from posttrain.data.io import DataError, Rows, read_rows
from posttrain.data.tokenize import Example, join
from posttrain.losses.reward_model import bradley_terry_loss
from posttrain.models.lora import apply_lora
from posttrain.models.scalar import load_scalar, sequence_scores
from posttrain.recipes.preference import disable_dropout, encode_units
from posttrain.recipes.sft import corpus_of, split_rows
from posttrain.run import loop

log = logging.getLogger("posttrain")


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example
    margin: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _margins(rows: Rows) -> dict[str, float]:
    """The `margin` column by row location; a value that is not a finite number is a data error."""
    out = {}
    for row, where in zip(rows.rows, rows.where):
        m = row.get("margin", 0.0)
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise DataError(f"{where}: column 'margin' must be a finite number, got {m!r}")
        out[where] = float(m)
    return out


def load_pairs(tok, rows: Rows, cfg: RewardModelConfig) -> list[Pair]:
    units = encode_units(
        tok, rows, paired=True, split_pairs=False, max_length=cfg.data.max_length, overlong=cfg.data.overlong
    )
    margins = _margins(rows) if cfg.use_margin and any("margin" in r for r in rows.rows) else {}
    return [
        Pair(
            join(list(u.prompt), list(u.completions[0])),
            join(list(u.prompt), list(u.completions[1])),
            margins.get(u.where, 0.0),
        )
        for u in units
    ]


def pair_scores(model, pairs: list[Pair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores (B,), rejected scores (B,)) from one forward over both columns."""
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id).to(device)
    scores = sequence_scores(model, batch.input_ids_BT, batch.attention_mask)
    return scores[: len(pairs)], scores[len(pairs) :]


def micro_loss(model, pairs: list[Pair], n_global: int, cfg: RewardModelConfig, pad_id: int, device):
    """Sum of per-pair losses / n_global (the step's pair count): micro 1 x accum N == N x 1."""
    chosen, rejected = pair_scores(model, pairs, pad_id, device)
    margin = torch.tensor([p.margin for p in pairs], device=chosen.device) if cfg.use_margin else None
    terms = bradley_terry_loss(chosen, rejected, margin_B=margin, center_coef=cfg.center_rewards_coefficient)
    return terms.loss_B.sum() / n_global, (chosen.detach(), rejected.detach())


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str = "") -> dict[str, float]:
    scores = torch.cat([chosen, rejected])
    margin = chosen - rejected
    return {
        f"{prefix}accuracy": (margin > 0).float().mean().item(),
        f"{prefix}rewards/margin": margin.mean().item(),
        f"{prefix}rewards/chosen": chosen.mean().item(),
        f"{prefix}rewards/rejected": rejected.mean().item(),
        f"{prefix}reward/mean": scores.mean().item(),
        f"{prefix}reward/std": scores.std().item() if len(scores) > 1 else 0.0,
    }


@torch.no_grad()
def evaluate_pairs(model, pairs: list[Pair], cfg: RewardModelConfig, pad_id: int, device) -> dict[str, float]:
    """Held-out loss and pair accuracy (the fraction of pairs the model ranks the right way round)."""
    was_training = model.training
    model.eval()
    loss, chosen, rejected = 0.0, [], []
    for s in range(0, len(pairs), cfg.train.micro_batch_size):
        part, (c, r) = micro_loss(model, pairs[s : s + cfg.train.micro_batch_size], len(pairs), cfg, pad_id, device)
        loss += part.item()
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return {
        "eval_loss": loss,
        "eval_pairs": len(pairs),
        **pair_metrics(torch.cat(chosen), torch.cat(rejected), "eval_"),
    }


def train(cfg: RewardModelConfig) -> Path:
    """Train; return the exported reward model directory (``<output_dir>/final``)."""
    run = loop.start_run(cfg, "reward_model")
    device, dist = run.device, run.dist

    rows = read_rows(cfg.data.path, cfg.data.split, num_examples=cfg.data.num_examples, seed=cfg.train.seed)
    validate(rows, "preference")
    train_rows, eval_rows = split_rows(rows, cfg.data.eval_path, cfg.data.eval_fraction, cfg.train.seed, cfg.data.split)
    if eval_rows is not None:
        validate(eval_rows, "preference")
    model, tok = load_scalar(cfg.model, corpus=corpus_of(train_rows), seed=cfg.train.seed, device=run.load_device)
    model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    disable_dropout(model)  # scores of the same text must not differ between steps and at export
    model = loop.wrap(run, cfg, model)
    model.train()
    pairs = load_pairs(tok, train_rows, cfg)
    eval_pairs = load_pairs(tok, eval_rows, cfg) if eval_rows is not None else []
    log.info("reward_model: %d training pairs, %d held-out pairs", len(pairs), len(eval_pairs))

    pad_id, mbs = tok.pad_token_id, cfg.train.micro_batch_size
    sampler = EpochSampler(len(pairs), cfg.train.seed, shuffle=cfg.data.shuffle)
    optimizer, scheduler = loop.make_optimizer(model, cfg.optim, cfg.train.steps)
    start, state = loop.resume(run, model, optimizer, scheduler)
    if state:
        sampler.load_state_dict(state["sampler"])

    progress = loop.Progress(cfg.train.steps, start, "reward_model", cfg.train.progress and dist.is_main)
    last = cfg.train.steps
    try:
        for step in range(start + 1, last + 1):
            t0 = time.time()
            # The step's global batch: micro_batch_size x grad_accum pairs per rank, each rank its slice.
            picked = sampler.take(mbs * cfg.train.grad_accum * dist.world)
            mine = [pairs[i] for i in picked[dist.slice(len(picked))]]
            n_global = len(picked)  # the loss is a mean over the step's pairs
            loss_sum, chosen, rejected = 0.0, [], []
            for k in range(0, len(mine), mbs):
                loss, (c, r) = micro_loss(model, mine[k : k + mbs], n_global, cfg, pad_id, device)
                (loss * dist.loss_scale).backward()
                loss_sum += loss.item()
                chosen.append(c.cpu())
                rejected.append(r.cpu())
            loss_sum = dist.sum(loss_sum)
            chosen, rejected = ([t for part in dist.gather(x) for t in part] for x in (chosen, rejected))
            lr = scheduler.get_last_lr()[0]
            grad_norm = loop.optimizer_step(
                model, optimizer, scheduler, max_grad_norm=cfg.optim.max_grad_norm, step=step, loss=loss_sum
            )
            dt = time.time() - t0
            metrics = {
                "loss": loss_sum,
                **pair_metrics(torch.cat(chosen), torch.cat(rejected)),
                "lr": lr,
                "grad_norm": grad_norm,
                "num_items": n_global,
                "tokens_per_s": dist.sum(sum(p.num_tokens for p in mine)) / max(dt, 1e-9),
                "step_time": dt,
                "wall_time": time.time() - run.start_time,
                "epoch": sampler.epoch,
                **run.memory.metrics([model], [optimizer]),
            }
            if eval_pairs and loop.should(cfg.train.eval_every, step, last):
                metrics.update(evaluate_pairs(model, eval_pairs, cfg, pad_id, device))
            loop.end_step(
                run,
                cfg,
                "reward_model",
                step,
                last,
                metrics,
                f"loss {loss_sum:.4f} acc {metrics['accuracy']:.2f}",
                progress,
                lambda: loop.save(
                    run,
                    cfg,
                    step,  # noqa: B023 - the save runs within this iteration
                    model,
                    tok,
                    optimizer,
                    scheduler,
                    {"sampler": sampler.state_dict()},
                ),
            )
    finally:
        progress.close()
        run.tracker.close()
    return loop.export_final(run, model, tok, "reward_model")
