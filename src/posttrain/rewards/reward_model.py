"""`reward_model`: a trained reward model's score as a reward, for GRPO and PPO.

    rewards:
      - {name: reward_model, options: {path: runs/rm/final}}        # a learned reward (RLHF)
      - {name: math, weight: 0}                                     # logged only: the gold check

The score of a completion is the reward model's head on the last non-pad token of prompt + completion,
encoded exactly as `posttrain reward-model` encoded its training pairs (the prompt through the chat
template when it is a list of messages, the completion as the assistant turn, EOS appended), so the
policy is scored on the distribution the reward model was trained on. Unbounded, unlike a verifier's
[0, 1]: `is_correct` never holds for it, so put a verifier first in `rewards` when accuracy matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from posttrain.data.collate import collate_padded
from posttrain.data.tokenize import completion_ids, is_conversational, join, prompt_ids
from posttrain.models.loading import DTYPES, load_tokenizer, no_progress_bars, resolve_device
from posttrain.models.scalar import check_scalar_dir, sequence_scores

from .base import Example, Score, VerifierError


class RewardModelReward:
    name = "reward_model"

    def __init__(self, *, path: str, batch_size: int = 32, device: str = "auto", dtype: str = "float32") -> None:
        check_scalar_dir(path, "reward_model option path")
        self.path, self.batch_size = path, int(batch_size)
        self.device = resolve_device(device)
        with no_progress_bars():
            self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype]).to(self.device)
        self.model.eval().requires_grad_(False)
        self.tok = load_tokenizer(path)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self._torch = torch

    def encode(self, prompt: Any, completion: str):
        """prompt + completion as the reward model saw its training pairs (see the module docstring)."""
        answer = [{"role": "assistant", "content": completion}] if is_conversational(prompt) else completion
        return join(prompt_ids(self.tok, prompt), completion_ids(self.tok, prompt, answer))

    def score_batch(self, completions: Sequence[str], examples: Sequence[Example]) -> list[Score]:
        if any("prompt" not in ex for ex in examples):
            raise VerifierError("reward_model scores prompt + completion, but no prompt was given")
        seqs = [self.encode(ex["prompt"], c) for c, ex in zip(completions, examples)]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # less padding per batch
        scores = [0.0] * len(seqs)
        with self._torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                b = collate_padded([seqs[i] for i in idx], self.tok.pad_token_id).to(self.device)
                for i, v in zip(idx, sequence_scores(self.model, b.input_ids_BT, b.attention_mask).tolist()):
                    scores[i] = v
        return [Score(v, "reward_model") for v in scores]

    def __call__(self, completion: str, **example: Any) -> Score:
        return self.score_batch([completion], [example])[0]
