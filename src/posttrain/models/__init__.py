"""Models: loading Hugging Face causal LMs and tokenizers from a local directory (``loading``), the tiny
in-process models and their tokenizers (``tiny``), LoRA through peft (``lora``), scalar heads for reward models
and critics (``scalar``), checkpoint and export I/O (``checkpoint``).

May import: config, losses (nothing today), runtime; never data, rewards, rollout or above.
"""
