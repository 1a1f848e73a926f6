"""Verifier throughput. Run: .venv/bin/python benchmarks/bench_verifiers.py [--n 2000] [--workers 2]

Math: checks/s over typical short answers (integers, fractions, a share of symbolic forms that need
math-verify), the same through math-verify only (fast path off), and the timeout path: a pathological
answer that must be killed while the pool keeps serving. Target: >= 300 checks/s on 2 cores.
Code: `posttrain.rewards.code.bench_code()` when that module provides it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import random
import time
from collections import Counter

from posttrain.rewards.math import MathVerifier

TARGET_PER_S = 300.0
FILLER = "Let me work through this step by step. First I simplify the expression, then I check the result. "


def typical_cases(n: int, seed: int = 0) -> tuple[list[str], list[dict[str, str]]]:
    """(completions, rows): ~45% integers, ~30% fractions/decimals, ~25% symbolic forms; about half wrong."""
    rng = random.Random(seed)
    completions, rows = [], []
    for _ in range(n):
        kind = rng.random()
        right = rng.random() < 0.5
        if kind < 0.45:
            a = rng.randint(-999, 9999)
            gold, pred = str(a), str(a if right else a + rng.randint(1, 9))
        elif kind < 0.75:
            p, q = rng.randint(1, 50), rng.randint(2, 50)
            k = rng.randint(1, 4)
            gold = f"\\frac{{{p}}}{{{q}}}"
            if rng.random() < 0.5:
                pred = f"\\frac{{{p * k}}}{{{q * k}}}" if right else f"\\frac{{{p + 1}}}{{{q}}}"
            else:
                pred = f"{p / q:.10f}" if right else f"{p / q + 0.01:.10f}"
        else:
            a = rng.randint(2, 30)
            forms = [
                (f"\\sqrt{{{4 * a}}}", f"2\\sqrt{{{a}}}", f"3\\sqrt{{{a}}}"),
                (f"{a}", f"x={a}", f"x={a + 1}"),
                (f"\\frac{{{a}}}{{100}}", f"{a}\\%", f"{a + 1}\\%"),
                (f"\\{{{a},{a + 1}\\}}", f"\\{{{a + 1},{a}\\}}", f"\\{{{a},{a + 2}\\}}"),
                (f"x^2+{2 * a}x+{a * a}", f"(x+{a})^2", f"(x+{a + 1})^2"),
            ]
            gold, good, bad = rng.choice(forms)
            pred = good if right else bad
        completions.append(FILLER * rng.randint(1, 4) + f"So the answer is $\\boxed{{{pred}}}$.")
        rows.append({"answer": gold})
    return completions, rows


def bench_math(n: int, workers: int) -> None:
    completions, rows = typical_cases(n)
    with MathVerifier(workers=workers, timeout=5.0) as v:
        t0 = time.perf_counter()
        v(r"\boxed{\sqrt{8}}", answer=r"2\sqrt{2}")  # start and warm the pool; not counted
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = v.score_batch(completions, rows)
        elapsed = time.perf_counter() - t0
    rate = n / elapsed
    reasons = Counter(s.reason for s in scores)
    fast = sum(reasons[r] for r in ("exact", "mismatch"))
    print(
        f"math, typical short answers: {n} checks in {elapsed:.2f} s with {workers} workers = {rate:,.0f} checks/s "
        f"({rate / TARGET_PER_S:.1f}x the {TARGET_PER_S:.0f}/s target); pool start {startup:.2f} s"
    )
    print(f"  decided by the fast path: {fast}/{n}; reasons: {dict(reasons)}; mean reward {sum(scores) / n:.3f}")

    m = min(n, 600)
    with MathVerifier(workers=workers, timeout=5.0, fast_path=False) as v:
        v(r"\boxed{1}", answer="1")
        t0 = time.perf_counter()
        slow_scores = v.score_batch(completions[:m], rows[:m])
        elapsed = time.perf_counter() - t0
    agree = sum(float(a) == float(b) for a, b in zip(scores[:m], slow_scores))
    rate = m / elapsed
    print(
        f"math, every check through math-verify (fast path off): {m} checks in {elapsed:.2f} s = {rate:,.0f} checks/s "
        f"({rate / TARGET_PER_S:.1f}x target); verdicts agree with the fast path on {agree}/{m}"
    )


def bench_timeout(workers: int, timeout: float = 2.0) -> None:
    completions, rows = typical_cases(40, seed=1)
    completions = [r"\boxed{9^{9^{9^{9}}}}"] + completions
    rows = [{"answer": "3"}] + rows
    with MathVerifier(workers=workers, timeout=timeout) as v:
        v(r"\boxed{1}", answer="1")
        t0 = time.perf_counter()
        scores = v.score_batch(completions, rows)
        elapsed = time.perf_counter() - t0
        restarts = v.restarts
        t0 = time.perf_counter()
        after = v.score_batch([r"\boxed{2\sqrt{2}}"] * 20, [{"answer": r"\sqrt{8}"}] * 20)
        after_s = time.perf_counter() - t0
    print(
        f"timeout path: pathological answer -> score {float(scores[0])} ({scores[0].reason}); batch of {len(completions)} "
        f"took {elapsed:.2f} s with timeout {timeout} s; workers killed and replaced: {restarts}"
    )
    print(f"  after the kill: 20 symbolic checks in {after_s:.2f} s, all correct: {all(s == 1.0 for s in after)}")


def bench_code_if_available() -> None:
    if importlib.util.find_spec("posttrain.rewards.code") is None:
        print("code: posttrain.rewards.code not present; skipped")
        return
    module = importlib.import_module("posttrain.rewards.code")
    if not hasattr(module, "bench_code"):
        print("code: posttrain.rewards.code has no bench_code(); skipped")
        return
    figures = module.bench_code()
    if figures is not None:
        print(
            "code:", ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in dict(figures).items())
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-code", action="store_true")
    args = parser.parse_args()
    bench_math(args.n, args.workers)
    bench_timeout(args.workers)
    if not args.skip_code:
        bench_code_if_available()


if __name__ == "__main__":
    main()
