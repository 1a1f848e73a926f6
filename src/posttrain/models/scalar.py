"""Scalar-head models: reward models and critics, as transformers' ``AutoModelForSequenceClassification``
with one label -- the format TRL, vLLM and any transformers user load unchanged.

One head, read two ways:

* a **reward model** reads the head on the last non-pad token of each sequence. That is exactly
  transformers' own ``forward`` (``sequence_scores`` calls it), so an exported reward model scores
  the same in posttrain, in plain transformers and in TRL;
* a **critic** reads the head at every position (``token_values``): V(s_t) at the position whose
  logits predict token t+1, the alignment of ``losses.logprobs`` (so values line up with log-probs).

A scalar model starts from a causal LM (its backbone weights, a new head) or from a directory that
already is one (e.g. a trained reward model as the critic's start).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoModelForSequenceClassification

from posttrain.config import ModelConfig
from posttrain.models import tiny
from posttrain.models.loading import DTYPES, ModelError, load_model, load_tokenizer, no_progress_bars


def architecture(path: str | Path) -> tuple[str, int | None]:
    """(architecture name from config.json, num_labels or None) of a model directory; ("", None) when
    the directory has no readable config."""
    cfg_file = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return "", None
    archs = cfg.get("architectures") or [""]
    labels = len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else cfg.get("num_labels")
    return str(archs[0]), labels


def check_scalar_dir(path: str | Path, field: str) -> None:
    """Raise a ModelError naming ``field`` unless ``path`` is a sequence-classification directory with
    exactly one label (what a reward model is)."""
    arch, labels = architecture(path)
    if not arch:
        raise ModelError(f"{field}={str(path)!r}: not a model directory (no readable config.json)")
    if not arch.endswith("ForSequenceClassification"):
        raise ModelError(
            f"{field}={str(path)!r}: a {arch or 'model'} directory, not a reward model "
            f"(a *ForSequenceClassification directory with one label, e.g. `posttrain reward-model`'s "
            f"final/)"
        )
    if labels != 1:
        raise ModelError(
            f"{field}={str(path)!r}: a sequence classifier with {labels} labels; a reward model "
            f"has exactly one (a scalar score)"
        )


def scalar_from_causal(causal, tokenizer, *, zero_head: bool = False, seed: int = 0):
    """A one-label sequence classifier with ``causal``'s backbone weights (copied) and a new head:
    transformers' default initialisation, or zeros (a critic then starts at V = 0 everywhere)."""
    config = copy.deepcopy(causal.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, tokenizer.pad_token_id, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    backbone = getattr(causal, causal.base_model_prefix)
    getattr(model, model.base_model_prefix).load_state_dict(backbone.state_dict())
    if zero_head:
        torch.nn.init.zeros_(model.score.weight)
    param = next(causal.parameters())
    return model.to(dtype=param.dtype, device=param.device)


def load_scalar(
    cfg: ModelConfig,
    *,
    corpus: Iterable[str] = (),
    seed: int = 0,
    device: torch.device | None = None,
    field: str = "model.path",
    zero_head: bool = False,
):
    """(scalar model, tokenizer) from ``cfg.path``: a tiny preset or a causal LM directory (backbone
    + new head), or a one-label sequence-classification directory (loaded as it is)."""
    if not tiny.is_preset(cfg.path):
        arch, _ = architecture(cfg.path)
        if arch.endswith("ForSequenceClassification"):
            check_scalar_dir(cfg.path, field)
            with no_progress_bars():
                model = AutoModelForSequenceClassification.from_pretrained(cfg.path, dtype=DTYPES[cfg.dtype])
            tok = load_tokenizer(cfg.tokenizer or cfg.path)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
            if cfg.gradient_checkpointing:
                model.gradient_checkpointing_enable()
            return model.to(device or torch.device("cpu")), tok
        if not arch:
            raise ModelError(
                f"{field}={cfg.path!r} is neither a tiny preset ({', '.join(tiny.PRESETS)}) nor a "
                f"local model directory with a config.json"
            )
    causal, tok = load_model(cfg, corpus=corpus, seed=seed, device=device)
    return scalar_from_causal(causal, tok, zero_head=zero_head, seed=seed), tok


def same_vocabulary(a, b) -> bool:
    """Do two tokenizers map text to the same ids (same vocabulary and special tokens)?"""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id


def sequence_scores(model, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """(B,) reward-model scores: transformers' forward, the head on each row's last non-pad token."""
    logits = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).logits[:, 0]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


# The attribute under which a model wrapped for data parallelism carries its FSDP entry point for
# ``token_values_unwrapped`` (``run.loop.wrap`` registers it).
TOKEN_VALUES_ENTRY = "_posttrain_token_values"


def token_values(model, input_ids_BT, attention_mask, position_ids_BT) -> torch.Tensor:
    """(B, T) critic values: the head at every position (``attention_mask`` may be a packed 4D mask). A
    model wrapped for data parallelism runs it through its registered FSDP entry point."""
    entry = getattr(model, TOKEN_VALUES_ENTRY, None)
    if entry is not None:
        return entry(input_ids_BT, attention_mask, position_ids_BT)
    return token_values_unwrapped(model, input_ids_BT, attention_mask, position_ids_BT)


def token_values_unwrapped(model, input_ids_BT, attention_mask, position_ids_BT) -> torch.Tensor:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = getattr(lm, lm.base_model_prefix)(
        input_ids=input_ids_BT, attention_mask=attention_mask, position_ids=position_ids_BT, use_cache=False
    ).last_hidden_state
    values = lm.score(hidden)[..., 0]
    return values.to(torch.promote_types(values.dtype, torch.float32))
