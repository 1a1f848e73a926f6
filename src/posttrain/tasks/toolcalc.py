"""Products a tiny model cannot compute in its head, and can with a calculator: the built-in tool task
(`posttrain demo --task tools`).

    prompt:    "Multiply 347 by 829."
    answer:    "287663"
    messages:  user: the prompt
               assistant: <tool_call>{"name": "calculator", "arguments": {"expression": "347*829"}}</tool_call>
               tool: 287663
               assistant: \\boxed{287663}

The question comes in four phrasings. The SFT view (``builtin:tools/sft``) demonstrates the call mostly on
part of the distribution: on ``tool_share`` (90%) of the questions in the first two phrasings and on
``other_share`` (30%) of the other two; the rest it answers directly, "in the head" (the boxed product, one
turn), as a model does before it has learnt that a tool pays. After SFT the policy calls the calculator on the
first two phrasings and guesses on the others; RL (where a guess is rarely right and a call almost always is)
has to learn to call it there too. A model without the tool must multiply two- and three-digit numbers digit by digit in its head, which
a tiny model does not learn (the demo's single-turn control, trained on ``rows``' direct answers). The held-out
split is a disjoint set of questions, chosen by a hash of the question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from posttrain.tasks.worked import draw_split

PHRASINGS = (
    "What is {a}*{b}?",
    "Multiply {a} by {b}.",
    "Compute {a} times {b}.",
    "Find the product of {a} and {b}.",
)
# The calculator's schema as transformers' get_json_schema writes it for envs.builtin.calculator (the SFT rows
# carry it in their `tools` column, as the environment gives it to the chat template in RL; a test checks
# that the two agree).
CALCULATOR_SCHEMA = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression exactly.",
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "Numbers with + - * / // % ** and parentheses, e.g. (12+3)*4.",
                }
            },
            "required": ["expression"],
        },
    },
}


@dataclass(frozen=True)
class ToolCalcTask:
    heldout_fraction: float = 0.1
    min_digits: int = 2
    max_digits: int = 3
    # The SFT view shows the call on this share of the questions in the first `taught` phrasings, and on
    # `other_share` of the others; the rest are answered directly.
    tool_share: float = 0.9
    other_share: float = 0.3
    taught: int = 2
    verifier: str = "math"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits <= 6 or not 0 <= self.taught <= len(PHRASINGS):
            raise ValueError(
                f"tools: need 1 <= min_digits <= max_digits <= 6 and 0 <= taught <= {len(PHRASINGS)}, got {self}"
            )
        if not (0 <= self.tool_share <= 1 and 0 <= self.other_share <= 1):
            raise ValueError(f"tools: tool_share and other_share are shares in [0, 1], got {self}")

    def _question(self, rng: random.Random) -> tuple[str, int, int, int]:
        def number() -> int:
            d = rng.randint(self.min_digits, self.max_digits)
            return rng.randint(10 ** (d - 1), 10**d - 1)

        a, b = number(), number()
        k = rng.randrange(len(PHRASINGS))
        return PHRASINGS[k].format(a=a, b=b), a, b, k

    def rows(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
        """prompt / answer rows (every phrasing), with the direct answer as ``completion`` (the single-turn
        control's SFT data)."""

        def draw(rng: random.Random, _: int) -> tuple[str, dict]:
            q, a, b, _ = self._question(rng)
            return q, {"prompt": q, "completion": f"\\boxed{{{a * b}}}", "answer": str(a * b)}

        return draw_split("tools", n, split, seed, self.heldout_fraction, draw)

    def sft_rows(self, n: int, seed: int = 0) -> list[dict]:
        """Conversations in TRL's conventions (`messages`, the `tools` column): the call, the tool's turn and
        the boxed result on ``tool_share`` of the questions in the first ``taught`` phrasings and on
        ``other_share`` of the others; the boxed product answered directly on the rest. Never a held-out
        question."""

        def draw(rng: random.Random, _: int) -> tuple[str, dict]:
            q, a, b, k = self._question(rng)
            call_it = rng.random() < (self.tool_share if k < self.taught else self.other_share)
            answer = {"role": "assistant", "content": f"\\boxed{{{a * b}}}"}
            messages = [{"role": "user", "content": q}, answer]
            if call_it:
                call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": f"{a}*{b}"}}}
                messages[1:1] = [
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "name": "calculator", "content": str(a * b)},
                ]
            return q, {"messages": messages, "tools": [CALCULATOR_SCHEMA], "answer": str(a * b)}

        return draw_split("tools", n, "train", seed, self.heldout_fraction, draw)

    def pretrain_text(self, n: int, seed: int = 0) -> list[dict]:
        raise ValueError("the tools task has no pretraining view (use builtin:tools or builtin:tools/sft)")
