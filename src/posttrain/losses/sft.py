"""Next-token negative log-likelihood over the trained tokens.

    L = - sum_{b,t} m_{b,t} log p(y_{b,t} | y_{b,<t}) / N

N is the number of trained tokens in the whole optimizer step (all gradient-accumulation
micro-batches), passed in: summing this loss over micro-batches then equals the loss of the full
batch exactly, whatever the split and however much padding each micro-batch has.
"""

from __future__ import annotations

import torch


def sft_loss(logps_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: int | float) -> torch.Tensor:
    if num_tokens <= 0:
        raise ValueError("sft_loss: the step has no trained tokens")
    return -(logps_BT * mask_BT).sum() / num_tokens
