"""Record extraction into JSON: the built-in structured-output task (`posttrain demo --task extraction`).

    prompt:      "Order 48 from Kim Lee, September 5, 2024, total $25. =>"
    completion:  ' {"id": 48, "name": "Kim Lee", "date": "2024-09-05", "total": 25}'
    answer:      {"id": 48, "name": "Kim Lee", "date": "2024-09-05", "total": 25}

Four fields, each checked on its own by the json verifier (a schema, then partial credit per field): copy the
id and the name, rewrite the date as ISO (a month name becomes its number), read the amount as a number.
Numbers have two digits: with four-digit ids and amounts the SFT model of the demo got the id right on 0.5%
of the held-out records and the amount on 1.0%, while the date, whose day has two digits, was right on 46.5%:
about every record whose month SFT had shown.
Pretraining text follows every record, of every month, with its facts in words ("The id is 48, the name Kim
Lee, the date 2024-09-05, the total 25."); the SFT rows show the JSON answer for dates in the first
`months_in_sft` months only (with `months_in_sft` < 12), so the other months' conversion is known from
pretraining but never demonstrated in the answer format: RL, rewarded per field, has to bring it out. The held-out split is a disjoint set of records, chosen by a hash of the prompt.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from posttrain.tasks.worked import draw_split, is_heldout

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
FIRST = ("Kim", "Ada", "Omar", "Lena", "Raj", "Mia", "Tom", "Zoe", "Ivan", "Nora", "Eli", "Sara")
LAST = ("Lee", "Diaz", "Novak", "Berg", "Shah", "Ito", "Cole", "Haas", "Roy", "Khan", "Park", "Moss")
KINDS = ("Order", "Invoice", "Receipt")
FIELDS = ("id", "name", "date", "total")
SCHEMA = {
    "type": "object",
    "required": list(FIELDS),
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "total": {"type": "integer"},
    },
}


def _amount(n: int) -> str:
    return f"${n:,}"


@dataclass(frozen=True)
class ExtractionTask:
    heldout_fraction: float = 0.1
    months_in_sft: int = 12  # < 12: the train split's records fall in the first N months only
    verifier: str = "json"

    def __post_init__(self):
        if not 1 <= self.months_in_sft <= 12:
            raise ValueError(f"extraction: need 1 <= months_in_sft <= 12, got {self.months_in_sft}")

    def _record(self, rng: random.Random, months: int) -> tuple[str, dict]:
        month = rng.randrange(months)
        day, year = rng.randint(1, 28), rng.choice((2023, 2024, 2025))
        gold = {
            "id": rng.randint(10, 99),
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "date": f"{year}-{month + 1:02d}-{day:02d}",
            "total": rng.randint(10, 99),
        }
        text = (
            f"{rng.choice(KINDS)} {gold['id']} from {gold['name']}, {MONTHS[month]} {day}, {year}, "
            f"total {_amount(gold['total'])}."
        )
        return text, gold

    def rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        months = self.months_in_sft if split == "train" else 12

        def draw(rng: random.Random, _: int) -> tuple[str, dict]:
            text, gold = self._record(rng, months)
            return text, {"prompt": f"{text} =>", "completion": " " + json.dumps(gold), "answer": gold}

        return draw_split("extraction", n, split, seed, self.heldout_fraction, draw)

    def pretrain_text(self, n: int, seed: int = 0) -> list[dict]:
        """Records of every month, each followed by its facts in words (the id, the name, the ISO date, the
        total): reading a record is learned here, for every month; the JSON form is SFT's to show. No JSON
        answers, never a held-out record."""
        rng = random.Random(f"extraction-pretrain-{seed}")
        out = []
        while len(out) < n:
            text, gold = self._record(rng, 12)
            if is_heldout(text, self.heldout_fraction):
                continue
            out.append(
                {
                    "text": f"{text} The id is {gold['id']}, the name {gold['name']}, the date {gold['date']}, "
                    f"the total {gold['total']}."
                }
            )
        return out
