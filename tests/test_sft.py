import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kill_resume import kill_mid_run
from posttrain.config import SFTConfig, config_from_dict
from posttrain.data.collate import collate_packed, collate_padded, pack
from posttrain.data.tokenize import encode_prompt_completion
from posttrain.models.checkpoint import latest_checkpoint, list_checkpoints
from posttrain.recipes import sft
from posttrain.run.loop import NonFiniteError
from posttrain.runtime.tracking import TrackingError, read_metrics
from posttrain.tasks import get_task


def _cfg(tmp_path, *overrides, name="run"):
    base = [
        "model=tiny",
        "data.path=builtin:arithmetic",
        "data.num_examples=400",
        "data.max_length=48",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "train.micro_batch_size=8",
        "train.steps=40",
        "train.progress=false",
        f"train.output_dir={tmp_path / name}",
    ]
    return config_from_dict(SFTConfig, {}, base + list(overrides))


def test_sft_loss_falls_and_checkpoint_generates(tmp_path):
    final = sft.train(_cfg(tmp_path, "train.eval_every=20"))
    m = read_metrics(tmp_path / "run")
    first, last = m[0]["loss"], sum(r["loss"] for r in m[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert m[-1]["eval_loss"] < m[0]["loss"]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "wall_time"):
        assert key in m[-1]
    model = AutoModelForCausalLM.from_pretrained(final)
    from posttrain.models.loading import load_tokenizer

    tok = load_tokenizer(final)
    ids = tok("12+7=", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    # It generates, and only from the task's alphabet (a random model picks any of ~100 symbols).
    assert text and set(text) <= set("0123456789+-=, \\boxed{}"), text


def _examples(tok, n):
    rows = get_task("arithmetic").rows(n)
    return [encode_prompt_completion(tok, r["prompt"], r["completion"]) for r in rows]


def _loss_and_grad(model, batch, n_tokens):
    model.zero_grad()
    loss = sft.micro_loss(model, batch, n_tokens)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_batch_equals_unpacked(tiny_model, char_tok):
    ex = _examples(char_tok, 12)
    n_tok = sum(sum(e.loss_mask[1:]) for e in ex)
    unpacked = collate_padded(ex, char_tok.pad_token_id)
    bins = pack(ex, 64)
    assert len(bins) < len(ex)  # several documents per row
    packed = collate_packed(bins, char_tok.pad_token_id)
    assert packed.num_target_tokens == unpacked.num_target_tokens == n_tok
    l1, g1 = _loss_and_grad(tiny_model, unpacked, n_tok)
    l2, g2 = _loss_and_grad(tiny_model, packed, n_tok)
    assert abs(l1 - l2) < 1e-5
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-5), k


def test_micro_batch_1x4_equals_4x1(tiny_model, char_tok):
    ex = _examples(char_tok, 4)
    n_tok = sum(sum(e.loss_mask[1:]) for e in ex)
    l_full, g_full = _loss_and_grad(tiny_model, collate_padded(ex, char_tok.pad_token_id), n_tok)
    tiny_model.zero_grad()
    l_acc = 0.0
    for e in ex:
        loss = sft.micro_loss(tiny_model, collate_padded([e], char_tok.pad_token_id), n_tok)
        loss.backward()
        l_acc += loss.item()
    assert abs(l_full - l_acc) < 1e-6
    for n, p in tiny_model.named_parameters():
        assert torch.allclose(p.grad, g_full[n], atol=1e-6), n


def test_accumulation_invariance_end_to_end(tmp_path):
    a = sft.train(_cfg(tmp_path, "train.steps=3", "train.micro_batch_size=4", "train.grad_accum=1", name="a"))
    b = sft.train(_cfg(tmp_path, "train.steps=3", "train.micro_batch_size=1", "train.grad_accum=4", name="b"))
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    la = [r["loss"] for r in read_metrics(tmp_path / "a")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, abs=1e-5)


def _cli(out_dir, steps):
    return [
        sys.executable,
        "-m",
        "posttrain.commands.main",
        "sft",
        "model=tiny",
        "data.path=builtin:arithmetic",
        "data.num_examples=400",
        "data.max_length=48",
        "optim.lr=3e-3",
        "train.micro_batch_size=16",
        f"train.steps={steps}",
        "train.save_every=5",
        "train.progress=false",
        f"train.output_dir={out_dir}",
    ]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 150  # long enough that the kill at step >= 17 always lands mid-run
    full = tmp_path / "full"
    subprocess.run(_cli(full, steps), check=True, capture_output=True)
    killed = tmp_path / "killed"
    ckpt = kill_mid_run(_cli(killed, steps), killed, 17)
    assert not (killed / "final").exists()
    assert int(ckpt.name.split("-")[1]) < steps
    subprocess.run(_cli(killed, steps), check=True, capture_output=True)
    w_full = load_file(full / "final" / "model.safetensors")
    w_res = load_file(killed / "final" / "model.safetensors")
    for k in w_full:
        assert torch.allclose(w_full[k], w_res[k], atol=1e-6), k
    m_full, m_res = read_metrics(full), read_metrics(killed)
    assert [r["step"] for r in m_res] == list(range(1, steps + 1))
    assert [r["loss"] for r in m_res] == pytest.approx([r["loss"] for r in m_full], abs=1e-6)


def test_non_finite_loss_stops_naming_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real = sft.sft_loss
    calls = {"n": 0}

    def poisoned(logps, mask, n):
        calls["n"] += 1
        out = real(logps, mask, n)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    with pytest.raises(NonFiniteError, match="at step 5"):
        sft.train(_cfg(tmp_path, "train.steps=10", "train.save_every=2"))
    assert latest_checkpoint(tmp_path / "run").name == "step-00000004"
    assert not (tmp_path / "run" / "final").exists()


def test_half_written_checkpoints_are_never_resumed(tmp_path, monkeypatch):
    from posttrain.models import checkpoint as ck

    sft.train(_cfg(tmp_path, "train.steps=4", "train.save_every=2", "train.keep_checkpoints=5"))
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    # A kill during a save leaves a hidden temp dir; a marker-less step dir is incomplete too.
    (run / "checkpoints" / ".tmp-step-00000006-999").mkdir()
    (run / "checkpoints" / "step-00000008").mkdir()
    assert latest_checkpoint(run).name == "step-00000004"

    def crash(tmp, final):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        sft.train(_cfg(tmp_path, "train.steps=6", "train.save_every=2"))
    assert latest_checkpoint(run).name == "step-00000004"


def test_missing_tracking_sink_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(TrackingError, match=r"report_to asks for 'wandb' but it is not installed"):
        sft.train(_cfg(tmp_path, "train.report_to=wandb"))


def test_lora_sft_checkpoints_resume_and_export_merged(tmp_path):
    common = ("lora.r=4", "lora.alpha=8", "train.save_every=2", "optim.lr=1e-2")
    sft.train(_cfg(tmp_path, *common, "train.steps=2", name="split"))
    final = sft.train(_cfg(tmp_path, *common, "train.steps=4", name="split"))  # resumes from step 2
    full = sft.train(_cfg(tmp_path, *common, "train.steps=4", name="full"))
    assert (tmp_path / "split" / "checkpoints" / "step-00000002" / "adapter_model.safetensors").exists()
    wa, wb = load_file(final / "model.safetensors"), load_file(full / "model.safetensors")
    assert not any("lora" in k for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    base = sft.train(_cfg(tmp_path, "train.steps=1", "optim.lr=0", name="base"))  # the untouched init
    wbase = load_file(base / "model.safetensors")
    assert any(not torch.allclose(wa[k], wbase[k]) for k in wa)  # the merged adapters changed the weights
