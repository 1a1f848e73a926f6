import logging
import os

import pytest
import torch

# One intra-op thread per process: the models here are tiny, and with two threads per process a
# 2-core machine running a test plus verifier workers or a subprocess trainer thrashes (measured
# 5-50x slower steps). Subprocesses (CLI tests) inherit OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
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
