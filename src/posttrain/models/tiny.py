"""Tiny random-initialized causal LMs with a tokenizer built locally: no downloads.

The presets are real transformers architectures (Qwen2 or Llama), so everything that works on
them works on a local HF model directory, and a saved tiny model loads with plain
``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

PRESETS: dict[str, dict[str, int]] = {
    # name: hidden size, layers, heads, kv heads, MLP size
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192
    ),
    "small": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384
    ),
    "medium": dict(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, intermediate_size=768
    ),
    # ~25M parameters: big enough that weights, gradients and optimizer state dominate a CPU process's
    # memory (benchmarks/grpo_vs_ppo.py), small enough to train a few steps on a laptop.
    "base": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1536
    ),
    # ~0.5B parameters with a real-size vocabulary, for GPU benchmarks (Qwen2-0.5B's shape).
    "qwen2-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864
    ),
}

SPECIAL_TOKENS = {"pad": "<|pad|>", "eos": "<|endoftext|>", "unk": "<|unk|>"}
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# ChatML, as Qwen models use; assistant turns end with <|im_end|>. With ``tools`` (apply_chat_template(...,
# tools=[schemas])) a system turn names them, and an assistant message's ``tool_calls`` render as Hermes-style
# <tool_call>{"name": ..., "arguments": ...}</tool_call> blocks (what the `hermes` parser reads back); tool
# results are turns of role "tool". Kept short: every character is a token for the char tokenizer.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\ntools: ' }}"
    "{% for t in tools %}{{ (t.function.name if t.function is defined else t.name) }}"
    "{% if not loop.last %}{{ ', ' }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{% for call in message.get('tool_calls') or [] %}{% set f = call.function if call.function is defined else call %}"
    "{{ '<tool_call>{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments if f.arguments is string else f.arguments | tojson) + '}</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHARSET = string.printable  # digits, letters, punctuation and whitespace


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_tokenizer(kind: str = "char", corpus: Iterable[str] = (), vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, or a BPE tokenizer trained on ``corpus``."""
    specials = [SPECIAL_TOKENS["pad"], SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["unk"], *CHAT_TOKENS]
    if kind == "char":
        vocab = {tok: i for i, tok in enumerate(specials)}
        for ch in CHARSET:
            vocab.setdefault(ch, len(vocab))
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
        # Every character is its own token ("[\s\S]" also matches newlines).
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    elif kind == "bpe":
        corpus = list(corpus)
        if not corpus:
            raise ValueError("a BPE tokenizer needs the task's text to train on")
        tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d|\s+|[^\d\s]+"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=list(CHARSET), show_progress=False
        )
        tok.train_from_iterator(corpus, trainer)
    else:
        raise ValueError(f"tokenizer kind {kind!r}: expected 'char' or 'bpe'")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        additional_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    preset: str, tokenizer, arch: str = "llama", seed: int = 0, max_positions: int = 2048
) -> torch.nn.Module:
    """A random-initialized model of a preset's size whose vocabulary matches ``tokenizer``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    common = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **shape,
    )
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
