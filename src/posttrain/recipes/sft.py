"""Supervised fine-tuning (and, with kind="lm", pretraining): masked next-token NLL.

setup -> for step: draw micro-batches -> count trained tokens for the whole step -> forward,
loss (token mean over the step), backward per micro-batch -> clip, AdamW step -> log -> checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from posttrain.config import SFTConfig
from posttrain.data.collate import EpochSampler, LMBatch, collate_packed, collate_padded, pack
from posttrain.data.formats import validate
from posttrain.data.io import Rows, heldout_split, read_rows
from posttrain.data.tokenize import Example, encode_rows
from posttrain.losses.logprobs import forward_logits, token_logps
from posttrain.losses.sft import sft_loss
from posttrain.models.loading import load_model
from posttrain.models.lora import apply_lora
from posttrain.run import loop

log = logging.getLogger("posttrain")


def split_rows(rows: Rows, eval_path: str, eval_fraction: float, seed: int, split: str) -> tuple[Rows, Rows | None]:
    """(train, eval): eval_path when given, else a seeded eval_fraction of the rows."""
    if eval_path:
        return rows, read_rows(eval_path, heldout_split(eval_path, split), seed=seed)
    if eval_fraction <= 0 or len(rows) < 4:
        return rows, None
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(len(rows) * eval_fraction))
    return rows.subset(sorted(idx[n_eval:])), rows.subset(sorted(idx[:n_eval]))


def corpus_of(rows: Rows) -> list[str]:
    """Plain text of the rows, for training a BPE tokenizer on a tiny model."""
    out = []
    for r in rows.rows:
        for k in ("text", "prompt", "completion", "chosen", "rejected"):
            if isinstance(r.get(k), str):
                out.append(r[k])
        for m in r.get("messages") or []:  # a conversation: its turns, tool calls as the template writes them
            out.append(m.get("content") or "")
            for call in m.get("tool_calls") or []:
                f = call.get("function", call)
                args = f["arguments"] if isinstance(f["arguments"], str) else json.dumps(f["arguments"])
                out.append(f'<tool_call>{{"name": "{f["name"]}", "arguments": {args}}}</tool_call>')
    return out


def collate(units: list[list[Example]], pad_id: int, packed: bool) -> LMBatch:
    return collate_packed(units, pad_id) if packed else collate_padded([u[0] for u in units], pad_id)


def micro_loss(model, batch: LMBatch, num_tokens: int) -> torch.Tensor:
    logits = forward_logits(model, batch.input_ids_BT, batch.attention_mask, batch.position_ids_BT)
    return sft_loss(token_logps(logits, batch.targets_BT), batch.target_mask_BT, num_tokens)


@torch.no_grad()
def eval_loss(model, units: list[list[Example]], pad_id: int, packed: bool, batch_size: int, device) -> float:
    model.eval()
    total = sum(sum(sum(e.loss_mask[1:]) for e in u) for u in units)
    loss = 0.0
    for s in range(0, len(units), batch_size):
        loss += micro_loss(model, collate(units[s : s + batch_size], pad_id, packed).to(device), total).item()
    model.train()
    return loss


def train(cfg: SFTConfig, kind: str = "sft", recipe: str = "sft") -> Path:
    """Train; return the exported model directory (``<output_dir>/final``)."""
    run = loop.start_run(cfg, recipe)
    device, dist = run.device, run.dist
    completion_only = getattr(cfg, "completion_only", False)

    rows = read_rows(cfg.data.path, cfg.data.split, num_examples=cfg.data.num_examples, seed=cfg.train.seed)
    validate(rows, kind)
    train_rows, eval_rows = split_rows(rows, cfg.data.eval_path, cfg.data.eval_fraction, cfg.train.seed, cfg.data.split)
    if eval_rows is not None:
        validate(eval_rows, kind)
    model, tok = load_model(cfg.model, corpus=corpus_of(train_rows), seed=cfg.train.seed, device=run.load_device)
    model = loop.wrap(run, cfg, apply_lora(model, cfg.lora))
    model.train()

    encode = dict(
        max_length=cfg.data.max_length,
        overlong=cfg.data.overlong,
        completion_only=completion_only,
        truncate_ok=(kind == "lm" and cfg.packing),
    )
    examples, _ = encode_rows(tok, train_rows, kind, **encode)
    eval_examples = encode_rows(tok, eval_rows, kind, **encode)[0] if eval_rows is not None else []
    pack_len = cfg.data.max_length
    units = pack(examples, pack_len) if cfg.packing else [[e] for e in examples]
    eval_units = pack(eval_examples, pack_len) if cfg.packing else [[e] for e in eval_examples]
    log.info(
        "%s: %d training rows -> %d %s, %d eval rows",
        recipe,
        len(examples),
        len(units),
        "packed rows" if cfg.packing else "rows",
        len(eval_examples),
    )

    sampler = EpochSampler(len(units), cfg.train.seed, shuffle=cfg.data.shuffle)
    optimizer, scheduler = loop.make_optimizer(model, cfg.optim, cfg.train.steps)
    start, state = loop.resume(run, model, optimizer, scheduler)
    if state:
        sampler.load_state_dict(state["sampler"])

    progress = loop.Progress(cfg.train.steps, start, recipe, cfg.train.progress and dist.is_main)
    last = cfg.train.steps
    mbs = cfg.train.micro_batch_size
    try:
        for step in range(start + 1, last + 1):
            t0 = time.time()
            # The step's global batch: micro_batch_size x grad_accum per rank, each rank its slice.
            picked = sampler.take(mbs * cfg.train.grad_accum * dist.world)
            mine = picked[dist.slice(len(picked))]
            micro = [
                collate([units[i] for i in mine[k : k + mbs]], tok.pad_token_id, cfg.packing)
                for k in range(0, len(mine), mbs)
            ]
            num_tokens = dist.sum(sum(b.num_target_tokens for b in micro))  # global count for the whole step
            loss_sum = 0.0
            for batch in micro:
                loss = micro_loss(model, batch.to(device), num_tokens)
                (loss * dist.loss_scale).backward()
                loss_sum += loss.item()
            loss_sum = dist.sum(loss_sum)
            lr = scheduler.get_last_lr()[0]
            grad_norm = loop.optimizer_step(
                model, optimizer, scheduler, max_grad_norm=cfg.optim.max_grad_norm, step=step, loss=loss_sum
            )
            dt = time.time() - t0
            metrics = {
                "loss": loss_sum,
                "lr": lr,
                "grad_norm": grad_norm,
                "num_tokens": num_tokens,
                "tokens_per_s": dist.sum(sum(int(b.input_ids_BT.numel()) for b in micro)) / max(dt, 1e-9),
                "step_time": dt,
                "wall_time": time.time() - run.start_time,
                "epoch": sampler.epoch,
                **run.memory.metrics([model], [optimizer]),
            }
            if eval_units and loop.should(cfg.train.eval_every, step, last):
                metrics["eval_loss"] = eval_loss(
                    model, eval_units, tok.pad_token_id, cfg.packing, cfg.train.micro_batch_size, device
                )
            loop.end_step(
                run,
                cfg,
                recipe,
                step,
                last,
                metrics,
                f"loss {loss_sum:.4f}",
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
    return loop.export_final(run, model, tok, recipe)
