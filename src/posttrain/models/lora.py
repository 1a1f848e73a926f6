"""LoRA adapters through peft; merged into the base weights on export."""

from __future__ import annotations

import copy

from posttrain.config import LoraConfig
from posttrain.models.loading import ModelError


def apply_lora(model, cfg: LoraConfig, task_type: str = "CAUSAL_LM"):
    """peft LoRA adapters on ``cfg.target_modules``; ``task_type="SEQ_CLS"`` (reward models, critics) also
    trains the score head in full (peft's modules_to_save)."""
    if cfg.r <= 0:
        return model
    try:
        from peft import LoraConfig as PeftLoraConfig  # noqa: PLC0415 - peft is optional (posttrain[peft])
        from peft import get_peft_model  # noqa: PLC0415 - peft is optional (posttrain[peft])
    except ImportError:
        raise ImportError("lora.r > 0 needs peft: pip install 'posttrain[peft]'") from None
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in present]
    if missing:
        raise ModelError(
            f"lora.target_modules: {missing} not found in the model (it has e.g. "
            f"{sorted(n for n in present if n.endswith('proj'))[:8]})"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, peft_cfg)


def is_peft(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def merged(model):
    """A plain transformers model with adapters merged in (a copy when the model is a peft model)."""
    if not is_peft(model):
        return model
    return copy.deepcopy(model).merge_and_unload()
