"""Token log-probabilities and entropy from logits, and the one forward pass every recipe uses.

``logits[:, t]`` predicts token ``t + 1``; callers pass ``targets_BT`` already shifted
(see posttrain.data.collate). With sampling temperature T != 1 the logits are divided by T before
the log-softmax, so the trainer scores tokens under the distribution the sampler used.
"""

from __future__ import annotations

import torch


def token_logps(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target], computed row by row to bound the (B, T, V) float32 copies."""
    out = []
    for logits_TV, tgt_T in zip(logits_BTV, targets_BT):
        logits_TV = logits_TV.float()
        if temperature != 1.0:
            logits_TV = logits_TV / temperature
        picked = logits_TV.gather(-1, tgt_T.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(logits_TV, dim=-1))
    return torch.stack(out)


def entropy_from_logits(logits_BTV: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, per position (B, T)."""
    out = []
    for logits_TV in logits_BTV:
        z = logits_TV.float() / temperature
        p = torch.softmax(z, dim=-1)
        out.append(torch.logsumexp(z, dim=-1) - (p * z).sum(-1))
    return torch.stack(out)


def forward_logits(model, input_ids_BT, attention_mask, position_ids_BT=None) -> torch.Tensor:
    return model(input_ids=input_ids_BT, attention_mask=attention_mask, position_ids=position_ids_BT,
                 use_cache=False).logits
