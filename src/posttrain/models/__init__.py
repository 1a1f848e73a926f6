"""Model and tokenizer loading, the tiny in-process models, LoRA and checkpoint I/O."""
