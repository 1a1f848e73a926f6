"""Advantages: GRPO group z-score, Dr. GRPO centring, RLOO, batch whitening (outcome rewards), and
GAE over per-token rewards with a critic (PPO / RLHF).

Shape letters: P prompts, G completions per prompt (the group), B batch, T tokens. Rewards are
one scalar per completion, ``rewards_PG``; the advantage of completion (p, g) is broadcast to all
of its tokens by the caller (``adv_PG.reshape(-1, 1)`` gives the (B, 1) that the policy losses
take, with B = P * G in prompt-major order).

Conventions:

* Standard deviations are UNBIASED (Bessel, N - 1; ``torch.std``'s default), as in every
  reference (verl, TRL, OpenRLHF, oat). The epsilon is added to the std, outside the square
  root: (r - mean) / (std + eps), eps = 1e-6 as in verl (TRL uses 1e-4, OpenRLHF 1e-9, oat 1e-8).
* A group whose rewards are all equal gets advantage EXACTLY 0. Computing (r - mean) / (std + eps)
  there is not safe: in fp32, mean([0.3] * 16) differs from 0.3 by ~3e-8 and so does the std,
  which gives advantages ~0.03 instead of 0. These groups carry no learning signal (DAPO's
  dynamic sampling drops them; see ``zero_variance_groups``).
* Groups must have G >= 2: a baseline from the group is undefined for a single sample (verl
  silently falls back to the raw reward; here it is an error).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def _check_groups(rewards_PG: Tensor) -> Tensor:
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards_PG must be (P, G); got shape {tuple(rewards_PG.shape)}")
    if rewards_PG.shape[1] < 2:
        raise ValueError(f"group-relative advantages need G >= 2 completions per prompt; got G = {rewards_PG.shape[1]}")
    return rewards_PG if rewards_PG.is_floating_point() else rewards_PG.float()


def zero_variance_groups(rewards_PG: Tensor) -> Tensor:
    """Bool (P,): True where all G rewards of the prompt are identical (all correct / all wrong).

    Compared exactly (max == min), not with std < tol, so it does not depend on rounding.
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards_PG must be (P, G); got shape {tuple(rewards_PG.shape)}")
    return rewards_PG.amax(dim=-1) == rewards_PG.amin(dim=-1)


