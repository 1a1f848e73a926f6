"""`posttrain make-pairs`: on-policy preference data from a verifier.

Sample n completions per prompt from a model, score each with a verifier, and write
(prompt, chosen = a correct completion, rejected = an incorrect one) rows for DPO / IPO / SimPO /
ORPO, or (prompt, completion, label = correct?) rows for KTO. A prompt whose samples are all correct
or all wrong yields no pair (there is nothing to prefer) and is counted -- unless the data has a
reference solution (``gold_column``, e.g. the `completion` of SFT rows): then a prompt the model never
solves takes it, if the verifier accepts it, as the chosen completion against the model's own wrong
ones. Those are the prompts the model most needs to learn, and on-policy pairs never cover them. The
dataset's other columns (e.g. `answer`) are kept in every output row.

With a pairwise judge instead of a verifier (``judge``: rewards.pairwise.PairwiseJudge, RLAIF), every two
distinct non-empty samples of a prompt are compared IN BOTH ORDERS and the averaged P(first better) decides.
A comparison whose orders disagree (position-inconsistent) or whose average is within the judge's margin of
0.5 (a tie) is counted and not used, and one with a judge failure in either order is never a preference
(TRL's swapped -1 became "the second wins"): it is counted as ``judge_failed``. Of the usable comparisons the
``pairs_per_prompt`` most confident become pairs. The stats report the position-consistency rate.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from posttrain.data.formats import reward_columns
from posttrain.data.tokenize import is_conversational
from posttrain.data.tokenize import prompt_ids as encode_prompt
from posttrain.rewards.base import is_correct, score_all
from posttrain.rewards.pairwise import INCONSISTENT, PREFERRED, TIE, PairwiseJudge
from posttrain.rollout import make_engine
from posttrain.rollout.engine import KVCacheEngine, SamplingParams
from posttrain.run.loop import Progress

# Columns the output rows define themselves; an input row's own values for these are not copied.
OWN_COLUMNS = ("prompt", "completion", "chosen", "rejected", "label")


@dataclass(frozen=True)
class PairStats:
    prompts: int
    completions: int
    correct: int
    empty: int  # empty completions, left out
    pairs: int  # preference rows written (kto: completion rows written)
    skipped_all_correct: int
    skipped_all_wrong: int
    desirable: int = 0  # kto only
    undesirable: int = 0  # kto only
    gold_chosen: int = 0  # all-wrong prompts whose reference solution was used (gold_column)
    ranked_by: str = "verifier"  # "verifier", or "judge": a pairwise judge compared the samples
    # judge only: comparisons of two distinct samples (each judged in both orders), and what they gave
    judged: int = 0
    preferred: int = 0  # orders agree, average outside the margin: usable as a preference
    inconsistent: int = 0  # the orders prefer different answers: no preference
    ties: int = 0  # the orders agree but the average is within the margin of 0.5: no preference
    judge_failed: int = 0  # no verdict in at least one order: never a preference
    position_consistency: float | None = None  # (preferred + ties) / (judged - judge_failed)
    skipped_no_preference: int = 0  # prompts with comparisons but no usable preference
    skipped_too_few: int = 0  # prompts with fewer than two distinct non-empty samples


def _as_completion(prompt: Any, text: str) -> Any:
    """Conversational prompts get conversational completions (one assistant message)."""
    return [{"role": "assistant", "content": text}] if is_conversational(prompt) else text


def _distinct(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def make_pairs(
    model,
    tokenizer,
    rows: list[dict],
    verifier: Callable[..., float],
    n: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    pairs_per_prompt: int = 1,
    kto: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = False,
    engine: str = "native",
    gold_column: str = "",
    judge: PairwiseJudge | None = None,
) -> tuple[list[dict], PairStats]:
    """(output rows, counts). Pairs: up to ``pairs_per_prompt`` distinct (correct, incorrect)
    combinations per prompt, drawn with ``seed``. KTO: every distinct completion, labelled by the
    verifier (prompts with one kind only are kept: KTO needs no pair, but they are still counted).
    Prompts go through in chunks of ``batch_size // n``: sampled, scored and turned into rows, so only
    one chunk's completions are held at a time (the result is the same as one pass over all rows).
    ``engine``: native (KV-cache loop on ``model``) or vllm (a colocated vLLM copy of it).
    ``gold_column``: a column holding a correct worked completion; a prompt without a correct sample uses
    it as its correct one (when the verifier accepts it; otherwise the prompt stays all-wrong).
    ``judge``: rank the samples with a pairwise judge instead (``verifier`` None; module docstring)."""
    if judge is not None:
        if verifier is not None:
            raise ValueError("make_pairs: a verifier or a pairwise judge ranks the samples, not both")
        if kto or gold_column:
            raise ValueError(
                "make_pairs: a pairwise judge gives preferences between samples, not a verdict per sample; kto "
                "rows and gold_column need a verifier"
            )
    elif verifier is None:
        raise ValueError("make_pairs: give a verifier or a pairwise judge to rank the samples")
    if n < 2 and not kto:
        raise ValueError("make_pairs: n must be >= 2 to find a correct and an incorrect completion")
    if temperature <= 0:
        raise ValueError("make_pairs: temperature must be > 0; greedy decoding gives n identical samples")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if engine == "native":
        gen_engine = KVCacheEngine(model, tokenizer, max_batch=batch_size)
    else:
        longest = max((len(encode_prompt(tokenizer, r["prompt"])) for r in rows), default=1)
        gen_engine = make_engine(
            engine, model, tokenizer, max_batch=batch_size, seed=seed, max_model_len=longest + max_new_tokens
        )
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    out: list[dict] = []
    counts = dict(correct=0, empty=0, all_correct=0, all_wrong=0, desirable=0, undesirable=0, gold_chosen=0)
    counts.update(judged=0, preferred=0, inconsistent=0, ties=0, judge_failed=0, no_preference=0, too_few=0)
    chunk = max(1, batch_size // n)
    bar = Progress(len(rows), 0, "make-pairs", enabled=progress, unit="prompts")
    try:
        for s in range(0, len(rows), chunk):
            part = rows[s : s + chunk]
            gen = gen_engine.generate([encode_prompt(tokenizer, r["prompt"]) for r in part], n, params)
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
            if judge is not None:
                _judged_rows(part, texts, n, judge, pairs_per_prompt, rng, out, counts)
                bar.update(s + len(part), f"{len(out)} rows")
                continue
            scores = score_all(verifier, texts, [reward_columns(r) for r in part for _ in range(n)])
            golds = (
                (lambda need, part=part: _accepted_golds(verifier, [part[i] for i in need], gold_column))
                if gold_column
                else None
            )
            _rows_from_samples(part, texts, scores, n, kto, pairs_per_prompt, rng, out, counts, golds)
            bar.update(s + len(part), f"{len(out)} rows")
    finally:
        bar.close()
        gen_engine.close()
    stats = PairStats(
        prompts=len(rows),
        completions=len(rows) * n,
        correct=counts["correct"],
        empty=counts["empty"],
        pairs=len(out),
        skipped_all_correct=counts["all_correct"],
        skipped_all_wrong=counts["all_wrong"],
        desirable=counts["desirable"],
        undesirable=counts["undesirable"],
        gold_chosen=counts["gold_chosen"],
    )
    if judge is not None:
        usable = counts["judged"] - counts["judge_failed"]
        stats = replace(
            stats,
            ranked_by="judge",
            judged=counts["judged"],
            preferred=counts["preferred"],
            inconsistent=counts["inconsistent"],
            ties=counts["ties"],
            judge_failed=counts["judge_failed"],
            position_consistency=(counts["preferred"] + counts["ties"]) / usable if usable else None,
            skipped_no_preference=counts["no_preference"],
            skipped_too_few=counts["too_few"],
        )
    return out, stats


def _judged_rows(
    rows: list[dict],
    texts: list[str],
    n: int,
    judge: PairwiseJudge,
    pairs_per_prompt: int,
    rng: random.Random,
    out: list[dict],
    counts: dict,
) -> None:
    """Append the judge's preference rows of ``rows`` (n samples each, in order) to ``out``: every two distinct
    non-empty samples of a prompt compared in both orders, in one batched pass; update ``counts``."""
    candidates = []
    for i in range(len(rows)):
        samples = texts[i * n : (i + 1) * n]
        counts["empty"] += sum(not t.strip() for t in samples)
        candidates.append(_distinct([t for t in samples if t.strip()]))
    planned = [(i, x, y) for i, c in enumerate(candidates) for x, y in itertools.combinations(c, 2)]
    found = judge.compare([rows[i] for i, _, _ in planned], [x for _, x, _ in planned], [y for *_, y in planned])
    usable: list[list[tuple[float, str, str]]] = [[] for _ in rows]  # (confidence, chosen, rejected)
    for (i, x, y), v in zip(planned, found):
        counts["judged"] += 1
        counts[{PREFERRED: "preferred", INCONSISTENT: "inconsistent", TIE: "ties"}.get(v.status, "judge_failed")] += 1
        if v.status == PREFERRED and v.winner is not None:
            chosen, rejected = (x, y) if v.winner == 0 else (y, x)
            usable[i].append((v.confidence, chosen, rejected))
    for i, row in enumerate(rows):
        if len(candidates[i]) < 2:
            counts["too_few"] += 1
            continue
        if not usable[i]:
            counts["no_preference"] += 1
            continue
        rng.shuffle(usable[i])  # equally confident comparisons: a seeded pick, then the most confident first
        best = sorted(usable[i], key=lambda c: -c[0])[:pairs_per_prompt]
        extra = {k: v for k, v in row.items() if k not in OWN_COLUMNS}
        prompt = row["prompt"]
        for _, chosen, rejected in best:
            out.append(
                {
                    "prompt": prompt,
                    "chosen": _as_completion(prompt, chosen),
                    "rejected": _as_completion(prompt, rejected),
                    **extra,
                }
            )


def _accepted_golds(verifier, rows: list[dict], column: str) -> list[str | None]:
    """Each row's reference completion in ``column`` when the verifier scores it correct, else None."""
    texts = [r.get(column) if isinstance(r.get(column), str) and r.get(column).strip() else None for r in rows]
    have = [i for i, t in enumerate(texts) if t is not None]
    scores = score_all(verifier, [texts[i] for i in have], [reward_columns(rows[i]) for i in have]) if have else []
    ok = {i for i, sc in zip(have, scores) if sc == sc and is_correct(sc)}
    return [t if i in ok else None for i, t in enumerate(texts)]


