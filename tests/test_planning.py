"""The planner's formulas pinned on exact numbers: parameter counts of real models, AdamW's state, what
autograd saves (torch.autograd.graph.saved_tensors_hooks, byte for byte), the KV cache, and the static
memory of real tiny GRPO / PPO runs. The peak against measured runs: benchmarks/plan_check.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain.commands.plan import load_shape, main, parse_gpus
from posttrain.config import GRPOConfig, LoraConfig, PPOConfig, config_from_dict
from posttrain.losses.logprobs import completion_logps, forward_logits, token_logps
from posttrain.models.lora import apply_lora
from posttrain.models.scalar import scalar_from_causal, token_values
from posttrain.models.tiny import build_tiny_model, build_tokenizer
from posttrain.planning import estimate as pl
from posttrain.runtime.memory import MB, optimizer_bytes
from posttrain.runtime.tracking import read_metrics

TOK = build_tokenizer("char")


def _model(preset="small", arch="llama", dtype=torch.float32, lora=0):
    m = build_tiny_model(preset, TOK, arch=arch).to(dtype).train()
    return apply_lora(m, LoraConfig(r=lora)) if lora else m


@pytest.mark.parametrize("preset", ["tiny", "small", "medium", "base"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_parameter_counts_equal_the_real_models(preset, arch):
    shape = load_shape(preset, arch)
    model = build_tiny_model(preset, TOK, arch=arch)
    assert pl.causal_params(shape) == sum(p.numel() for p in model.parameters())
    assert pl.param_tensors(shape) == len(list(model.parameters()))
    scalar = scalar_from_causal(model, TOK)
    assert pl.scalar_params(shape) == sum(p.numel() for p in scalar.parameters())
    assert pl.param_tensors(shape, scalar=True) == len(list(scalar.parameters()))
    peft_model = apply_lora(model, LoraConfig(r=8))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert pl.lora_params(shape, 8, LoraConfig().target_modules) == trainable


def test_qwen25_7b_shape_matches_the_published_checkpoint():
    # Qwen/Qwen2.5-7B-Instruct's model.safetensors.index.json: "total_size": 15231233024 bytes of bf16
    # weights = 7,615,616,512 parameters.
    shape = load_shape("qwen2.5-7b")
    assert pl.causal_params(shape) * 2 == 15231233024
    assert (
        shape.hidden,
        shape.layers,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.intermediate,
        shape.vocab,
        shape.tied,
        shape.qkv_bias,
    ) == (3584, 28, 28, 4, 128, 18944, 152064, False, True)


def test_a_model_directory_is_read_from_its_config_alone(tmp_path, capsys):
    model = build_tiny_model("medium", TOK, arch="qwen2")
    model.config.save_pretrained(tmp_path)  # config.json only: no weights on disk
    shape = load_shape(str(tmp_path))
    assert pl.causal_params(shape) == sum(p.numel() for p in model.parameters())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2}))
    assert main(["--model", str(tmp_path), "--recipe", "sft"]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().out


def test_adamw_state_is_two_moments_per_trainable_parameter_plus_steps():
    for lora in (0, 8):
        model = _model("small", lora=lora)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params)
        model(input_ids=torch.randint(10, 90, (2, 8))).logits.sum().backward()
        opt.step()
        shape = load_shape("small")
        est = pl.estimate(shape, pl.Plan(recipe="sft", lora_r=lora, device="cpu"))
        trainable = sum(p.numel() for p in params)
        assert optimizer_bytes(opt) == est.get("optimizer state") == 8 * trainable + 4 * len(params)
        assert est.get("gradients") == 4 * trainable


def test_fsdp_divides_the_static_parts_by_the_gpu_count():
    shape = load_shape("qwen2.5-1.5b")
    one = pl.estimate(shape, pl.Plan(recipe="sft", gpus=4, strategy="replicate", device="cuda"))
    four = pl.estimate(shape, pl.Plan(recipe="sft", gpus=4, strategy="fsdp", device="cuda"))
    for name in ("policy weights", "gradients"):
        assert four.get(name) == pytest.approx(one.get(name) / 4, abs=1)
    steps = 4 * pl.param_tensors(shape)  # every rank keeps a step counter for each of its shards
    assert four.get("optimizer state") - steps == pytest.approx((one.get("optimizer state") - steps) / 4, abs=1)
    assert four.get("activations") == one.get("activations")  # each GPU runs its own micro-batch
    offload = pl.estimate(shape, pl.Plan(recipe="sft", gpus=4, strategy="fsdp", offload=True, device="cuda"))
    assert offload.get("policy weights") == offload.get("optimizer state") == offload.get("gradients") == 0
    assert offload.host_bytes == pytest.approx(16 * pl.causal_params(shape) / 4, rel=1e-6)  # fp32 w + g + 2 moments


def _saved_bytes(fn, model) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``fn`` runs."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _batch(B=3, T=20, masked=True):
    ids = torch.randint(10, 90, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    if masked:
        attn[0, T // 2 :] = 0
    return ids, attn, torch.arange(T).expand(B, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("masked", [True, False])
def test_saved_activations_are_counted_byte_for_byte(dtype, lora, masked):
    model = _model("small", "qwen2", dtype, lora)
    base = model.get_base_model() if lora else model
    ids, attn, pos = _batch(masked=masked)
    got = _saved_bytes(lambda: base.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False), model)
    act = pl.Act(
        b=dtype.itemsize, full=not lora, targets=LoraConfig().target_modules if lora else (), lora_r=lora, masked=masked
    )
    assert pl.model_saved(load_shape("small"), *ids.shape, act, checkpointing=False) == got


def test_saved_activations_with_gradient_checkpointing():
    model = _model("small")
    model.gradient_checkpointing_enable()
    ids, attn, pos = _batch()
    got = _saved_bytes(
        lambda: model.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False), model
    )
    s, act = load_shape("small"), pl.Act(b=4, full=True)
    B, T = ids.shape
    # Checkpointed: each layer's input, the final norm, the ids. The planner also counts one layer
    # recomputed in backward, and RoPE's cos/sin, which the checkpoint holds as inputs (not saved tensors).
    assert pl.model_saved(s, B, T, act, True) - pl.layer_saved(s, B, T, act) - 2 * 4 * B * T * s.head_dim == got


def test_saved_bytes_of_the_three_heads():
    s = load_shape("small")
    model = _model("small")
    ids, attn, pos = _batch()
    B, T = ids.shape
    mask = torch.zeros(B, T)
    mask[:, 8:] = 1.0
    act = pl.Act(b=4, full=True)
    stack = pl.model_saved(s, B, T, act, False)
    targets = torch.roll(ids, -1, 1)
    chunked = _saved_bytes(lambda: completion_logps(model, ids, attn, pos, targets, mask), model)
    assert chunked == stack + pl.head_saved(s, B, T, int(mask.sum()), act, "chunked")
    full = _saved_bytes(lambda: token_logps(forward_logits(model, ids, attn, pos), targets), model)
    assert full == stack + pl.head_saved(s, B, T, 0, act, "full")
    critic = scalar_from_causal(model, TOK).train()
    scalar = _saved_bytes(lambda: token_values(critic, ids, attn, pos), critic)
    assert scalar == stack + pl.head_saved(s, B, T, 0, act, "scalar")


def test_kv_cache_bytes_equal_transformers_cache():
    model = _model("medium").eval()
    ids = torch.randint(10, 90, (5, 17))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    got = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert pl.kv_cache(load_shape("medium"), 5, 17, 4) == got


def _run(recipe, tmp_path, *overrides):
    from posttrain.recipes import grpo, ppo

    cls, mod = (GRPOConfig, grpo) if recipe == "grpo" else (PPOConfig, ppo)
    common = [
        "model.path=tiny",
        "model.device=cpu",
        "data.path=builtin:arithmetic",
        "data.num_examples=16",
        "prompts_per_step=2",
        "num_generations=2",
        "max_completion_length=4",
        "train.micro_batch_size=4",
        "train.steps=2",
        f"train.output_dir={tmp_path}",
        "train.progress=false",
        "samples_every=0",
    ]
    cfg = config_from_dict(cls, {}, [*common, *overrides])
    mod.train(cfg)
    return cfg, read_metrics(tmp_path)[-1]


@pytest.mark.parametrize(
    "recipe,overrides",
    [
        ("grpo", ("rewards=[toy_rewards:parity]", "beta=0.04")),
        ("grpo", ("rewards=[toy_rewards:parity]", "lora.r=4", "beta=0.04")),
        ("ppo", ("rewards=[{name: math}]", "beta=0.05", "ppo_epochs=1")),
    ],
)
def test_static_memory_of_real_runs_is_exact(tmp_path, recipe, overrides):
    cfg, m = _run(recipe, tmp_path, *overrides)
    plan = pl.Plan(recipe=recipe, lora_r=cfg.lora.r, beta=cfg.beta, device="cpu")
    est = pl.estimate(load_shape("tiny"), plan)
    held = pl.held_models(plan)
    assert m["memory/models_held"] == 1 + held["reference"] + held["critic"]  # no reward model: a verifier
    weights = est.get("policy weights") + est.get("reference weights") + est.get("critic weights")
    assert m["memory/weights_mb"] == pytest.approx(weights / MB, abs=1e-9)
    assert m["memory/grads_mb"] == pytest.approx((est.get("gradients") + est.get("critic gradients")) / MB, abs=1e-9)
    opt = est.get("optimizer state") + est.get("critic optimizer state")
    assert m["memory/optimizer_mb"] == pytest.approx(opt / MB, abs=1e-9)


def test_models_held_per_recipe():
    assert pl.held_models(pl.Plan(recipe="grpo", beta=0)) == {
        "reference": False,
        "critic": False,
        "reward model": False,
    }
    assert pl.held_models(pl.Plan(recipe="grpo", beta=0.04))["reference"]
    assert not pl.held_models(pl.Plan(recipe="grpo", beta=0.04, lora_r=16))["reference"]  # adapters off
    assert pl.held_models(pl.Plan(recipe="ppo", beta=0.05)) == {"reference": True, "critic": True, "reward model": True}
    assert not pl.held_models(pl.Plan(recipe="dpo"))["reference"]  # precompute_ref
    assert pl.held_models(pl.Plan(recipe="dpo", precompute_ref=False))["reference"]
    assert not pl.held_models(pl.Plan(recipe="simpo", precompute_ref=False))["reference"]


def test_parse_gpus():
    assert parse_gpus("2x24GB") == (2, 24 << 30)
    assert parse_gpus("80GiB") == (1, 80 << 30)
    with pytest.raises(pl.PlanError):
        parse_gpus("two cards")


def test_search_ranks_fitting_full_fine_tuning_first_then_by_cost():
    shape = load_shape("qwen2.5-0.5b")
    plan = pl.Plan(
        recipe="grpo",
        gpus=2,
        strategy="fsdp",
        mixed_precision="bf16",
        micro_batch=8,
        seq_len=1280,
        completion_len=1024,
        prompts_per_step=8,
        num_generations=8,
    )
    options = pl.search(shape, plan, capacity=24 << 30)
    fits = [o for o in options if o.fits]
    assert fits and all(o.estimate.peak <= 24 << 30 for o in fits)
    assert fits[0].plan.lora_r == 0  # a 0.5B full fine-tune fits in 24 GiB
    assert [o.cost for o in fits if o.plan.lora_r == 0] == sorted(o.cost for o in fits if o.plan.lora_r == 0)
    assert not any(o.fits for o in options[len(fits) :])
    # Halving the micro-batch never raises the peak of the train phase.
    small = dataclasses.replace(plan, micro_batch=4)
    assert pl.estimate(shape, small).phases["train"] < pl.estimate(shape, plan).phases["train"]


def test_7b_on_two_24gb_gpus_grpo_fits_ppo_does_not(capsys):
    """The README's worked example: on a machine with 64 GiB of RAM (no room to offload a 7B full fine-tune's
    state) GRPO fits with LoRA; PPO fits in no searched configuration, LoRA or not: its frozen reward model
    and the unsharded policy for the rollout alone fill a 24 GiB GPU."""
    common = [
        "--model",
        "qwen2.5-7b",
        "--gpus",
        "2x24GB",
        "--prompt-length",
        "256",
        "--max-completion-length",
        "1024",
        "--prompts-per-step",
        "8",
        "--num-generations",
        "8",
        "--micro-batch",
        "4",
        "--cpu-memory",
        "64",
    ]
    assert main([*common, "--recipe", "grpo"]) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning: nothing fits" in out and "with LoRA r=16 instead" in out
    assert main([*common, "--recipe", "ppo"]) == 1
    out = capsys.readouterr().out
    assert "full fine-tuning: nothing fits" in out and "with LoRA r=16: nothing fits either" in out
    # With the RAM for it, a full GRPO fine-tune fits by offloading to the CPU.
    assert (
        main([*common[:-2], "--recipe", "grpo", "--no-search", "--offload", "--strategy", "fsdp", "--micro-batch", "1"])
        == 0
    )
    assert "usable: fits" in capsys.readouterr().out


def test_json_output_carries_the_estimate_and_the_best_option(capsys):
    assert main(["--model", "small", "--recipe", "dpo", "--gpus", "1x1GB", "--reserve", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["hidden"] == 128 and out["plan"]["recipe"] == "dpo"
    assert out["estimate"]["peak"] == max(out["estimate"]["phases"].values())
    assert out["best"]["peak"] <= out["capacity_bytes"] == 1 << 30
