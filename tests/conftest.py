import logging
import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when tests run alongside worker processes.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture
def char_tok():
    from posttrain.models.tiny import build_tokenizer

    return build_tokenizer("char")


@pytest.fixture
def tiny_model(char_tok):
    from posttrain.models.tiny import build_tiny_model

    return build_tiny_model("tiny", char_tok, seed=0)
