"""A generative judge you can train here: a verifier's labels on a model's own samples become judge data.

    make-pairs with kto: every distinct sample of a prompt, labelled by the verifier (pairs.make_pairs)
    hard_negatives:      near misses of the correct samples, the judge master keys, and answers that are right
                         for another prompt (swapped), which the verifier rejects: what a policy trained against
                         the judge would otherwise find first
    judge_rows:          each (question, answer, label) as a chat SFT row, the prompt rendered exactly as the
                         `judge` reward renders it (its template, the answer fenced), the completion "Yes" / "No"
    SFT on those rows    (any SFT stage: a judge is a causal LM that answers the template)
    judge_accuracy:      the trained judge against the verifier on held-out prompts' samples

The labels are balanced (the majority label subsampled; on the "No" side the real wrong samples are kept first),
so a judge that always says one thing scores 50% on its own training data, not the share of that label. This is GenRM's recipe (Zhang et al. 2024, P("Yes") as
the score) with a program's verdicts as the labels: the judge learns the verifier where it can be measured,
and the demo checks what a policy trained against it learns (``posttrain demo --judge``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from posttrain.data.formats import reward_columns
from posttrain.data.tokenize import prompt_ids as encode_prompt
from posttrain.evaluation.stats import wilson
from posttrain.rewards import is_correct, score_all
from posttrain.rewards.judge import DEFAULT_TEMPLATE, fill, prompt_values
from posttrain.rollout.engine import KVCacheEngine, SamplingParams

VERDICTS = ("No", "Yes")


def judge_messages(
    question: Any, answer: str, template: str = DEFAULT_TEMPLATE, system: str | None = None, reference: Any = None
) -> list[dict]:
    """The judge's chat prompt for one answer, as ``JudgeReward`` renders it (one-pass fill, fenced answer and
    reference)."""
    example = {"prompt": question, "reference": reference}
    user = fill(template, prompt_values(answer, example, 0, "reference" if reference is not None else None))
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def source_key(prompt: Any) -> str:
    """The key a sampled row's prompt finds its data row by (``sources``)."""
    return json.dumps(prompt, sort_keys=True)


def judge_rows(
    labelled: Sequence[dict],
    *,
    template: str = DEFAULT_TEMPLATE,
    system: str | None = None,
    reference_column: str | None = None,
    sources: Mapping[str, dict] | None = None,
    seed: int = 0,
    balance: bool = True,
) -> tuple[list[dict], dict]:
    """KTO rows (``prompt``, ``completion``, ``label``) as judge SFT rows ``{"prompt": [messages],
    "completion": [{"role": "assistant", "content": "Yes" | "No"}]}``, shuffled. Near misses
    (``hard_negatives``) are kept up to twice the number of real wrong samples; with ``balance`` the more common
    verdict is then subsampled to the other's count, the "No" side keeping the real wrong samples first and
    filling up with swapped answers and near misses. Returns (rows, counts)."""
    by_label: dict[bool, list[dict]] = {True: [], False: []}
    synthetic: list[dict] = []  # swapped answers and near misses: kept after the real wrong samples
    rng = random.Random(seed)
    real_no = sum(1 for r in labelled if not r["label"] and not r.get("near_miss") and not r.get("swap"))
    misses = [r for r in labelled if r.get("near_miss")]
    # near misses teach the judge what a policy would try first, but the real wrong samples are the verdicts it
    # must get right: at most twice as many near misses as real negatives
    keep_misses = {id(r) for r in rng.sample(misses, min(len(misses), 2 * max(real_no, 1)))}
    for r in labelled:
        if r.get("near_miss") and id(r) not in keep_misses:
            continue
        answer = r["completion"] if isinstance(r["completion"], str) else r["completion"][-1]["content"]
        reference = None
        if reference_column is not None:  # the data row's reference answer (KTO rows keep no gold column)
            reference = (sources or {})[source_key(r["prompt"])][reference_column]
        row = {
            "prompt": judge_messages(r["prompt"], answer, template, system, reference),
            "completion": [{"role": "assistant", "content": VERDICTS[bool(r["label"])]}],
        }
        (synthetic if r.get("near_miss") or r.get("swap") else by_label[bool(r["label"])]).append(row)
    counts = {
        "yes": len(by_label[True]),
        "no": len(by_label[False]) + len(synthetic),
        "near_misses": len(keep_misses),
        "swapped": sum(1 for r in labelled if r.get("swap")),
    }
    rng.shuffle(synthetic)
    if balance and by_label[True] and (by_label[False] or synthetic):
        k = min(len(by_label[True]), counts["no"])
        no = rng.sample(by_label[False], min(k, len(by_label[False])))
        by_label = {True: rng.sample(by_label[True], k), False: no + synthetic[: k - len(no)]}
    else:
        by_label[False] += synthetic
    out = by_label[True] + by_label[False]
    rng.shuffle(out)
    counts["written"] = len(out)
    return out, counts


MASTER_KEYS = (":", "Thought process:", "Solution", "Let's solve this step by step.")


