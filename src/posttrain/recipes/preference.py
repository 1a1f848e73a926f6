"""Preference optimisation: DPO (+ cDPO), IPO, SimPO, KTO and ORPO.

setup -> encode rows (each prompt tokenized once, shared by its completions) -> reference log-probs
(computed once and cached, or scored per batch by a frozen model; none at all for simpo / orpo)
-> for step: draw micro-batches -> [kto: reference point z over the whole step] -> per micro-batch
one forward over [chosen..., rejected...], loss summed over the micro-batch / global item count,
backward -> clip, AdamW step -> log -> eval -> checkpoint.

Shapes: B items (pairs, or kto examples) in a micro-batch, T tokens. Every per-sequence log-prob
is over completion tokens only (the prompt is masked out).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from posttrain.config import PreferenceConfig
from posttrain.data.collate import EpochSampler, collate_padded
from posttrain.data.formats import validate
from posttrain.data.io import DataError, Rows, read_rows
from posttrain.data.tokenize import EncodeStats, Example, completion_ids, join, prompt_ids
from posttrain.losses.logprobs import forward_logits, token_logps
from posttrain.losses.preference import dpo_loss, ipo_loss, kto_kl_estimate, kto_loss, orpo_loss, rpo_loss, simpo_loss
from posttrain.models.loading import load_frozen, load_model
from posttrain.models.lora import apply_lora, is_peft
from posttrain.recipes.sft import corpus_of, split_rows
from posttrain.run import loop

log = logging.getLogger("posttrain")


# ---------------------------------------------------------------------------------------------
# Data: rows -> items of two sequences that share the prompt's token ids


@dataclass(frozen=True)
class Item:
    """One training unit of two sequences with the same prompt ids.

    paired losses: (prompt + chosen, prompt + rejected). kto: (prompt + completion, prompt + the
    completion of another row), the second being the mismatched pair behind KTO's reference point.
    ``ref_logps``: the two sequences' summed reference log-probs once precomputed.
    """

    seqs: tuple[Example, Example]
    desirable: bool = True
    ref_logps: tuple[float, float] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.seqs[0]) + len(self.seqs[1])


@dataclass(frozen=True)
class Unit:
    """A row after tokenization and the length policy: prompt ids + one or two completions."""

    prompt: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    desirable: bool
    where: str


def _fit(prompt: list[int], completions: list[list[int]], max_length: int, overlong: str) -> list[list[int]] | None:
    """Completions cut to fit max_length after the prompt, or None when the row must be dropped.
    Truncation keeps the prompt whole: a cut prompt would change what the completion answers."""
    room = max_length - len(prompt)
    if room <= 0 or overlong == "drop":
        return None
    cut = [c[:room] for c in completions]
    if len(cut) == 2 and cut[0] == cut[1]:
        return None  # chosen and rejected differed only past the cut: nothing left to prefer
    return cut


def encode_units(tok, rows: Rows, *, paired: bool, split_pairs: bool, max_length: int, overlong: str) -> list[Unit]:
    """Tokenize every row (the prompt once); overlong rows are counted, reported, dropped or truncated.

    ``paired``: rows hold chosen/rejected. ``split_pairs`` (kto on paired data) turns each pair into
    a desirable (chosen) and an undesirable (rejected) unit with the same prompt ids.
    """
    units: list[Unit] = []
    overlong_n = dropped = truncated = 0
    for row, where in zip(rows.rows, rows.where):
        try:
            p = prompt_ids(tok, row["prompt"])
            cols = ("chosen", "rejected") if paired else ("completion",)
            comps = [completion_ids(tok, row["prompt"], row[c]) for c in cols]
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if paired and comps[0] == comps[1]:
            raise DataError(
                f"{where}: columns 'chosen' and 'rejected' are the same completion; a pair must "
                f"prefer one completion over a different one"
            )
        if len(p) + max(len(c) for c in comps) > max_length:
            overlong_n += 1
            comps = _fit(p, comps, max_length, overlong)
            if comps is None:
                dropped += 1
                continue
            truncated += 1
        if len(p) + min(len(c) for c in comps) < 2:
            raise DataError(f"{where}: no tokens to train on (an empty prompt and a one-token completion)")
        if paired and split_pairs:
            units += [Unit(tuple(p), (tuple(comps[0]),), True, where), Unit(tuple(p), (tuple(comps[1]),), False, where)]
        else:
            units.append(Unit(tuple(p), tuple(tuple(c) for c in comps), bool(row.get("label", True)), where))
    stats = EncodeStats(len(rows), overlong_n, dropped, truncated)
    if stats.overlong:
        log.warning(
            "%s: %d of %d rows are longer than max_length=%d: %d dropped, %d truncated",
            rows.source,
            stats.overlong,
            stats.total,
            max_length,
            stats.dropped,
            stats.truncated,
        )
    if not units:
        raise DataError(f"{rows.source}: no rows left after length filtering (max_length={max_length})")
    return units


def mismatch_partners(prompts: list[tuple[int, ...]]) -> list[int]:
    """For each unit, the next one (cyclically) whose prompt differs: its completion after this
    prompt is an unrelated answer, what KTO's reference point z needs. A fixed dataset-level
    choice (TRL instead rotates completions within a batch) lets the reference log-probs of the
    mismatched pairs be cached like the others. Linear time; all prompts equal -> the next unit."""
    n = len(prompts)
    nxt = [2 * n] * (2 * n)
    for j in range(2 * n - 2, -1, -1):
        nxt[j] = j + 1 if prompts[(j + 1) % n] != prompts[j % n] else nxt[j + 1]
    return [nxt[i] % n if nxt[i] < 2 * n else (i + 1) % n for i in range(n)]


def build_items(units: list[Unit], *, kto: bool, max_length: int) -> list[Item]:
    if not kto:
        return [
            Item((join(list(u.prompt), list(u.completions[0])), join(list(u.prompt), list(u.completions[1]))))
            for u in units
        ]
    partners = mismatch_partners([u.prompt for u in units])
    items = []
    for u, j in zip(units, partners):
        other = list(units[j].completions[0][: max_length - len(u.prompt)])  # >= 1 token: u itself fit
        items.append(Item((join(list(u.prompt), list(u.completions[0])), join(list(u.prompt), other)), u.desirable))
    return items


def load_items(tok, rows: Rows, cfg: PreferenceConfig) -> list[Item]:
    kto = cfg.loss == "kto"
    # KTO also takes paired rows (each pair -> one desirable + one undesirable example).
    paired = not kto or "chosen" in rows.rows[0]
    units = encode_units(
        tok, rows, paired=paired, split_pairs=kto, max_length=cfg.data.max_length, overlong=cfg.data.overlong
    )
    return build_items(units, kto=kto, max_length=cfg.data.max_length)


def data_kind(rows: Rows, loss: str) -> str:
    if loss == "kto" and "chosen" not in rows.rows[0]:
        return "unpaired"
    return "preference"


# ---------------------------------------------------------------------------------------------
# Log-probs: the policy, a live reference, or the cached reference


@dataclass(frozen=True)
class SeqLogps:
    """Summed completion log-probs and completion token counts of B sequences."""

    sum_B: torch.Tensor
    len_B: torch.Tensor

    @property
    def avg_B(self) -> torch.Tensor:
        return self.sum_B / self.len_B

    def split(self, b: int) -> tuple["SeqLogps", "SeqLogps"]:
        return SeqLogps(self.sum_B[:b], self.len_B[:b]), SeqLogps(self.sum_B[b:], self.len_B[b:])


def sequence_logps(model, seqs: list[Example], pad_id: int, device) -> SeqLogps:
    """One forward pass over ``seqs`` (right-padded); per-sequence sums over completion tokens."""
    batch = collate_padded(seqs, pad_id).to(device)
    logits = forward_logits(model, batch.input_ids_BT, batch.attention_mask, batch.position_ids_BT)
    logps_BT = token_logps(logits, batch.targets_BT) * batch.target_mask_BT
    return SeqLogps(logps_BT.sum(1), batch.target_mask_BT.sum(1))


def _column(items: list[Item], cols: tuple[int, ...]) -> list[Example]:
    """Sequences in column-major order: [items' seq cols[0]..., items' seq cols[1]...]."""
    return [it.seqs[c] for c in cols for it in items]


# items, columns -> summed reference log-probs in _column order, (len(cols) * B,)
RefFn = Callable[[list[Item], tuple[int, ...]], torch.Tensor]


def live_reference(model, pad_id: int, device, *, adapters_off: bool = False) -> RefFn:
    @torch.no_grad()
    def ref(items: list[Item], cols: tuple[int, ...]) -> torch.Tensor:
        if adapters_off:
            with model.disable_adapter():
                return sequence_logps(model, _column(items, cols), pad_id, device).sum_B
        return sequence_logps(model, _column(items, cols), pad_id, device).sum_B

    return ref


def cached_reference(device) -> RefFn:
    def ref(items: list[Item], cols: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor([it.ref_logps[c] for c in cols for it in items], dtype=torch.float32, device=device)

    return ref


def reference_source(cfg: PreferenceConfig, policy, device):
    """The reference model: None for reference-free losses (no model loaded, no pass); "policy" when
    ``initial`` is read off the policy itself (LoRA: its adapters off; precompute_ref: before its first
    update); else a frozen model (a copy of the starting weights, or ``ref_model``'s directory). Made
    before the policy is wrapped for data parallelism, so a copy is of the plain module."""
    if cfg.reference_free:
        return None
    if cfg.ref_model != "initial":
        return load_frozen(cfg.ref_model, cfg.model, device)
    if is_peft(policy) or cfg.precompute_ref:
        return "policy"
    return copy.deepcopy(policy).eval().requires_grad_(False)


def reference_scorer(source, policy, pad_id: int, device) -> RefFn | None:
    """What scores reference log-probs, from ``reference_source``'s answer."""
    if source is None:
        return None
    if isinstance(source, str):
        return live_reference(policy, pad_id, device, adapters_off=is_peft(policy))
    return live_reference(source, pad_id, device)


def precompute(items: list[Item], ref: RefFn, batch_size: int) -> list[Item]:
    """The items with their reference log-probs attached (one pass, before training)."""
    out: list[Item] = []
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        sums = ref(chunk, (0, 1)).view(2, -1).T.tolist()
        out += [replace(it, ref_logps=(a, b)) for it, (a, b) in zip(chunk, sums)]
    return out


def disable_dropout(model) -> None:
    """As TRL does for preference training: with dropout the policy's log-probs at step 0 would not
    equal the reference's, so the implicit rewards would start as noise. The saved config is kept."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


# ---------------------------------------------------------------------------------------------
# Objectives, picked once at setup: the paired losses, and KTO


PairLoss = Callable[[SeqLogps, SeqLogps, SeqLogps | None, SeqLogps | None], object]


def pair_loss(cfg: PreferenceConfig) -> PairLoss:
    """(policy chosen, policy rejected, ref chosen, ref rejected) -> terms with loss_B and rewards."""
    beta = cfg.effective_beta

    def dpo(pc, pr, rc, rr):
        return dpo_loss(pc.sum_B, pr.sum_B, rc.sum_B, rr.sum_B, beta=beta, label_smoothing=cfg.label_smoothing)

    def rpo(pc, pr, rc, rr):
        return rpo_loss(
            pc.sum_B,
            pr.sum_B,
            rc.sum_B,
            rr.sum_B,
            pc.len_B,
            beta=beta,
            alpha=cfg.rpo_alpha,
            label_smoothing=cfg.label_smoothing,
        )

    def ipo(pc, pr, rc, rr):
        return ipo_loss(pc.avg_B, pr.avg_B, rc.avg_B, rr.avg_B, beta=beta)

    def simpo(pc, pr, rc, rr):
        return simpo_loss(pc.avg_B, pr.avg_B, beta=beta, gamma=cfg.simpo_gamma)

    def orpo(pc, pr, rc, rr):
        # The SFT term per pair is the chosen completion's token-mean NLL (the ORPO code takes a
        # token mean over the whole batch); per pair keeps the loss a mean over pairs, so
        # gradient accumulation cannot change it.
        return orpo_loss(pc.avg_B, pr.avg_B, -pc.avg_B, lam=cfg.orpo_lambda)

    return {"dpo": rpo if cfg.rpo_alpha > 0 else dpo, "ipo": ipo, "simpo": simpo, "orpo": orpo}[cfg.loss]


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean().item())


class PairObjective:
    """dpo / ipo / simpo / orpo: one forward over [chosen..., rejected...] per micro-batch."""

    def __init__(self, loss_fn: PairLoss, ref: RefFn | None, pad_id: int, device):
        self.loss_fn, self.ref, self.pad_id, self.device = loss_fn, ref, pad_id, device

    def begin_step(self, model, items: list[Item], dist=None) -> dict[str, float]:
        return {}

    def micro_loss(self, model, items: list[Item], n_global: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of per-pair losses / n_global (the step's pair count): micro 1 x accum N == N x 1."""
        b = len(items)
        pc, pr = sequence_logps(model, _column(items, (0, 1)), self.pad_id, self.device).split(b)
        rc = rr = None
        if self.ref is not None:
            ref_sum = self.ref(items, (0, 1))
            rc, rr = SeqLogps(ref_sum[:b], pc.len_B), SeqLogps(ref_sum[b:], pr.len_B)
        terms = self.loss_fn(pc, pr, rc, rr)
        record = {
            "chosen_rewards": terms.chosen_rewards_B,
            "rejected_rewards": terms.rejected_rewards_B,
            "chosen_logps": pc.sum_B.detach(),
            "rejected_logps": pr.sum_B.detach(),
        }
        return terms.loss_B.sum() / n_global, record

    @staticmethod
    def metrics(rec: dict[str, torch.Tensor]) -> dict[str, float]:
        c, r = rec["chosen_rewards"], rec["rejected_rewards"]
        return {
            "rewards/chosen": _mean(c),
            "rewards/rejected": _mean(r),
            "rewards/margin": _mean(c - r),
            "rewards/accuracy": _mean(c > r),
            "logps/chosen": _mean(rec["chosen_logps"]),
            "logps/rejected": _mean(rec["rejected_logps"]),
        }


class KTOObjective:
    """KTO: z (the reference point) from the step's mismatched pairs, then per-example losses."""

    def __init__(self, cfg: PreferenceConfig, ref: RefFn, pad_id: int, device, batch_size: int):
        self.cfg, self.ref, self.pad_id, self.device, self.batch_size = cfg, ref, pad_id, device, batch_size
        self.z = torch.zeros((), device=device)

    @torch.no_grad()
    def begin_step(self, model, items: list[Item], dist=None) -> dict[str, float]:
        """z over every item of the step, not per micro-batch: one value for the whole step keeps
        accumulation invariance. Data-parallel (``dist``): ``items`` is this rank's share, and the
        log-probs of every rank's share are gathered first, so z is the global batch's."""
        pol, ref = [], []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            pol.append(sequence_logps(model, _column(chunk, (1,)), self.pad_id, self.device).sum_B)
            ref.append(self.ref(chunk, (1,)))
        pol_B, ref_B = torch.cat(pol).cpu(), torch.cat(ref).cpu()
        if dist is not None and dist.enabled:
            pol_B, ref_B = (torch.cat(parts) for parts in zip(*dist.gather((pol_B, ref_B))))
        self.z = kto_kl_estimate(pol_B, ref_B).to(self.device)
        return {"kl": float(self.z.item())}

    def micro_loss(self, model, items: list[Item], n_global: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pol = sequence_logps(model, _column(items, (0,)), self.pad_id, self.device)
        desirable_B = torch.tensor([it.desirable for it in items], device=self.device)
        terms = kto_loss(
            pol.sum_B,
            self.ref(items, (0,)),
            desirable_B,
            self.z,
            beta=self.cfg.effective_beta,
            desirable_weight=self.cfg.kto_desirable_weight,
            undesirable_weight=self.cfg.kto_undesirable_weight,
        )
        record = {"rewards": terms.rewards_B, "desirable": desirable_B, "logps": pol.sum_B.detach()}
        return terms.loss_B.sum() / n_global, record

    @staticmethod
    def metrics(rec: dict[str, torch.Tensor]) -> dict[str, float]:
        out = {}
        for name, sel in (("desirable", rec["desirable"]), ("undesirable", ~rec["desirable"])):
            if sel.any():  # a step may hold only one kind; no NaN in the metrics file
                out[f"rewards/{name}"] = _mean(rec["rewards"][sel])
                out[f"logps/{name}"] = _mean(rec["logps"][sel])
        if len(out) == 4:
            out["rewards/margin"] = out["rewards/desirable"] - out["rewards/undesirable"]
        return out


def _merge(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([r[k] for r in records]) for k in records[0]}


@torch.no_grad()
def evaluate(objective, model, items: list[Item], batch_size: int) -> dict[str, float]:
    """eval_loss (mean over held-out items) and the objective's reward metrics, prefixed eval_."""
    extra = objective.begin_step(model, items)
    loss, records = 0.0, []
    for s in range(0, len(items), batch_size):
        part, rec = objective.micro_loss(model, items[s : s + batch_size], len(items))
        loss += part.item()
        records.append(rec)
    return {f"eval_{k}": v for k, v in {"loss": loss, **extra, **objective.metrics(_merge(records))}.items()}


def warn_kto_imbalance(cfg: PreferenceConfig, items: list[Item]) -> None:
    n_d = sum(it.desirable for it in items)
    n_u = len(items) - n_d
    ratio = cfg.kto_desirable_weight * n_d / max(1e-9, cfg.kto_undesirable_weight * n_u)
    if not 1.0 <= ratio <= 4 / 3:
        # The KTO authors' rule of thumb, enforced with a warning by TRL as well.
        log.warning(
            "kto: %d desirable / %d undesirable examples; lambda_D n_D / (lambda_U n_U) = %.2f is outside "
            "[1, 4/3]: consider kto_desirable_weight / kto_undesirable_weight",
            n_d,
            n_u,
            ratio,
        )


# ---------------------------------------------------------------------------------------------


def train(cfg: PreferenceConfig) -> Path:
    """Train; return the exported model directory (``<output_dir>/final``)."""
    run = loop.start_run(cfg, "preference")
    device, dist = run.device, run.dist

    rows = read_rows(cfg.data.path, cfg.data.split, num_examples=cfg.data.num_examples, seed=cfg.train.seed)
    kind = data_kind(rows, cfg.loss)
    validate(rows, kind)
    train_rows, eval_rows = split_rows(rows, cfg.data.eval_path, cfg.data.eval_fraction, cfg.train.seed, cfg.data.split)
    if eval_rows is not None:
        validate(eval_rows, data_kind(eval_rows, cfg.loss))
    model, tok = load_model(cfg.model, corpus=corpus_of(train_rows), seed=cfg.train.seed, device=run.load_device)
    model = apply_lora(model, cfg.lora)
    disable_dropout(model)
    source = reference_source(cfg, model, run.load_device)
    if isinstance(source, torch.nn.Module):
        source = loop.wrap(run, cfg, source)  # a frozen model runs in lockstep with the policy
    model = loop.wrap(run, cfg, model)
    model.train()
    # Before any forward: FSDP leaves the root's gathered parameters registered after a forward without
    # backward (the reference precompute below), and an optimizer built then would hold those.
    optimizer, scheduler = loop.make_optimizer(model, cfg.optim, cfg.train.steps)

    items = load_items(tok, train_rows, cfg)
    eval_items = load_items(tok, eval_rows, cfg) if eval_rows is not None else []
    log.info("preference (%s): %d training items, %d eval items", cfg.loss, len(items), len(eval_items))
    if cfg.loss == "kto":
        warn_kto_imbalance(cfg, items)

    # Reference log-probs. Cached ones are taken before loop.resume loads trained weights, so a
    # resumed run recomputes exactly the values the first run used (from the starting weights).
    pad_id, mbs = tok.pad_token_id, cfg.train.micro_batch_size
    ref = reference_scorer(source, model, pad_id, device)
    if ref is not None and cfg.precompute_ref:
        t0 = time.time()
        items, eval_items = precompute(items, ref, mbs), precompute(eval_items, ref, mbs)
        ref = cached_reference(device)  # drops the last handle on a loaded reference model
        log.info(
            "preference: reference log-probs of %d items computed in %.1fs",
            len(items) + len(eval_items),
            time.time() - t0,
        )
    if cfg.loss == "kto":
        objective = KTOObjective(cfg, ref, pad_id, device, mbs)
    else:
        objective = PairObjective(pair_loss(cfg), ref, pad_id, device)

    sampler = EpochSampler(len(items), cfg.train.seed, shuffle=cfg.data.shuffle)
    start, state = loop.resume(run, model, optimizer, scheduler)
    if state:
        sampler.load_state_dict(state["sampler"])

    progress = loop.Progress(cfg.train.steps, start, f"preference ({cfg.loss})", cfg.train.progress and dist.is_main)
    last = cfg.train.steps
    try:
        for step in range(start + 1, last + 1):
            t0 = time.time()
            # The step's global batch: micro_batch_size x grad_accum items per rank, each rank its slice.
            picked = sampler.take(mbs * cfg.train.grad_accum * dist.world)
            mine = [items[i] for i in picked[dist.slice(len(picked))]]
            micro = [mine[k : k + mbs] for k in range(0, len(mine), mbs)]
            n_global = len(picked)  # the loss is a mean over the whole step's items
            step_extra = objective.begin_step(model, mine, dist)  # kto: z over the global batch
            loss_sum, records = 0.0, []
            for batch in micro:
                loss, record = objective.micro_loss(model, batch, n_global)
                (loss * dist.loss_scale).backward()
                loss_sum += loss.item()
                records.append({k: v.cpu() for k, v in record.items()})
            loss_sum = dist.sum(loss_sum)
            records = [r for part in dist.gather(records) for r in part]  # metrics over the global batch
            lr = scheduler.get_last_lr()[0]
            grad_norm = loop.optimizer_step(
                model, optimizer, scheduler, max_grad_norm=cfg.optim.max_grad_norm, step=step, loss=loss_sum
            )
            dt = time.time() - t0
            metrics = {
                "loss": loss_sum,
                **step_extra,
                **objective.metrics(_merge(records)),
                "lr": lr,
                "grad_norm": grad_norm,
                "num_items": n_global,
                "tokens_per_s": dist.sum(sum(it.num_tokens for it in mine)) / max(dt, 1e-9),
                "step_time": dt,
                "wall_time": time.time() - run.start_time,
                "epoch": sampler.epoch,
                **run.memory.metrics([model, source], [optimizer]),
            }
            if eval_items and loop.should(cfg.train.eval_every, step, last):
                metrics.update(evaluate(objective, model, eval_items, mbs))
            info = f"loss {loss_sum:.4f}"
            if "rewards/margin" in metrics:
                info += f" margin {metrics['rewards/margin']:.3f}"
            loop.end_step(
                run,
                cfg,
                "preference",
                step,
                last,
                metrics,
                info,
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
    return loop.export_final(run, model, tok, "preference")
