"""Rollout engines: prompts in, token ids (and optionally sampling log-probs) out.

The interface is one method, ``generate(prompt_ids, n, params) -> Generation``; the first engine
runs transformers' ``generate`` on the policy itself (KV cache, batched, left padding).
Completions are returned unpadded: everything after the first EOS is cut, and EOS itself is kept
(it is a token the policy chose, so it carries loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    return_logps: bool = False


@dataclass(frozen=True)
class Generation:
    """Completions for P prompts x n samples, in prompt-major order (prompt i's samples are contiguous)."""

    prompt_ids: list[list[int]]          # P prompts
    completion_ids: list[list[int]]      # P * n completions, EOS kept, nothing after it
    truncated: list[bool]                # hit max_new_tokens without EOS
    logps: list[list[float]] | None      # sampling log-probs per completion token, when asked for

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Generation: ...


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[i, T - len(s):] = 1
    return ids.to(device), attn.to(device)


class HFEngine:
    """transformers ``generate`` on the policy (no copy of the weights, so no sync step)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 256):
        self.model, self.tok, self.max_batch = model, tokenizer, max_batch

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Generation:
        seqs = [p for p in prompt_ids for _ in range(n)]
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        was_training = self.model.training
        self.model.eval()
        completions: list[list[int]] = []
        truncated: list[bool] = []
        logps: list[list[float]] | None = [] if params.return_logps else None
        try:
            for s in range(0, len(seqs), self.max_batch):
                chunk = seqs[s:s + self.max_batch]
                ids, attn = _left_pad(chunk, pad, next(self.model.parameters()).device)
                greedy = params.temperature <= 0
                out = self.model.generate(
                    input_ids=ids, attention_mask=attn, max_new_tokens=params.max_new_tokens,
                    do_sample=not greedy, temperature=None if greedy else params.temperature,
                    top_p=None if greedy else params.top_p, top_k=None if greedy else 0,
                    eos_token_id=eos, pad_token_id=pad, use_cache=True,
                    return_dict_in_generate=True, output_scores=params.return_logps,
                )
                new = out.sequences[:, ids.shape[1]:].tolist()
                if params.return_logps:
                    # scores are the processed logits the sampler drew from (temperature, top-p applied)
                    step_logps = torch.stack(out.scores, 1).float().log_softmax(-1)  # (B, T_new, V)
                for b, toks in enumerate(new):
                    cut = toks.index(eos) + 1 if eos in toks else len(toks)
                    completions.append(toks[:cut])
                    truncated.append(eos not in toks)
                    if logps is not None:
                        idx = torch.tensor(toks[:cut], device=step_logps.device)
                        logps.append(step_logps[b, torch.arange(cut, device=idx.device), idx].tolist())
        finally:
            self.model.train(was_training)
        return Generation([list(p) for p in prompt_ids], completions, truncated, logps)
