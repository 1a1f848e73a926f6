"""What the built-in tasks share: instances worked step by step, drawn reproducibly into a train split and a
disjoint held-out split (chosen by a hash of the prompt, so no split is ever trained on).

A task defines ``_instance(rng, long) -> (query, steps, answer)`` (``long``: None for any length, else whether
the instance must be longer than the task's short ones), ``heldout_fraction``, ``long_rows`` and ``_tag``.
"""

from __future__ import annotations

import hashlib
import random


def is_heldout(query: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(query.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def draw_split(tag: str, n: int, split: str, seed: int, heldout_fraction: float, draw) -> list[dict]:
    """``n`` rows with distinct prompts from one split ("train" or "test") of a task: ``draw(rng, i)`` makes
    candidate i as (its key, its row), and a candidate whose key is taken, or is on the other side of the
    held-out hash, is drawn again. The stream is ``tag-split-seed``: the same rows for the same arguments."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r}: expected 'train' or 'test'")
    rng = random.Random(f"{tag}-{split}-{seed}")
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct {split} prompts; widen the task")
        key, row = draw(rng, len(out))
        if key in seen or is_heldout(key, heldout_fraction) != (split == "test"):
            continue
        seen.add(key)
        out.append(row)
    return out


class WorkedTask:
    _tag = "task"

    def rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        """``n`` prompt/completion/answer rows from one split ("train" or "test"). With ``long_rows >= 0``,
        exactly that many rows are long instances, spread evenly through the rows (a count, not a rate:
        with a handful of long rows, chance would make the count, and with it what SFT learns, differ from
        seed to seed)."""
        long_slots = (
            {(2 * j + 1) * n // (2 * self.long_rows) for j in range(self.long_rows)} if self.long_rows > 0 else set()
        )

        def draw(rng: random.Random, i: int) -> tuple[str, dict]:
            query, steps, answer = self._instance(rng, (i in long_slots) if self.long_rows >= 0 else None)
            row = {
                "prompt": f"{query}=",
                "completion": ",".join(steps) + f" \\boxed{{{answer}}}",
                "answer": str(answer),
            }
            return query, row

        return draw_split(self._tag, n, split, seed, self.heldout_fraction, draw)

    def pretrain_text(self, n: int, seed: int = 0) -> list[dict]:
        """The worked steps alone, "query=step,step,...": no answer format, never a held-out prompt."""
        rng = random.Random(f"{self._tag}-pretrain-{seed}")
        out = []
        while len(out) < n:
            query, steps, _ = self._instance(rng)
            if is_heldout(query, self.heldout_fraction):
                continue
            out.append({"text": f"{query}=" + ",".join(steps)})
        return out
