"""Reward-model training (Bradley-Terry), its export, and the reward model as a reward source."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from posttrain.config import RewardModelConfig, config_from_dict
from posttrain.data.io import DataError
from posttrain.models.loading import load_tokenizer
from posttrain.recipes import reward_model as rm
from posttrain.rewards import build_reward, load
from posttrain.rewards.registry import VerifierLoadError
from posttrain.runtime.tracking import read_metrics


def _pairs_file(path, n=120, seed=0, **extra):
    """A learnable preference: the chosen completion ends in 'yes', the rejected one in 'no'."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            stem = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6)))
            row = {"prompt": f"q{i % 7}:", "chosen": stem + " yes", "rejected": stem + " no", **extra}
            fh.write(json.dumps(row) + "\n")
    return path


def _cfg(tmp_path, data, *overrides):
    return config_from_dict(
        RewardModelConfig,
        {},
        [f"train.output_dir={tmp_path / 'rm'}", "train.progress=false", f"data.path={data}", "model=tiny", *overrides],
    )


def test_reward_model_learns_a_preference_and_exports_a_standard_classifier(tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl")
    out = rm.train(
        _cfg(
            tmp_path,
            data,
            "optim.lr=3e-3",
            "train.steps=40",
            "train.micro_batch_size=16",
            "data.eval_fraction=0.2",
            "train.eval_every=20",
        )
    )
    m = read_metrics(tmp_path / "rm")
    assert m[-1]["eval_accuracy"] >= 0.9 and m[-1]["accuracy"] >= 0.9, m[-1]
    assert m[-1]["eval_rewards/margin"] > m[0]["rewards/margin"]
    for key in (
        "loss",
        "rewards/margin",
        "reward/mean",
        "reward/std",
        "rewards/chosen",
        "rewards/rejected",
        "eval_loss",
        "grad_norm",
    ):
        assert key in m[-1], key
    # The export is a plain one-label sequence classifier; transformers scores exactly like posttrain.
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and len(cfg["id2label"]) == 1
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = load_tokenizer(out)
    scorer = load("reward_model", path=str(out))
    texts = ["abc yes", "abc no", "h no", "gg yes"]
    ours = scorer.score_batch(texts, [{"prompt": "q1:"}] * 4)
    for text, score in zip(texts, ours):
        ids = tok("q1:" + text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            theirs = plain(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert score == pytest.approx(theirs, abs=1e-5)
    # A batch with padding scores each row as it scores alone.
    assert [float(s) for s in ours] == pytest.approx([float(scorer(t, prompt="q1:")) for t in texts], abs=1e-5)
    assert ours[0] > ours[1] and ours[3] > ours[2]


def test_lora_reward_model_trains_the_head_and_merges_on_export(tmp_path):
    data = _pairs_file(tmp_path / "pairs.jsonl", n=40)
    out = rm.train(
        _cfg(
            tmp_path,
            data,
            "lora.r=4",
            "optim.lr=1e-2",
            "train.steps=15",
            "train.micro_batch_size=8",
            "data.eval_fraction=0",
        )
    )
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    scorer = load("reward_model", path=str(out))
    assert float(scorer("ab yes", prompt="q0:")) > float(scorer("ab no", prompt="q0:"))


def test_margin_column_enters_the_loss(tmp_path, char_tok):
    data = _pairs_file(tmp_path / "pairs.jsonl", n=8, margin=2.0)
    cfg = _cfg(tmp_path, data)
    rows = rm.read_rows(str(data))
    pairs = rm.load_pairs(char_tok, rows, cfg)
    assert all(p.margin == 2.0 for p in pairs)
    from posttrain.models.scalar import scalar_from_causal
    from posttrain.models.tiny import build_tiny_model

    model = scalar_from_causal(build_tiny_model("tiny", char_tok), char_tok)
    with torch.no_grad():
        loss, (c, r) = rm.micro_loss(model, pairs, len(pairs), cfg, char_tok.pad_token_id, "cpu")
        plain, _ = rm.micro_loss(model, pairs, len(pairs), replace(cfg, use_margin=False), char_tok.pad_token_id, "cpu")
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(-(c - r - 2.0)).mean().item(), abs=1e-6)
    assert plain.item() == pytest.approx(torch.nn.functional.softplus(-(c - r)).mean().item(), abs=1e-6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: column 'margin' must be a finite number"):
        rm.load_pairs(char_tok, rm.read_rows(str(bad)), cfg)


def test_identical_chosen_and_rejected_is_a_data_error_naming_the_row(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"})
        + "\n"
        + json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"pairs.jsonl:2: columns 'chosen' and 'rejected' are the same"):
        rm.train(_cfg(tmp_path, data, "train.steps=1", "data.eval_fraction=0"))
    assert not (tmp_path / "rm" / "final").exists()


def test_reward_model_reward_rejects_a_causal_lm_directory(tmp_path, tiny_model, char_tok):
    tiny_model.save_pretrained(tmp_path / "lm")
    char_tok.save_pretrained(tmp_path / "lm")
    with pytest.raises(
        VerifierLoadError, match=r"reward_model option path=.*LlamaForCausalLM directory, not a reward model"
    ):
        build_reward([("reward_model", 1.0, {"path": str(tmp_path / "lm")})])
    with pytest.raises(VerifierLoadError, match="no readable config.json"):
        build_reward([("reward_model", 1.0, {"path": str(tmp_path / "nothing")})])
