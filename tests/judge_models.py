"""Tiny judge models for the judge tests, built in-process: a char-tokenizer causal LM saved as a local HF
directory, optionally trained for a few dozen steps so that its next-token distribution after a rendered
judge prompt puts its mass on a chosen label (a judge BUILT to give a verdict, not a mock of one)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from posttrain.models.tiny import build_tiny_model, build_tokenizer


def save_tiny_judge(path: str | Path, seed: int = 0) -> str:
    tok = build_tokenizer("char")
    build_tiny_model("tiny", tok, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def train_verdicts(
    path: str | Path,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    steps: int = 60,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> None:
    """Train the judge in ``path`` so that after each rendered ``prompts[i]`` its next token is the first token
    of ``labels[i]`` (cross-entropy at the last position, left-padded batches as the Judge reads them), and
    save it back. Deterministic: seeded sampling and init, one thread (conftest)."""
    tok = build_tokenizer("char")
    model = AutoModelForCausalLM.from_pretrained(str(path))
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    targets = [tok.encode(label, add_special_tokens=False)[0] for label in labels]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = rng.sample(range(len(encoded)), min(batch, len(encoded)))
        T = max(len(encoded[i]) for i in idx)
        ids_BT = torch.full((len(idx), T), tok.pad_token_id, dtype=torch.long)
        mask_BT = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            ids_BT[b, T - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask_BT[b, T - len(encoded[i]) :] = 1
        positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        logits_BV = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=positions_BT).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits_BV, torch.tensor([targets[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(path))
