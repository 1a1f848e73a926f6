"""Pretraining: next-token loss on every token of `text` (or `messages`) rows, packed.

The same masked-NLL loop as SFT (posttrain.recipes.sft); only the data view differs: every token
is a target and long documents are split into max_length chunks instead of being dropped.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import PretrainConfig
from posttrain.recipes import sft


def train(cfg: PretrainConfig) -> Path:
    return sft.train(cfg, kind="lm", recipe="pretrain")
