"""posttrain: pretrain -> SFT -> preference optimization -> reasoning RL (GRPO + verifiable rewards, DAPO fixes)."""

__version__ = "0.1.0"
