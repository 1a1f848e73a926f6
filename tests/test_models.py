import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import LoraConfig, ModelConfig
from posttrain.models.checkpoint import export_model
from posttrain.models.loading import ModelError, load_model, load_tokenizer
from posttrain.models.lora import apply_lora
from posttrain.models.tiny import build_tiny_model, build_tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_saves_and_reloads_in_plain_transformers(tmp_path, char_tok, arch):
    model = build_tiny_model("tiny", char_tok, arch=arch, seed=3)
    model.save_pretrained(tmp_path)
    char_tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = char_tok("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-6)
    out = again.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4 or out[0, -1] == char_tok.eos_token_id
    # Our loader keeps the saved char-level tokenization (newer AutoTokenizer rebuilds qwen2's).
    tok = load_tokenizer(tmp_path)
    assert tok("a b+1")["input_ids"] == char_tok("a b+1")["input_ids"]
    if arch == "llama":
        assert AutoTokenizer.from_pretrained(tmp_path)("a b")["input_ids"] == char_tok("a b")["input_ids"]


def test_load_model_from_local_directory(tmp_path, tiny_model, char_tok):
    tiny_model.save_pretrained(tmp_path)
    char_tok.save_pretrained(tmp_path)
    model, tok = load_model(ModelConfig(path=str(tmp_path), device="cpu"))
    ids = tok("7+8=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_model(ids).logits, atol=1e-6)
    bf16, _ = load_model(ModelConfig(path=str(tmp_path), device="cpu", dtype="bfloat16"))
    assert next(bf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="neither a tiny preset"):
        load_model(ModelConfig(path=str(tmp_path / "nope"), device="cpu"))


def test_bpe_tokenizer_trained_on_task_text_round_trips():
    corpus = ["12+34=46 46-5=41"] * 20 + ["hello world"] * 5
    tok = build_tokenizer("bpe", corpus, vocab_size=120)
    text = "12+34=46 hello"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # merges were learned


def test_lora_trains_adapters_only_and_merges_on_export(tmp_path, tiny_model, char_tok):
    model = apply_lora(tiny_model, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # make the adapter change the output
    ids = char_tok("12+34=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    out = export_model(tmp_path, model, char_tok)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, expected, atol=1e-5)
    with pytest.raises(ValueError, match="not found in the model"):
        apply_lora(build_tiny_model("tiny", char_tok), LoraConfig(r=2, target_modules=("c_attn",)))


def test_loading_and_exporting_show_no_transformers_progress_bars(tmp_path, tiny_model, char_tok, capfd):
    """transformers' "Loading weights" / "Writing model shards" bars interleaved with posttrain's own in the
    demo's output: they are off while posttrain saves and loads, and on again after (a user's own code keeps
    them)."""
    from transformers.utils import logging as hf_logging

    capfd.readouterr()
    export_model(tmp_path, tiny_model, char_tok, name="m")
    load_model(ModelConfig(path=str(tmp_path / "m")))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
    assert hf_logging.is_progress_bar_enabled()
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))  # outside posttrain: transformers' bar as usual
    assert "Loading weights" in capfd.readouterr().err
