"""Loss aggregation: one function, four named modes (DESIGN principle 2).

Shape letters: B batch (sequences), T tokens. ``loss_BT`` is a per-token loss to minimise,
``mask_BT`` is 1 on completion tokens that carry loss (EOS included; prompt, padding and
post-EOS tokens excluded) and 0 elsewhere.

With ``l`` the per-token loss, ``m`` the mask, ``|y_i| = sum_t m_it`` and the counts taken over
the WHOLE optimiser step (all gradient-accumulation micro-batches and all data-parallel ranks):

===================== ============================================== =============================
mode                  formula                                        used by
===================== ============================================== =============================
token_mean            sum_it m l / N_tokens                          DAPO Eq. 8 (token-level loss)
seq_mean_token_mean   (1/N_seqs) sum_i (1/|y_i|) sum_t m l           GRPO (Shao et al. 2024), GSPO
seq_sum_const         sum_it m l / (L_const * N_seqs)                Dr. GRPO (Liu et al. 2025)
seq_mean_token_sum    (1/N_seqs) sum_i sum_t m l                     verl ``seq-mean-token-sum``
===================== ============================================== =============================

``N_seqs`` counts sequences with at least one mask token in EVERY mode: an all-zero-mask row
(for example an overlong-filtered sample) contributes nothing and is not counted. For
``seq_sum_const`` this deviates from oat's Dr. GRPO reference, whose ``.mean()`` over the batch
also counts empty rows; the two agree whenever no row is fully masked.

Because each micro-batch's value is "its share of the global sum", summing ``aggregate`` over
micro-batches (with the global counts passed in) equals aggregating the full batch at once, in
value and gradient. Data parallelism: DDP averages gradients over ``world_size`` ranks, so a
recipe that passes global counts must multiply the loss by ``world_size`` (as verl does with
``dp_size``) or sum-reduce gradients instead.
"""

from __future__ import annotations

from typing import Literal, Union, get_args

import torch
from torch import Tensor

AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_sum_const", "seq_mean_token_sum"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)

Count = Union[int, float, Tensor]


def token_count(mask_BT: Tensor) -> int:
    """Number of loss-carrying tokens; sum this over micro-batches/ranks to get ``num_tokens``."""
    return int(mask_BT.bool().sum().item())


def sequence_count(mask_BT: Tensor) -> int:
    """Number of sequences with >= 1 loss token; sum over micro-batches/ranks to get ``num_seqs``."""
    return int(mask_BT.bool().any(dim=-1).sum().item())


def _as_denominator(count: Count, like: Tensor) -> Tensor:
    """A detached positive denominator. A count of 0 means there is no loss token at all, so the
    numerator is 0 too; dividing by 1 then returns 0 (with a zero gradient) instead of NaN."""
    count_t = torch.as_tensor(count, dtype=like.dtype, device=like.device).detach()
    return count_t.clamp(min=1.0)


def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: AggMode,
    *,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    const_len: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to the scalar that is backpropagated (see the module table).

    Args:
        loss_BT: per-token loss, (B, T). Values at masked positions are ignored, even if NaN/inf
            (they are selected away with ``torch.where``, not multiplied by 0).
        mask_BT: (B, T) bool or 0/1 float.
        mode: one of ``AGG_MODES``.
        num_tokens: global token count for ``token_mean``; ``None`` = this batch's count (only
            correct when the optimiser step is a single micro-batch on a single rank).
        num_seqs: global non-empty sequence count for the three ``seq_*`` modes; ``None`` = local.
        const_len: the constant ``L_const`` of ``seq_sum_const`` (Dr. GRPO uses the maximum
            completion length). Required for that mode, rejected by the others.

    Returns:
        A scalar tensor, in fp32 (or fp64) even for half-precision ``loss_BT``.
    """
    if loss_BT.shape != mask_BT.shape or loss_BT.dim() != 2:
        raise ValueError(
            f"loss_BT and mask_BT must both be (B, T); got {tuple(loss_BT.shape)} and {tuple(mask_BT.shape)}"
        )
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")
    if (const_len is not None) != (mode == "seq_sum_const"):
        raise ValueError("const_len is required by mode 'seq_sum_const' and only by it")
    if mode == "token_mean" and num_seqs is not None:
        raise ValueError("mode 'token_mean' normalises by num_tokens, not num_seqs")
    if mode != "token_mean" and num_tokens is not None:
        raise ValueError(f"mode {mode!r} normalises by num_seqs, not num_tokens")

    keep_BT = mask_BT.bool()
    # Reduce in at least fp32: a bf16 denominator cannot even represent 100001 tokens.
    acc_BT = loss_BT.to(torch.promote_types(loss_BT.dtype, torch.float32))
    masked_BT = torch.where(keep_BT, acc_BT, torch.zeros_like(acc_BT))

    if mode == "token_mean":
        n_tok = token_count(mask_BT) if num_tokens is None else num_tokens
        return masked_BT.sum() / _as_denominator(n_tok, acc_BT)

    n_seq = sequence_count(mask_BT) if num_seqs is None else num_seqs
    denom = _as_denominator(n_seq, acc_BT)
    if mode == "seq_mean_token_mean":
        # max(|y_i|, 1): an all-masked row has a zero numerator and contributes exactly 0.
        len_B = keep_BT.sum(dim=-1).clamp(min=1).to(acc_BT.dtype)
        return (masked_BT.sum(dim=-1) / len_B).sum() / denom
    if mode == "seq_sum_const":
        if const_len <= 0:
            raise ValueError(f"const_len must be positive, got {const_len}")
        return masked_BT.sum() / (denom * const_len)
    return masked_BT.sum() / denom  # seq_mean_token_sum


def masked_mean(x_BT: Tensor, mask_BT: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over mask positions (for metrics: clip fractions, mean KL, entropy).

    Over all positions when ``dim`` is None, else along ``dim``. An empty selection gives 0, not
    NaN. Masked positions are selected away, so NaN there does not leak.
    """
    keep = mask_BT.bool()
    acc_dtype = torch.promote_types(x_BT.dtype, torch.float32) if x_BT.is_floating_point() else torch.float32
    x_BT = x_BT.to(acc_dtype)
    x_kept = torch.where(keep, x_BT, torch.zeros_like(x_BT))
    if dim is None:
        return x_kept.sum() / keep.sum().clamp(min=1).to(x_kept.dtype)
    return x_kept.sum(dim=dim) / keep.sum(dim=dim).clamp(min=1).to(x_kept.dtype)
