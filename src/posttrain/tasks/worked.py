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


class WorkedTask:
    _tag = "task"

    def rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        """``n`` prompt/completion/answer rows from one split ("train" or "test"). With ``long_rows >= 0``,
        exactly that many rows are long instances, spread evenly through the rows (a count, not a rate:
        with a handful of long rows, chance would make the count, and with it what SFT learns, differ from
        seed to seed)."""
        if split not in ("train", "test"):
            raise ValueError(f"split {split!r}: expected 'train' or 'test'")
        rng = random.Random(f"{self._tag}-{split}-{seed}")
        out, seen = [], set()
        long_slots = (
            {(2 * j + 1) * n // (2 * self.long_rows) for j in range(self.long_rows)} if self.long_rows > 0 else set()
        )
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct {split} prompts; widen the task")
            query, steps, answer = self._instance(rng, (len(out) in long_slots) if self.long_rows >= 0 else None)
            if query in seen or is_heldout(query, self.heldout_fraction) != (split == "test"):
                continue
            seen.add(query)
            out.append(
                {"prompt": f"{query}=", "completion": ",".join(steps) + f" \\boxed{{{answer}}}", "answer": str(answer)}
            )
        return out

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