def _rows_from_samples(
    rows: list[dict],
    texts: list[str],
    scores: list[float],
    n: int,
    kto: bool,
    pairs_per_prompt: int,
    rng: random.Random,
    out: list[dict],
    counts: dict,
    golds: Callable[[list[int]], list[str | None]] | None = None,
) -> None:
    """Append the output rows of ``rows`` (n samples each, in order) to ``out``; update ``counts``.
    ``golds``: given the indices of the rows with wrong samples and no correct one, their accepted
    reference completions (or None), which stand in for a correct sample; asked once, for those rows only."""
    split = []
    for i in range(len(rows)):
        # NaN is a verifier's "does not apply": such samples are neither correct nor incorrect.
        # An empty completion (EOS first) is no training text in either format: it is counted only.
        samples = [(t, s) for t, s in zip(texts[i * n : (i + 1) * n], scores[i * n : (i + 1) * n]) if s == s]
        counts["empty"] += sum(not t.strip() for t, _ in samples)
        samples = [(t, s) for t, s in samples if t.strip()]
        counts["correct"] += sum(is_correct(s) for _, s in samples)
        split.append(
            (
                _distinct([t for t, s in samples if is_correct(s)]),
                _distinct([t for t, s in samples if not is_correct(s)]),
            )
        )
    need = [i for i, (good, bad) in enumerate(split) if bad and not good] if golds else []
    gold_of = dict(zip(need, golds(need))) if need else {}
    for i, (row, (good, bad)) in enumerate(zip(rows, split)):
        if good and not bad:
            counts["all_correct"] += 1
        elif not good:  # all wrong, or nothing usable (all empty / not applicable)
            counts["all_wrong"] += 1
            if gold_of.get(i) is not None:
                good = [gold_of[i]]
                counts["gold_chosen"] += 1
        extra = {k: v for k, v in row.items() if k not in OWN_COLUMNS}
        prompt = row["prompt"]
        if kto:
            for text, label in [(t, True) for t in good] + [(t, False) for t in bad]:
                out.append({"prompt": prompt, "completion": _as_completion(prompt, text), "label": label, **extra})
                counts["desirable" if label else "undesirable"] += 1
            continue
        combos = [(g, b) for g in good for b in bad]
        for g, b in rng.sample(combos, min(pairs_per_prompt, len(combos))):
            out.append(
                {"prompt": prompt, "chosen": _as_completion(prompt, g), "rejected": _as_completion(prompt, b), **extra}
            )


