"""Pure loss functions over tensors (DESIGN principle 1): one function per named method, no model, config
or torch.distributed inside. Per-token losses are reduced by ``aggregate``.

May import: torch, and other losses only (an import-linter contract also keeps transformers, peft and vLLM
out).
"""

from posttrain.losses.aggregation import (
    AGG_MODES,
    AggMode,
    aggregate,
    masked_mean,
    sequence_count,
    token_count,
)
from posttrain.losses.importance import ISWeights, mismatch_stats, rollout_is_weights
from posttrain.losses.kl import KLKind, kl_estimate
from posttrain.losses.policy import PolicyLossTerms, cispo_loss, gspo_loss, ppo_clip_loss
from posttrain.losses.preference import (
    KTOLossTerms,
    ORPOLossTerms,
    PairwiseLossTerms,
    dpo_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    rpo_loss,
    simpo_loss,
)

__all__ = [
    "AGG_MODES",
    "AggMode",
    "ISWeights",
    "KLKind",
    "KTOLossTerms",
    "ORPOLossTerms",
    "PairwiseLossTerms",
    "PolicyLossTerms",
    "aggregate",
    "cispo_loss",
    "dpo_loss",
    "gspo_loss",
    "ipo_loss",
    "kl_estimate",
    "kto_kl_estimate",
    "kto_loss",
    "masked_mean",
    "mismatch_stats",
    "orpo_loss",
    "ppo_clip_loss",
    "rollout_is_weights",
    "rpo_loss",
    "sequence_count",
    "simpo_loss",
    "token_count",
]
