"""Clause classification: the built-in label task (`posttrain demo --task clauses`).

    prompt:      "The Licensee shall not assign its rights without consent. =>"
    completion:  " prohibition"
    label:       "prohibition"

A clause's label depends on two of its words, not one: the verb names the kind of clause (terminate ->
termination, disclose -> confidentiality, assign -> assignment, pay -> payment) unless the modal is negated
("shall not", "may not", "must not"), which makes any clause a prohibition. The SFT rows show negation with
only the first `negated_in_sft` kinds of verb (with `negated_in_sft >= 0`), so a model that has seen "not
terminate" and "not disclose" as prohibitions must still learn, from the reward, that "not assign" is one too;
RL and evaluation draw every combination. The held-out split is a disjoint set of clauses, chosen by a hash
of the clause, so no split is ever trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.tasks.worked import draw_split, is_heldout

PARTIES = ("The Supplier", "The Customer", "Either party", "The Licensee", "The Company", "The Contractor")
VERBS = {
    "termination": ("terminate", "cancel", "end"),
    "confidentiality": ("disclose", "reveal", "share"),
    "assignment": ("assign", "transfer", "sublicense"),
    "payment": ("pay", "reimburse", "refund"),
}
OBJECTS = {
    "termination": ("this Agreement", "the order", "the services"),
    "confidentiality": ("the Confidential Information", "the source code", "the terms"),
    "assignment": ("its rights", "this license", "the contract"),
    "payment": ("the fees", "all expenses", "the deposit"),
}
MODALS = ("shall", "may", "must")
CONDITIONS = ("", " upon notice", " within 30 days", " without consent", " at any time", " in writing")
LABELS = (*VERBS, "prohibition")


@dataclass(frozen=True)
class ClausesTask:
    heldout_fraction: float = 0.1
    negated_share: float = 0.3  # clauses with a negated modal
    negated_in_sft: int = -1  # >= 0: the train split negates only the first N kinds of verb
    verifier: str = "label"

    def __post_init__(self):
        if not 0 <= self.negated_share <= 1 or self.negated_in_sft > len(VERBS):
            raise ValueError(f"clauses: need 0 <= negated_share <= 1 and negated_in_sft <= {len(VERBS)}, got {self}")

    def _clause(self, rng: random.Random, split: str) -> tuple[str, str]:
        kind = rng.choice(list(VERBS))
        negated = rng.random() < self.negated_share
        if negated and split == "train" and self.negated_in_sft >= 0:
            kind = rng.choice(list(VERBS)[: self.negated_in_sft]) if self.negated_in_sft else kind
            negated = self.negated_in_sft > 0
        modal = rng.choice(MODALS) + (" not" if negated else "")
        clause = (
            f"{rng.choice(PARTIES)} {modal} {rng.choice(VERBS[kind])} {rng.choice(OBJECTS[kind])}"
            f"{rng.choice(CONDITIONS)}."
        )
        return clause, "prohibition" if negated else kind

    def rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        def draw(rng: random.Random, _: int) -> tuple[str, dict]:
            clause, label = self._clause(rng, split)
            return clause, {"prompt": f"{clause} =>", "completion": f" {label}", "label": label}

        return draw_split("clauses", n, split, seed, self.heldout_fraction, draw)

    def pretrain_text(self, n: int, seed: int = 0) -> list[dict]:
        """Clauses of every combination, without labels; never a held-out clause."""
        rng = random.Random(f"clauses-pretrain-{seed}")
        out = []
        while len(out) < n:
            clause, _ = self._clause(rng, "pretrain")
            if not is_heldout(clause, self.heldout_fraction):
                out.append({"text": clause})
        return out