def group_advantages(
    rewards_PG: Tensor,
    *,
    scale: Literal["std", "none"] = "std",
    eps: float = 1e-6,
    valid_PG: Tensor | None = None,
) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, arXiv 2402.03300, §4.1.2), (P, G):

        scale="std":  A_pg = (R_pg - mean_g R_p) / (std_g R_p + eps)    (GRPO, DAPO)
        scale="none": A_pg =  R_pg - mean_g R_p                          (Dr. GRPO, arXiv 2503.20783)

    std is unbiased (N - 1); zero-variance groups give exactly 0 (module docstring).

    ``valid_PG`` (bool): samples without a reward (a judge that gave no verdict, under ``on_failure:
    exclude``) are left out: mean and std are over the group's valid samples, an invalid sample's advantage
    is 0, and a group with fewer than 2 valid samples, or whose valid rewards are equal, gets 0.
    """
    if valid_PG is not None and not bool(valid_PG.all()):
        return _masked_group_advantages(_check_groups(rewards_PG), valid_PG.bool(), scale, eps)
    rewards = _check_groups(rewards_PG)
    centred_PG = rewards - rewards.mean(dim=-1, keepdim=True)
    if scale == "std":
        adv_PG = centred_PG / (rewards.std(dim=-1, keepdim=True) + eps)
    elif scale == "none":
        adv_PG = centred_PG
    else:
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
    flat_P1 = zero_variance_groups(rewards)[:, None]
    return torch.where(flat_P1, torch.zeros_like(adv_PG), adv_PG)


def _masked_group_advantages(rewards: Tensor, valid: Tensor, scale: str, eps: float) -> Tensor:
    """``group_advantages`` over each group's valid samples only (see its ``valid_PG``)."""
    zero = torch.zeros_like(rewards)
    r = torch.where(valid, rewards, zero)  # an excluded reward may be NaN: never in the sums
    n_P1 = valid.sum(-1, keepdim=True).to(rewards.dtype)
    mean_P1 = r.sum(-1, keepdim=True) / n_P1.clamp(min=1)
    centred = torch.where(valid, r - mean_P1, zero)
    if scale == "std":
        std_P1 = ((centred**2).sum(-1, keepdim=True) / (n_P1 - 1).clamp(min=1)).sqrt()
        adv = centred / (std_P1 + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
    big = torch.finfo(rewards.dtype).max
    flat_P1 = (torch.where(valid, r, -big).amax(-1) == torch.where(valid, r, big).amin(-1))[:, None] | (n_P1 < 2)
    return torch.where(flat_P1 | ~valid, zero, adv)


def rloo_advantages(rewards_PG: Tensor, valid_PG: Tensor | None = None) -> Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024,
    arXiv 2402.14740), (P, G):

        A_pg = R_pg - (1/(G-1)) sum_{j != g} R_pj  =  G/(G-1) (R_pg - mean_j R_pj)

    Unbiased: the baseline of sample g does not depend on sample g. No std scaling. Any KL
    penalty must already be folded into R (RLOO puts the sequence-summed k1 in the reward).
    """
    rewards = _check_groups(rewards_PG)
    if valid_PG is not None and not bool(valid_PG.all()):
        # the leave-one-out baseline over the group's other valid samples (see group_advantages' valid_PG)
        valid = valid_PG.bool()
        r = torch.where(valid, rewards, torch.zeros_like(rewards))
        n_P1 = valid.sum(-1, keepdim=True).to(rewards.dtype)
        adv_PG = r - (r.sum(-1, keepdim=True) - r) / (n_P1 - 1).clamp(min=1)
        flat = _masked_group_advantages(rewards, valid, "none", 0.0) == 0
        return torch.where(flat | ~valid, torch.zeros_like(adv_PG), adv_PG)
    group_size = rewards.shape[1]
    baseline_PG = (rewards.sum(dim=-1, keepdim=True) - rewards) / (group_size - 1)
    adv_PG = rewards - baseline_PG
    flat_P1 = zero_variance_groups(rewards)[:, None]
    return torch.where(flat_P1, torch.zeros_like(adv_PG), adv_PG)


def batch_normalize(adv: Tensor, eps: float = 1e-6, *, mask: Tensor | None = None) -> Tensor:
    """Whiten advantages over the whole batch: (A - mean) / (std + eps).

    REINFORCE++ (Hu 2025, arXiv 2501.03262) normalises globally over all valid tokens of the
    batch; with per-token advantages (B, T) pass the loss ``mask`` so padding is excluded from
    the statistics (output is 0 there). Any shape is accepted without a mask (e.g. (P, G)).

    Conventions: unbiased std (verl ``masked_whiten``; OpenRLHF uses the population variance, and
    verl puts its 1e-8 inside the square root: slightly different numbers), eps outside the
    square root as in ``group_advantages``. If every selected value is equal the result is
    exactly 0. The statistics are those of the tensor given: under data parallelism, gather
    first or the normalisation becomes per-rank.
    """
    x = adv if adv.is_floating_point() else adv.float()
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool().expand_as(x)
    n = keep.sum().to(x.dtype)
    zero = torch.zeros_like(x)
    mean = torch.where(keep, x, zero).sum() / n.clamp(min=1)
    centred = torch.where(keep, x - mean, zero)
    var = (centred**2).sum() / (n - 1).clamp(min=1)
    out = centred / (var.sqrt() + eps)
    selected = x[keep]
    if selected.numel() == 0 or bool(selected.amax() == selected.amin()):
        return zero
    return out


# ---------------------------------------------------------------------------------------------
# PPO with a critic (RLHF): per-token rewards and GAE. Shapes: N sequences, L completion tokens
# (completion layout: token t of sequence n at [n, t]; ``mask_NL`` is 1 on the tokens that carry loss).


def per_token_rewards(scores_N: Tensor, kl_NL: Tensor, mask_NL: Tensor, beta: float) -> Tensor:
    """The RLHF reward of every completion token (InstructGPT; losses.md §1-2), (N, L):

        r_t = -beta * KL_t                  on every valid token
        r_T += score                        at the last valid token T of the sequence

    ``KL_t`` is the per-token estimate between the rollout policy and the reference (usually k1), a
    constant; ``score`` is the sequence's reward (reward model and/or verifiers). Rows without a valid
    token (masked out) get no reward at all."""
    mask = mask_NL.to(kl_NL.dtype)
    rewards_NL = -beta * kl_NL.detach() * mask
    has_token_N = mask.sum(-1) > 0
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last_N = (positions * mask).argmax(-1)  # index of the last valid token (0 for an empty row)
    rows = has_token_N.nonzero()[:, 0]
    rewards_NL[rows, last_N[rows]] += scores_N.to(rewards_NL.dtype)[rows]
    return rewards_NL


def gae(
    rewards_NL: Tensor, values_NL: Tensor, mask_NL: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438), backwards over the
    valid tokens of each sequence:

        delta_t = r_t + gamma V_{t+1} - V_t,    A_t = delta_t + gamma lam A_{t+1},    G_t = A_t + V_t

    with V and A = 0 after the last valid token: the completion ends there (EOS, or the length cap,
    which RLHF implementations also treat as terminal, since the score is given there). Positions
    outside the mask are skipped, carrying V_{t+1} and A_{t+1} across them (as verl does for
    observation tokens), and get A = G = 0. Returns (advantages_NL, returns_NL), both constants."""
    r, v, keep = rewards_NL.detach(), values_NL.detach(), mask_NL.bool()
    adv_NL = torch.zeros_like(r)
    next_value, next_adv = torch.zeros_like(r[:, 0]), torch.zeros_like(r[:, 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        k = keep[:, t]
        adv_NL[:, t] = torch.where(k, a_t, torch.zeros_like(a_t))
        next_adv = torch.where(k, a_t, next_adv)
        next_value = torch.where(k, v[:, t], next_value)
    returns_NL = torch.where(keep, adv_NL + v, torch.zeros_like(adv_NL))
    return adv_NL, returns_NL


def decoupled_gae(
    rewards_NL: Tensor, values_NL: Tensor, mask_NL: Tensor, *, gamma: float, lam_actor: float, lam_critic: float
) -> tuple[Tensor, Tensor]:
    """Decoupled GAE (VC-PPO, Yuan et al. 2025, arXiv 2503.01491): the actor's advantages with ``lam_actor``,
    the critic's return targets G_t = A_t + V_t with ``lam_critic``. With lam < 1 the terminal reward reaches
    token t of a long completion only as (gamma lam)^(T-t); the paper trains the critic with lam = 1.0, so
    its targets carry the reward to every token undecayed, while the actor keeps a lower-variance lam
    (0.95). Equal lambdas give ``gae`` exactly. Returns (advantages_NL, returns_NL)."""
    adv_NL, returns_NL = gae(rewards_NL, values_NL, mask_NL, gamma=gamma, lam=lam_actor)
    if lam_critic != lam_actor:
        _, returns_NL = gae(rewards_NL, values_NL, mask_NL, gamma=gamma, lam=lam_critic)
    return adv_NL, returns_NL