def corruptions(text: str, rng: random.Random, k: int, others: Sequence[str] = ()) -> list[str]:
    """``k`` near misses of an answer (a character dropped, swapped, doubled or replaced; the answer cut short;
    its characters scrambled; a piece of it repeated; spliced with another answer of ``others``) and the master
    keys that fool judges (Zhao et al. 2025): the negatives a judge must see, since a policy trained against it
    explores exactly these (answer-like strings) and its own samples rarely contain them."""
    out = list(MASTER_KEYS)
    body = text.strip()
    for _ in range(k):
        if len(body) < 2:
            break
        i = rng.randrange(len(body) - 1)
        kind = rng.randrange(8 if others else 7)
        if kind == 5:
            out.append(" " + "".join(rng.sample(body, len(body))))
            continue
        if kind == 6:
            piece = body[i : i + rng.randint(2, 4)]
            out.append(" " + body[:i] + piece * rng.randint(2, 4))
            continue
        if kind == 7:
            other = rng.choice(others).strip()
            out.append(" " + body[: rng.randint(1, len(body))] + other[rng.randint(0, max(0, len(other) - 1)) :])
            continue
        if kind == 0:
            cand = body[:i] + body[i + 1 :]
        elif kind == 1:
            cand = body[:i] + body[i + 1] + body[i] + body[i + 2 :]
        elif kind == 2:
            cand = body[: i + 1] + body[i] + body[i + 1 :]
        elif kind == 3:
            cand = body[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") + body[i + 1 :]
        else:
            cand = body[: max(1, len(body) // 2)]
        out.append(text[: len(text) - len(text.lstrip())] + cand)
    return out


def hard_negatives(
    labelled: Sequence[dict],
    verifier: Callable[..., float],
    sources: Mapping[str, dict],
    *,
    per_answer: int = 4,
    swaps: int = 2,
    seed: int = 0,
) -> list[dict]:
    """For each correct answer in ``labelled`` (KTO rows), its corruptions and up to ``swaps`` answers that
    were right for other prompts, each kept where the verifier rejects it, as rows labelled False (the verifier
    decides, with the data row's columns from ``sources``: a candidate that is still right is not a negative).

    A swapped answer is the negative a reference-based judge needs most: the policy's own mistakes cover only
    the confusions it makes (a model that writes "payment" for "prohibition" never shows the judge "prohibition"
    against "payment"), and a policy trained against the judge moves to the answers the judge never saw judged
    wrong (measured: the demo's GRPO collapsed to "prohibition", passed at 0.9 against every reference)."""
    rng = random.Random(seed)
    others = sorted({r["completion"] for r in labelled if r["label"] and isinstance(r["completion"], str)})
    cands = []
    for r in labelled:
        if r["label"] and isinstance(r["completion"], str):
            cands += [(r, c, "near_miss") for c in corruptions(r["completion"], rng, per_answer, others)]
            swapped = [o for o in others if o.strip() != r["completion"].strip()]
            cands += [(r, c, "swap") for c in rng.sample(swapped, min(swaps, len(swapped)))]
    if not cands:
        return []
    columns = [reward_columns(sources[source_key(r["prompt"])]) for r, _, _ in cands]
    scores = score_all(verifier, [c for _, c, _ in cands], columns)
    seen, out = set(), []
    for (r, c, kind), s in zip(cands, scores):
        key = (str(r["prompt"]), c)
        if s == s and not is_correct(s) and key not in seen:
            seen.add(key)
            out.append({**r, "completion": c, "label": False, kind: True})
    return out


def judge_accuracy(
    judge,
    policy,
    tok,
    rows: Sequence[dict],
    verifier: Callable[..., float],
    *,
    n: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """How often ``judge`` (a JudgeReward) agrees with ``verifier`` on ``n`` samples per held-out row from
    ``policy``: accuracy with a Wilson interval over the samples, and the two error rates (a false positive is
    a wrong answer the judge passes: the one a policy can exploit)."""
    torch.manual_seed(seed)
    engine = KVCacheEngine(policy, tok)
    gen = engine.generate(
        [encode_prompt(tok, r["prompt"]) for r in rows], n, SamplingParams(max_new_tokens, temperature=temperature)
    )
    texts = [tok.decode(c, skip_special_tokens=True) for c in gen.completion_ids]
    examples = [{**reward_columns(r), "prompt": r["prompt"]} for r in rows for _ in range(n)]
    gold = [is_correct(s) for s in score_all(verifier, texts, examples)]
    scores = judge.score_batch(texts, examples)
    said = [s >= 0.5 for s in scores]  # NaN (a judge failure under exclude) counts as "No"
    agree = sum(a == b for a, b in zip(said, gold))
    pos, neg = sum(gold), len(gold) - sum(gold)
    return {
        "kind": "judge",
        "judge_accuracy": agree / max(1, len(gold)),
        "judge_ci": wilson(agree, len(gold)),
        "n_judged": len(gold),
        "gold_positive_share": pos / max(1, len(gold)),
        "false_positive_rate": sum(s and not g for s, g in zip(said, gold)) / max(1, neg),
        "false_negative_rate": sum(g and not s for s, g in zip(said, gold)) / max(1, pos),
        "judge_failed": sum(getattr(s, "reason", "") == "judge_failed" for s in scores),
    }
