"""`posttrain make-pairs`: on-policy preference data from a verifier.

Sample n completions per prompt from a model, score each with a verifier, and write
(prompt, chosen = a correct completion, rejected = an incorrect one) rows for DPO / IPO / SimPO /
ORPO, or (prompt, completion, label = correct?) rows for KTO. A prompt whose samples are all correct
or all wrong yields no pair (there is nothing to prefer) and is counted -- unless the data has a
reference solution (``gold_column``, e.g. the `completion` of SFT rows): then a prompt the model never
solves takes it, if the verifier accepts it, as the chosen completion against the model's own wrong
ones. Those are the prompts the model most needs to learn, and on-policy pairs never cover them. The
dataset's other columns (e.g. `answer`) are kept in every output row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from posttrain.data.formats import reward_columns
from posttrain.data.tokenize import is_conversational
from posttrain.data.tokenize import prompt_ids as encode_prompt
from posttrain.rewards.base import is_correct, score_all
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
) -> tuple[list[dict], PairStats]:
    """(output rows, counts). Pairs: up to ``pairs_per_prompt`` distinct (correct, incorrect)
    combinations per prompt, drawn with ``seed``. KTO: every distinct completion, labelled by the
    verifier (prompts with one kind only are kept: KTO needs no pair, but they are still counted).
    Prompts go through in chunks of ``batch_size // n``: sampled, scored and turned into rows, so only
    one chunk's completions are held at a time (the result is the same as one pass over all rows).
    ``engine``: native (KV-cache loop on ``model``) or vllm (a colocated vLLM copy of it).
    ``gold_column``: a column holding a correct worked completion; a prompt without a correct sample uses
    it as its correct one (when the verifier accepts it; otherwise the prompt stays all-wrong)."""
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
    chunk = max(1, batch_size // n)
    bar = Progress(len(rows), 0, "make-pairs", enabled=progress, unit="prompts")
    try:
        for s in range(0, len(rows), chunk):
            part = rows[s : s + chunk]
            gen = gen_engine.generate([encode_prompt(tokenizer, r["prompt"]) for r in part], n, params)
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
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
    return out, stats


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
