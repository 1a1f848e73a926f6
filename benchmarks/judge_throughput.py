"""Judge throughput: completions judged per second, by scoring mode, batch size, engine and cache.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_throughput.py --preset tiny --n 1024
    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/judge_throughput.py --preset small --engines native,vllm

Each row scores the same N distinct (clause, answer) pairs of the clauses task with the demo judge's
reference-based template, on a random-initialized judge of the preset (the char tokenizer, ChatML template:
the prompt lengths of the demo's judge, ~200 tokens). Side by side, with ratios against the first row:

* ``probs`` (the default scoring: one forward pass, P(Yes) from the labels' log-probabilities) at batch
  sizes 16 and 64,
* ``text`` (the verdict generated greedily and read back, the way verl / OpenRLHF reward functions ask a judge;
  ``--text-tokens`` new tokens, a random model rarely stops earlier),
* the same prompts a second time through the content-addressed cache (the hit path of a resumed run or a
  prompt judged twice in a step),
* with ``--engines native,vllm`` (vLLM installed; on CPU the ``small`` preset or larger): each mode on vLLM.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import build_model_dir, set_threads  # noqa: E402

TEMPLATE = (
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer:\n{answer}\n\n"
    "Does the answer mean the same as the reference? Reply Yes or No."
)


def cases(n: int) -> tuple[list[str], list[dict]]:
    """N distinct (answer, row) pairs: every label against held-out-style clauses."""
    from posttrain.tasks.clauses import LABELS, ClausesTask

    rows = ClausesTask().rows(n // len(LABELS) + 1, "train", seed=7)
    texts, examples = [], []
    for row in rows:
        for label in LABELS:
            texts.append(f" {label}")
            examples.append({"prompt": row["prompt"], "label": row["label"]})
    return texts[:n], examples[:n]


def rate(judge, texts: list[str], examples: list[dict]) -> tuple[float, float]:
    """(completions per second, seconds) of one score_batch over all of them, after a short warm-up."""
    judge.score_batch(texts[:8], examples[:8])
    start = time.perf_counter()
    judge.score_batch(texts, examples)
    seconds = time.perf_counter() - start
    return len(texts) / seconds, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="judge model preset (tiny, small, medium)")
    p.add_argument("--n", type=int, default=1024, help="distinct completions judged per row")
    p.add_argument("--engines", default="native", help="comma-separated: native, vllm")
    p.add_argument("--text-tokens", type=int, default=8, help="new tokens a text-mode verdict may take")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    set_threads(a.threads)
    from posttrain.rewards.judge import JudgeReward

    texts, examples = cases(a.n)
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="posttrain-judge-bench-") as tmp:
        path = build_model_dir(Path(tmp) / "judge", a.preset, "llama")
        common = dict(path=str(path), template=TEMPLATE, reference_column="label", device="cpu")
        for engine in a.engines.split(","):
            for mode, batch in (("probs", 16), ("probs", 64), ("text", 16)):
                # a random judge writes no verdict: timing only, so its failures neither stop nor count
                extra = {"max_new_tokens": a.text_tokens, "max_failure_rate": 1.0} if mode == "text" else {}
                judge = JudgeReward(**common, mode=mode, batch_size=batch, engine=engine, cache=False, **extra)
                n = a.n if mode == "probs" else max(64, a.n // 8)  # text mode: fewer, it is slow
                per_s, seconds = rate(judge, texts[:n], examples[:n])
                rows.append((f"{engine} {mode} batch {batch} (n={n})", per_s, seconds))
                judge.close()
            judge = JudgeReward(**common, batch_size=64, engine=engine, cache=True)
            judge.score_batch(texts, examples)  # fills the cache
            hits = judge.judge.cache_hits
            per_s, seconds = rate(judge, texts, examples)
            rows.append((f"{engine} probs, every prompt a cache hit", per_s, seconds))
            assert judge.judge.cache_hits - hits >= len(texts), "the second pass did not hit the cache"
            judge.close()
    base = rows[0][1]
    print(f"judge throughput, preset {a.preset}, {a.threads} thread(s), {a.n} distinct completions")
    print(f"{'':48s} {'completions/s':>14s} {'seconds':>9s} {'vs first row':>13s}")
    for name, per_s, seconds in rows:
        print(f"{name:48s} {per_s:14.1f} {seconds:9.2f} {per_s / base:12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
