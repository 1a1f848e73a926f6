"""Loading a policy (and tokenizer) from a local HF directory or a tiny preset."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from posttrain.config import ModelConfig
from posttrain.models import tiny
from posttrain.runtime.distributed import resolve_device
from posttrain.runtime.errors import ModelError

log = logging.getLogger("posttrain")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off for the duration:
    posttrain shows its own progress, and theirs interleaved with it in the demo's output."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# What a tokenizer directory holds, one of: a fast tokenizer, its config, a sentencepiece or a BPE vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def tokenizer_problem(path: str | Path) -> str | None:
    """None when ``path`` holds tokenizer files; else what is missing, in words a user can act on
    (transformers itself blames a missing sentencepiece package)."""
    if any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return (
        f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in this model directory: save the tokenizer "
        f"beside the weights (tokenizer.save_pretrained(DIR)) or name one with model.tokenizer"
    )


def load_tokenizer(path: str | Path):
    """A tokenizer from a local directory.

    Directories whose tokenizer_config names the generic fast tokenizer are loaded exactly as their
    tokenizer.json says: newer transformers otherwise swap in a model-specific class for some model
    types (qwen2) and rebuild the pre-tokenizer, which changes the tokenization.
    """
    path = Path(path)
    cfg_file = path / "tokenizer_config.json"
    if not path.is_dir():
        raise ModelError(f"tokenizer directory {str(path)!r} does not exist")
    if problem := tokenizer_problem(path):
        raise ModelError(f"{path}: {problem}")
    generic = False
    if cfg_file.is_file():
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class", "")
        generic = cls in ("PreTrainedTokenizerFast", "TokenizersBackend")
    tok = (
        PreTrainedTokenizerFast.from_pretrained(str(path))
        if generic and (path / "tokenizer.json").is_file()
        else AutoTokenizer.from_pretrained(str(path))
    )
    if tok.pad_token_id is None:
        # Padding is always masked out; reusing EOS for it is the common convention.
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, *, corpus: Iterable[str] = (), seed: int = 0, device: torch.device | None = None):
    """(model, tokenizer) on ``device`` in ``cfg.dtype``.

    ``cfg.path`` is a local HF directory, or a tiny preset built in-process (random init, seeded).
    """
    device = device or resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    if tiny.is_preset(cfg.path):
        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else tiny.build_tokenizer(cfg.tokenizer_kind, corpus)
        model = tiny.build_tiny_model(cfg.path, tok, arch=cfg.arch, seed=seed).to(dtype)
    else:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.path={cfg.path!r} is neither a tiny preset ({', '.join(tiny.PRESETS)}) "
                f"nor a local model directory with a config.json"
            )
        tok = load_tokenizer(cfg.tokenizer or path)
        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device), tok


def load_frozen(path: str, like: ModelConfig, device: torch.device):
    """A frozen copy (reference model) from a checkpoint directory, in eval mode."""
    cfg = ModelConfig(path=path, dtype=like.dtype, device=str(device), tokenizer=like.tokenizer)
    model, _ = load_model(cfg, device=device)
    model.eval().requires_grad_(False)
    return model
