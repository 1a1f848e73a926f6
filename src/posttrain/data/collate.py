"""Examples -> padded or packed tensor batches, and a resumable epoch sampler.

Shapes: B sequences (rows), T tokens. ``targets_BT[:, t]`` is the token predicted from position t
(the input shifted left); ``target_mask_BT`` says which of those predictions count.
Packed rows hold several documents: position ids restart at 0 for each, and a block-diagonal
causal 4D mask keeps attention inside each document, so a packed batch computes exactly what the
unpacked one does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from posttrain.data.tokenize import Example


@dataclass(frozen=True)
class LMBatch:
    input_ids_BT: torch.Tensor
    attention_mask: torch.Tensor  # (B, T) padding mask, or (B, 1, T, T) bool for packed rows
    position_ids_BT: torch.Tensor
    targets_BT: torch.Tensor
    target_mask_BT: torch.Tensor  # float

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_mask_BT.sum().item())

    def to(self, device) -> "LMBatch":
        return LMBatch(
            *(
                t.to(device)
                for t in (
                    self.input_ids_BT,
                    self.attention_mask,
                    self.position_ids_BT,
                    self.targets_BT,
                    self.target_mask_BT,
                )
            )
        )


def _targets(ids_BT: torch.Tensor, loss_mask_BT: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    targets = torch.full_like(ids_BT, pad_id)
    targets[:, :-1] = ids_BT[:, 1:]
    mask = torch.zeros_like(loss_mask_BT, dtype=torch.float32)
    mask[:, :-1] = loss_mask_BT[:, 1:].float()
    return targets, mask


def collate_padded(examples: list[Example], pad_id: int, *, pad_to: int | None = None, side: str = "right") -> LMBatch:
    T = max(max(len(e) for e in examples), pad_to or 0)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    loss = torch.zeros((B, T), dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e)
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = torch.tensor(e.input_ids)
        loss[i, sl] = torch.tensor(e.loss_mask)
        attn[i, sl] = 1
        pos[i, sl] = torch.arange(n)
    targets, mask = _targets(ids, loss, pad_id)
    return LMBatch(ids, attn, pos, targets, mask)


def pack_indices(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bins of indices whose lengths sum to <= max_length, each bin in input
    order (deterministic for a given input)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit max_length={max_length}")
        for b, r in enumerate(room):
            if r >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    # Keep documents in input order inside a bin: it makes packed batches easy to read.
    return [sorted(b) for b in bins]


def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
    """First-fit-decreasing bins of examples of total length <= max_length."""
    return [[examples[i] for i in b] for b in pack_indices([len(e) for e in examples], max_length)]


def collate_packed(rows: list[list[Example]], pad_id: int) -> LMBatch:
    T = max(sum(len(e) for e in docs) for docs in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    loss = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)  # document index per token; -1 = padding
    for i, docs in enumerate(rows):
        s = 0
        for d, e in enumerate(docs):
            n = len(e)
            ids[i, s : s + n] = torch.tensor(e.input_ids)
            loss[i, s : s + n] = torch.tensor(e.loss_mask)
            pos[i, s : s + n] = torch.arange(n)
            doc[i, s : s + n] = d
            s += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    # Padding rows attend to themselves only, so no attention row is empty (which would give NaN).
    eye = torch.eye(T, dtype=torch.bool)[None] & (doc[:, :, None] < 0)
    mask4d = ((same_doc & causal[None]) | eye)[:, None]
    targets, mask = _targets(ids, loss, pad_id)
    return LMBatch(ids, mask4d, pos, targets, mask)


class EpochSampler:
    """Seeded shuffled order over ``n`` items, epoch after epoch, with a resumable position."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n <= 0:
            raise ValueError("EpochSampler needs at least one item")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"resume: the dataset has {self.n} items, the checkpoint was taken with {state['n']}")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._make_order()