def format_stats(s: PairStats, kto: bool) -> str:
    if s.ranked_by == "judge":
        return _format_judge_stats(s)
    written = (
        f"kto rows: {s.pairs} ({s.desirable} desirable, {s.undesirable} undesirable)" if kto else f"pairs: {s.pairs}"
    )
    no_pair = "kept for kto, no pair" if kto else "skipped"
    return "\n".join(
        [
            f"prompts: {s.prompts}",
            f"completions: {s.completions} ({s.correct} correct, {s.empty} empty and left out)",
            written,
            f"prompts with every sample correct ({no_pair}): {s.skipped_all_correct}",
            f"prompts with every sample wrong ({no_pair}): {s.skipped_all_wrong}"
            + (f" ({s.gold_chosen} of them paired with their reference solution)" if s.gold_chosen else ""),
        ]
    )


def _format_judge_stats(s: PairStats) -> str:
    rate = "n/a (nothing judged)" if s.position_consistency is None else f"{s.position_consistency:.1%}"
    return "\n".join(
        [
            f"prompts: {s.prompts}",
            f"completions: {s.completions} ({s.empty} empty and left out)",
            f"pairs: {s.pairs}",
            f"comparisons judged in both orders: {s.judged} ({s.preferred} preferred, {s.inconsistent} "
            f"position-inconsistent, {s.ties} ties, {s.judge_failed} judge failures; only preferred ones are used)",
            f"position consistency: {rate}",
            f"prompts with no usable preference (skipped): {s.skipped_no_preference}",
            f"prompts with fewer than two distinct samples (skipped): {s.skipped_too_few}",
        ]
    )
